"""The clocks and the sleeps the gateway runs on, in one value so tests can replace them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """``wall`` dates tag records (persisted); ``monotonic`` times breakers and deadlines.

    ``sleep`` is the pause between retries (tests make it return at once); ``timer`` is the
    wait that races network I/O, the first-byte timeout and the hedge delay (tests keep it
    real, or drive it by hand together with ``monotonic``).
    """

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    timer: Callable[[float], Awaitable[None]] = asyncio.sleep

    @contextlib.asynccontextmanager
    async def deadline(self, seconds: float) -> AsyncIterator[None]:
        """``asyncio.timeout(seconds)`` (``TimeoutError`` when it passes), timed by ``timer``."""
        async with asyncio.timeout(None) as scope:
            loop = asyncio.get_running_loop()

            async def expire() -> None:
                await self.timer(seconds)
                scope.reschedule(loop.time())

            alarm = asyncio.create_task(expire())
            try:
                yield
            finally:
                if not alarm.done():
                    alarm.cancel()
                    await asyncio.wait([alarm])


REAL_TIME = Timing()  # the default: the real clocks and asyncio.sleep
