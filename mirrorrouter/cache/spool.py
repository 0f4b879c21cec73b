"""What every backend does on the local disk and in memory, whatever stores the content.

- ``SpoolArea``: a backend instance's own ``tmp/<owner>/`` directory for writes in
  progress, held by an ``flock`` on ``tmp/<owner>/.lock``. ``open()`` sweeps the areas whose
  owner is gone (their lock can be taken): what they hold was interrupted and is never
  served. Areas of live owners (other worker processes) are left alone. An area may have
  companions, ``<companion>/<owner>/`` directories swept together with it.
- ``SpoolWriter``: streams a blob into a spool file of that area, hashing as it goes, on one
  ordered worker thread (see the class); ``commit`` verifies digest and size and hands the
  file to the backend's ``_publish``.
- ``SharedState``: what every instance over the same storage shares within one process:
  readers and writers in progress (in use), the announced size of each write, and the
  accesses recorded in memory (``touch``) and those already persisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import LRUCache

from mirrorrouter.cache.base import ACCESS_RESOLUTION, DigestMismatch
from mirrorrouter.reference import Digest

IN_FLIGHT = 4  # chunks a blob writer may hash and write behind the network reads
ACCESS_MEMORY = 100_000  # objects whose last persisted access is remembered
PENDING_ACCESSES = 100_000  # accesses recorded in memory at most, until flushed
LOCK_NAME = ".lock"
STAGING_PREFIX = ".new-"  # an area being made: see SpoolArea.open
STAGING_GRACE = 600.0  # seconds after which a leftover one is a crash's


@dataclass(slots=True)
class SharedState:
    """What every instance over one storage shares in this process: readers and writers in
    progress, and accesses recorded in memory."""

    in_use: Counter[Digest] = field(default_factory=Counter)
    writers: dict[str, int] = field(default_factory=dict)  # spool file name -> announced size
    pending: dict[Digest, float] = field(default_factory=dict)  # accesses not yet persisted
    persisted: LRUCache[Digest, float] = field(
        default_factory=lambda: LRUCache(maxsize=ACCESS_MEMORY)
    )

    def acquire(self, digest: Digest) -> None:
        self.in_use[digest] += 1

    def release(self, digest: Digest) -> None:
        self.in_use[digest] -= 1
        if self.in_use[digest] <= 0:
            del self.in_use[digest]

    @contextmanager
    def hold(self, digest: Digest) -> Iterator[None]:
        self.acquire(digest)
        try:
            yield
        finally:
            self.release(digest)

    def touch(self, digest: Digest, now: float) -> None:
        """Record an access in memory, unless one within the resolution is already known."""
        last = self.pending.get(digest)
        if last is None:
            last = self.persisted.get(digest)
        if last is not None and now - last < ACCESS_RESOLUTION:
            return
        if digest in self.pending or len(self.pending) < PENDING_ACCESSES:
            self.pending[digest] = now

    def persisted_recently(self, digest: Digest, now: float) -> bool:
        """Whether an access of ``digest`` was persisted within the resolution before ``now``."""
        last = self.persisted.get(digest)
        return last is not None and now - last < ACCESS_RESOLUTION

    def mark_persisted(self, digest: Digest, when: float) -> None:
        self.persisted[digest] = when
        pending = self.pending.get(digest)
        if pending is not None and pending <= when:
            del self.pending[digest]

    def take_pending(self) -> list[tuple[Digest, float]]:
        """The accesses recorded in memory, now the caller's to persist."""
        batch = list(self.pending.items())
        self.pending.clear()
        return batch


