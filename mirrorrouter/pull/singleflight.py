"""Streaming single-flight: one upstream download per blob, followed by every reader.

A ``BlobFill`` is one download of one blob into a spool file. Its task runs on its own
(owned by the app's lifespan, never by a response): the first client leaving does not stop
it, and its digest check and commit always run. Readers stream from the spool file as the
bytes land, not after the download completes.

The last byte is held back from readers until the digest is verified: a reader can never
receive a whole, wrong blob. When verification fails, every reader gets an error (its
response is cut short) and nothing is committed.

Small blobs (up to the upstream's ``verify_before_send``) are not streamed: their readers
wait for the commit (``settled``), following the fill that replaces a corrupt one, and are
then served the verified file; a corrupt mirror then costs them nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from mirrorrouter.reference import Digest

READ_CHUNK = 4 * 1024 * 1024
T = TypeVar("T")


class FillFailed(Exception):
    """The fill a reader was following failed; the response must be cut short."""


class BlobFill:
    """The state of one blob download, shared by every reader of that blob.

    Changed by its owner alone, the ``Filler`` (fill.py), which starts or joins it, runs
    its download (the filling task's side below) and finds it for a following replica;
    readers, the pull-through and the peer endpoint, only read it."""

    def __init__(self, digest: Digest, repository: str) -> None:
        self.digest = digest
        self.repository = repository
        self.size: int | None = None
        self.mirror: str | None = None
        self.path: Path | None = None
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.followers = 0
        self.mirrors: set[str] = set()  # every mirror that sent bytes (resumes may switch)
        # The token of this download's cluster-wide lock: replicas that follow the download
        # present it to this one's peer endpoint (fill.py).
        self.lease_token: str | None = None
        # Set when the cache cannot take the blob (disk full): readers then stream straight
        # from upstream, from where they are, without caching.
        self.direct: Callable[[int, int | None], AsyncIterator[bytes]] | None = None
        # The fill that started over from another mirror when this one's content failed
        # verification: readers waiting for a verified blob follow it (``settled``).
        self.replaced_by: BlobFill | None = None
        self.started = asyncio.Event()  # the upstream answered, or the fill failed
        self._changed = asyncio.Event()

    # -- the filling task's side

    def begin(self, spool: Path, size: int | None, mirror: str) -> None:
        self.path, self.size, self.mirror = spool, size, mirror
        self.started.set()

    def degrade(
        self, direct: Callable[[int, int | None], AsyncIterator[bytes]], size: int | None
    ) -> None:
        """Readers read through ``direct`` from where they are: straight from upstream when
        the cache cannot take the blob, or from a store that keeps no local file."""
        self.direct = direct
        if self.size is None:
            self.size = size
        self.started.set()
        self._notify()

    def progress(self, written: int) -> None:
        self.written = written
        self._notify()

    def finish(self, committed: Path) -> None:
        # Readers that open the file from now on open the committed file; readers that
        # opened the spool file keep reading it, since the rename keeps the inode.
        self.path = committed
        self.done = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.started.set()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- the readers' side

    async def begun(self) -> BlobFill:
        """This fill once the upstream answered; or, when its content failed verification
        meanwhile, the fill that replaced it: a reader without a byte yet starts on that."""
        fill = self
        await fill.started.wait()
        while fill.error is not None and fill.replaced_by is not None:
            fill = fill.replaced_by
            await fill.started.wait()
        return fill

    async def settled(self) -> BlobFill:
        """Wait for the verified blob: the fill that holds it (committed, or degraded to
        reads through ``direct``), following the fills that replaced a corrupt one; or the
        last one's failure (``error`` set) when no mirror is left to try."""
        fill = self
        while True:
            while not (fill.done or fill.error is not None or fill.direct is not None):
                await fill._changed.wait()
            if fill.error is None or fill.replaced_by is None:
                return fill
            fill = fill.replaced_by

    @property
    def readable(self) -> int:
        """How many bytes readers may have: all once verified, else all but the last."""
        return self.written if self.done else max(0, self.written - 1)

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, end)`` as they land; raises ``FillFailed`` on failure."""
        await self.started.wait()
        if self.direct is not None and self.path is None:
            async for chunk in self.direct(start, end):
                yield chunk
            return
        fd = await self._open()
        if fd is None:  # the spool file is gone: degraded meanwhile
            assert self.direct is not None
            async for chunk in self.direct(start, end):
                yield chunk
            return
        try:
            position = start
            while True:
                limit = end if end is not None else self.size
                if limit is not None and position >= limit:
                    return
                if self.direct is not None:
                    async for chunk in self.direct(position, end):
                        yield chunk
                    return
                if self.error is not None:
                    raise FillFailed(str(self.error))
                available = self.readable
                if position < available:
                    size = min(READ_CHUNK, available - position)
                    if limit is not None:
                        size = min(size, limit - position)
                    chunk = await asyncio.to_thread(os.pread, fd, size, position)
                    position += len(chunk)
                    yield chunk
                elif self.done:
                    return
                else:
                    await self._changed.wait()
        finally:
            os.close(fd)

    async def _open(self) -> int | None:
        """Open the spool file, or the committed file once the fill is done; None when the
        spool file was dropped for direct reads. The commit renames the spool file before
        ``finish`` names the committed one: a reader that comes in between waits for that."""
        while True:
            path = self.path
            if self.error is not None or path is None:
                raise FillFailed(str(self.error))
            changed = self._changed
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if self.direct is not None:
                    return None
                if self.done and self.path is path:
                    raise
                if self.path is path and self.error is None:
                    await changed.wait()


class Coalescer:
    """Single-flight for small awaitables: concurrent calls with one key share one result."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(self, key: Hashable, factory: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is not None:
            result: T = await asyncio.shield(running)
            return result
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            value = await factory()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: followers may be none
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._running[key]
