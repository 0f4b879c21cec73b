"""The cache interface every backend implements, one instance per upstream.

A backend stores three things:

- **content** by digest (blobs and manifests), committed only after the digest and size
  were verified, and made visible atomically: a half-written object is never readable;
- **tags**: the last known digest of each tag with the time it was checked (so the tag
  index survives a restart and can be served stale on a bad day);
- **links**: which repository may see which digest. A blob is served for a repository only
  if a manifest of that repository referenced it or its upstream confirmed it, so a private
  blob cached for one repository never leaks through another name.

Writers stream into a local spool file that readers may follow while it grows
(``BlobWriter.spool_path``); that is what makes streaming single-flight possible.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirrorrouter.errors import MirrorRouterError
from mirrorrouter.reference import Digest


class DigestMismatch(MirrorRouterError):
    """Content did not hash to the digest it was fetched for (or had the wrong size)."""


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag pointed to when it was last checked upstream."""

    digest: Digest
    media_type: str
    size: int
    checked_at: float  # wall-clock seconds of the last upstream confirmation


class Claim(Protocol):
    """The right to download one blob into a shared cache."""

    def release(self) -> None: ...


class BlobWriter(Protocol):
    """A blob being written: chunks in, then ``commit`` (verified, atomic) or ``abort``."""

    @property
    def spool_path(self) -> Path:
        """A local file holding the bytes written so far; readers may follow it."""
        ...

    @property
    def written(self) -> int:
        """Bytes already in the spool file: what followers may read."""
        ...

    async def write(self, chunk: bytes) -> None:
        """Queue a chunk; it may reach the spool file after this returns (see ``written``)."""
        ...

    async def flush(self) -> None:
        """Wait until every chunk written so far is in the spool file."""
        ...

    async def commit(self) -> Path:
        """Verify digest (and size when known), make the blob visible; return where it is."""
        ...

    async def abort(self) -> None: ...


class CacheBackend(Protocol):
    """Per-upstream storage of verified content, tags and repository links."""

    async def open(self) -> None:
        """Prepare storage and sweep leftovers of interrupted writes."""
        ...

    async def close(self) -> None:
        """Release what ``open()`` took; writes in progress must be aborted first."""
        ...

    # -- blobs
    async def blob_size(self, digest: Digest) -> int | None: ...

    def blob_path(self, digest: Digest) -> Path | None:
        """A local file with the committed blob, when the backend keeps one."""
        ...

    def read_blob(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]: ...

    def blob_writer(
        self,
        digest: Digest,
        expected_size: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> BlobWriter:
        """A writer for ``digest``; ``on_written(total)`` is called on the event loop each
        time more bytes are in the spool file."""
        ...

    def try_claim(self, digest: Digest) -> Claim | None:
        """Claim the download of ``digest`` among every process sharing this cache; None
        while another holds it. A claim ends when released or when its holder dies."""
        ...

    # -- manifests
    async def get_manifest(self, digest: Digest) -> StoredManifest | None: ...

    async def put_manifest(self, manifest: StoredManifest) -> None: ...

    # -- tags
    async def get_tag(self, repository: str, tag: str) -> TagRecord | None: ...

    async def put_tag(self, repository: str, tag: str, record: TagRecord) -> None: ...

    # -- links
    async def is_linked(self, repository: str, digest: Digest) -> bool: ...

    async def link(self, repository: str, digests: list[Digest]) -> None: ...
