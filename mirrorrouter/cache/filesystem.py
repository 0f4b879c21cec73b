"""The embedded cache: a local directory per upstream.

Layout (``<root>`` is the upstream's cache directory)::

    blobs/<alg>/<hex[:2]>/<hex>           committed blob bytes
    manifests/<alg>/<hex>                 "<media type>\\n" + the exact manifest bytes
    repositories/<repo>/_tags/<tag>       JSON tag record
    repositories/<repo>/_links/<alg>/<hex>  empty: the repository may see this digest
    tmp/<owner>/                          spool files and writes in progress of one
                                          open instance, which holds tmp/<owner>/.lock
    locks/<alg>-<hex>                     flock: the claim on one digest's download

Every write goes to the instance's own ``tmp/<owner>/`` first and is moved into place with
``os.replace`` after it was verified, so a reader sees the whole object or nothing.
``open()`` sweeps the temp directories whose owner is gone (a crash, a kill -9, a clean
``close()``): their lock can be taken, and what they hold was interrupted and is never
served. Directories of live owners (other worker processes sharing the cache) are left
alone, since their lock cannot be taken. Repository components never start with "_", so
``_tags`` and ``_links`` cannot collide with a repository name.

Bounds (see base.py): the **last access** of a blob or manifest is its file's mtime (the
content never changes after the rename, so the mtime is free to carry it; reads never move
it, unlike an atime). It is set on commit, and on a read from disk at most once per
``ACCESS_RESOLUTION``; ``touch`` only records in memory, ``flush_access`` writes those
down. **In use**: readers and writers of a blob count in memory, shared by every instance
over the same directory in this process; ``read_blob`` also takes a shared ``flock`` on
the blob file, which ``remove`` (holding an exclusive one while it deletes) and
``in_use`` see from any process. Deleting a file that is open is harmless on Linux (the
reader keeps the inode); the rule is kept explicitly all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import LRUCache

from mirrorrouter.cache.base import (
    ACCESS_RESOLUTION,
    DigestMismatch,
    Inventory,
    Removal,
    Removed,
    StoredManifest,
    StoredObject,
    TagRecord,
)
from mirrorrouter.reference import Digest, ReferenceError

READ_CHUNK = 4 * 1024 * 1024  # measured: 4 MiB reads serve ~1.3x faster than 1 MiB
IN_FLIGHT = 4  # chunks a blob writer may hash and write behind the network reads
ACCESS_MEMORY = 100_000  # objects whose last persisted access is remembered
PENDING_ACCESSES = 100_000  # accesses recorded in memory at most, until flushed


@dataclass(slots=True)
class _Shared:
    """What every instance over one directory in this process shares: readers and writers
    in progress, and accesses recorded in memory."""

    in_use: Counter[Digest] = field(default_factory=Counter)
    writers: dict[str, int] = field(default_factory=dict)  # spool file name -> announced size
    pending: dict[Digest, float] = field(default_factory=dict)  # accesses not yet on disk
    persisted: LRUCache[Digest, float] = field(
        default_factory=lambda: LRUCache(maxsize=ACCESS_MEMORY)
    )


_SHARED: dict[str, _Shared] = {}


class FilesystemCache:
    """``CacheBackend`` over a local directory."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.tmp = root / "tmp" / uuid.uuid4().hex
        self._lock_fd: int | None = None
        self._clock = clock
        self._shared = _SHARED.setdefault(os.path.abspath(root), _Shared())

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
        self._shared.in_use[digest] += 1
        try:
            # Other processes' evictors see the shared lock; when one holds its exclusive
            # lock (it is deleting the file), this read goes on from the open inode.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            self._accessed(digest, fd)
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
            self._release(digest)

    def blob_writer(
        self,
        digest: Digest,
        expected_size: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> _FileBlobWriter:
        return _FileBlobWriter(self, digest, expected_size, on_written)

    def _claim_file(self, digest: Digest) -> Path:
        return self.root / "locks" / f"{digest.algorithm}-{digest.hex}"

    def try_claim(self, digest: Digest) -> _FileClaim | None:
        """Claim the download of ``digest`` among processes sharing this cache, or None
        when another process holds it. The claim ends when released or its process dies."""
        path = self._claim_file(digest)
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
        stored = await self.peek_manifest(digest)
        if stored is not None:
            self._accessed(digest, self._manifest_file(digest))
        return stored

    async def peek_manifest(self, digest: Digest) -> StoredManifest | None:
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
        now = self._clock()
        target = self._manifest_file(manifest.digest)
        await asyncio.to_thread(self._write_atomic, target, raw, now)
        self._persisted(manifest.digest, now)

    # ------------------------------------------------------------------ tags and links

    def _repository_dir(self, repository: str) -> Path:
        return self.root / "repositories" / repository

    async def get_tag(self, repository: str, tag: str) -> TagRecord | None:
        path = self._repository_dir(repository) / "_tags" / tag
        try:
            return _parse_tag(await asyncio.to_thread(path.read_bytes))
        except FileNotFoundError:
            return None

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

    async def list_tags(self, repository: str) -> list[str]:
        entries = await asyncio.to_thread(_entries, self._repository_dir(repository) / "_tags")
        return sorted(e.name for e in entries if e.is_file())

    async def delete_tag(self, repository: str, tag: str) -> bool:
        path = self._repository_dir(repository) / "_tags" / tag
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        return True

    def _link_file(self, repository: str, digest: Digest) -> Path:
        return self._repository_dir(repository) / "_links" / digest.algorithm / digest.hex

    async def is_linked(self, repository: str, digest: Digest) -> bool:
        return self._link_file(repository, digest).exists()

    async def link(self, repository: str, digests: list[Digest]) -> None:
        await asyncio.to_thread(self._link_sync, repository, digests)

    async def linked(self, repository: str) -> frozenset[Digest]:
        links = self._repository_dir(repository) / "_links"
        return await asyncio.to_thread(lambda: frozenset(d for d, _ in _digest_files(links, 1)))

    def _link_sync(self, repository: str, digests: list[Digest]) -> None:
        for digest in digests:
            path = self._link_file(repository, digest)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

    # ------------------------------------------------------------------ helpers

    def temp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def _write_atomic(self, target: Path, data: bytes, accessed: float | None = None) -> None:
        temp = self.temp_path()
        temp.write_bytes(data)
        if accessed is not None:
            os.utime(temp, (accessed, accessed))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)

    def commit_file(self, temp: Path, digest: Digest) -> Path:
        target = self._blob_file(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        os.utime(temp, (now, now))  # committed is accessed: the newest in the LRU order
        os.replace(temp, target)
        self._persisted(digest, now)
        return target

    # ------------------------------------------------------------------ access and in-use

    def touch(self, digest: Digest) -> None:
        """Record an access in memory; ``flush_access`` (or a later read) persists it."""
        shared, now = self._shared, self._clock()
        last = shared.pending.get(digest)
        if last is None:
            last = shared.persisted.get(digest)
        if last is not None and now - last < ACCESS_RESOLUTION:
            return
        if digest in shared.pending or len(shared.pending) < PENDING_ACCESSES:
            shared.pending[digest] = now

    def _accessed(self, digest: Digest, file: Path | int) -> None:
        """A read from disk: persist its access now, unless done within the resolution."""
        now = self._clock()
        last = self._shared.persisted.get(digest)
        if last is not None and now - last < ACCESS_RESOLUTION:
            return
        try:
            os.utime(file, (now, now))
        except OSError:
            return
        self._persisted(digest, now)

    def _persisted(self, digest: Digest, when: float) -> None:
        self._shared.persisted[digest] = when
        pending = self._shared.pending.get(digest)
        if pending is not None and pending <= when:
            del self._shared.pending[digest]

    async def flush_access(self) -> None:
        pending = self._shared.pending
        if not pending:
            return
        batch = list(pending.items())
        pending.clear()
        done = await asyncio.to_thread(self._flush_sync, batch)
        for digest, when in done:
            self._shared.persisted[digest] = when

    def _flush_sync(self, batch: list[tuple[Digest, float]]) -> list[tuple[Digest, float]]:
        done = []
        for digest, when in batch:
            for path in (self._blob_file(digest), self._manifest_file(digest)):
                try:
                    if os.stat(path).st_mtime < when:  # never move an access back
                        os.utime(path, (when, when))
                except FileNotFoundError:
                    continue
                done.append((digest, when))
        return done

    @contextmanager
    def hold(self, digest: Digest) -> Iterator[None]:
        self._shared.in_use[digest] += 1
        try:
            yield
        finally:
            self._release(digest)

    def _release(self, digest: Digest) -> None:
        in_use = self._shared.in_use
        in_use[digest] -= 1
        if in_use[digest] <= 0:
            del in_use[digest]

    def in_use(self, digest: Digest) -> bool:
        """Read, written or held here; read (shared flock) or claimed by another process."""
        if self._shared.in_use.get(digest):
            return True
        for path in (self._blob_file(digest), self._claim_file(digest)):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)  # also drops the lock when it was taken
        return False

    # ------------------------------------------------------------------ inventory, removal

    async def inventory(self) -> Inventory:
        return await asyncio.to_thread(self._inventory_sync)

    def _inventory_sync(self) -> Inventory:
        tags: dict[tuple[str, str], TagRecord] = {}
        links: dict[str, frozenset[Digest]] = {}
        repositories = self.root / "repositories"
        for directory, subdirs, _ in os.walk(repositories):
            repository = os.path.relpath(directory, repositories)
            if "_tags" in subdirs:
                for entry in _entries(Path(directory) / "_tags"):
                    with contextlib.suppress(OSError):
                        record = _parse_tag(Path(entry.path).read_bytes())
                        if record is not None:
                            tags[(repository, entry.name)] = record
            if "_links" in subdirs:
                linked = frozenset(d for d, _ in _digest_files(Path(directory) / "_links", 1))
                if linked:
                    links[repository] = linked
            subdirs[:] = [d for d in subdirs if not d.startswith("_")]
        in_flight = 0
        for owner in _entries(self.root / "tmp"):
            for entry in _entries(Path(owner.path)):
                if entry.name == ".lock":
                    continue
                with contextlib.suppress(OSError):
                    announced = self._shared.writers.get(entry.name, 0)
                    in_flight += max(entry.stat().st_size, announced)
        return Inventory(
            blobs=self._objects(self.root / "blobs", 2),
            manifests=self._objects(self.root / "manifests", 1),
            tags=tags,
            links=links,
            in_flight=in_flight,
        )

    @staticmethod
    def _objects(top: Path, depth: int) -> dict[Digest, StoredObject]:
        objects = {}
        for digest, entry in _digest_files(top, depth):
            with contextlib.suppress(OSError):
                stat = entry.stat()
                objects[digest] = StoredObject(digest, stat.st_size, stat.st_mtime)
        return objects

    async def remove(self, removal: Removal) -> Removed:
        return await asyncio.to_thread(self._remove_sync, removal)

    def _remove_sync(self, removal: Removal) -> Removed:
        locked: list[tuple[Digest, Path, int]] = []
        busy: set[Digest] = set()
        try:
            for digest in removal.digests:
                if self._shared.in_use.get(digest):
                    busy.add(digest)
                    continue
                path = self._blob_file(digest)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                locked.append((digest, path, fd))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy.add(digest)  # a reader in another process
            if busy:
                return Removed(frozenset(), 0, frozenset(busy))
            removed: set[Digest] = set()
            freed = 0
            for digest, path, fd in locked:
                size = os.fstat(fd).st_size
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.add(digest)
                    freed += size
            for digest in removal.digests:
                path = self._manifest_file(digest)
                with contextlib.suppress(FileNotFoundError):
                    size = os.stat(path).st_size
                    path.unlink()
                    removed.add(digest)
                    freed += size
        finally:
            for _, _, fd in locked:
                os.close(fd)
        for repository, tag in removal.tags:
            path = self._repository_dir(repository) / "_tags" / tag
            with contextlib.suppress(OSError):
                record = _parse_tag(path.read_bytes())
                # Only while it still names what went: it may have moved on meanwhile.
                if record is None or record.digest in removal.digests:
                    path.unlink()
        for repository, digest in removal.links:
            self._link_file(repository, digest).unlink(missing_ok=True)
        # Directories stay: another process may be about to write into one.
        return Removed(frozenset(removed), freed)


