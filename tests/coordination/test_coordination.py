"""Coordination among replicas against a real redis-server: fill locks, shared caches,
shared circuits, failing open; then two in-process replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mirrorrouter.api.failures import error_response
from mirrorrouter.api.peer import peer_blob
from mirrorrouter.cache import FilesystemCache, TagRecord
from mirrorrouter.config import Secret, parse_settings
from mirrorrouter.config.model import CoordinationSettings
from mirrorrouter.coordination import Lease, LocalCoordinator
from mirrorrouter.coordination.generation import (
    SHARED_MAX_AGE,
    SHARED_TRUST,
    Generation,
    SharedGenerations,
)
from mirrorrouter.coordination.redisbacked import OUTAGE_BACKOFF, RedisCoordinator, RedisLease
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.pull.peers import PEER_PATH
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.timing import Timing
from mirrorrouter.upstream.breaker import CircuitBreaker, CircuitState
from tests.support.fakeregistry import FakeRegistry, Image, make_image, sha256
from tests.support.inprocess import Clock, uvicorn_in_loop
from tests.support.redisserver import RedisServer
from tests.support.registry import free_port

pytestmark = pytest.mark.anyio

DIGEST = Digest.of(b"some blob")
TTL = 0.3  # seconds: real lock TTLs, short enough to wait for


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def settings_for(
    url: str, *, advertise: str | None = None, lock_ttl: float = TTL
) -> CoordinationSettings:
    return CoordinationSettings(
        backend="redis",
        redis_url=Secret(url),
        key_prefix="test",
        lock_ttl=lock_ttl,
        advertise_url=advertise,
    )


@asynccontextmanager
async def coordinators(
    url: str,
    count: int = 2,
    clock: Clock | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[list[RedisCoordinator]]:
    made = [
        RedisCoordinator(
            settings_for(url, advertise=f"http://replica-{i}"), clock=clock or Clock(), sleep=sleep
        )
        for i in range(count)
    ]
    try:
        yield made
    finally:
        for coordinator in made:
            await coordinator.close()


async def wait_for_claim(
    coordinator: RedisCoordinator, digest: Digest = DIGEST, limit: float = 3.0
) -> Lease:
    """Claim as soon as the lock is free (a real TTL running out)."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        lease = await coordinator.claim("docker.io", digest)
        if lease is not None:
            return lease
        assert asyncio.get_running_loop().time() < deadline, "the lock never expired"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------- fill locks


async def test_fill_lock_is_exclusive_across_replicas(redis_server: RedisServer) -> None:
    """One replica holds a blob's lock; the others see who (to follow it) until released."""
    async with coordinators(redis_server.redis_url) as (a, b):
        lease = await a.claim("docker.io", DIGEST)
        assert lease is not None
        assert await b.claim("docker.io", DIGEST) is None
        assert await a.claim("docker.io", DIGEST) is None  # not reentrant either
        holder = await b.holder("docker.io", DIGEST)
        assert holder is not None
        assert (holder.token, holder.url) == (lease.token, "http://replica-0")
        assert await b.claim("quay.io", DIGEST) is not None  # per upstream
        await lease.release()
        assert await b.holder("docker.io", DIGEST) is None
        assert await b.claim("docker.io", DIGEST) is not None


async def test_renewal_keeps_the_lock_past_its_ttl(redis_server: RedisServer) -> None:
    """A holder renews every lock_ttl/3: the lock outlives several TTLs while held."""
    async with coordinators(redis_server.redis_url) as (a, b):
        lease = await a.claim("docker.io", DIGEST)
        assert lease is not None
        await asyncio.sleep(TTL * 2.5)
        assert await b.claim("docker.io", DIGEST) is None
        assert not lease.lost
        await lease.release()


async def test_lock_of_a_dead_holder_expires_and_is_taken_over(
    redis_server: RedisServer,
) -> None:
    """A holder that stops renewing (it died) loses the lock after lock_ttl."""
    async with coordinators(redis_server.redis_url) as (a, b):
        lease = await a.claim("docker.io", DIGEST)
        assert isinstance(lease, RedisLease)
        lease.abandon()
        started = asyncio.get_running_loop().time()
        taken = await wait_for_claim(b)
        assert asyncio.get_running_loop().time() - started > TTL / 2
        holder = await a.holder("docker.io", DIGEST)
        assert holder is not None and holder.token == taken.token
        await taken.release()


