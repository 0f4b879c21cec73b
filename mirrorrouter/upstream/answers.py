"""Reading an upstream's answers: what a failure means (temporary, not found, final), what
each mirror answered (``Attempts``, the client's error when all failed), and the facts in
headers and bodies (digest, size, ``Retry-After``). client.py and failover.py ask."""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import httpx

from mirrorrouter.config import Mirror, redact_url
from mirrorrouter.errors import ErrorCode, RegistryError, UpstreamError
from mirrorrouter.oci import CONTENT_DIGEST_HEADER
from mirrorrouter.reference import Digest, InvalidReference
from mirrorrouter.upstream.bodies import drain
from mirrorrouter.upstream.retry import TEMPORARY_CODES, TEMPORARY_STATUSES
from mirrorrouter.upstream.sending import from_elsewhere, shown

_REASONS = {401: "unauthorized", 403: "denied", 404: "not found", 429: "too many requests"}


@dataclass(slots=True)
class Attempts:
    """What each mirror answered; turns into the client's error when all failed."""

    upstream: str
    tried: list[dict[str, str]] = field(default_factory=list)
    retry_after: float | None = None
    only_not_found: bool = True
    throttled: bool = False

    def add(self, mirror: Mirror, outcome: str, status: int | None = None) -> None:
        self.tried.append({"mirror": mirror.name, "result": outcome})
        if status not in (401, 403, 404):
            self.only_not_found = False
        if status == 429:
            self.throttled = True

    def error(self, not_found: ErrorCode, what: str) -> RegistryError:
        detail: dict[str, Any] = {"upstream": self.upstream, "tried": self.tried}
        if not self.tried:
            return RegistryError(
                ErrorCode.UNAVAILABLE,
                f"no mirror of {self.upstream} may serve {what}",
                detail=detail,
            )
        if self.only_not_found:
            return RegistryError(not_found, f"{what} not found upstream", detail=detail)
        if self.throttled:
            headers = {"Retry-After": str(math.ceil(self.retry_after or 60))}
            return RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                f"{self.upstream} is rate-limiting this mirror",
                detail=detail,
                headers=headers,
            )
        return RegistryError(
            ErrorCode.UNAVAILABLE, f"no mirror of {self.upstream} could serve {what}", detail=detail
        )


async def failure(mirror: Mirror, response: httpx.Response) -> UpstreamError:
    """Classify a non-success answer: temporary (retry, fail over), not found, or final.

    Only the mirror's own origin says "not found": an answer from where it redirected to
    (a CDN or bucket: an expired signed URL's 403, its own 401 challenge, a 404, a 5xx) is
    that target's failure, and temporary, since asking the registry again gets a fresh URL.
    The body is read within ``ERROR_BODY_LIMIT`` (for its error code), then closed.
    """
    status = response.status_code
    body = await drain(response)
    retry_after = retry_after_seconds(response.headers.get("retry-after"))
    retry_after = retry_after if status in (429, 503) else None
    if from_elsewhere(response, mirror.url):
        return UpstreamError(
            f"redirect target {shown(response.url)} answered HTTP {status}",
            mirror=mirror.name,
            is_temporary=True,
            retry_after=retry_after,
        )
    temporary = status in TEMPORARY_STATUSES
    if not temporary and status >= 400 and status not in (401, 403, 404):
        temporary = _error_code(body) in TEMPORARY_CODES
    return UpstreamError(
        f"HTTP {status} {_REASONS.get(status, '')}".rstrip(),
        mirror=mirror.name,
        status=status,
        is_temporary=temporary,
        retry_after=retry_after,
    )


def final(mirror: Mirror, message: str) -> UpstreamError:
    return UpstreamError(message, mirror=mirror.name, is_temporary=False)


def _error_code(body: bytes) -> str | None:
    try:
        errors = json.loads(body).get("errors") or []
        return str(errors[0].get("code")) if errors else None
    except (ValueError, AttributeError, LookupError, TypeError):
        return None


def describe(exc: httpx.HTTPError) -> str:
    """What went wrong, for logs and error details: a proxy's credentials never show."""
    kind = type(exc).__name__
    return redact_url(f"{kind}: {exc}") if str(exc) else kind


def content_type_of(value: str | None) -> str | None:
    return value.split(";", 1)[0].strip().lower() if value else None


def header_digest(headers: httpx.Headers) -> Digest | None:
    value = headers.get(CONTENT_DIGEST_HEADER)
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except InvalidReference:
        return None


def blob_size_from_headers(response: httpx.Response, offset: int) -> int | None:
    """The whole blob's size: a 200's Content-Length, a 206's (from ``offset``) Content-Range."""
    if offset:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None


# Longer asks are taken as a day (and never waited for: retry.py fails over past its cap).
RETRY_AFTER_CAP = 86400.0
_DELTA_SECONDS_RE = re.compile(r"[0-9]+")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date, at most a day.

    An upstream may send anything here: a 400-digit number is a day (not an overflow), a
    date in the past is 0, garbage is None (as if there were no header).
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS_RE.fullmatch(value):
        return min(float(value) if len(value) <= 9 else RETRY_AFTER_CAP, RETRY_AFTER_CAP)
    try:
        moment = email.utils.parsedate_to_datetime(value)
        if moment.tzinfo is None:  # "-0000": UTC, says RFC 5322
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_CAP)
