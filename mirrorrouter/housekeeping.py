"""Housekeeping: the work the server does on its own, in the background, every so often.

A ``Housekeeper`` (one per process, started and stopped by the app's lifespan) runs
``Chore``s, each every ``interval`` seconds in a task of its own; a round that fails is
logged and the next one runs all the same. Today's chore is each hosted set's upload sweep
and quota recount (``HostedStore.housekeep``); scheduled garbage collection is meant to be
another chore of the same kind.

Every worker process runs its own chores. A chore must therefore be safe beside itself in
another process: the upload sweep is (it removes a session only under that session's
lock, taken without waiting). The waits between rounds are on the event loop; a chore's
blocking I/O goes to a thread and never waits for a lock there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("mirrorrouter.housekeeping")

SWEEP_INTERVAL_MAX = 60.0  # seconds
SWEEP_INTERVAL_MIN = 1.0


def sweep_interval(upload_ttl: float) -> float:
    """How often abandoned upload sessions are swept: every quarter of ``upload_ttl`` (so a
    session goes between 1 and 1.25 ``upload_ttl`` idle), at least once a minute, at most
    once a second."""
    return min(SWEEP_INTERVAL_MAX, max(SWEEP_INTERVAL_MIN, upload_ttl / 4))


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