async def test_release_never_deletes_another_replicas_lock(redis_server: RedisServer) -> None:
    """Compare-and-delete: a stalled holder whose lock expired and was taken over deletes
    nothing when it releases; its renewal, once it runs, reports the lock lost."""
    stalled = asyncio.Event()
    other = Digest.of(b"another blob")

    async def stall(seconds: float) -> None:
        await stalled.wait()  # a holder stalled past its TTL (a long GC pause, a frozen VM)

    async with (
        coordinators(redis_server.redis_url, count=1, sleep=stall) as (a,),
        coordinators(redis_server.redis_url, count=1) as (b,),
    ):
        stale = await a.claim("docker.io", DIGEST)
        stale_too = await a.claim("docker.io", other)
        assert stale is not None and stale_too is not None
        current = await wait_for_claim(b)
        current_too = await wait_for_claim(b, other)
        await stale.release()  # runs the compare-and-delete: not its value any more
        holder = await b.holder("docker.io", DIGEST)
        assert holder is not None and holder.token == current.token
        stalled.set()  # the other stale lease's renewal runs and finds the lock taken
        for _ in range(100):
            if stale_too.lost:
                break
            await asyncio.sleep(0.01)
        assert stale_too.lost
        await stale_too.release()
        holder = await b.holder("docker.io", other)
        assert holder is not None and holder.token == current_too.token
        await current.release()
        await current_too.release()


async def test_local_coordinator_locks_in_memory() -> None:
    """One replica alone: the same lock semantics, in this process."""
    local = LocalCoordinator(CoordinationSettings(advertise_url="http://me"))
    lease = await local.claim("docker.io", DIGEST)
    assert lease is not None and await local.claim("docker.io", DIGEST) is None
    holder = await local.holder("docker.io", DIGEST)
    assert holder is not None and holder.url == "http://me"
    await lease.release()
    assert await local.claim("docker.io", DIGEST) is not None
    assert await local.get_tag("docker.io", "a", "b") is None
    assert local.circuit("docker.io", "http://m", threshold=1, cooldown=1) is None


# ---------------------------------------------------------------------- shared caches


async def test_tag_and_negative_entries_are_shared_with_their_ttl(
    redis_server: RedisServer,
) -> None:
    """What one replica puts, another gets, for the TTL it was put with."""
    record = TagRecord(DIGEST, "application/vnd.oci.image.manifest.v1+json", 123, 1_000_000.5)
    missing = RegistryError(
        ErrorCode.MANIFEST_UNKNOWN, "manifest library/nope:1 not found upstream", detail={"x": 1}
    )
    async with coordinators(redis_server.redis_url) as (a, b):
        await a.put_tag("docker.io", "library/alpine", "3.19", record, ttl=60)
        await a.put_not_found("docker.io", "library/nope", "1", missing, ttl=30)
        assert await b.get_tag("docker.io", "library/alpine", "3.19") == record
        assert await b.get_tag("docker.io", "library/alpine", "3.20") is None
        assert await b.get_tag("quay.io", "library/alpine", "3.19") is None
        error = await b.get_not_found("docker.io", "library/nope", "1")
        assert error is not None
        assert (error.code, error.message, error.detail) == (
            missing.code,
            missing.message,
            missing.detail,
        )
        assert 59_000 < await b.redis.pttl("test:tag:docker.io/library/alpine:3.19") <= 60_000
        assert 29_000 < await b.redis.pttl("test:notfound:docker.io/library/nope:1") <= 30_000
        # Expiry is Redis's: an entry put for a fraction of a second is gone after it.
        await a.put_tag("docker.io", "library/alpine", "edge", record, ttl=0.05)
        await a.put_tag("docker.io", "library/alpine", "old", record, ttl=0)  # not put at all
        assert await b.get_tag("docker.io", "library/alpine", "old") is None
        await asyncio.sleep(0.1)
        assert await b.get_tag("docker.io", "library/alpine", "edge") is None


# ---------------------------------------------------------------------- hosted generations


