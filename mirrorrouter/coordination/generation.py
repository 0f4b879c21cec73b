"""The generation of a hosted set: a number that every change to the set's content moves
and that every worker and replica reads, so that memory may answer for the set for certain.

A pull through a group is answered by the first member that has the reference. Memory may
give that answer only when it knows, *now*, what each hosted member before the answering
one holds; a push through another worker or replica changes that. So every change of a
hosted set that a pull can see (a manifest or blob linked, a tag moved or deleted, a
manifest deleted, garbage collected) bumps the set's generation once it is stored and before
the client hears of it, and whatever memory learns of the set is stamped with the
generation read *before* the storage was read. A stamp equal to the current generation
proves that nothing changed since: the bump follows every write, and the stamp precedes
every read.

**One machine** (the filesystem backend; every worker process): the generation is an
8-byte counter in the file ``generation`` of the set's directory, mapped into each process
(``mmap``, shared). Reading it is one aligned 8-byte load (no system call; an aligned 8-byte
load or store is a single instruction on x86-64 and arm64, so a reader never sees half a
value: see ``COUNTER``); a bump takes the file's ``flock`` for the read-modify-write,
without waiting on a thread (``LOCK_NB``, retried on the event loop: the lock is held for a
few instructions).
Exact: a worker never answers from memory what another worker's push changed.

**Several replicas** (an object store, which other machines write): a replica cannot see
another's file, and a pull cannot wait for Redis. So, with ``[coordination] backend =
"redis"``, a bump also INCRs ``P:generation:<set>`` in Redis (created at a random value,
so a counter Redis lost never repeats an old one), and each worker reads those
counters in the background every ``SHARED_REFRESH`` seconds; the stamp is the pair (local
counter, shared counter). Memory of a set on shared storage is trusted only while the last
read of Redis was *asked* less than ``SHARED_TRUST`` seconds ago: a push acknowledged by one
replica reaches the memory answers of every other replica within ``SHARED_TRUST`` (it is
usually seen after half a refresh interval). When Redis is slow or down, no read succeeds,
the view grows old and memory stops answering for the set (the full path reads the store,
which is exact). What a replica that could not reach Redis pushed is bounded by
``SHARED_MAX_AGE`` instead: memory of a set on shared storage is never older than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from mirrorrouter.coordination.base import Coordinator

log = logging.getLogger("mirrorrouter.coordination")

FILE_NAME = "generation"
# One 8-byte word at offset 0 (page-aligned), in the NATIVE format: struct packs and unpacks
# it with one 8-byte memcpy, a single load or store (atomic when aligned on x86-64 and arm64);
# the standard-size formats ("=Q", "<Q") copy byte by byte, and a reader could see half a value.
COUNTER = struct.Struct("@Q")
BUMP_RETRY = 0.0005  # seconds between tries of the counter's lock (held for microseconds)
SHARED_REFRESH = 0.1  # seconds between reads of the shared generations from Redis
SHARED_TRUST = 0.5  # a read of them is trusted this long after it was asked for
SHARED_MAX_AGE = 5.0  # what memory learnt of a set on shared storage serves at most this long

Stamp: TypeAlias = tuple[int, int]  # (this machine's counter, the shared counter)


class Generation:
    """One hosted set's generation as this process sees it.

    ``shared_storage``: the set's content lives where other machines write it (an object
    store), so the counter on this machine is not the whole truth; ``coordinator`` shares
    the bumps with the other replicas (a ``RedisCoordinator``; None or a local one: not
    shared). ``monotonic`` times the trust windows.
    """

    def __init__(
        self,
        name: str,
        directory: Path,
        *,
        shared_storage: bool = False,
        coordinator: Coordinator | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.path = directory / FILE_NAME
        self.shared_storage = shared_storage
        self.coordinator = coordinator if coordinator is not None and coordinator.shared else None
        self.monotonic = monotonic
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._shared = 0  # the shared counter as last read from Redis
        self._asked = -float("inf")  # when that read was sent (monotonic)

    @property
    def polled(self) -> bool:
        """Whether this process must keep reading the shared counter (``SharedGenerations``)."""
        return self.shared_storage and self.coordinator is not None

    def open(self) -> None:
        """Map the counter file, creating it (zero) when it is not there yet."""
        if self._map is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < COUNTER.size:
                os.ftruncate(fd, COUNTER.size)  # zeros; a racing creator's value survives
            self._map = mmap.mmap(fd, COUNTER.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def stamp(self) -> Stamp:
        """The generation now; take it BEFORE reading what it is to vouch for."""
        if self._map is None:
            self.open()
            assert self._map is not None
        return COUNTER.unpack_from(self._map)[0], self._shared

    def confirms(self, stamp: Stamp, learnt: float) -> bool:
        """Whether what was learnt (at monotonic time ``learnt``) under ``stamp`` still holds
        for certain: nothing changed since, as far as every process that can change it says."""
        if stamp != self.stamp():
            return False
        if not self.shared_storage:
            return True
        now = self.monotonic()
        if now - learnt >= SHARED_MAX_AGE:
            return False
        return self.coordinator is None or now - self._asked < SHARED_TRUST

    def saw(self, shared: int, asked: float) -> None:
        """The shared counter, as a read of Redis sent at ``asked`` answered it."""
        if asked >= self._asked:  # reads are sequential: a later one knows more
            self._shared, self._asked = shared, asked

    async def bump(self) -> None:
        """The set changed (and the change is stored): move the generation, here and, for
        shared storage, for the other replicas, before anyone is told of the change."""
        if self._map is None:
            self.open()
        assert self._fd is not None and self._map is not None
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(BUMP_RETRY)
        try:
            COUNTER.pack_into(self._map, 0, COUNTER.unpack_from(self._map)[0] + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        if self.shared_storage and self.coordinator is not None:
            await self.coordinator.bump_generation(self.name)


class SharedGenerations:
    """Keeps this process's view of the shared generations fresh: one read of Redis every
    ``SHARED_REFRESH`` seconds for every hosted set on shared storage (started and stopped
    with the app)."""

    def __init__(
        self,
        generations: Sequence[Generation],
        *,
        interval: float = SHARED_REFRESH,
    ) -> None:
        self.generations = [g for g in generations if g.polled]
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.generations and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """One read of every shared counter; a failed read leaves the views to grow old."""
        if not self.generations:
            return
        coordinator = self.generations[0].coordinator
        assert coordinator is not None
        asked = self.generations[0].monotonic()
        values = await coordinator.generations([g.name for g in self.generations])
        if values is None:
            return
        for generation in self.generations:
            generation.saw(values.get(generation.name, 0), asked)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let the refresher die: the views would only age
                log.exception("reading the shared generations failed")
            await asyncio.sleep(self.interval)
