"""Errors: the OCI error-code table and the exceptions that carry them.

Exception tree::

    MirrorRouterError
    ├── RegistryError      an answer for the client: OCI code, HTTP status, detail.
    │                      Raised where the fact is known, rendered by ONE handler in app.py.
    └── UpstreamError      an upstream mirror failed; ``is_temporary`` says whether
        │                  retrying or failing over can help.
        └── NoHeadersInTime  no response headers within ``first_byte_timeout``: the
                           mirror hangs or drowns, so the next one is asked at once
                           (never this one again within the request).

Config errors live in config/ (ConfigError) because they never reach HTTP. A bad name, tag
or digest raises ``reference.InvalidReference`` (a ValueError: the grammar knows nothing of
HTTP); ``reference_error`` is the one place it becomes the client's error.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from mirrorrouter.reference import InvalidReference


class ErrorCode(enum.Enum):
    """OCI distribution error codes with the HTTP status each is answered with."""

    BLOB_UNKNOWN = (404, "blob unknown to registry")
    BLOB_UPLOAD_INVALID = (400, "blob upload invalid")
    BLOB_UPLOAD_UNKNOWN = (404, "blob upload unknown to registry")
    DIGEST_INVALID = (400, "provided digest did not match uploaded content")
    MANIFEST_BLOB_UNKNOWN = (400, "manifest references a manifest or blob unknown to registry")
    MANIFEST_INVALID = (400, "manifest invalid")
    MANIFEST_UNKNOWN = (404, "manifest unknown to registry")
    NAME_INVALID = (400, "invalid repository name")
    NAME_UNKNOWN = (404, "repository name not known to registry")
    SIZE_INVALID = (400, "provided length did not match content length")
    UNAUTHORIZED = (401, "authentication required")
    DENIED = (403, "requested access to the resource is denied")
    UNSUPPORTED = (405, "the operation is unsupported")
    TOOMANYREQUESTS = (429, "too many requests")
    RANGE_INVALID = (416, "requested range not satisfiable")
    UNAVAILABLE = (503, "upstream registry unavailable")
    NOT_FOUND = (404, "no such endpoint")
    METHOD_NOT_ALLOWED = (405, "method not allowed on this endpoint")
    UNKNOWN = (500, "unknown error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def default_message(self) -> str:
        return self.value[1]


class MirrorRouterError(Exception):
    """Base of every mirrorrouter exception."""


class RegistryError(MirrorRouterError):
    """An error answered to the client as the OCI JSON envelope."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        detail: Any = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.default_message
        self.detail = detail
        self.status = status or code.status
        self.headers = dict(headers or {})
        super().__init__(f"{code.name}: {self.message}")

    def with_context(self, route: str, headers: dict[str, str]) -> RegistryError:
        """A copy that also says which route was taken (errors may be shared and cached)."""
        if isinstance(self.detail, dict):
            detail: Any = {"route": route, **self.detail}
        else:
            detail = {"route": route} if self.detail is None else self.detail
        return RegistryError(
            self.code,
            self.message,
            detail=detail,
            status=self.status,
            headers={**headers, **self.headers},
        )

    def envelope(self) -> dict[str, Any]:
        """The ``{"errors": [...]}`` body."""
        item: dict[str, Any] = {"code": self.wire_code, "message": self.message}
        if self.detail is not None:
            item["detail"] = self.detail
        return {"errors": [item]}

    @property
    def wire_code(self) -> str:
        # NOT_FOUND, METHOD_NOT_ALLOWED and RANGE_INVALID are ours, not the spec's; on the
        # wire they use the spec's closest codes so that strict clients parse them.
        return {
            ErrorCode.NOT_FOUND: "NAME_UNKNOWN",
            ErrorCode.METHOD_NOT_ALLOWED: "UNSUPPORTED",
            ErrorCode.RANGE_INVALID: "BLOB_UNKNOWN",
        }.get(self.code, self.code.name)

    def body(self) -> bytes:
        return json.dumps(self.envelope(), separators=(",", ":")).encode()


class UpstreamError(MirrorRouterError):
    """A failure talking to one upstream mirror."""

    def __init__(
        self,
        message: str,
        *,
        mirror: str,
        status: int | None = None,
        is_temporary: bool,
        retry_after: float | None = None,
    ) -> None:
        self.mirror = mirror
        self.outcome = message
        self.status = status
        self.is_temporary = is_temporary
        self.retry_after = retry_after
        super().__init__(f"{mirror}: {message}")

    @property
    def is_not_found(self) -> bool:
        """401, 403 and 404: a healthy mirror's answer that it has nothing to give."""
        return self.status in (401, 403, 404)


class NoHeadersInTime(UpstreamError):
    """A mirror gave no response headers in time: temporary, but not worth asking again."""

    def __init__(self, message: str, *, mirror: str) -> None:
        super().__init__(message, mirror=mirror, is_temporary=True)


def reference_error(code: ErrorCode, exc: InvalidReference, *, why: str = "") -> RegistryError:
    """The one translation of a bad name, tag or digest into the client's error: ``code``
    with the message of ``exc`` (and ``why`` after it). Raised ``from exc`` where the parse
    failed; the parse itself stays a plain call, which costs nothing on the hot path."""
    return RegistryError(code, f"{exc}{why}")
