"""``RedisCoordinator``: replicas sharing one Redis (the keys and the fail-open rule are in
the package docstring, coordination/__init__.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mirrorrouter.cache import TagRecord
from mirrorrouter.cache.base import encode_tag_record, parse_tag_record
from mirrorrouter.config.model import CoordinationSettings
from mirrorrouter.coordination.base import Holder, Lease, SharedCircuit
from mirrorrouter.coordination.local import LocalCoordinator
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.reference import Digest

log = logging.getLogger("mirrorrouter.coordination")

T = TypeVar("T")

REDIS_TIMEOUT = 1.0  # seconds for a connection or an answer: a pull never waits longer
OUTAGE_BACKOFF = 5.0  # seconds Redis is not asked again after it failed
FAILURE_WINDOW = 60.0  # a circuit's failure count is forgotten this long after the last

# Delete (or extend) the lock only while it still holds our value.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# Move a generation. A counter Redis does not have (never bumped, or Redis restarted empty)
# starts from a random value: a stamp remembered before a restart never matches again.
_BUMP = """
if redis.call('exists', KEYS[1]) == 0 then redis.call('set', KEYS[1], ARGV[1]) end
return redis.call('incr', KEYS[1])
"""
# Count a failure; at the threshold open the circuit for everyone (NX: a window that is
# already running keeps its end). Answers the count and what is left of the open window.
_FAILURE = """
local n = redis.call('incr', KEYS[1])
redis.call('pexpire', KEYS[1], ARGV[1])
if n >= tonumber(ARGV[2]) then redis.call('set', KEYS[2], '1', 'PX', ARGV[3], 'NX') end
return {n, redis.call('pttl', KEYS[2])}
"""


class _Unavailable(Exception):
    """Redis could not answer (already logged): fall back to local behaviour."""


class RedisCoordinator:
    """Replicas sharing one Redis; fails open to ``LocalCoordinator`` behaviour.

    Its leases (blob downloads, tag resolutions) are SET NX PX keys renewed while held.

    ``clock`` (monotonic seconds) times the outage backoff and the circuit views; ``sleep``
    paces lease renewal (it waits for real time: a lock's TTL runs in Redis).
    """

    def __init__(
        self,
        settings: CoordinationSettings,
        *,
        client: aioredis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if client is None:
            if settings.redis_url is None:
                raise ValueError('coordination backend "redis" needs redis_url')
            client = aioredis.from_url(
                settings.redis_url.value,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
                retry=Retry(NoBackoff(), 1),  # once, for a pooled connection Redis closed
                decode_responses=True,
            )
        self.redis = client
        self.shared = True
        self.prefix = settings.key_prefix
        self.lock_ttl = settings.lock_ttl
        self.advertise_url = settings.advertise_url
        self.clock = clock
        self.sleep = sleep
        self.local = LocalCoordinator(settings)  # while Redis is out
        self._down_until: float | None = None
        self._outage = False
        self._background: set[asyncio.Task[None]] = set()
        self._renewals: set[asyncio.Task[None]] = set()  # of the leases held
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._failure = client.register_script(_FAILURE)
        self._bump = client.register_script(_BUMP)

    async def close(self) -> None:
        """Stop renewing leases still held (they expire), flush writes, disconnect."""
        for renewal in list(self._renewals):
            renewal.cancel()
        await asyncio.gather(*self._renewals, return_exceptions=True)
        await self.flush()
        await self.redis.aclose()

    async def flush(self) -> None:
        """Wait for the writes sent in the background so far (circuit updates)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- fill locks

    def _fill_key(self, upstream: str, digest: Digest) -> str:
        return f"{self.prefix}:fill:{upstream}@{digest}"

    async def claim(self, upstream: str, digest: Digest) -> Lease | None:
        """SET NX PX lock_ttl; renewed in the background while held. Redis out: the local
        lock table decides (fail open)."""
        try:
            return await self._lease(self._fill_key(upstream, digest))
        except _Unavailable:
            return await self.local.claim(upstream, digest)

    async def claim_tag(self, upstream: str, repository: str, tag: str) -> Lease | None:
        """The lease on resolving a tag, like ``claim``. Redis out: the local table decides."""
        try:
            return await self._lease(f"{self.prefix}:resolve:{upstream}/{repository}:{tag}")
        except _Unavailable:
            return await self.local.claim_tag(upstream, repository, tag)

    async def _lease(self, key: str) -> RedisLease | None:
        """SET NX PX lock_ttl of ``key`` (renewed while held); None while another holds it.
        Raises ``_Unavailable`` when Redis could not answer."""
        token = secrets.token_hex(16)
        value = f"{token} {self.advertise_url or ''}"
        taken = await self._redis(
            "claim", lambda: self.redis.set(key, value, nx=True, px=_ms(self.lock_ttl))
        )
        return RedisLease(self, key, token, value) if taken else None

    async def holder(self, upstream: str, digest: Digest) -> Holder | None:
        key = self._fill_key(upstream, digest)
        try:
            value = await self._redis("holder", lambda: self.redis.get(key))
        except _Unavailable:
            return await self.local.holder(upstream, digest)
        if not isinstance(value, str):
            return None
        token, _, url = value.partition(" ")
        return Holder(token, url or None)

    # -- negative cache

    def _not_found_key(self, upstream: str, repository: str, reference: str) -> str:
        return f"{self.prefix}:notfound:{upstream}/{repository}:{reference}"

    async def _get(self, what: str, key: str) -> str | None:
        """A value, or None when there is none or Redis is out."""
        try:
            raw = await self._redis(what, lambda: self.redis.get(key))
        except _Unavailable:
            return None
        return raw if isinstance(raw, str) else None

    async def _put(self, what: str, key: str, raw: str, ttl: float) -> None:
        """Set with an expiry; dropped when Redis is out (or there is no time to keep it)."""
        if ttl <= 0:
            return
        with contextlib.suppress(_Unavailable):
            await self._redis(what, lambda: self.redis.set(key, raw, px=_ms(ttl)))

    async def get_not_found(
        self, upstream: str, repository: str, reference: str
    ) -> RegistryError | None:
        """A miss when Redis is out (the local negative cache still answers)."""
        key = self._not_found_key(upstream, repository, reference)
        raw = await self._get("negative cache", key)
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
            return RegistryError(
                ErrorCode[entry["code"]], entry["message"], detail=entry.get("detail")
            )
        except (ValueError, KeyError, TypeError):
            return None

    async def put_not_found(
        self, upstream: str, repository: str, reference: str, error: RegistryError, ttl: float
    ) -> None:
        """Dropped when Redis is out."""
        entry = {"code": error.code.name, "message": error.message, "detail": error.detail}
        key = self._not_found_key(upstream, repository, reference)
        await self._put("negative cache", key, json.dumps(entry, default=str), ttl)

    # -- tag checks

    def _tag_key(self, upstream: str, repository: str, tag: str) -> str:
        return f"{self.prefix}:tag:{upstream}/{repository}:{tag}"

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        """A miss when Redis is out (the replica revalidates upstream as it would alone)."""
        raw = await self._get("tag cache", self._tag_key(upstream, repository, tag))
        return None if raw is None else parse_tag_record(raw.encode())

    async def put_tag(
        self, upstream: str, repository: str, tag: str, record: TagRecord, ttl: float
    ) -> None:
        """Dropped when Redis is out."""
        raw = encode_tag_record(record).decode()
        await self._put("tag cache", self._tag_key(upstream, repository, tag), raw, ttl)

    # -- upload sessions of hosted repositories

    def _upload_key(self, upload_id: str) -> str:
        return f"{self.prefix}:upload:{upload_id}"

    async def put_upload(self, upload_id: str, ttl: float) -> None:
        """Dropped when Redis is out, or when this replica has no advertise_url."""
        if self.advertise_url is not None:
            await self._put("upload session", self._upload_key(upload_id), self.advertise_url, ttl)

    async def upload_owner(self, upload_id: str) -> str | None:
        return await self._get("upload session", self._upload_key(upload_id))

    # -- housekeeping chores

    def _chore_key(self, chore: str) -> str:
        return f"{self.prefix}:chore:{chore}"

    async def claim_chore(self, chore: str) -> Lease | None:
        """A lease like a fill lock's (SET NX PX, renewed while held). Redis out: the local
        table decides, so each replica may run the chore once (fail open)."""
        try:
            return await self._lease(self._chore_key(chore))
        except _Unavailable:
            return await self.local.claim_chore(chore)

    async def chore_record(self, chore: str) -> str | None:
        """None when Redis is out."""
        return await self._get("chore record", f"{self._chore_key(chore)}:record")

    async def put_chore_record(self, chore: str, record: str, ttl: float) -> None:
        """Dropped when Redis is out."""
        await self._put("chore record", f"{self._chore_key(chore)}:record", record, ttl)

    # -- generations of hosted sets

    def _generation_key(self, hosted: str) -> str:
        return f"{self.prefix}:generation:{hosted}"

    async def bump_generation(self, hosted: str) -> None:
        """INCR; dropped when Redis is out (the other replicas then rely on the age limit
        of what they remember, generation.SHARED_MAX_AGE)."""
        keys, start = [self._generation_key(hosted)], secrets.randbits(48)
        with contextlib.suppress(_Unavailable):
            await self._redis("generation", lambda: self._bump(keys=keys, args=[start]))

    async def generations(self, hosted: Sequence[str]) -> dict[str, int] | None:
        """One MGET; None when Redis is out."""
        keys = [self._generation_key(name) for name in hosted]
        try:
            values = await self._redis("generation", lambda: self.redis.mget(keys))
        except _Unavailable:
            return None
        found = {}
        for name, value in zip(hosted, values, strict=True):
            try:
                found[name] = int(value or 0)
            except ValueError:
                found[name] = -1  # unreadable: never equal to a counter we saw
        return found

    # -- circuits

    def circuit(
        self, upstream: str, mirror: str, *, threshold: int, cooldown: float
    ) -> SharedCircuit | None:
        return RedisCircuit(self, f"{self.prefix}:circuit:{upstream}:{mirror}", threshold, cooldown)

    # -- the one way to Redis

    async def _redis(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; raises ``_Unavailable`` (after logging the outage once)
        when Redis fails, and for ``OUTAGE_BACKOFF`` seconds after without asking it."""
        if self._down_until is not None and self.clock() < self._down_until:
            raise _Unavailable(what)
        try:
            result = await operation()
        except Exception as error:  # whatever it was, a pull must not fail for it
            self._down_until = self.clock() + OUTAGE_BACKOFF
            if not self._outage:
                self._outage = True
                log.warning(
                    "redis unavailable (%s: %s): this replica coordinates alone until it is back",
                    what,
                    error or type(error).__name__,
                )
            raise _Unavailable(what) from error
        if self._outage:
            self._outage = False
            log.warning("redis is back: coordination is shared again")
        return result

    def _send(self, what: str, operation: Callable[[], Awaitable[None]]) -> None:
        """Run a write in the background (breakers call synchronously); never raises."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop: nothing to share with
        task = loop.create_task(self._quietly(what, operation))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quietly(self, what: str, operation: Callable[[], Awaitable[None]]) -> None:
        with contextlib.suppress(_Unavailable):
            await self._redis(what, operation)


class RedisLease:
    """A lease held in Redis (a fill lock, a chore's), renewed every lock_ttl/3 until
    released."""

    def __init__(self, owner: RedisCoordinator, key: str, token: str, value: str) -> None:
        self.token = token
        self.lost = False
        self._owner = owner
        self._key = key
        self._value = value
        self._done = False
        self._renewal = asyncio.get_running_loop().create_task(self._keep())
        owner._renewals.add(self._renewal)
        self._renewal.add_done_callback(owner._renewals.discard)

    async def _keep(self) -> None:
        owner = self._owner
        while True:
            await owner.sleep(owner.lock_ttl / 3)
            try:
                kept = await owner._redis(
                    "lock renewal",
                    lambda: owner._renew(keys=[self._key], args=[self._value, _ms(owner.lock_ttl)]),
                )
            except _Unavailable:
                continue  # the lock may expire meanwhile: another replica may fetch it too
            if not kept:
                self.lost = True
                log.warning("lease %s expired while held: another may take it", self._key)
                return

    async def _stop(self) -> None:
        self._renewal.cancel()
        await asyncio.wait([self._renewal])

    def abandon(self) -> None:
        """Stop renewing and never release: what a holder that died leaves behind."""
        self._done = True
        self._renewal.cancel()

    async def release(self) -> None:
        """Compare-and-delete: only our own lock is deleted. Redis out: it expires."""
        if self._done:
            return
        self._done = True
        await self._stop()
        if self.lost:
            return
        owner = self._owner
        with contextlib.suppress(_Unavailable):
            await owner._redis(
                "lock release", lambda: owner._release(keys=[self._key], args=[self._value])
            )


class RedisCircuit:
    """A mirror's circuit in Redis: a failure count (INCR, expiring FAILURE_WINDOW after the
    last failure) and an open window (a key with PX cooldown). Reads answer the view of the
    last ``refresh``; writes go out in the background. Redis out: the local breaker decides."""

    def __init__(self, owner: RedisCoordinator, key: str, threshold: int, cooldown: float) -> None:
        self._owner = owner
        self._failures_key = f"{key}:failures"
        self._open_key = f"{key}:open"
        self._threshold = threshold
        self._cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0

    def open_for(self) -> float:
        return max(0.0, self._open_until - self._owner.clock())

    def _saw(self, failures: int, open_ms: int) -> None:
        self._failures = failures
        self._open_until = self._owner.clock() + open_ms / 1000 if open_ms > 0 else 0.0

    async def refresh(self) -> None:
        async def read() -> list[Any]:
            async with self._owner.redis.pipeline(transaction=False) as pipe:
                pipe.get(self._failures_key)
                pipe.pttl(self._open_key)
                return list(await pipe.execute())

        try:
            failures, open_ms = await self._owner._redis("circuit", read)
        except _Unavailable:
            return
        self._saw(int(failures or 0), int(open_ms))

    def failure(self) -> None:
        self._failures += 1
        args = [_ms(FAILURE_WINDOW), self._threshold, _ms(self._cooldown)]

        async def count() -> None:
            failures, open_ms = await self._owner._failure(
                keys=[self._failures_key, self._open_key], args=args
            )
            self._saw(int(failures), int(open_ms))

        self._owner._send("circuit failure", count)

    def opened(self) -> None:
        self._open_until = self._owner.clock() + self._cooldown
        key, cooldown = self._open_key, _ms(self._cooldown)

        async def open_window() -> None:
            await self._owner.redis.set(key, "1", px=cooldown)

        self._owner._send("circuit open", open_window)

    def success(self) -> None:
        if self._failures == 0 and self.open_for() == 0:
            return  # nothing to reset: no write on the healthy path
        self._saw(0, 0)
        keys = (self._failures_key, self._open_key)

        async def reset() -> None:
            await self._owner.redis.delete(*keys)

        self._owner._send("circuit reset", reset)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
