"""The embedded cache: a local directory per upstream.

Layout (``<root>`` is the upstream's cache directory)::

    blobs/<alg>/<hex[:2]>/<hex>           committed blob bytes
    manifests/<alg>/<hex>                 "<media type>\\n" + the exact manifest bytes
    repositories/<repo>/_tags/<tag>       JSON tag record
    repositories/<repo>/_links/<alg>/<hex>  empty: the repository may see this digest
    tmp/<owner>/                          spool files and writes in progress of one
                                          open instance, which holds tmp/<owner>/.lock

Every write goes to the instance's own ``tmp/<owner>/`` first and is moved into place with
``os.replace`` after it was verified, so a reader sees the whole object or nothing.
``open()`` sweeps the temp directories whose owner is gone (a crash, a kill -9, a clean
``close()``): their lock can be taken, and what they hold was interrupted and is never
served. Directories of live owners (other worker processes sharing the cache) are left
alone, since their lock cannot be taken. Repository components never start with "_", so
``_tags`` and ``_links`` cannot collide with a repository name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mirrorrouter.cache.base import DigestMismatch, StoredManifest, TagRecord
from mirrorrouter.reference import Digest

READ_CHUNK = 4 * 1024 * 1024  # measured: 4 MiB reads serve ~1.3x faster than 1 MiB
IN_FLIGHT = 4  # chunks a blob writer may hash and write behind the network reads


class FilesystemCache:
    """``CacheBackend`` over a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp" / uuid.uuid4().hex
        self._lock_fd: int | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    async def close(self) -> None:
        """Release this instance's temp directory; the next ``open()`` anywhere sweeps it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _open_sync(self) -> None:
        for sub in ("blobs", "manifests", "repositories", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep()
        self.tmp.mkdir(exist_ok=True)
        self._lock_fd = os.open(self.tmp / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def _sweep(self) -> None:
        """Remove temp directories whose owner is gone (their lock is free)."""
        for entry in (self.root / "tmp").iterdir():
            if not entry.is_dir():
                entry.unlink(missing_ok=True)
                continue
            try:
                fd = os.open(entry / ".lock", os.O_RDWR)
            except FileNotFoundError:
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live owner
            else:
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ blobs

    def _blob_file(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    async def blob_size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self._blob_file(digest)).st_size
        except FileNotFoundError:
            return None

    def blob_path(self, digest: Digest) -> Path | None:
        path = self._blob_file(digest)
        return path if path.exists() else None

    async def read_blob(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        fd = os.open(self._blob_file(digest), os.O_RDONLY)
        try:
            position = start
            while position < end:
                size = min(READ_CHUNK, end - position)
                chunk = await asyncio.to_thread(os.pread, fd, size, position)
                if not chunk:
                    return
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def blob_writer(
        self,
        digest: Digest,
        expected_size: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> _FileBlobWriter:
        return _FileBlobWriter(self, digest, expected_size, on_written)

    def try_claim(self, digest: Digest) -> _FileClaim | None:
        """Claim the download of ``digest`` among processes sharing this cache, or None
        when another process holds it. The claim ends when released or its process dies."""
        path = self.root / "locks" / f"{digest.algorithm}-{digest.hex}"
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _FileClaim(fd)

    # ------------------------------------------------------------------ manifests

    def _manifest_file(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        try:
            raw = await asyncio.to_thread(self._manifest_file(digest).read_bytes)
        except FileNotFoundError:
            return None
        media_type, _, data = raw.partition(b"\n")
        return StoredManifest(digest, media_type.decode(), data)

    async def put_manifest(self, manifest: StoredManifest) -> None:
        if Digest.of(manifest.data, manifest.digest.algorithm) != manifest.digest:
            raise DigestMismatch(f"manifest bytes do not hash to {manifest.digest}")
        raw = manifest.media_type.encode() + b"\n" + manifest.data
        await asyncio.to_thread(self._write_atomic, self._manifest_file(manifest.digest), raw)

    # ------------------------------------------------------------------ tags and links

    def _repository_dir(self, repository: str) -> Path:
        return self.root / "repositories" / repository

    async def get_tag(self, repository: str, tag: str) -> TagRecord | None:
        path = self._repository_dir(repository) / "_tags" / tag
        try:
            data = json.loads(await asyncio.to_thread(path.read_bytes))
            return TagRecord(
                Digest.parse(data["digest"]), data["media_type"], data["size"], data["checked_at"]
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # an unreadable record is a miss, never an error

    async def put_tag(self, repository: str, tag: str, record: TagRecord) -> None:
        data = json.dumps(
            {
                "digest": str(record.digest),
                "media_type": record.media_type,
                "size": record.size,
                "checked_at": record.checked_at,
            }
        ).encode()
        path = self._repository_dir(repository) / "_tags" / tag
        await asyncio.to_thread(self._write_atomic, path, data)

    def _link_file(self, repository: str, digest: Digest) -> Path:
        return self._repository_dir(repository) / "_links" / digest.algorithm / digest.hex

    async def is_linked(self, repository: str, digest: Digest) -> bool:
        return self._link_file(repository, digest).exists()

    async def link(self, repository: str, digests: list[Digest]) -> None:
        await asyncio.to_thread(self._link_sync, repository, digests)

    def _link_sync(self, repository: str, digests: list[Digest]) -> None:
        for digest in digests:
            path = self._link_file(repository, digest)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

    # ------------------------------------------------------------------ helpers

    def temp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def _write_atomic(self, target: Path, data: bytes) -> None:
        temp = self.temp_path()
        temp.write_bytes(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)

    def commit_file(self, temp: Path, digest: Digest) -> Path:
        target = self._blob_file(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        return target


class _FileClaim:
    """A held flock on a digest's lock file."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


