"""Hedged requests: when the mirror asked has not answered within its usual time, the same
request goes to the next mirror too, and the first good answer wins.

Two pieces, used by ``UpstreamClient._over_mirrors`` (which decides who is asked, when):

- ``HeaderLatency``, per mirror: the time from sending a request to its response's headers,
  whatever the status, over the last ``WINDOW`` requests (a first-byte timeout counts as the
  timeout). A hedge goes out after about the 90th percentile of those, never sooner than
  ``HEDGE_MIN`` (250 ms: a mirror that usually answers in 20 ms is not doubled by every
  hiccup) and never later than ``HEDGE_MAX`` (2 s) or half the first-byte timeout (so the
  hedge comes well before the mirror is given up). A mirror with no history is hedged after
  ``HEDGE_MIN``. A request abandoned because another mirror answered first adds no sample:
  it says nothing about how long this mirror takes.
- ``Race``: the runs of one request on several mirrors at once. The first good answer is
  taken; every other run is cancelled, and an answer that arrived but was not taken is
  closed, so a blob's losing response is closed before its body is read: the blob is
  downloaded once. Structured: no run outlives the ``async with`` block, also when the
  request itself is cancelled.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

K = TypeVar("K")
T = TypeVar("T")

HEDGE_MIN = 0.25
HEDGE_MAX = 2.0
WINDOW = 32


class HeaderLatency:
    """How long one mirror recently took to send response headers."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[float] = deque(maxlen=window)

    def record(self, seconds: float) -> None:
        self._samples.append(max(0.0, seconds))

    def usual(self) -> float | None:
        """About the 90th percentile of the recent samples; None without any."""
        if not self._samples:
            return None
        if len(self._samples) == 1:
            return self._samples[0]
        return statistics.quantiles(self._samples, n=10, method="inclusive")[-1]

    def hedge_delay(self, first_byte_timeout: float) -> float:
        """How long to wait for this mirror before asking the next one as well."""
        ceiling = min(HEDGE_MAX, first_byte_timeout / 2)
        usual = self.usual()
        return min(max(HEDGE_MIN if usual is None else usual, HEDGE_MIN), ceiling)


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """How one run ended: its value, or the exception it raised."""

    value: T | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False, slots=True)
class Entrant(Generic[K, T]):
    """One run of the request on one mirror; ``key`` is what the caller knows it by."""

    key: K
    started: float
    hedge: bool
    task: asyncio.Task[Outcome[T]] = field(init=False, repr=False)
    outcome: Outcome[T] | None = None
    taken: bool = False


class Race(Generic[K, T]):
    """Runs of one request on several mirrors, the first good answer taken, the rest closed.

    ``timer`` waits out the hedge delays (``Timing.timer``); ``close`` disposes of an
    answer nobody took (an open response).
    """

    def __init__(
        self,
        timer: Callable[[float], Awaitable[None]],
        close: Callable[[T], Awaitable[None]],
    ) -> None:
        self._timer = timer
        self._close = close
        self._entrants: list[Entrant[K, T]] = []

    async def __aenter__(self) -> Race[K, T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    @property
    def pending(self) -> list[Entrant[K, T]]:
        """The runs whose end the caller has not seen yet (``ended``), finished or not."""
        return [e for e in self._entrants if e.outcome is None]

    def start(self, key: K, run: Coroutine[Any, Any, T], *, started: float, hedge: bool) -> None:
        entrant: Entrant[K, T] = Entrant(key, started, hedge)
        entrant.task = asyncio.create_task(_outcome(run))
        self._entrants.append(entrant)

    async def ended(self, patience: float | None) -> list[Entrant[K, T]]:
        """The runs that ended next (in start order), or none when ``patience`` (seconds;
        None: no limit) ran out first: the moment to hedge."""
        waiting: set[asyncio.Future[Any]] = {e.task for e in self.pending}
        alarm = asyncio.ensure_future(self._timer(patience)) if patience is not None else None
        if alarm is not None:
            waiting.add(alarm)
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if alarm is not None and not alarm.done():
                alarm.cancel()
                await asyncio.wait([alarm])
        ended = [e for e in self._entrants if e.outcome is None and e.task.done()]
        for entrant in ended:
            entrant.outcome = entrant.task.result()
        return ended

    def take(self, entrant: Entrant[K, T]) -> T:
        """Claim a good answer: it is the caller's now (nobody closes it)."""
        assert entrant.outcome is not None and entrant.outcome.ok
        entrant.taken = True
        return cast(T, entrant.outcome.value)

    async def _stop(self) -> None:
        """Cancel every run still going, wait until all ended, close what was not taken (and,
        when cancelled meanwhile, also what was: the caller will never get it)."""
        tasks = [e.task for e in self._entrants if not e.task.done()]
        for task in tasks:
            task.cancel()
        interrupted: asyncio.CancelledError | None = None
        while not all(task.done() for task in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError as exc:  # cancelled again: finish the cleanup first
                interrupted = exc
        for entrant in self._entrants:
            task = entrant.task
            if task.cancelled() or (entrant.taken and interrupted is None):
                continue
            outcome = entrant.outcome or task.result()
            if outcome.ok and outcome.value is not None:
                await self._close(outcome.value)
        if interrupted is not None:
            raise interrupted


async def _outcome(run: Coroutine[Any, Any, T]) -> Outcome[T]:
    try:
        return Outcome(value=await run)
    except Exception as exc:  # the caller decides what a failure means
        return Outcome(error=exc)
