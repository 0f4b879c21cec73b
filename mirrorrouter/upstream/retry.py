"""The one retry policy for upstream calls, built on tenacity.

- Only idempotent GET and HEAD requests are ever retried (every upstream call of a mirror
  is one of them).
- **Temporary** failures are retried: connection errors, a timeout within a body, 408, 429,
  5xx, and the ``UNAVAILABLE`` / ``TOOMANYREQUESTS`` error codes. Not found (401/403/404),
  corrupt content and other 4xx are final for that mirror: the caller fails over instead.
- A mirror that gave no response headers in time (``NoHeadersInTime``: the first-byte
  timeout, or any timeout before the headers) is temporary but not retried: a hung mirror
  would cost the whole timeout again, so the next mirror is asked at once.
- Waits grow exponentially with full jitter; a ``Retry-After`` is honoured up to a cap, and
  a mirror asking for more than the cap is not retried (the next mirror is tried at once).
- One total deadline bounds all tries of a request, across mirrors.
- Tests inject ``sleep`` (zero waits) and ``clock``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
)
from tenacity.stop import stop_base

from mirrorrouter.errors import NoHeadersInTime, UpstreamError

T = TypeVar("T")

TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TEMPORARY_CODES = frozenset({"UNAVAILABLE", "TOOMANYREQUESTS"})


def is_temporary(exc: BaseException) -> bool:
    """Whether retrying the same mirror may help."""
    if isinstance(exc, NoHeadersInTime):
        return False  # a hung mirror: move on rather than wait for it again
    return isinstance(exc, UpstreamError) and exc.is_temporary


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one mirror is retried."""

    attempts: int = 3
    deadline: float = 120.0
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    retry_after_cap: float = 10.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    jitter: Callable[[], float] = field(default=random.random)

    def start(self) -> float:
        """The deadline of a request starting now."""
        return self.clock() + self.deadline

    def wait_seconds(self, attempt: int, error: BaseException | None) -> float:
        """Exponential backoff with full jitter, or the mirror's Retry-After (capped)."""
        if isinstance(error, UpstreamError) and error.retry_after is not None:
            return min(error.retry_after, self.retry_after_cap)
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        return float(ceiling * self.jitter())

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        deadline: float,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn``, retrying temporary failures while attempts and time remain."""

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(state.attempt_number, error)

        retrying = AsyncRetrying(
            stop=stop_any(stop_after_attempt(self.attempts), _OutOfTime(self, deadline)),
            wait=wait,
            retry=retry_if_exception(is_temporary),
            sleep=self.sleep,
            reraise=True,
            before_sleep=(lambda _state: on_retry()) if on_retry is not None else None,
        )
        result: T = await retrying(fn)
        return result


class _OutOfTime(stop_base):
    """Stop when the next wait would pass the deadline, or the mirror wants too long."""

    def __init__(self, policy: RetryPolicy, deadline: float) -> None:
        self.policy = policy
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        retry_after = error.retry_after if isinstance(error, UpstreamError) else None
        if retry_after is not None and retry_after > self.policy.retry_after_cap:
            return True  # the mirror wants a long pause: fail over instead
        wait = self.policy.wait_seconds(state.attempt_number, error)
        return self.policy.clock() + wait >= self.deadline
