"""Password checks that cannot stall the gateway, and the back-off of failed logins.

bcrypt is slow on purpose (a cost-12 hash costs about 0.3 s of CPU); run on the event loop,
forty wrong passwords held up every other request for seconds. So:

- ``PasswordChecker`` runs each bcrypt check in a small thread pool of its own (never the
  default pool, which the caches' file I/O shares), with a bounded number of checks waiting
  for it: past that bound a login is answered at once with 503 ``UNAVAILABLE`` and
  ``Retry-After`` rather than queued without bound. A password bcrypt cannot take (over 72
  bytes) is simply wrong: bcrypt is not even asked.
- ``LoginBackoff`` counts failed logins per key: (user, client address) for a user of the
  htpasswd file, the address alone for names it does not know. After ``free`` failures,
  the next attempt waits ``base * 2**(failures - free)`` seconds (at most ``cap``) from the
  last failure; an attempt during that wait is refused at once with 429
  ``TOOMANYREQUESTS`` and ``Retry-After`` (nothing sleeps, nothing is held). Checks in
  progress count as failures until they are decided, so a burst cannot slip past the count.
  A success forgets the key; so does ``forget`` seconds without a failure.

A credential already proven good is answered from clientauth.py's cache before either of
these is asked, so an attacker's failures never delay a real user's cached login.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import bcrypt
from cachetools import TTLCache

from mirrorrouter.errors import ErrorCode, RegistryError

BCRYPT_MAX_BYTES = 72  # bcrypt raises beyond this (older versions silently truncated)

CHECK_WORKERS = 2  # bcrypt threads: password checks never take more of the CPUs than this
CHECKS_WAITING = 16  # checks queued behind them before logins are answered 503

FREE_FAILURES = 5  # failed logins per key before the back-off starts
BACKOFF_BASE = 1.0  # seconds after the first failure past the free ones; doubling
BACKOFF_CAP = 60.0  # the longest wait: one guess a minute per key at most
BACKOFF_FORGET = 900.0  # a key with no failure for this long starts over
BACKOFF_KEYS = 65536  # keys remembered at most (the oldest go first)


def checkpw(password: str, stored: bytes) -> bool:
    """bcrypt's verdict; a password bcrypt cannot take, or a broken entry, is a wrong one."""
    try:
        return bcrypt.checkpw(password.encode(), stored)
    except ValueError:  # over 72 bytes, or an htpasswd entry with a malformed salt
        return False


class PasswordChecker:
    """bcrypt checks in a bounded pool of their own threads."""

    def __init__(self, *, workers: int = CHECK_WORKERS, waiting: int = CHECKS_WAITING) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        # Checks running or queued. A semaphore (not a counter on the loop) because a
        # check's slot is given back by its thread when it ends, even if nobody awaits it
        # any more (the client left).
        self._slots = threading.BoundedSemaphore(workers + waiting)

    async def check(self, password: str, stored: bytes) -> bool:
        """Whether ``password`` matches the ``stored`` hash; 503 when too many checks wait."""
        if len(password.encode()) > BCRYPT_MAX_BYTES:
            return False  # never a thread for what bcrypt refuses anyway
        if not self._slots.acquire(blocking=False):
            raise RegistryError(
                ErrorCode.UNAVAILABLE,
                "too many password checks in progress; try again shortly",
                headers={"Retry-After": "1"},
            )
        try:
            future = self._pool.submit(checkpw, password, stored)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class _Failures:
    count: int = 0  # decided failures
    pending: int = 0  # attempts being checked
    last: float = 0.0  # when the last failure was decided


class LoginBackoff:
    """Failed logins per key, and how long a key must wait before its next attempt."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        free: int = FREE_FAILURES,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_CAP,
        forget: float = BACKOFF_FORGET,
        keys: int = BACKOFF_KEYS,
    ) -> None:
        self.clock = clock
        self.free, self.base, self.cap = free, base, cap
        self._failures: TTLCache[Hashable, _Failures] = TTLCache(keys, forget, timer=clock)

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failed attempts (0 while they are free)."""
        if failures < self.free:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - self.free, 32))

    def wait(self, key: Hashable) -> float:
        """Seconds before ``key`` may try again; 0 when it may now."""
        record = self._failures.get(key)
        if record is None:
            return 0.0
        if record.pending and record.count + record.pending >= self.free:
            return self.base  # the attempts in progress use up what is allowed
        if record.count < self.free:
            return 0.0
        return max(0.0, record.last + self.delay(record.count) - self.clock())

    async def guard(self, key: Hashable, check: Callable[[], Awaitable[bool]]) -> bool:
        """Run one login attempt of ``key`` (``check`` says whether it succeeded), or refuse
        it with 429 during the key's back-off."""
        wait = self.wait(key)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                f"too many failed logins; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
        record = self._failures.get(key) or _Failures()
        record.pending += 1
        self._failures[key] = record
        verdict: bool | None = None  # None: undecided (the check failed or was cancelled)
        try:
            verdict = await check()
            return verdict
        finally:
            self._settle(key, verdict)

    def _settle(self, key: Hashable, verdict: bool | None) -> None:
        if verdict:
            self._failures.pop(key, None)
            return
        record = self._failures.get(key) or _Failures()
        record.pending = max(0, record.pending - 1)
        if verdict is False:
            record.count += 1
            record.last = self.clock()
        self._failures[key] = record  # (re)starts the time until it is forgotten
