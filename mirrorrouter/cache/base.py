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

For bounded caches (see mirrorrouter/cache/eviction.py) a backend also keeps:

- **last access** of each blob and manifest: ``touch`` records one in memory (the hot
  path may call it on every hit; it does no I/O), reads from storage record their own, and
  the backend persists them cheaply (at most once per ``ACCESS_RESOLUTION`` per object,
  and on ``flush_access``);
- **what is in use**: a blob being read (``read_blob``), written (``blob_writer``) or held
  (``hold``) is never removed by ``remove``;
- an **inventory** of everything stored, and ``remove`` to evict a set of objects together.

``inventory``, ``peek_manifest``, ``remove`` and ``flush_access`` work without ``open()``
(an operator command inspects a cache without taking part in it); storage that does not
exist is an empty cache.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mirrorrouter.errors import MirrorRouterError
from mirrorrouter.reference import Digest

# Opens a committed blob's local file for zero-copy sending (``CacheBackend.open_blob``).
BlobFile = Callable[[], AbstractAsyncContextManager[int | None]]


class DigestMismatch(MirrorRouterError):
    """Content did not hash to the digest it was fetched for (or had the wrong size)."""


class CacheUnavailable(MirrorRouterError):
    """The cache's storage could not be reached or refused us (an object store that is
    down, wrong credentials). Clients get a 503 and retry; nothing is lost or corrupted."""


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


def encode_manifest(manifest: StoredManifest) -> bytes:
    """A manifest as every backend stores it: ``<media type>\n`` then the exact bytes;
    refused when the bytes do not hash to its digest."""
    if Digest.of(manifest.data, manifest.digest.algorithm) != manifest.digest:
        raise DigestMismatch(f"manifest bytes do not hash to {manifest.digest}")
    return manifest.media_type.encode() + b"\n" + manifest.data


def decode_manifest(digest: Digest, raw: bytes) -> StoredManifest:
    media_type, _, data = raw.partition(b"\n")
    return StoredManifest(digest, media_type.decode(), data)


def encode_tag_record(record: TagRecord) -> bytes:
    """A tag record as stored (JSON; the object-store backend stores the same)."""
    return json.dumps(
        {
            "digest": str(record.digest),
            "media_type": record.media_type,
            "size": record.size,
            "checked_at": record.checked_at,
        }
    ).encode()


def parse_tag_record(raw: bytes) -> TagRecord | None:
    """A stored tag record; None when unreadable (a miss, never an error)."""
    try:
        data = json.loads(raw)
        return TagRecord(
            Digest.parse(data["digest"]), data["media_type"], data["size"], data["checked_at"]
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


ACCESS_RESOLUTION = 60.0  # seconds: an object's last access is persisted at most this often


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A committed blob or manifest as the inventory sees it."""

    digest: Digest
    size: int  # bytes it takes in storage
    accessed: float  # wall-clock seconds of its last recorded access


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything one cache holds, for eviction and the operator commands."""

    blobs: Mapping[Digest, StoredObject] = field(default_factory=dict)
    manifests: Mapping[Digest, StoredObject] = field(default_factory=dict)
    tags: Mapping[tuple[str, str], TagRecord] = field(default_factory=dict)
    links: Mapping[str, frozenset[Digest]] = field(default_factory=dict)  # repository -> digests
    in_flight: int = 0  # bytes of writes in progress (their announced size when known)

    @property
    def stored_bytes(self) -> int:
        return sum(o.size for o in self.blobs.values()) + sum(
            o.size for o in self.manifests.values()
        )


@dataclass(frozen=True, slots=True)
class Removal:
    """Objects to evict together: all of them, or (when one is in use) none."""

    digests: frozenset[Digest]  # blobs and manifests
    tags: tuple[tuple[str, str], ...] = ()  # tag records, dropped if they still name one
    links: tuple[tuple[str, Digest], ...] = ()  # (repository, digest) links to drop


@dataclass(frozen=True, slots=True)
class Removed:
    removed: frozenset[Digest]  # what was deleted (those of ``digests`` that existed)
    freed: int  # bytes
    in_use: frozenset[Digest] = frozenset()  # not empty: nothing was removed because of these


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

    def open_blob(self, digest: Digest) -> AbstractAsyncContextManager[int | None]:
        """The committed blob as a read-only local file descriptor for the ``async with``
        block (what zero-copy sending hands to ``sendfile``), counted as a read the way
        ``read_blob`` counts one (in use, its access recorded); None when the backend keeps
        no local file of it (then ``read_blob`` reads it). Raises ``FileNotFoundError``
        when the blob is gone."""
        ...

    def blob_writer(
        self,
        digest: Digest,
        expected_size: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> BlobWriter:
        """A writer for ``digest``; ``on_written(total)`` is called on the event loop each
        time more bytes are in the spool file."""
        ...

    async def presigned_url(self, digest: Digest, expires: float) -> str | None:
        """A URL at which clients may fetch a committed blob themselves for ``expires``
        seconds (object storage configured for redirects); None: serve it through us."""
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

    async def list_tags(self, repository: str) -> list[str]:
        """The tags recorded for a repository, sorted; empty for an unknown repository."""
        ...

    async def delete_tag(self, repository: str, tag: str) -> bool:
        """Forget a tag record whatever it names; whether there was one."""
        ...

    # -- links
    async def is_linked(self, repository: str, digest: Digest) -> bool: ...

    async def link(self, repository: str, digests: list[Digest]) -> None: ...

    async def linked(self, repository: str) -> frozenset[Digest]:
        """Every digest linked to one repository (hosted referrers, deletes)."""
        ...

    # -- bounds: access times, in-use, inventory, removal (see the module docstring)
    def touch(self, digest: Digest) -> None:
        """Record an access to a blob or manifest, in memory only (no I/O)."""
        ...

    async def flush_access(self) -> None:
        """Persist the accesses recorded in memory and not yet stored."""
        ...

    def hold(self, digest: Digest) -> AbstractContextManager[None]:
        """Mark a blob in use for the ``with`` block (a reader following a download)."""
        ...

    def in_use(self, digest: Digest) -> bool:
        """Whether a blob is being read, written or held (by any process, where the backend
        can tell)."""
        ...

    async def inventory(self) -> Inventory: ...

    async def peek_manifest(self, digest: Digest) -> StoredManifest | None:
        """``get_manifest`` without recording an access."""
        ...

    async def remove(self, removal: Removal) -> Removed:
        """Delete a set of objects, and the tag records and links that go with them; nothing
        when any of its blobs is in use."""
        ...
