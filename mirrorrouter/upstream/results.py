"""What ``UpstreamClient`` hands back: a manifest fetched (``FetchedManifest``), a tag's
HEAD (``ManifestHead``), a tag list page or referrers index (``ListAnswer``) and an open
blob stream (``BlobStream``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from mirrorrouter.errors import UpstreamError
from mirrorrouter.reference import Digest
from mirrorrouter.upstream.answers import describe
from mirrorrouter.upstream.bodies import raw_chunks
from mirrorrouter.upstream.breaker import CircuitBreaker

BLOB_CHUNK = 1024 * 1024


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


@dataclass(frozen=True, slots=True)
class ListAnswer:
    """A tag list page or a referrers index: JSON, read within ``max_list_bytes``, checked
    to be the object it should be; the client gets these bytes."""

    data: bytes
    headers: httpx.Headers


@dataclass(slots=True)
class BlobStream:
    """An open upstream blob response; ``chunks()`` yields about 1 MiB at a time.

    A failure mid-body raises a temporary ``UpstreamError`` and counts against the mirror.
    Bytes are taken as sent (``aiter_raw``): a digest is over the stored bytes, and a
    Content-Encoding is never decoded (it could inflate without bound).
    """

    response: httpx.Response
    size: int | None  # of the whole blob, when the upstream said
    offset: int
    mirror: str
    breaker: CircuitBreaker
    skip: int = 0  # bytes to drop: the upstream ignored Range and sent the whole blob

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces of about 1 MiB: the transport delivers ~64 KiB reads, and each
        piece costs the writer a thread hop, while one join costs a memcpy."""
        skip = self.skip
        parts: list[bytes] = []
        pending = 0
        failure: UpstreamError | None = None
        try:
            async for chunk in raw_chunks(self.response):
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                    if not chunk:
                        continue
                parts.append(chunk)
                pending += len(chunk)
                if pending >= BLOB_CHUNK:
                    yield b"".join(parts)
                    parts, pending = [], 0
        except httpx.HTTPError as exc:
            self.breaker.failure()
            failure = UpstreamError(describe(exc), mirror=self.mirror, is_temporary=True)
            failure.__cause__ = exc
        if parts:  # also what arrived before a failure: a resume continues after it
            yield b"".join(parts)
        if failure is not None:
            raise failure
