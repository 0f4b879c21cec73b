"""Housekeeping: the work the server does on its own, in the background, every so often.

A ``Housekeeper`` (one per process, started and stopped by the app's lifespan) runs
``Chore``s, each every ``interval`` seconds in a task of its own; a round that fails is
logged and the next one runs all the same. The chores of each hosted set are the upload
sweep and quota recount (``HostedStore.housekeep``), in every worker process: it is safe
beside itself in another process (a session is removed only under that session's lock,
taken without waiting), and each worker keeps its own quota total; and its scheduled
garbage collection (schedule.py), one worker of one replica at a time.

The waits between rounds are on the event loop; a chore's blocking I/O goes to a thread
and never waits for a lock there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("mirrorrouter.housekeeping")

CADENCE_MAX = 60.0  # seconds
CADENCE_MIN = 1.0


def cadence(period: float) -> float:
    """How often a chore with a ``period`` runs or looks whether it is due: every quarter
    of it, at least once a minute, at most once a second."""
    return min(CADENCE_MAX, max(CADENCE_MIN, period / 4))


def sweep_interval(upload_ttl: float) -> float:
    """How often abandoned upload sessions are swept: ``cadence(upload_ttl)``, so a session
    goes between 1 and 1.25 ``upload_ttl`` idle (or a minute past it)."""
    return cadence(upload_ttl)


@dataclass(frozen=True, slots=True)
class Chore:
    name: str
    interval: float  # seconds between the end of one round and the start of the next
    run: Callable[[], Awaitable[object]]


class Housekeeper:
    """Runs chores in the background until stopped."""

    def __init__(
        self,
        chores: list[Chore],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.chores = chores
        self._sleep = sleep
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._rounds(chore)) for chore in self.chores]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _rounds(self, chore: Chore) -> None:
        while True:
            await self._sleep(chore.interval)
            try:
                await chore.run()
            except Exception:
                log.exception(
                    "housekeeping: %s failed; trying again in %.0fs", chore.name, chore.interval
                )
