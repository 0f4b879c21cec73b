"""The clocks and the sleep the gateway runs on, in one value so tests can replace them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """``wall`` dates tag records (persisted); ``monotonic`` times breakers and deadlines."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


REAL_TIME = Timing()  # the default: the real clocks and asyncio.sleep
