"""Failover across an upstream's mirrors: the one place that decides which mirror is asked,
when the next one is, and what the client hears when all failed.

- mirrors are tried in their configured order (a mirror a hedge overtook while it was past
  its usual time is asked after the others for a ``breaker_cooldown``); a mirror whose
  circuit is open
  (``breaker.py``; shared by every replica with Redis coordination) is skipped;
- each mirror is retried per the retry policy (``retry.py``) while its failures are
  temporary, then the next mirror is tried;
- a mirror that sends no response headers within ``first_byte_timeout`` is given up at
  once for the next (never retried: a hung mirror would cost the timeout again);
- while a mirror is slower than it usually is, the next one is asked as well (a hedge,
  ``hedging.py``); the first good answer wins, the other request is closed unread;
- when every mirror's circuit is open and none was asked, one request at a time probes the
  mirror whose cooldown ends first, instead of every request failing untried;
- every answer is kept in ``Attempts`` (in list order), which becomes the client's error
  when all failed.

``UpstreamClient`` (client.py) says what one attempt at one mirror is; this module runs
the attempts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from mirrorrouter.config import Capability, Mirror, UpstreamSettings
from mirrorrouter.errors import ErrorCode, RegistryError, UpstreamError
from mirrorrouter.metrics import Metrics
from mirrorrouter.timing import Timing
from mirrorrouter.upstream.answers import Attempts
from mirrorrouter.upstream.breaker import CircuitBreaker, CircuitState
from mirrorrouter.upstream.hedging import Entrant, HeaderLatency, Race
from mirrorrouter.upstream.retry import RetryPolicy

log = logging.getLogger("mirrorrouter.upstream")

T = TypeVar("T")


class Failover:
    """Runs one request over an upstream's mirrors (see the module docstring)."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        breakers: dict[str, CircuitBreaker],
        latency: dict[str, HeaderLatency],
        demoted: dict[str, float],
        retry: RetryPolicy,
        metrics: Metrics,
        timing: Timing,
    ) -> None:
        """``breakers``, ``latency`` and ``demoted`` are per mirror URL (the client's)."""
        self.settings = settings
        self.name = settings.name
        self.breakers = breakers
        self.latency = latency
        self.demoted = demoted
        self.retry = retry
        self.metrics = metrics
        self.timing = timing
        self.clock = timing.monotonic

    def mirrors(self, capability: Capability) -> list[Mirror]:
        return [m for m in self.settings.mirrors if capability in m.capabilities]

    async def first(
        self,
        capability: Capability,
        what: str,
        not_found: ErrorCode,
        attempt: Callable[[Mirror], Awaitable[T]],
        *,
        exclude: frozenset[str] = frozenset(),
    ) -> tuple[T, Mirror]:
        """The first good answer, in failover order; raises the summed-up error.

        One mirror is asked at a time, the next when it failed; while the one asked has not
        answered within its usual time, the next is asked as well (``hedge``), so at most
        two are asked at once. A hedge target must be allowed by its breaker like any other.
        """
        policy = self.settings.policy
        answers = _Answers(self.name)
        queue = deque(self._in_order(self.mirrors(capability)))
        circuit_open: list[_Asked] = []
        deadline = self.retry.start()
        asked_any = False
        async with Race[_Asked, T](self.timing.timer, _close_answer) as race:
            while True:
                pending = race.pending
                if not pending:
                    asked = await self._next_mirror(queue, exclude, answers, circuit_open)
                    if asked is None and not asked_any:
                        asked = self._early_probe(circuit_open)
                    if asked is None:
                        break
                    self._ask(race, asked, attempt, deadline, hedge=False)
                    asked_any = True
                    continue
                hedge_in = None
                if policy.hedge and len(pending) == 1 and queue:
                    lone = pending[0]
                    delay = self.latency[lone.key.mirror.url].hedge_delay(policy.first_byte_timeout)
                    hedge_in = max(0.0, lone.started + delay - self.clock())
                ended = await race.ended(hedge_in)
                if not ended:  # the one asked is slower than usual: ask the next one too
                    asked = await self._next_mirror(queue, exclude, answers, circuit_open)
                    if asked is not None:
                        self.metrics.hedges.labels(self.name, asked.mirror.name).inc()
                        self._ask(race, asked, attempt, deadline, hedge=True)
                    continue
                for entrant in ended:
                    if self._judge(entrant, what, answers):
                        self._overtaken(race.pending, entrant, what)
                        return race.take(entrant), entrant.key.mirror
        raise answers.error(not_found, what)

    def _in_order(self, mirrors: list[Mirror]) -> list[tuple[int, Mirror]]:
        """The mirrors with their places in the configured (failover) order, demoted ones
        after the others (each group keeps its configured order)."""
        now = self.clock()
        for url, until in list(self.demoted.items()):
            if until <= now:
                del self.demoted[url]
        return sorted(enumerate(mirrors), key=lambda placed: placed[1].url in self.demoted)

    async def _next_mirror(
        self,
        queue: deque[tuple[int, Mirror]],
        exclude: frozenset[str],
        answers: _Answers,
        circuit_open: list[_Asked],
    ) -> _Asked | None:
        """The next mirror in failover order that may be asked now (a half-open circuit's
        probe is claimed here); the ones passed over are noted."""
        while queue:
            position, mirror = queue.popleft()
            if mirror.name in exclude:
                answers.note(position, mirror, "skipped: served content that failed verification")
                continue
            breaker = self.breakers[mirror.url]
            await breaker.refresh()  # what other replicas saw (shared circuits only)
            if not breaker.allow():
                answers.note(position, mirror, "skipped: circuit open")
                circuit_open.append(_Asked(position, mirror, probe=True))
                continue
            return _Asked(position, mirror, probe=breaker.state is CircuitState.HALF_OPEN)
        return None

    def _early_probe(self, circuit_open: list[_Asked]) -> _Asked | None:
        """Every mirror the request could use has its circuit open: probe the one whose
        cooldown ends first now, unless a probe is out already (then fail at once, as before:
        a probe of a hung mirror takes the first-byte timeout, and the tags among the
        refused requests are served stale meanwhile)."""
        if not circuit_open:
            return None
        soonest = min(circuit_open, key=lambda a: self.breakers[a.mirror.url].reopens_in())
        if not self.breakers[soonest.mirror.url].probe_early():
            return None
        log.warning(
            "every mirror of %s has its circuit open: probing %s", self.name, soonest.mirror.name
        )
        return soonest

    def _ask(
        self,
        race: Race[_Asked, T],
        asked: _Asked,
        attempt: Callable[[Mirror], Awaitable[T]],
        deadline: float,
        *,
        hedge: bool,
    ) -> None:
        race.start(asked, self._tries(asked, attempt, deadline), started=self.clock(), hedge=hedge)

    async def _tries(
        self, asked: _Asked, attempt: Callable[[Mirror], Awaitable[T]], deadline: float
    ) -> T:
        """Every try of one mirror (the retry policy's)."""
        mirror = asked.mirror
        try:
            return await self.retry.call(
                _bind(attempt, mirror),
                deadline,
                on_retry=self.metrics.retries.labels(self.name, mirror.name).inc,
            )
        except asyncio.CancelledError:
            # Abandoned (another mirror answered first, or the client went away): a probe
            # is given back, or the circuit would stay half-open with a probe out forever.
            if asked.probe:
                self.breakers[mirror.url].release()
            raise

    def _judge(self, entrant: Entrant[_Asked, T], what: str, answers: _Answers) -> bool:
        """Count a mirror's answer (breaker, metrics, the error detail); True when good."""
        asked, outcome = entrant.key, entrant.outcome
        assert outcome is not None
        mirror, breaker = asked.mirror, self.breakers[asked.mirror.url]
        seconds = self.clock() - entrant.started
        if outcome.ok:
            self.metrics.mirror_answer(self.name, mirror.name, "ok", seconds)
            breaker.success()
            self.demoted.pop(mirror.url, None)  # it answered first: fast again
            if entrant.hedge:
                self.metrics.hedge_wins.labels(self.name, mirror.name).inc()
            return True
        exc = outcome.error
        if not isinstance(exc, UpstreamError):
            assert exc is not None
            raise exc  # not an answer of the mirror's: a fault of ours, raised as it is
        outcome_label = "not_found" if exc.is_not_found else "failure"
        self.metrics.mirror_answer(self.name, mirror.name, outcome_label, seconds)
        if exc.is_not_found:
            breaker.success()  # a healthy answer
        else:
            breaker.failure()
            self.metrics.failovers.labels(self.name, mirror.name).inc()
            log.warning("mirror %s failed %s: %s", mirror.name, what, exc.outcome)
        answers.note(asked.position, mirror, exc.outcome, exc.status, exc.retry_after)
        return False

    def _overtaken(
        self, losers: list[Entrant[_Asked, T]], winner: Entrant[_Asked, T], what: str
    ) -> None:
        """The mirrors still silent when another's answer won (they are closed next): past
        their own usual time, that is a failure for their breaker, as a timeout would have
        been, so a hung or drowning mirror's circuit opens and requests stop waiting for it;
        a hedge target asked moments ago gets no verdict. Such a mirror is also demoted for
        a ``breaker_cooldown``: asked after the others, it is only their hedge meanwhile."""
        policy = self.settings.policy
        for loser in losers:
            mirror = loser.key.mirror
            waited = self.clock() - loser.started
            if waited < self.latency[mirror.url].hedge_delay(policy.first_byte_timeout):
                continue
            self.breakers[mirror.url].failure()
            if mirror.url not in self.demoted:
                self.metrics.demotions.labels(self.name, mirror.name).inc()
            self.demoted[mirror.url] = self.clock() + policy.breaker_cooldown
            log.warning(
                "mirror %s gave no answer to %s in %.2fs; %s answered first",
                mirror.name,
                what,
                waited,
                winner.key.mirror.name,
            )

    async def round_from(
        self,
        after: str | None,
        what: str,
        not_found: ErrorCode,
        attempt: Callable[[Mirror], Awaitable[T]],
        *,
        exclude: frozenset[str],
    ) -> tuple[T, Mirror]:
        """``first`` on the pull mirrors, in failover order turned round to start
        after the mirror ``after`` (which comes last); one error listing every answer."""
        names = [m.name for m in self.mirrors(Capability.PULL)]
        turns = [names]
        if after in names:
            cut = names.index(after) + 1
            turns = [turn for turn in (names[cut:], names[:cut]) if turn]
        tried: list[dict[str, str]] = []
        for turn in turns:
            elsewhere = frozenset(names).difference(turn, exclude)  # asked in the other turn
            try:
                return await self.first(
                    Capability.PULL, what, not_found, attempt, exclude=exclude | elsewhere
                )
            except RegistryError as error:
                # Each mirror as the turn that asked it answered; the excluded ones once.
                listed = elsewhere if turn is turns[0] else elsewhere | exclude
                tried += _tried(error, leave_out=listed)
                if turn is turns[-1]:
                    if isinstance(error.detail, dict):
                        error.detail["tried"] = tried
                    raise
        raise AssertionError("unreachable: the last turn returns or raises")


