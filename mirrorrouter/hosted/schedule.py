"""Scheduled garbage collection of a hosted set (``GcSchedule``, every ``gc_interval``).

One worker of one replica at a time, at most once per interval cluster-wide. Every worker
looks every ``cadence(gc_interval)`` whether a run is due; the one that takes the set's lock
file (an ``flock`` taken without waiting: the other workers of the machine skip) and the
coordinator's lease (the other replicas skip) reads the last run's record again (a run may
have ended just before), runs ``HostedStore.collect_garbage`` (which sweeps upload
sessions too) and records the run beside the lock and in the coordinator, where every
worker, replica and restart reads it: when it ran, what it removed, what it freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mirrorrouter.cache.spool import try_flock
from mirrorrouter.hosted.housekeeping import cadence

if TYPE_CHECKING:
    from mirrorrouter.coordination import Coordinator
    from mirrorrouter.hosted.store import HostedStore
    from mirrorrouter.metrics import Metrics

log = logging.getLogger("mirrorrouter.housekeeping")

# A run that failed (the object store was down, say) is tried again this long after it
# began, or after gc_interval when that is shorter: not a day later, not every minute.
GC_RETRY_AFTER_FAILURE = 900.0
GC_RECORD_MIN_TTL = 7 * 86400.0  # how long the coordinator keeps a run's record, at least
GC_LOCK = ".gc.lock"  # in the hosted set's directory: one worker of the machine at a time
GC_RECORD = ".gc.json"  # beside it: the last run


@dataclass(frozen=True, slots=True)
class GcRun:
    """One run of a hosted set's scheduled garbage collection, as recorded for everyone."""

    started: float  # Unix seconds
    finished: float
    outcome: str  # "ok" or "failed"
    blobs: int = 0  # removed
    manifests: int = 0
    uploads: int = 0  # abandoned upload sessions removed
    freed: int = 0  # bytes
    by: str = ""  # which worker ran it: its advertise_url, or host:pid
    error: str = ""  # why it failed

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes | None) -> GcRun | None:
        """The record, or None for none or one that does not parse (it is then rewritten
        by the next run)."""
        if not raw:
            return None
        try:
            fields = json.loads(raw)
            run = cls(**fields) if isinstance(fields, dict) else None
        except (ValueError, TypeError):
            return None
        if run is None or not all(isinstance(t, int | float) for t in (run.started, run.finished)):
            return None
        return run


class GcSchedule:
    """A hosted set's scheduled garbage collection: due ``gc_interval`` after the last run
    began (``GC_RETRY_AFTER_FAILURE`` after a failed one), run by one worker of one replica
    while every other skips (the module docstring says how)."""

    def __init__(
        self,
        store: HostedStore,
        coordinator: Coordinator,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.coordinator = coordinator
        self.metrics = metrics
        self.name = store.settings.name
        self.interval = store.settings.gc_interval  # 0: off
        self.chore = f"gc:{self.name}"
        directory = store.settings.storage.directory
        self._lock_path = directory / GC_LOCK
        self._record_path = directory / GC_RECORD
        self._runner = coordinator.advertise_url or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def check_interval(self) -> float:
        """How often each worker looks whether a run is due."""
        return cadence(self.interval)

    async def last_run(self) -> GcRun | None:
        """The latest run recorded here or by any replica; None before the first."""
        local = await asyncio.to_thread(_read_text, self._record_path)
        shared = await self.coordinator.chore_record(self.chore)
        runs = [run for run in (GcRun.decode(local), GcRun.decode(shared)) if run is not None]
        last = max(runs, key=lambda run: run.started, default=None)
        if last is not None and self.metrics is not None:
            self.metrics.gc_seen(self.name, last)
        return last

    def next_run(self, last: GcRun | None) -> float | None:
        """When the next run is due (Unix seconds; due at once when none was recorded yet);
        None when scheduled collection is off."""
        if not self.interval:
            return None
        if last is None:
            return self.store.clock()
        wait = self.interval if last.outcome == "ok" else min(self.interval, GC_RETRY_AFTER_FAILURE)
        return last.started + wait

    def _due(self, last: GcRun | None) -> bool:
        due = self.next_run(last)
        return due is not None and self.store.clock() >= due

    async def tick(self) -> GcRun | None:
        """Collect garbage when a run is due and no other worker or replica runs it; the
        run made, or None."""
        if not self._due(await self.last_run()):
            return None
        fd = await asyncio.to_thread(_try_lock, self._lock_path)
        if fd is None:
            return None  # another worker of this machine runs it
        try:
            lease = await self.coordinator.claim_chore(self.chore)
            if lease is None:
                return None  # another replica runs it
            try:
                if not self._due(await self.last_run()):
                    return None  # a run ended between the first look and the lock
                run = await self._run()
                await self._record(run)
                return run
            finally:
                await lease.release()
        finally:
            os.close(fd)  # drops the flock

    async def _run(self) -> GcRun:
        clock = self.store.clock
        started = clock()
        try:
            report = await self.store.collect_garbage()
        except Exception as exc:
            log.exception("hosted %s: scheduled garbage collection failed", self.name)
            run = GcRun(started, clock(), "failed", by=self._runner, error=str(exc)[:500])
        else:
            run = GcRun(
                started,
                clock(),
                "ok",
                report.blobs,
                report.manifests,
                report.uploads,
                report.freed,
                by=self._runner,
            )
            log.info(
                "hosted %s: garbage collection removed %d blobs, %d manifests and %d "
                "abandoned uploads (%d bytes) in %.1fs",
                self.name,
                run.blobs,
                run.manifests,
                run.uploads,
                run.freed,
                run.finished - run.started,
            )
        if self.metrics is not None:
            self.metrics.gc_ran(self.name, run)
        return run

    async def _record(self, run: GcRun) -> None:
        """Beside the lock (the workers of this machine, restarts) and in the coordinator
        (the other replicas), before the lease and the lock are let go."""
        raw = run.encode()
        await asyncio.to_thread(_write_atomic, self._record_path, raw)
        ttl = max(2 * self.interval, GC_RECORD_MIN_TTL)
        await self.coordinator.put_chore_record(self.chore, raw, ttl)


def _try_lock(path: Path) -> int | None:
    """The lock file's descriptor holding its ``flock``; None when another holds it (never
    waits: this runs in a shared thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return try_flock(path)


def _read_text(path: Path) -> str | None:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text()
    return None


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
