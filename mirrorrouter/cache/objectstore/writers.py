"""The local writers of the object-store cache: spool files on this replica's disk that
become something else once verified (see ``SpoolWriter``).

- ``ObjectBlobWriter``: a download, streamed into a spool file (followers read it while it
  grows); its commit hands the verified file to the cache, which uploads it and keeps it
  as a local copy.
- ``CopyWriter``: a blob read from the bucket, kept as a local copy once verified (nothing
  is uploaded: the object is where it came from).
- ``WarmCopy``: the tee of one whole read from the bucket into a ``CopyWriter``, so the
  next client of this replica reads the blob from disk; best effort, never slowing the read.

They are given what they use (the shared state, a spool path, the local copies, the
cache's publish and background hooks), not the cache, so the cache builds them and
nothing here imports it back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path

from obstore.exceptions import BaseError as StoreError

from mirrorrouter.cache.base import CacheUnavailable, DigestMismatch
from mirrorrouter.cache.copies import LocalCopies
from mirrorrouter.cache.spool import IN_FLIGHT, SharedState, SpoolWriter
from mirrorrouter.reference import Digest

log = logging.getLogger("mirrorrouter.cache.s3")


class ObjectBlobWriter(SpoolWriter):
    """Spools a blob locally (see ``SpoolWriter``); commit verifies it, uploads it, and keeps
    the spool file as a local copy (``publish``: the cache's upload and keep)."""

    def __init__(
        self,
        shared: SharedState,
        path: Path,
        digest: Digest,
        expected_size: int | None,
        on_written: Callable[[int], None] | None,
        publish: Callable[[Path, Digest, int], Awaitable[Path]],
        where: str,
    ) -> None:
        super().__init__(shared, path, digest, expected_size, on_written)
        self._publish_blob = publish
        self._where = where

    async def _publish(self) -> Path:
        try:
            return await self._publish_blob(self._path, self._digest, self._written)
        except StoreError as exc:
            raise CacheUnavailable(f"object store {self._where}: {exc}") from exc


class CopyWriter(SpoolWriter):
    """Spools a blob read from the bucket; commit verifies it and keeps it as a local copy
    (nothing is uploaded: the object is where it came from)."""

    def __init__(
        self, shared: SharedState, path: Path, digest: Digest, size: int, copies: LocalCopies
    ) -> None:
        super().__init__(shared, path, digest, size, None)
        self._copies = copies

    async def _publish(self) -> Path:
        return self._copies.keep(self._path, self._digest, self._written)


class WarmCopy:
    """The bytes of one whole read from the bucket, teed into a local copy (verified like
    a download) that the next client of this replica reads from disk. Best effort: it
    never slows the read nor fails it. A copy that falls ``IN_FLIGHT`` chunks behind (the
    disk slower than the store and the client: measured here, a local disk at 0.4 GB/s
    under a 1.2 GB/s bucket read slowed the read to 0.2 GB/s when it waited) is dropped,
    as is one whose write fails."""

    def __init__(
        self,
        writer: CopyWriter,
        size: int,
        warming: set[Digest],
        in_background: Callable[[Coroutine[object, object, None]], object],
    ) -> None:
        self.writer: CopyWriter | None = writer
        self.digest = writer._digest
        self.size = size
        self.seen = 0
        self._warming = warming  # the blobs being kept in this process: one copy at a time
        self._in_background = in_background  # the cache's: ``close()`` waits for the task
        self._warming.add(self.digest)

    async def write(self, chunk: bytes) -> None:
        if self.writer is None:
            return
        if self.writer.backlog >= IN_FLIGHT:
            log.debug("no local copy of %s: the disk falls behind the read", self.digest)
            await self.finish()
            return
        try:
            await self.writer.write(chunk)  # below IN_FLIGHT queued: it does not wait
            self.seen += len(chunk)
        except OSError as exc:
            log.info("no local copy of %s: %s", self.digest, exc)
            await self.finish()

    async def finish(self) -> None:
        """Keep the copy when the whole blob went by (verified first: the wait is for at
        most ``IN_FLIGHT`` chunks still queued), else drop it in the background (its
        queued writes may be stuck on the disk; the read goes on without them)."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        if self.seen == self.size:
            await self._settle(writer.commit())  # a copy that does not hash is not kept
        else:
            self._in_background(self._settle(writer.abort()))

    async def _settle(self, ending: Awaitable[object]) -> None:
        try:
            await ending
        except (DigestMismatch, OSError) as exc:
            log.info("no local copy of %s: %s", self.digest, exc)
        finally:
            self._warming.discard(self.digest)
