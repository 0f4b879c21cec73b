"""A circuit breaker per mirror.

Closed: requests flow. After ``threshold`` consecutive failures (temporary errors or
corrupt content; a 404 is a healthy answer) the circuit opens and the mirror is skipped
for ``cooldown`` seconds. Then it is half-open: exactly one request is let through as a
probe; success closes the circuit, failure opens it again for another cooldown.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger("mirrorrouter.breaker")


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """The health of one mirror, as seen by this process."""

    def __init__(
        self,
        name: str,
        *,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.name = name
        self.on_change = on_change
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether a request may go to this mirror now (claims the probe when half-open)."""
        if self.state is CircuitState.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self._change(CircuitState.HALF_OPEN)
        if self.state is CircuitState.HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state is not CircuitState.CLOSED:
            self._change(CircuitState.CLOSED)

    def failure(self) -> None:
        self._probing = False
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or self.failures >= self.threshold:
            self.opened_at = self.clock()
            if self.state is not CircuitState.OPEN:
                self._change(CircuitState.OPEN)

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
