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
``os.replace`` after it was verified, so a reader sees the whole object or nothing. The temp
area, the blob writer and the in-process shared state are spool.py's, which the object-store
backend (objectstore/) uses too; so is the tag record format below.
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
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from mirrorrouter.cache.base import (
    Inventory,
    Removal,
    Removed,
    StoredManifest,
    StoredObject,
    TagRecord,
    decode_manifest,
    encode_manifest,
    encode_tag_record,
    parse_tag_record,
)
from mirrorrouter.cache.spool import (
    SharedState,
    SpoolArea,
    SpoolWriter,
    entries,
    locked_elsewhere,
    try_flock,
)
from mirrorrouter.reference import Digest, InvalidReference

READ_CHUNK = 4 * 1024 * 1024  # measured: 4 MiB reads serve ~1.3x faster than 1 MiB

_SHARED: dict[str, SharedState] = {}


class FilesystemCache:
    """``CacheBackend`` over a local directory."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self._spool = SpoolArea(root)
        self.tmp = self._spool.tmp
        self._clock = clock
        self._shared = _SHARED.setdefault(os.path.abspath(root), SharedState())

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    async def close(self) -> None:
        """Release this instance's temp directory; the next ``open()`` anywhere sweeps it."""
        self._spool.close()

    def _open_sync(self) -> None:
        for sub in ("blobs", "manifests", "repositories"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._spool.open()  # sweeps temp directories whose owner is gone

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
        with self._reading(digest) as fd:
            position = start
            while position < end:
                size = min(READ_CHUNK, end - position)
                chunk = await asyncio.to_thread(os.pread, fd, size, position)
                if not chunk:
                    return
                position += len(chunk)
                yield chunk

    @contextlib.asynccontextmanager
    async def open_blob(self, digest: Digest) -> AsyncIterator[int | None]:
        with self._reading(digest) as fd:
            yield fd

    @contextlib.contextmanager
    def _reading(self, digest: Digest) -> Iterator[int]:
        """The blob file open for a read: in use here, shared-locked for other processes,
        its access recorded."""
        fd = os.open(self._blob_file(digest), os.O_RDONLY)
        self._shared.acquire(digest)
        try:
            # Other processes' evictors see the shared lock; when one holds its exclusive
            # lock (it is deleting the file), this read goes on from the open inode.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            self._accessed(digest, fd)
            yield fd
        finally:
            os.close(fd)
            self._shared.release(digest)

    def blob_writer(
        self,
        digest: Digest,
        expected_size: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> _FileBlobWriter:
        return _FileBlobWriter(self, digest, expected_size, on_written)

    async def presigned_url(self, digest: Digest, expires: float) -> str | None:
        return None  # a local directory: blobs are served through the gateway

    def _claim_file(self, digest: Digest) -> Path:
        return self.root / "locks" / f"{digest.algorithm}-{digest.hex}"

    def try_claim(self, digest: Digest) -> _FileClaim | None:
        """Claim the download of ``digest`` among processes sharing this cache, or None
        when another process holds it. The claim ends when released or its process dies."""
        path = self._claim_file(digest)
        path.parent.mkdir(exist_ok=True)
        fd = try_flock(path)
        return None if fd is None else _FileClaim(fd)

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
        return decode_manifest(digest, raw)

    async def put_manifest(self, manifest: StoredManifest) -> None:
        raw = encode_manifest(manifest)
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
            return parse_tag_record(await asyncio.to_thread(path.read_bytes))
        except FileNotFoundError:
            return None

    async def put_tag(self, repository: str, tag: str, record: TagRecord) -> None:
        path = self._repository_dir(repository) / "_tags" / tag
        await asyncio.to_thread(self._write_atomic, path, encode_tag_record(record))

    async def list_tags(self, repository: str) -> list[str]:
        found = await asyncio.to_thread(entries, self._repository_dir(repository) / "_tags")
        return sorted(e.name for e in found if e.is_file())

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
        return self._spool.temp_path()

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
        self._shared.touch(digest, self._clock())

    def _accessed(self, digest: Digest, file: Path | int) -> None:
        """A read from disk: persist its access now, unless done within the resolution."""
        now = self._clock()
        if self._shared.persisted_recently(digest, now):
            return
        try:
            os.utime(file, (now, now))
        except OSError:
            return
        self._persisted(digest, now)

    def _persisted(self, digest: Digest, when: float) -> None:
        self._shared.mark_persisted(digest, when)

    async def flush_access(self) -> None:
        batch = self._shared.take_pending()
        if not batch:
            return
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

    def hold(self, digest: Digest) -> AbstractContextManager[None]:
        return self._shared.hold(digest)

    def in_use(self, digest: Digest) -> bool:
        """Read, written or held here; read (shared flock) or claimed by another process."""
        if self._shared.in_use.get(digest):
            return True
        return any(map(locked_elsewhere, (self._blob_file(digest), self._claim_file(digest))))

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
                for entry in entries(Path(directory) / "_tags"):
                    with contextlib.suppress(OSError):
                        record = parse_tag_record(Path(entry.path).read_bytes())
                        if record is not None:
                            tags[(repository, entry.name)] = record
            if "_links" in subdirs:
                linked = frozenset(d for d, _ in _digest_files(Path(directory) / "_links", 1))
                if linked:
                    links[repository] = linked
            subdirs[:] = [d for d in subdirs if not d.startswith("_")]
        in_flight = self._spool.in_flight(self._shared.writers)
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
                record = parse_tag_record(path.read_bytes())
                # Only while it still names what went: it may have moved on meanwhile.
                if record is None or record.digest in removal.digests:
                    path.unlink()
        for repository, digest in removal.links:
            self._link_file(repository, digest).unlink(missing_ok=True)
        # Directories stay: another process may be about to write into one.
        return Removed(frozenset(removed), freed)


def _digest_files(top: Path, depth: int) -> Iterator[tuple[Digest, os.DirEntry[str]]]:
    """The files ``<top>/<alg>/<hex>`` (depth 1) or ``<top>/<alg>/<hex[:2]>/<hex>`` (depth 2)
    named by a valid digest; anything else (temp names, strays) is skipped."""
    for algorithm in entries(top):
        directories = [algorithm]
        if depth == 2:
            directories = [d for d in entries(Path(algorithm.path)) if d.is_dir()]
        for directory in directories:
            for entry in entries(Path(directory.path)):
                try:
                    digest = Digest.parse(f"{algorithm.name}:{entry.name}")
                except InvalidReference:
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


class _FileBlobWriter(SpoolWriter):
    """Streams a blob into the owner's temp directory (see ``SpoolWriter``); commit verifies
    it and renames it into place."""

    def __init__(
        self,
        cache: FilesystemCache,
        digest: Digest,
        expected_size: int | None,
        on_written: Callable[[int], None] | None,
    ) -> None:
        super().__init__(cache._shared, cache.temp_path(), digest, expected_size, on_written)
        self._cache = cache

    async def _publish(self) -> Path:
        # The rename happens on the event loop thread (no await before it), so that readers
        # which look up the spool path and the committed path never see neither.
        return self._cache.commit_file(self._path, self._digest)