def _parse_tag(raw: bytes) -> TagRecord | None:
    """A stored tag record; None when unreadable (a miss, never an error)."""
    try:
        data = json.loads(raw)
        return TagRecord(
            Digest.parse(data["digest"]), data["media_type"], data["size"], data["checked_at"]
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _digest_files(top: Path, depth: int) -> Iterator[tuple[Digest, os.DirEntry[str]]]:
    """The files ``<top>/<alg>/<hex>`` (depth 1) or ``<top>/<alg>/<hex[:2]>/<hex>`` (depth 2)
    named by a valid digest; anything else (temp names, strays) is skipped."""
    for algorithm in _entries(top):
        directories = [algorithm]
        if depth == 2:
            directories = [d for d in _entries(Path(algorithm.path)) if d.is_dir()]
        for directory in directories:
            for entry in _entries(Path(directory.path)):
                try:
                    digest = Digest.parse(f"{algorithm.name}:{entry.name}")
                except ReferenceError:
                    continue
                if entry.is_file():
                    yield digest, entry


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
        self._registered = True  # in use, and announced for the in-flight bytes
        cache._shared.in_use[digest] += 1
        cache._shared.writers[self._path.name] = expected_size or 0

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
        try:
            return self._cache.commit_file(self._path, self._digest)
        finally:
            self._unregister()

    async def abort(self) -> None:
        self._on_written = None  # readers must not be told of bytes that are going away
        while self._pending:  # let the worker finish before the file goes
            with contextlib.suppress(Exception):
                await self._pending.popleft().future
        self._close()
        self._path.unlink(missing_ok=True)
        self._unregister()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._cache._shared.writers.pop(self._path.name, None)
            self._cache._release(self._digest)

    def _close(self) -> None:
        self._file.close()
        self._worker.shutdown(wait=False)
