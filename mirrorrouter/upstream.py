"""``UpstreamClient``: talks to one upstream registry through its ordered mirror list.

One client per upstream, each with its own ``httpx.AsyncClient``: its own credentials
(``auth.RegistryAuth``), timeouts and proxy. Mirrors are tried in their configured order;
a mirror that fails is skipped for the next, and every answer is kept in ``Attempts`` so
that the final error can say what was tried.

Trust split: tags are resolved only by mirrors with the ``resolve`` capability; content by
digest (manifests and blobs) comes from mirrors with ``pull`` and is always verified.

An upstream 401 or 403 never reaches the client as such (the client would then try to log
in to the mirror): Docker Hub answers 401 for a repository that does not exist under an
anonymous token, so both count as "not found at this mirror", and the detail says why.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from mirrorrouter.auth import RegistryAuth
from mirrorrouter.config import Capability, Mirror, UpstreamSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.oci import (
    CONTENT_DIGEST_HEADER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from mirrorrouter.reference import Digest, ImageReference, ReferenceError

BLOB_CHUNK = 1024 * 1024
_ACCEPT = ", ".join(MANIFEST_ACCEPT)
_NOT_FOUND = frozenset({401, 403, 404})


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    digest: Digest
    media_type: str
    data: bytes
    mirror: str


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest | None
    media_type: str
    mirror: str


@dataclass(slots=True)
class BlobStream:
    """An open upstream blob response; ``chunks()`` yields about 1 MiB at a time."""

    response: httpx.Response
    size: int | None  # of the whole blob, when the upstream said
    offset: int
    mirror: str

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.aiter_bytes(BLOB_CHUNK)


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
        if status not in _NOT_FOUND:
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
            headers = {"Retry-After": str(int(self.retry_after or 60))}
            return RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                f"{self.upstream} is rate-limiting this mirror",
                detail=detail,
                headers=headers,
            )
        return RegistryError(
            ErrorCode.UNAVAILABLE, f"no mirror of {self.upstream} could serve {what}", detail=detail
        )


class UpstreamClient:
    """Manifests, blobs, tags and referrers from one upstream, with mirror failover."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.auth = RegistryAuth(settings.credentials)
        self.http = httpx.AsyncClient(
            auth=self.auth,
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=settings.read_timeout,
                write=settings.read_timeout,
                pool=settings.connect_timeout,
            ),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32),
            proxy=settings.proxy,
            follow_redirects=True,  # CDN redirects; httpx drops Authorization across hosts
            transport=transport,
            headers={"User-Agent": "mirrorrouter"},
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def mirrors(self, capability: Capability) -> list[Mirror]:
        return [m for m in self.settings.mirrors if capability in m.capabilities]

    @staticmethod
    def url(mirror: Mirror, repository: str, suffix: str) -> str:
        return f"{mirror.url}/v2/{repository}/{suffix}"

    # ------------------------------------------------------------------ manifests

    async def fetch_manifest(self, ref: ImageReference) -> FetchedManifest:
        """GET a manifest: by tag from resolve mirrors, by digest from pull mirrors."""
        capability = Capability.PULL if ref.digest else Capability.RESOLVE
        attempts = Attempts(self.name)
        for mirror in self.mirrors(capability):
            try:
                fetched = await self._get_manifest(mirror, ref, attempts)
            except httpx.HTTPError as exc:
                attempts.add(mirror, _describe(exc))
                continue
            if fetched is not None:
                return fetched
        raise attempts.error(ErrorCode.MANIFEST_UNKNOWN, f"manifest {ref}")

    async def _get_manifest(
        self, mirror: Mirror, ref: ImageReference, attempts: Attempts
    ) -> FetchedManifest | None:
        url = self.url(mirror, ref.repository, f"manifests/{ref.reference}")
        async with self.http.stream("GET", url, headers={"Accept": _ACCEPT}) as response:
            if response.status_code != 200:
                self._record_failure(attempts, mirror, response)
                return None
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_MANIFEST_BYTES:
                attempts.add(mirror, f"manifest of {declared} bytes is over the 4 MiB limit")
                return None
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    attempts.add(mirror, "manifest is over the 4 MiB limit")
                    return None
        body = bytes(data)
        algorithm = ref.digest.algorithm if ref.digest else "sha256"
        digest = Digest.of(body, algorithm)
        expected = ref.digest or _header_digest(response.headers)
        if expected is not None and expected.algorithm == algorithm and expected != digest:
            attempts.add(mirror, f"content hashed to {digest}, not {expected}: corrupt")
            return None
        media_type = manifest_media_type(response.headers.get("content-type"), body)
        if media_type is None:
            attempts.add(mirror, "answer is not a manifest")
            return None
        return FetchedManifest(digest, media_type, body, mirror.name)

    async def head_manifest(self, ref: ImageReference) -> ManifestHead:
        """HEAD a tag on the resolve mirrors (Docker Hub does not count HEADs against quota)."""
        attempts = Attempts(self.name)
        for mirror in self.mirrors(Capability.RESOLVE):
            url = self.url(mirror, ref.repository, f"manifests/{ref.reference}")
            try:
                response = await self.http.head(url, headers={"Accept": _ACCEPT})
            except httpx.HTTPError as exc:
                attempts.add(mirror, _describe(exc))
                continue
            if response.status_code == 200:
                media_type = _content_type(response.headers.get("content-type")) or ""
                return ManifestHead(_header_digest(response.headers), media_type, mirror.name)
            self._record_failure(attempts, mirror, response)
        raise attempts.error(ErrorCode.MANIFEST_UNKNOWN, f"manifest {ref}")

    # ------------------------------------------------------------------ blobs

    @asynccontextmanager
    async def open_blob(
        self, repository: str, digest: Digest, offset: int = 0
    ) -> AsyncIterator[BlobStream]:
        """Open a blob stream on the first pull mirror that has it (from ``offset``)."""
        attempts = Attempts(self.name)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        for mirror in self.mirrors(Capability.PULL):
            url = self.url(mirror, repository, f"blobs/{digest}")
            try:
                response = await self.http.send(
                    self.http.build_request("GET", url, headers=headers), stream=True
                )
            except httpx.HTTPError as exc:
                attempts.add(mirror, _describe(exc))
                continue
            expected_status = 206 if offset else 200
            if response.status_code != expected_status:
                await response.aclose()
                self._record_failure(attempts, mirror, response)
                continue
            try:
                yield BlobStream(response, _blob_size(response, offset), offset, mirror.name)
            finally:
                await response.aclose()
            return
        raise attempts.error(ErrorCode.BLOB_UNKNOWN, f"blob {digest}")

    async def blob_exists(self, repository: str, digest: Digest) -> bool:
        """Whether a pull mirror confirms the blob in this repository."""
        for mirror in self.mirrors(Capability.PULL):
            url = self.url(mirror, repository, f"blobs/{digest}")
            try:
                response = await self.http.head(url)
                if response.status_code == 404:
                    # An upstream that is itself a proxy may 404 a HEAD until a GET fetched
                    # the blob: probe with a one-byte GET.
                    response = await self.http.get(url, headers={"Range": "bytes=0-0"})
            except httpx.HTTPError:
                continue
            if response.status_code in (200, 206):
                return True
        return False

    # ------------------------------------------------------------------ tags, referrers

    async def get_tags(self, repository: str, query: Mapping[str, str]) -> httpx.Response:
        """The tag list page from the first resolve mirror that answers 200 (body read)."""
        attempts = Attempts(self.name)
        for mirror in self.mirrors(Capability.RESOLVE):
            try:
                response = await self.http.get(
                    self.url(mirror, repository, "tags/list"), params=dict(query)
                )
            except httpx.HTTPError as exc:
                attempts.add(mirror, _describe(exc))
                continue
            if response.status_code == 200:
                return response
            self._record_failure(attempts, mirror, response)
        raise attempts.error(ErrorCode.NAME_UNKNOWN, f"repository {repository}")

    async def get_referrers(
        self, repository: str, digest: Digest, artifact_type: str | None
    ) -> httpx.Response | None:
        """The upstream's referrers answer; None when no mirror has the referrers API."""
        attempts = Attempts(self.name)
        params = {"artifactType": artifact_type} if artifact_type else {}
        for mirror in self.mirrors(Capability.RESOLVE):
            try:
                response = await self.http.get(
                    self.url(mirror, repository, f"referrers/{digest}"), params=params
                )
            except httpx.HTTPError as exc:
                attempts.add(mirror, _describe(exc))
                continue
            if response.status_code == 200:
                return response
            if response.status_code in (404, 405, 501):
                return None  # no referrers API here: the tag schema is the fallback
            self._record_failure(attempts, mirror, response)
        raise attempts.error(ErrorCode.NAME_UNKNOWN, f"referrers of {digest}")

    # ------------------------------------------------------------------ helpers

    def _record_failure(self, attempts: Attempts, mirror: Mirror, response: httpx.Response) -> None:
        status = response.status_code
        reason = {401: "unauthorized", 403: "denied", 404: "not found", 429: "too many requests"}
        attempts.add(mirror, f"HTTP {status} {reason.get(status, '')}".rstrip(), status)
        if status == 429:
            attempts.retry_after = retry_after_seconds(response.headers.get("retry-after"))


def _describe(exc: httpx.HTTPError) -> str:
    kind = type(exc).__name__
    return f"{kind}: {exc}" if str(exc) else kind


def _content_type(value: str | None) -> str | None:
    return value.split(";", 1)[0].strip().lower() if value else None


def _header_digest(headers: httpx.Headers) -> Digest | None:
    value = headers.get(CONTENT_DIGEST_HEADER)
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except ReferenceError:
        return None


_MANIFEST_TYPES = frozenset(
    {
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)


def manifest_media_type(content_type: str | None, body: bytes) -> str | None:
    """The media type of a manifest: its Content-Type, else its ``mediaType`` field, else
    its shape (umoci writes OCI manifests without the optional ``mediaType``)."""
    declared = _content_type(content_type)
    if declared in _MANIFEST_TYPES:
        return declared
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    field_type = document.get("mediaType")
    if isinstance(field_type, str) and field_type:
        return field_type
    if "manifests" in document:
        return OCI_INDEX
    if "config" in document and "layers" in document:
        return OCI_MANIFEST
    return declared if declared and declared.startswith("application/vnd.") else None


def _blob_size(response: httpx.Response, offset: int) -> int | None:
    if offset:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, moment - (time.time() if now is None else now))