class SpoolArea:
    """``<root>/tmp/<owner>/``: one instance's spool files, held by an flock on ``.lock``;
    each companion ``<root>/<name>/<owner>/`` belongs to the same owner and goes with it."""

    def __init__(self, root: Path, companions: tuple[str, ...] = ()) -> None:
        self.root = root
        self.owner = uuid.uuid4().hex
        self.tmp = root / "tmp" / self.owner
        self._companions = companions
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Sweep the areas of owners that are gone, then create and lock this one (blocking
        I/O, but never a wait: call it from a thread).

        The area is made and locked under a hidden name, then renamed into place: another
        process's sweep never sees it unlocked (it would take it for the area of an owner
        that is gone, and remove it), and no one else can hold its lock, so taking it
        without waiting always succeeds."""
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self._sweep()
        staging = self.root / "tmp" / f"{STAGING_PREFIX}{self.owner}"
        staging.mkdir()
        fd = os.open(staging / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, self.tmp)
        except BaseException:
            os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._lock_fd = fd

    def close(self) -> None:
        """Drop the lock; the next ``open()`` anywhere sweeps this area."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def temp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def companion(self, name: str) -> Path:
        """This owner's directory ``<root>/<name>/<owner>/`` (created by the caller)."""
        return self.root / name / self.owner

    def in_flight(self, announced: Mapping[str, int]) -> int:
        """Bytes of the spool files of every owner, at least their announced size."""
        total = 0
        for owner in entries(self.root / "tmp"):
            for entry in entries(Path(owner.path)):
                if entry.name == LOCK_NAME:
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        total += max(entry.stat().st_size, announced.get(entry.name, 0))
        return total

    def _sweep(self) -> None:
        """Remove the areas (and companions) whose owner is gone (their lock is free); an
        area still being made (``open``) only once it is old enough to be a crash's."""
        for entry in entries(self.root / "tmp"):
            if not entry.is_dir():
                Path(entry.path).unlink(missing_ok=True)
            elif entry.name.startswith(STAGING_PREFIX):
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > STAGING_GRACE:
                        shutil.rmtree(entry.path, ignore_errors=True)
            elif not _alive(Path(entry.path)):
                shutil.rmtree(entry.path, ignore_errors=True)
        for name in self._companions:
            for entry in entries(self.root / name):
                if not _alive(self.root / "tmp" / entry.name):
                    if entry.is_dir():
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        Path(entry.path).unlink(missing_ok=True)


def _alive(area: Path) -> bool:
    """Whether the owner of a spool area holds its lock."""
    return locked_elsewhere(area / LOCK_NAME)


def try_flock(path: Path) -> int | None:
    """An open descriptor of ``path`` (made when missing) holding an exclusive ``flock``
    until it is closed; None when another holds it. Never waits (``LOCK_NB``), so it may
    run in a shared thread."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def locked_elsewhere(path: Path) -> bool:
    """Whether some open file (another process, or another descriptor here) holds an
    ``flock`` on ``path``; False when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock when it was taken
    return False


def entries(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of a directory; none when it does not exist."""
    try:
        with os.scandir(directory) as found:
            return list(found)
    except (FileNotFoundError, NotADirectoryError):
        return []


@dataclass(slots=True)
class _Queued:
    """A chunk handed to the writer thread."""

    future: asyncio.Future[None]
    size: int
    counted: bool = False


class SpoolWriter:
    """Streams a blob into a spool file, hashing as it goes; ``commit`` verifies it and hands
    it to ``_publish`` (each backend's way of making it visible).

    Hashing and writing run on one ordered worker thread per blob, up to ``IN_FLIGHT``
    chunks behind the caller, so they overlap the next network read (hashlib releases the
    GIL on large buffers). ``written`` counts only bytes already in the spool file, which is
    what followers may read.
    """

    def __init__(
        self,
        shared: SharedState,
        path: Path,
        digest: Digest,
        expected_size: int | None,
        on_written: Callable[[int], None] | None,
    ) -> None:
        self._shared = shared
        self._on_written = on_written
        self._digest = digest
        self._expected_size = expected_size
        self._hasher = digest.hasher()
        self._path = path
        # Unbuffered: every write reaches the file at once, so followers see it.
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in commit/abort
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-writer")
        self._pending: deque[_Queued] = deque()
        self._written = 0
        self._registered = True  # in use, and announced for the in-flight bytes
        shared.acquire(digest)
        shared.writers[path.name] = expected_size or 0

    @property
    def spool_path(self) -> Path:
        return self._path

    @property
    def written(self) -> int:
        return self._written

    @property
    def backlog(self) -> int:
        """Chunks queued and not yet known to be in the spool file."""
        return len(self._pending)

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
        try:
            return await self._publish()
        except BaseException:
            await self.abort()  # the spool file goes; nothing of it was made visible
            raise
        finally:
            self._unregister()

    async def _publish(self) -> Path:
        """Make the verified spool file visible as the blob; return a local file with it."""
        raise NotImplementedError

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
            self._shared.writers.pop(self._path.name, None)
            self._shared.release(self._digest)

    def _close(self) -> None:
        self._file.close()
        self._worker.shutdown(wait=False)