@dataclass(slots=True)
class _Queued:
    """A chunk handed to the writer thread."""

    future: asyncio.Future[None]
    size: int
    counted: bool = False


class _FileBlobWriter:
    """Streams a blob into the owner's temp directory, hashing as it goes; commit verifies
    and renames it into place.

    Hashing and writing run on one ordered worker thread per blob, up to ``IN_FLIGHT``
    chunks behind the caller, so they overlap the next network read (hashlib releases the
    GIL on large buffers). ``written`` counts only bytes already in the spool file, which is
    what followers may read.
    """

    def __init__(
        self,
        cache: FilesystemCache,
        digest: Digest,
        expected_size: int | None,
        on_written: Callable[[int], None] | None,
    ) -> None:
        self._cache = cache
        self._on_written = on_written
        self._digest = digest
        self._expected_size = expected_size
        self._hasher = digest.hasher()
        self._path = cache.temp_path()
        # Unbuffered: every write reaches the file at once, so followers see it.
        self._file = open(self._path, "wb", buffering=0)  # noqa: SIM115 - closed in commit/abort
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-writer")
        self._pending: deque[_Queued] = deque()
        self._written = 0

    @property
    def spool_path(self) -> Path:
        return self._path

    @property
    def written(self) -> int:
        return self._written

    async def write(self, chunk: bytes) -> None:
        """Queue a chunk; returns once at most IN_FLIGHT chunks are still being written.
        A failed write (a full disk) raises here or from a later call."""
        future = asyncio.get_running_loop().run_in_executor(self._worker, self._write_sync, chunk)
        queued = _Queued(future, len(chunk))
        # Counted as soon as the chunk is on disk (in order: one worker), so followers see
        # it even while the caller waits for the network.
        future.add_done_callback(lambda _: self._count(queued))
        self._pending.append(queued)
        while self._pending and (len(self._pending) > IN_FLIGHT or self._pending[0].future.done()):
            await self._settle_oldest()

    async def flush(self) -> None:
        """Wait until every queued chunk is in the spool file."""
        while self._pending:
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        queued = self._pending.popleft()
        await queued.future  # raises what the write raised
        self._count(queued)  # its done-callback may not have run yet

    def _count(self, queued: _Queued) -> None:
        future = queued.future
        if queued.counted or future.cancelled() or future.exception() is not None:
            return  # a failure is raised to the caller by write() or flush()
        queued.counted = True
        self._written += queued.size
        if self._on_written is not None:
            self._on_written(self._written)

    def _write_sync(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        self._file.write(chunk)

    async def commit(self) -> Path:
        try:
            await self.flush()
        except BaseException:
            await self.abort()
            raise
        self._close()
        actual = self._hasher.hexdigest()
        if actual != self._digest.hex:
            await self.abort()
            raise DigestMismatch(
                f"content hashed to {self._digest.algorithm}:{actual}, not {self._digest}"
            )
        if self._expected_size is not None and self._written != self._expected_size:
            await self.abort()
            raise DigestMismatch(f"got {self._written} bytes, expected {self._expected_size}")
        # The rename happens on the event loop thread, so that readers which look up the
        # spool path and the committed path never see neither.
        return self._cache.commit_file(self._path, self._digest)

    async def abort(self) -> None:
        self._on_written = None  # readers must not be told of bytes that are going away
        while self._pending:  # let the worker finish before the file goes
            with contextlib.suppress(Exception):
                await self._pending.popleft().future
        self._close()
        self._path.unlink(missing_ok=True)

    def _close(self) -> None:
        self._file.close()
        self._worker.shutdown(wait=False)