@dataclass(frozen=True, slots=True)
class _Asked:
    """A mirror asked within one request: its place in the list, and whether the request
    holds its circuit's probe (to give back when the run is abandoned)."""

    position: int
    mirror: Mirror
    probe: bool


class _Answers:
    """What each mirror answered, in list order whatever order the answers came in (two
    mirrors may be asked at once); becomes the client's error (``Attempts``) when all failed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._by_position: dict[int, tuple[Mirror, str, int | None, float | None]] = {}

    def note(
        self,
        position: int,
        mirror: Mirror,
        outcome: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        # A later note replaces an earlier one: a probe's answer replaces "circuit open".
        self._by_position[position] = (mirror, outcome, status, retry_after)

    def error(self, not_found: ErrorCode, what: str) -> RegistryError:
        attempts = Attempts(self.upstream)
        for position in sorted(self._by_position):
            mirror, outcome, status, retry_after = self._by_position[position]
            attempts.add(mirror, outcome, status)
            if retry_after is not None:
                attempts.retry_after = retry_after
        return attempts.error(not_found, what)


async def _close_answer(answer: object) -> None:
    """An answer nobody took (a hedge's loser): an open response is closed unread."""
    if isinstance(answer, httpx.Response):
        await answer.aclose()


def _tried(error: RegistryError, *, leave_out: frozenset[str]) -> list[dict[str, str]]:
    """What each mirror answered, from an error of ``first``, but for ``leave_out``."""
    tried = error.detail.get("tried", []) if isinstance(error.detail, dict) else []
    return [t for t in tried if t.get("mirror") not in leave_out]


def _bind(attempt: Callable[[Mirror], Awaitable[T]], mirror: Mirror) -> Callable[[], Awaitable[T]]:
    # A coroutine function, not a lambda: tenacity awaits only what it sees as async.
    async def bound() -> T:
        return await attempt(mirror)

    return bound
