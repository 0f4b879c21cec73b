"""A circuit breaker per mirror.

Closed: requests flow. After ``threshold`` consecutive failures (temporary errors or
corrupt content; a 404 is a healthy answer) the circuit opens and the mirror is skipped
for ``cooldown`` seconds. Then it is half-open: exactly one request is let through as a
probe; success closes the circuit, failure opens it again for another cooldown.

When every mirror of a request is open, waiting out the cooldown would refuse requests a
recovered mirror could serve: ``probe_early`` lets one request at a time probe before the
cooldown ends (the caller picks the mirror whose cooldown ends first, ``reopens_in``).

With ``shared`` state (coordination/, for replicas sharing Redis) the failures of every
replica count, and a circuit one replica opens is open for all: ``refresh`` learns the
shared view before ``allow`` consults it; what this process sees is published as it
happens. The shared state never raises; without it the breaker is this process's alone.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

from mirrorrouter.coordination.base import SharedCircuit

log = logging.getLogger("mirrorrouter.breaker")


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """The health of one mirror, as seen by this process (and its peers, when shared)."""

    def __init__(
        self,
        name: str,
        *,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
        shared: SharedCircuit | None = None,
    ) -> None:
        self.name = name
        self.on_change = on_change
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.shared = shared
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    async def refresh(self) -> None:
        """Learn what the other replicas saw (no-op without shared state)."""
        if self.shared is not None:
            await self.shared.refresh()

    def allow(self) -> bool:
        """Whether a request may go to this mirror now (claims the probe when half-open)."""
        if self.shared is not None and self.state is not CircuitState.OPEN and not self._probing:
            remaining = self.shared.open_for()
            if remaining > 0:  # another replica opened it: skip for what is left of it
                self.opened_at = self.clock() - self.cooldown + remaining
                self._change(CircuitState.OPEN)
        if self.state is CircuitState.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self._change(CircuitState.HALF_OPEN)
        if self.state is CircuitState.HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return True

    def reopens_in(self) -> float:
        """Seconds until the cooldown ends and a probe may go (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def probe_early(self) -> bool:
        """Claim the one probe now, cooldown or not; False while another probe is out."""
        if self._probing:
            return False
        if self.state is CircuitState.OPEN:
            self._change(CircuitState.HALF_OPEN)
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.shared is not None:
            self.shared.success()
        if self.state is not CircuitState.CLOSED:
            self._change(CircuitState.CLOSED)

    def failure(self) -> None:
        self._probing = False
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or self.failures >= self.threshold:
            self.opened_at = self.clock()
            if self.shared is not None:
                self.shared.opened()
            if self.state is not CircuitState.OPEN:
                self._change(CircuitState.OPEN)
        elif self.shared is not None:
            self.shared.failure()

    def release(self) -> None:
        """Give back a probe that ended with neither success nor failure."""
        self._probing = False

    def _change(self, state: CircuitState) -> None:
        log.warning(
            "mirror %s circuit %s -> %s (%d consecutive failures)",
            self.name,
            self.state.value,
            state.value,
            self.failures,
        )
        self.state = state
        if self.on_change is not None:
            self.on_change(state)