async def test_hosted_generations_are_shared_and_trusted_only_while_fresh(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A bump on one replica moves the generation every other replica reads from Redis;
    their view counts for SHARED_TRUST after it was asked for, and what memory learnt of a
    set on shared storage for at most SHARED_MAX_AGE; Redis down: nothing is trusted."""
    clock = Clock()
    async with coordinators(redis_server.redis_url, clock=clock) as (a, b):
        pushing = Generation("team", tmp_path / "a", shared_storage=True, coordinator=a)
        reading = Generation(
            "team", tmp_path / "b", shared_storage=True, coordinator=b, monotonic=clock
        )
        refresher = SharedGenerations([reading])
        assert not reading.confirms(reading.stamp(), clock())  # never read Redis yet
        await refresher.refresh()
        stamp, learnt = reading.stamp(), clock()
        assert reading.confirms(stamp, learnt)
        await pushing.bump()  # the other machine's counter file knows nothing of it
        await refresher.refresh()
        assert not reading.confirms(stamp, learnt)
        first = await b.generations(["team", "other"])
        assert first is not None and first["other"] == 0 and first["team"] > 0
        await a.redis.delete("test:generation:team")  # Redis restarted empty
        await pushing.bump()
        again = await b.generations(["team"])
        assert again is not None and again["team"] != first["team"]  # never the old value
        await refresher.refresh()
        stamp = reading.stamp()
        clock.now += SHARED_TRUST  # no read since
        assert not reading.confirms(stamp, learnt)
        await refresher.refresh()
        assert reading.confirms(stamp, learnt)
        clock.now = learnt + SHARED_MAX_AGE
        await refresher.refresh()
        assert not reading.confirms(stamp, learnt)  # too old, whatever Redis says
        learnt = clock()
        redis_server.stop()
        await pushing.bump()  # fails open: dropped
        await refresher.refresh()
        assert reading.confirms(stamp, learnt)  # the last read is recent
        clock.now += SHARED_TRUST
        await refresher.refresh()
        assert not reading.confirms(stamp, learnt)
    local = Generation("team", tmp_path / "a")  # one machine: the counter file alone
    assert local.stamp() == (3, 0) and local.confirms((3, 0), -1e9)  # three bumps
    local.close()
    pushing.close()
    reading.close()


# ---------------------------------------------------------------------- shared circuits


def breaker_for(coordinator: RedisCoordinator, clock: Clock) -> CircuitBreaker:
    shared = coordinator.circuit("docker.io", "http://m0.test", threshold=3, cooldown=30)
    return CircuitBreaker("m0.test", threshold=3, cooldown=30, clock=clock, shared=shared)


async def test_failures_on_every_replica_open_the_circuit_for_all(
    redis_server: RedisServer,
) -> None:
    """Consecutive failures count across replicas; at the threshold every replica skips
    the mirror; a success anywhere resets the count."""
    clock = Clock()
    async with coordinators(redis_server.redis_url, clock=clock) as (a, b):
        first, second = breaker_for(a, clock), breaker_for(b, clock)
        for breaker in (first, second):
            await breaker.refresh()
            assert breaker.allow()
            breaker.failure()
            await a.flush()
            await b.flush()
        await first.refresh()
        assert first.allow()
        first.success()  # a healthy answer resets the shared count
        await a.flush()
        for breaker in (first, second, first):
            await breaker.refresh()
            assert breaker.allow()
            breaker.failure()
            await a.flush()
            await b.flush()
        assert (first.state, second.state) == (CircuitState.CLOSED, CircuitState.CLOSED)
        for breaker in (first, second):  # 3 failures in all: open for both
            await breaker.refresh()
            assert not breaker.allow()
            assert breaker.state is CircuitState.OPEN
        late = breaker_for(a, clock)  # a replica that saw none of it
        await late.refresh()
        assert not late.allow()
        clock.now += 30  # the local clocks run the cooldown; then one probe each
        assert second.allow() and second.state is CircuitState.HALF_OPEN


async def test_an_opened_circuit_is_shared(redis_server: RedisServer) -> None:
    """A circuit one replica opened on its own count is open for the others."""
    clock = Clock()
    async with coordinators(redis_server.redis_url, clock=clock) as (a, b):
        first, second = breaker_for(a, clock), breaker_for(b, clock)
        first.threshold = 1
        assert first.allow()
        first.failure()
        await a.flush()
        assert await b.redis.pttl("test:circuit:docker.io:http://m0.test:open") > 29_000
        await second.refresh()
        assert not second.allow()


# ---------------------------------------------------------------------- Redis down


async def test_redis_down_fails_open(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis gone every operation falls back to local behaviour, logged once; Redis is
    asked again after OUTAGE_BACKOFF and sharing resumes."""
    clock = Clock()
    record = TagRecord(DIGEST, "application/vnd.oci.image.manifest.v1+json", 1, 1.0)
    async with coordinators(redis_server.redis_url, clock=clock) as (a, b):
        held = await b.claim("docker.io", DIGEST)  # before the outage
        assert held is not None
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="mirrorrouter.coordination"):
            lease = await a.claim("docker.io", DIGEST)  # granted locally
            assert lease is not None
            assert await a.claim("docker.io", DIGEST) is None  # the local lock table
            holder = await a.holder("docker.io", DIGEST)
            assert holder is not None and holder.token == lease.token
            await a.put_tag("docker.io", "r", "t", record, ttl=60)
            assert await a.get_tag("docker.io", "r", "t") is None
            missing = RegistryError(ErrorCode.MANIFEST_UNKNOWN)
            await a.put_not_found("docker.io", "r", "t", missing, ttl=60)
            assert await a.get_not_found("docker.io", "r", "t") is None
            breaker = breaker_for(a, clock)
            await breaker.refresh()
            for _ in range(3):
                assert breaker.allow()
                breaker.failure()
            await a.flush()
            assert breaker.state is CircuitState.OPEN  # the local breaker still works
            await lease.release()
            await held.release()  # b's own release fails open too
        outages = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
        assert len(outages) == 2  # once per coordinator, not once per call
        redis_server.start()
        assert await a.get_tag("docker.io", "r", "t") is None  # still backing off
        clock.now += OUTAGE_BACKOFF
        await a.put_tag("docker.io", "r", "t", record, ttl=60)
        assert await a.get_tag("docker.io", "r", "t") == record
        assert any("redis is back" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- two replicas

CHUNK = 1024 * 1024
PAYLOAD = bytes(range(256)) * (3 * CHUNK // 256)  # 3 MiB
BLOB = Digest.of(PAYLOAD)


class GatedBody(httpx.AsyncByteStream):
    """Sends the first chunk, then waits at the gate before the rest."""

    def __init__(self, data: bytes, gate: asyncio.Event) -> None:
        self.data, self.gate = data, gate

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[:CHUNK]
        await self.gate.wait()
        for start in range(CHUNK, len(self.data), CHUNK):
            yield self.data[start : start + CHUNK]


class Upstream:
    """One blob: the first GET's body is held at a gate after 1 MiB; Range is honoured."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.ranges: list[str | None] = []

    def transport(self) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(self.handler)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.ranges.append(request.headers.get("range"))
        if "range" in request.headers:
            start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
            headers = {"Content-Range": f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"}
            return httpx.Response(206, headers=headers, content=PAYLOAD[start:])
        headers = {"Content-Length": str(len(PAYLOAD))}
        return httpx.Response(200, headers=headers, stream=GatedBody(PAYLOAD, self.gate))


@asynccontextmanager
async def peer_server(pull: Pullthrough, port: int) -> AsyncIterator[None]:
    """The replica's peer endpoint on 127.0.0.1:port, in this event loop."""

    async def endpoint(request: Request) -> Response:
        return await peer_blob(pull, request)

    async def error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RegistryError)
        return error_response(exc)

    app = Starlette(
        routes=[Route(PEER_PATH, endpoint, methods=["GET"])],
        exception_handlers={RegistryError: error},
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        ws="none",
        log_config=None,
        timeout_graceful_shutdown=5,
        log_level="critical",  # the stream a dying holder cuts short is not worth a traceback
    )
    async with uvicorn_in_loop(config):
        yield


class Recording(RedisCoordinator):
    """Keeps the leases it granted, so a test can make their holder die."""

    def __init__(self, settings: CoordinationSettings) -> None:
        super().__init__(settings)
        self.leases: list[Lease] = []

    async def claim(self, upstream: str, digest: Digest) -> Lease | None:
        lease = await super().claim(upstream, digest)
        if lease is not None:
            self.leases.append(lease)
        return lease


class Replicas:
    """Two pull-through replicas with their own caches, one Redis and one upstream."""

    def __init__(
        self, tmp_path: Path, redis_url: str, upstream: Callable[[], httpx.AsyncBaseTransport]
    ) -> None:
        self.tmp_path, self.redis_url, self.upstream = tmp_path, redis_url, upstream
        self.pulls: list[Pullthrough] = []
        self.coordinators: list[Recording] = []

    async def start(self, stack: AsyncExitStack) -> list[Pullthrough]:
        for name in ("a", "b"):
            port = free_port()
            coordinator = Recording(
                settings_for(self.redis_url, advertise=f"http://127.0.0.1:{port}")
            )
            self.coordinators.append(coordinator)
            stack.push_async_callback(coordinator.close)
            text = (  # PAYLOAD is a large blob here: it streams as it lands
                f'[cache]\ndirectory = "{self.tmp_path / name}"\n'
                '[upstreams."docker.io"]\nmirrors = [{ url = "http://up.test" }]\n'
                'verify_before_send = "1MiB"\n'
            )
            pull = Pullthrough(
                parse_settings(text, env={}),
                transport=self.upstream(),
                coordinator=coordinator,
            )
            await pull.start()
            await stack.enter_async_context(peer_server(pull, port))
            stack.push_async_callback(pull.close)  # first: its fills end, then its server
            self.pulls.append(pull)
        return self.pulls


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def committed(root: Path) -> Path:
    return root / "docker.io" / "blobs" / "sha256" / BLOB.hex[:2] / BLOB.hex


async def test_cold_blob_on_two_replicas_is_fetched_once_and_streamed_to_both(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Concurrent pulls of one cold blob on two replicas: ONE upstream GET. The replica
    without the lock streams it from the other as it lands, before the upstream is done."""
    upstream = Upstream()
    async with AsyncExitStack() as stack:
        a, b = await Replicas(tmp_path, redis_server.redis_url, upstream.transport).start(stack)
        hub = a.settings.upstreams["docker.io"]
        answers = await asyncio.gather(
            a.blob(hub, "library/a", BLOB), b.blob(hub, "library/a", BLOB)
        )
        readers = [answer.stream(0, None) for answer in answers]
        heads = [await anext(reader) for reader in readers]  # the upstream is still held
        assert all(head and PAYLOAD.startswith(head) for head in heads)
        sources = sorted((answer.mirror or "").split(" ")[0] for answer in answers)
        assert sources == ["peer", "up.test"]  # one fetches, the other follows it
        upstream.gate.set()
        bodies = [head + await collect(r) for head, r in zip(heads, readers, strict=True)]
        assert bodies == [PAYLOAD, PAYLOAD]
        await asyncio.gather(*a.filler.tasks, *b.filler.tasks)
        assert upstream.ranges == [None]  # exactly one upstream blob GET
        for name in ("a", "b"):  # each replica verified and committed its own copy
            assert committed(tmp_path / name).read_bytes() == PAYLOAD


async def test_cold_blob_from_the_fake_registry_is_fetched_once_for_two_replicas(
    tmp_path: Path, redis_server: RedisServer, fake: FakeRegistry, image: Image
) -> None:
    """Concurrent pulls of one cold blob on two replicas: ONE upstream blob GET."""
    layer = image.blobs[sha256(b"layer-one" * 1000)]
    digest = Digest.of(layer)
    fake.gate = asyncio.Event()  # the upstream answers once both replicas asked for it
    async with AsyncExitStack() as stack:
        replicas = Replicas(tmp_path, redis_server.redis_url, lambda: httpx.ASGITransport(fake.app))
        a, b = await replicas.start(stack)
        hub = a.settings.upstreams["docker.io"]
        tasks = [asyncio.create_task(pull.blob(hub, "library/alpine", digest)) for pull in (a, b)]
        sites = [await pull.site(hub) for pull in (a, b)]
        for _ in range(500):  # both fills started, one of them asked upstream
            if fake.count("GET", "/blobs/") and all(digest in site.fills for site in sites):
                break
            await asyncio.sleep(0.01)
        fake.gate.set()
        answers = await asyncio.gather(*tasks)
        bodies = [await collect(answer.stream(0, None)) for answer in answers]
        assert bodies == [layer, layer]
    assert fake.count("GET", f"/blobs/{digest}") == 1


async def test_follower_takes_over_when_the_holder_dies_mid_blob(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The holder dies mid-blob: its lock expires, the follower takes it over and resumes
    from upstream at its own byte offset; its client sees one whole stream."""
    upstream = Upstream()
    async with AsyncExitStack() as stack:
        replicas = Replicas(tmp_path, redis_server.redis_url, upstream.transport)
        a, b = await replicas.start(stack)
        hub = a.settings.upstreams["docker.io"]
        await a.blob(hub, "library/a", BLOB)  # a holds the lock, 1 MiB in
        answer = await b.blob(hub, "library/a", BLOB)  # b follows a
        assert (answer.mirror or "").startswith("peer http://")
        reader = answer.stream(0, None)
        head = await anext(reader)
        following = (await b.site(hub)).fills[BLOB]
        for _ in range(500):  # a releases all but its last byte: 1 MiB - 1
            if following.written == CHUNK - 1:
                break
            await asyncio.sleep(0.01)
        assert following.written == CHUNK - 1
        # a dies: its renewals stop, its download and its peer stream end mid-blob.
        (lease,) = replicas.coordinators[0].leases
        assert isinstance(lease, RedisLease)
        lease.abandon()
        for task in list(a.filler.tasks):
            task.cancel()
        body = head + await collect(reader)
        assert body == PAYLOAD
        assert upstream.ranges == [None, f"bytes={CHUNK - 1}-"]  # resumed at b's offset
        assert len(replicas.coordinators[1].leases) == 1  # b took the lock over
        await asyncio.gather(*b.filler.tasks)
        assert committed(tmp_path / "b").read_bytes() == PAYLOAD


class _Unshared:
    def release(self) -> None:
        return None


async def test_follower_without_a_peer_url_waits_for_the_shared_store(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas over one object store (a cache that claims only within its process and keeps
    no local file of what another committed), no advertise_url: the replica without the lock
    waits for the committed blob and reads it from the store. One upstream GET."""
    monkeypatch.setattr(FilesystemCache, "try_claim", lambda self, digest: _Unshared())
    monkeypatch.setattr(FilesystemCache, "blob_path", lambda self, digest: None)
    upstream = Upstream()
    text = (  # PAYLOAD is a large blob here: the lock holder answers once the upstream did
        f'[cache]\ndirectory = "{tmp_path / "store"}"\n'
        '[upstreams."docker.io"]\nmirrors = [{ url = "http://up.test" }]\n'
        'verify_before_send = "1MiB"\n'
    )
    async with (
        coordinators(redis_server.redis_url) as (first, second),
        AsyncExitStack() as stack,
    ):
        pulls = []
        for coordinator in (first, second):
            coordinator.advertise_url = None
            pull = Pullthrough(
                parse_settings(text, env={}),
                transport=httpx.MockTransport(upstream.handler),
                coordinator=coordinator,
            )
            # One after the other: a cache opening sweeps the spool areas it can lock, and
            # the other's may not be locked yet while it opens.
            await pull.start()
            stack.push_async_callback(pull.close)
            pulls.append(pull)
        hub = pulls[0].settings.upstreams["docker.io"]
        tasks = [asyncio.create_task(pull.blob(hub, "library/a", BLOB)) for pull in pulls]
        for _ in range(500):  # the lock holder answers once the upstream did
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.01)
        upstream.gate.set()
        answers = await asyncio.gather(*tasks)
        assert [await collect(answer.stream(0, None)) for answer in answers] == [PAYLOAD] * 2
        assert sorted(answer.mirror or "" for answer in answers) == ["", "up.test"]
        assert upstream.ranges == [None]


# ---------------------------------------------------------------------- shared tags, negatives


def replica(
    cache: Path,
    fake: FakeRegistry,
    clock: Clock,
    coordinator: RedisCoordinator,
    *,
    real_waits: bool = False,
) -> Pullthrough:
    """A replica on the fake registry whose tags date by ``clock``; its waits return at once
    (retries), or with ``real_waits`` take real time (waiting for another replica)."""

    async def no_sleep(seconds: float) -> None:
        return None

    timing = Timing(wall=clock, monotonic=clock, sleep=no_sleep)
    if real_waits:
        timing = Timing(wall=clock, monotonic=time.monotonic, sleep=asyncio.sleep)
    text = (
        f'[cache]\ndirectory = "{cache}"\n'
        '[upstreams."docker.io"]\ntag_ttl = "60s"\nnegative_ttl = "30s"\n'
        'mirrors = [{ url = "http://upstream.test" }]\n'
    )
    return Pullthrough(
        parse_settings(text, env={}),
        transport=httpx.ASGITransport(app=fake.app),
        timing=timing,
        coordinator=coordinator,
    )


@asynccontextmanager
async def two_replicas(
    tmp_path: Path, fake: FakeRegistry, clock: Clock, url: str
) -> AsyncIterator[tuple[Pullthrough, Pullthrough]]:
    """Two replicas over one shared cache (the object store's stand-in) and one Redis."""
    async with coordinators(url, clock=clock) as (first, second):
        a = replica(tmp_path / "cache", fake, clock, first)
        b = replica(tmp_path / "cache", fake, clock, second)
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()


async def test_tag_checked_on_one_replica_is_fresh_on_the_other(
    tmp_path: Path, fake: FakeRegistry, redis_server: RedisServer
) -> None:
    """A tag revalidated or moved through replica A is answered by B within tag_ttl with
    zero upstream requests, though B's own record of it had expired."""
    clock = Clock()
    image = fake.add(make_image("library/alpine", [b"one"]), "3.19")
    ref = ImageReference("docker.io", "library/alpine", "3.19")
    async with two_replicas(tmp_path, fake, clock, redis_server.redis_url) as (a, b):
        hub = a.settings.upstreams["docker.io"]
        assert (await a.manifest(hub, ref)).cache == "MISS"
        assert (await b.manifest(hub, ref)).cache == "HIT"
        clock.now += 61  # both records expired; A revalidates (one HEAD) and shares it
        assert (await a.manifest(hub, ref)).cache == "HIT"
        asked = len(fake.requests)
        answer = await b.manifest(hub, ref)
        assert (answer.cache, str(answer.manifest.digest)) == ("HIT", image.digest)
        assert len(fake.requests) == asked  # B asked nothing upstream
        moved = fake.add(make_image("library/alpine", [b"two"]), "3.19")
        clock.now += 61
        assert str((await a.manifest(hub, ref)).manifest.digest) == moved.digest
        asked = len(fake.requests)
        answer = await b.manifest(hub, ref)
        assert (answer.cache, str(answer.manifest.digest)) == ("HIT", moved.digest)
        assert len(fake.requests) == asked
        assert b.memory_manifest(hub, ref, ()) is not None  # B remembers it now
    assert fake.count("HEAD", "/manifests/3.19") == 2
    assert fake.count("GET", "/manifests/3.19") == 2


async def test_not_found_on_one_replica_is_remembered_by_the_other(
    tmp_path: Path, fake: FakeRegistry, redis_server: RedisServer
) -> None:
    """An upstream 404 through A is answered by B from Redis for negative_ttl."""
    clock = Clock()
    ref = ImageReference("docker.io", "library/nope", "1")
    async with two_replicas(tmp_path, fake, clock, redis_server.redis_url) as (a, b):
        hub = a.settings.upstreams["docker.io"]
        for pull in (a, b, b):
            with pytest.raises(RegistryError) as caught:
                await pull.manifest(hub, ref)
            assert caught.value.code is ErrorCode.MANIFEST_UNKNOWN
    assert fake.count("GET", "/manifests/1") == 1


async def test_pulls_go_on_when_redis_is_down(
    tmp_path: Path, fake: FakeRegistry, redis_server: RedisServer
) -> None:
    """Redis down: tags, negatives and blobs are served as by a replica on its own."""
    clock = Clock()
    image = fake.add(make_image("library/alpine", [b"layer"]), "3.19")
    ref = ImageReference("docker.io", "library/alpine", "3.19")
    async with two_replicas(tmp_path, fake, clock, redis_server.redis_url) as (a, b):
        redis_server.stop()
        hub = a.settings.upstreams["docker.io"]
        assert str((await a.manifest(hub, ref)).manifest.digest) == image.digest
        layer = Digest.of(b"layer")
        answer = await b.blob(hub, "library/alpine", layer)
        assert await collect(answer.stream(0, None)) == b"layer"
        with pytest.raises(RegistryError):
            await b.manifest(hub, ImageReference("docker.io", "library/nope", "1"))


# ---------------------------------------------------------------------- tag leases


class TagLeases(RedisCoordinator):
    """Keeps the tag leases it granted and counts the ones it refused (another holds it)."""

    def __init__(self, settings: CoordinationSettings) -> None:
        super().__init__(settings)
        self.leases: list[Lease] = []
        self.refused = 0

    async def claim_tag(self, upstream: str, repository: str, tag: str) -> Lease | None:
        lease = await super().claim_tag(upstream, repository, tag)
        if lease is None:
            self.refused += 1
        else:
            self.leases.append(lease)
        return lease


@asynccontextmanager
async def leasing_replicas(
    tmp_path: Path, fake: FakeRegistry, url: str
) -> AsyncIterator[tuple[list[Pullthrough], list[TagLeases]]]:
    """Two replicas over one shared cache (the object store's stand-in) and one Redis,
    waiting for each other in real time."""
    clock = Clock()
    leases = [TagLeases(settings_for(url, advertise=f"http://replica-{i}")) for i in range(2)]
    pulls = [replica(tmp_path / "cache", fake, clock, c, real_waits=True) for c in leases]
    try:
        yield pulls, leases
    finally:
        for pull in pulls:
            await pull.close()
        for coordinator in leases:
            await coordinator.close()


async def until(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit}s"
        await asyncio.sleep(0.01)


async def test_cold_tag_on_two_replicas_is_asked_upstream_once(
    tmp_path: Path, fake: FakeRegistry, redis_server: RedisServer
) -> None:
    """Concurrent cold pulls of one tag on two replicas: the replica holding the tag's lease
    makes the one upstream GET; the other waits for the record it shares and reads the
    manifest from the shared store. A tag upstream does not have: one GET, one 404 each."""
    image = fake.add(make_image("library/alpine", [b"leased"]), "3.19")
    ref = ImageReference("docker.io", "library/alpine", "3.19")
    fake.gate = asyncio.Event()  # the upstream answers once the second replica waits
    async with leasing_replicas(tmp_path, fake, redis_server.redis_url) as (pulls, leases):
        hub = pulls[0].settings.upstreams["docker.io"]
        tasks = [asyncio.create_task(pull.manifest(hub, ref)) for pull in pulls]
        await until(lambda: fake.count("GET", "/manifests/3.19") == 1, "an upstream GET")
        await until(lambda: sum(c.refused for c in leases) > 0, "a replica waiting")
        fake.gate.set()
        answers = await asyncio.gather(*tasks)
        assert {str(a.manifest.digest) for a in answers} == {image.digest}
        assert sorted(a.cache for a in answers) == ["HIT", "MISS"]
        assert fake.count("GET", "/manifests/3.19") == 1
        assert fake.count("HEAD", "/manifests/") == 0
        missing = ImageReference("docker.io", "library/alpine", "nope")
        fake.gate = asyncio.Event()
        refused_before = sum(c.refused for c in leases)
        tasks = [asyncio.create_task(pull.manifest(hub, missing)) for pull in pulls]
        await until(lambda: fake.count("GET", "/manifests/nope") == 1, "an upstream GET")
        await until(lambda: sum(c.refused for c in leases) > refused_before, "a replica waiting")
        fake.gate.set()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            assert isinstance(outcome, RegistryError), outcome
            assert outcome.code is ErrorCode.MANIFEST_UNKNOWN
        assert fake.count("GET", "/manifests/nope") == 1


async def test_holder_dying_mid_resolution_hands_the_tag_to_another_replica(
    tmp_path: Path, fake: FakeRegistry, redis_server: RedisServer
) -> None:
    """The replica asking upstream about a tag dies (its lease is never renewed or
    released): once the lease expires the waiting replica takes it and asks itself."""
    image = fake.add(make_image("library/alpine", [b"orphaned"]), "3.19")
    ref = ImageReference("docker.io", "library/alpine", "3.19")
    fake.gate = asyncio.Event()
    async with leasing_replicas(tmp_path, fake, redis_server.redis_url) as (pulls, leases):
        (a, b), (a_leases, b_leases) = pulls, leases
        hub = a.settings.upstreams["docker.io"]
        doomed = asyncio.create_task(a.manifest(hub, ref))
        await until(lambda: fake.count("GET", "/manifests/3.19") == 1, "A asking upstream")
        waiting = asyncio.create_task(b.manifest(hub, ref))
        await until(lambda: b_leases.refused > 0, "B waiting for A")
        (lease,) = a_leases.leases
        assert isinstance(lease, RedisLease)
        lease.abandon()  # A dies: no renewal, no release
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        fake.gate.set()
        answer = await waiting
        assert (str(answer.manifest.digest), answer.cache) == (image.digest, "MISS")
        assert len(b_leases.leases) == 1  # B took the lease over once it expired
    assert fake.count("GET", "/manifests/3.19") == 2  # A's, cut short, and B's
