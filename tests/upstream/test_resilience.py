"""Resilience: retries, circuit breakers, failover, resume, stale serving, corrupt content."""

from __future__ import annotations

import asyncio
import errno
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from mirrorrouter.cache.filesystem import FilesystemCache
from mirrorrouter.config import parse_settings
from mirrorrouter.errors import ErrorCode, RegistryError, UpstreamError
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.pull.singleflight import FillFailed
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.timing import Timing
from mirrorrouter.upstream.answers import RETRY_AFTER_CAP, retry_after_seconds
from mirrorrouter.upstream.breaker import CircuitBreaker, CircuitState
from mirrorrouter.upstream.client import UpstreamClient
from mirrorrouter.upstream.hedging import HeaderLatency
from mirrorrouter.upstream.retry import RetryPolicy
from tests.support.fakeregistry import FakeRegistry, Image, make_image, sha256
from tests.support.inprocess import Clock, Gateway, config, gateway, until

pytestmark = pytest.mark.anyio

T = TypeVar("T")

MIB = 1024 * 1024


# ---------------------------------------------------------------------- the retry policy


def error(
    status: int | None = 503, retry_after: float | None = None, temporary: bool = True
) -> UpstreamError:
    return UpstreamError(
        "x", mirror="m", status=status, is_temporary=temporary, retry_after=retry_after
    )


def test_backoff_grows_exponentially_up_to_its_cap() -> None:
    """Waits double per attempt (full jitter scales them) and stop growing at backoff_max."""
    policy = RetryPolicy(backoff_base=0.5, backoff_max=3.0, jitter=lambda: 1.0)
    assert [policy.wait_seconds(n, error()) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = RetryPolicy(backoff_base=0.5, jitter=lambda: 0.25)
    assert jittered.wait_seconds(3, error()) == 0.5


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    """A Retry-After within the cap is the wait; the cap bounds it."""
    policy = RetryPolicy(retry_after_cap=10.0)
    assert policy.wait_seconds(1, error(429, retry_after=7)) == 7
    assert policy.wait_seconds(1, error(429, retry_after=30)) == 10


NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("86401", RETRY_AFTER_CAP),
        ("9" * 400, RETRY_AFTER_CAP),  # float() would be inf, int(inf) an OverflowError
        ("Tue, 14 Nov 2023 22:14:20 GMT", 60.0),
        ("Tue, 14 Nov 2023 22:14:20 -0000", 60.0),
        ("Tue, 14 Nov 2023 22:12:20 GMT", 0.0),  # already past
        ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_CAP),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("\u00b2", None),  # a Unicode digit: str.isdigit() says yes, float() says no
        ("Tue, 99 Nov 2023 22:14:20 GMT", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_parsed_in_both_forms_and_capped(
    value: str | None, seconds: float | None
) -> None:
    """Retry-After is delta-seconds or an HTTP date, capped at a day; garbage is ignored."""
    assert retry_after_seconds(value, now=NOW) == seconds


async def test_absurd_retry_after_is_a_throttle_not_a_crash(tmp_path: Path) -> None:
    """A 429 with a 400-digit Retry-After reaches the client as 429 with a day, not a 500."""

    def throttled(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "9" * 400})

    pull = pull_for(tmp_path, throttled)
    await pull.start()
    try:
        with pytest.raises(RegistryError) as raised:
            await pull.blob(pull.settings.upstreams["docker.io"], "library/a", DIGEST)
    finally:
        await pull.close()
    assert raised.value.status == 429
    assert raised.value.headers["Retry-After"] == str(int(RETRY_AFTER_CAP))


async def test_temporary_failures_are_retried_until_attempts_run_out() -> None:
    """Temporary failures retry (waiting as the policy says); final ones raise at once."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(attempts=3, sleep=sleep, jitter=lambda: 1.0, backoff_base=0.1)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise error(503)
        return "ok"

    assert await policy.call(flaky, policy.start()) == "ok"
    assert (calls, waits) == (3, [0.1, 0.2])

    async def final() -> str:
        raise error(404, temporary=False)

    with pytest.raises(UpstreamError):
        await policy.call(final, policy.start())
    assert len(waits) == 2  # no wait for a final failure


async def test_long_retry_after_and_deadline_stop_retrying() -> None:
    """A Retry-After over the cap, or a wait past the deadline, fails over instead of waiting."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    calls = 0

    async def throttled() -> str:
        nonlocal calls
        calls += 1
        raise error(429, retry_after=3600)

    policy = RetryPolicy(attempts=5, sleep=sleep)
    with pytest.raises(UpstreamError):
        await policy.call(throttled, policy.start())
    assert (calls, waits) == (1, [])
    now = [0.0]
    tight = RetryPolicy(attempts=5, sleep=sleep, clock=lambda: now[0], jitter=lambda: 1.0)

    async def down() -> str:
        raise error(503)

    with pytest.raises(UpstreamError):
        await tight.call(down, deadline=0.3)  # the first wait (0.25) fits, the second not
    assert waits == [0.25]


# ---------------------------------------------------------------------- the circuit breaker


def test_breaker_opens_half_opens_and_closes() -> None:
    """N failures open the circuit; after the cooldown one probe goes; success closes it."""
    clock = Clock()
    breaker = CircuitBreaker("m", threshold=3, cooldown=30, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow() and breaker.state is CircuitState.HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    clock.now += 30
    assert breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.CLOSED and breaker.allow()


async def test_open_circuit_skips_a_failing_mirror(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """After breaker_failures failed requests a mirror is skipped, then probed after cooldown."""
    mirrors = '[{ url = "http://upstream.test/down" }, { url = "http://upstream.test" }]'
    policy = 'retry_attempts = 1\nbreaker_failures = 2\nbreaker_cooldown = "60s"'
    fake.faults["/down/"] = [503] * 100
    async with gateway(tmp_path, fake, config(tmp_path, policy, mirrors=mirrors)) as gw:
        for tag in ("a", "b", "c", "d"):
            fake.add(make_image("library/alpine", [tag.encode()]), tag)
            assert (await gw.client.get(f"/v2/library/alpine/manifests/{tag}")).status_code == 200
        assert fake.count("GET", "/down/") == 2  # then the circuit opened
        skipped = await gw.client.get("/v2/library/nothing/manifests/1")
        tried = json.loads(skipped.content)["errors"][0]["detail"]["tried"]
        assert tried[0] == {"mirror": "upstream.test/down", "result": "skipped: circuit open"}
        gw.clock.now += 61
        fake.faults.clear()
        fake.add(make_image("library/alpine", [b"e"]), "e")
        assert (await gw.client.get("/v2/library/alpine/manifests/e")).status_code == 200
        assert fake.count("GET", "/down/") == 3  # the half-open probe, which succeeded


async def test_throttled_mirror_is_retried_after_retry_after(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A 429 with Retry-After: 7 is retried after 7 s (injected sleep) and then succeeds."""
    waits: list[float] = []
    fake.faults["/manifests/3.19"] = [429]
    async with gateway(tmp_path, fake, sleeps=waits) as gw:
        response = await gw.client.get("/v2/library/alpine/manifests/3.19")
    assert response.status_code == 200 and waits == [7.0]


async def test_dead_first_mirror_fails_over(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A mirror that refuses connections is skipped for the next, within one request."""
    mirrors = '[{ url = "http://refused.test" }, { url = "http://upstream.test" }]'

    def refuse(app: httpx.ASGITransport) -> httpx.AsyncBaseTransport:
        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.host == "refused.test":
                raise httpx.ConnectError("connection refused", request=request)
            return await app.handle_async_request(request)

        return httpx.MockTransport(handler)

    async with gateway(tmp_path, fake, config(tmp_path, mirrors=mirrors), wrap=refuse) as gw:
        response = await gw.client.get("/v2/library/alpine/manifests/3.19")
    assert response.status_code == 200 and response.content == image.manifest


# ---------------------------------------------------------------------- stale and negative


async def test_stale_tag_is_served_when_every_mirror_fails(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """Past its TTL, a tag is served STALE while upstream fails, until max_stale runs out."""
    policy = 'max_stale = "1h"'
    async with gateway(tmp_path, fake, config(tmp_path, policy)) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        fake.faults["/manifests/"] = [503] * 1000
        gw.clock.now += 120
        stale = await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert stale.status_code == 200 and stale.headers["x-cache"] == "STALE"
        assert stale.content == image.manifest
        fake.faults["/manifests/"] = [429] * 1000
        throttled = await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert throttled.status_code == 200 and throttled.headers["x-cache"] == "STALE"
        gw.clock.now += 3600
        expired = await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert expired.status_code == 429
        never = await gw.client.get("/v2/library/other/manifests/1")
        assert never.status_code == 429
        assert (
            json.loads(never.content)["errors"][0]["detail"]["tried"][0]["mirror"]
            == "upstream.test"
        )


async def test_tag_gone_upstream_is_not_served_stale(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A tag that upstream says is gone (404) is not served stale: only failures are."""
    async with gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        del fake.manifests[("library/alpine", "3.19")]
        gw.clock.now += 120
        gone = await gw.client.get("/v2/library/alpine/manifests/3.19")
    assert gone.status_code == 404


async def test_concurrent_revalidations_of_a_tag_are_coalesced(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """Ten clients asking an expired tag at once cause one upstream HEAD."""
    async with gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        gw.clock.now += 61
        fake.gate = asyncio.Event()
        tasks = [
            asyncio.create_task(gw.client.get("/v2/library/alpine/manifests/3.19"))
            for _ in range(10)
        ]
        for _ in range(20):  # let every request reach the upstream call
            await asyncio.sleep(0)
        fake.gate.set()
        responses = await asyncio.gather(*tasks)
    assert [r.headers["docker-content-digest"] for r in responses] == [image.digest] * 10
    assert fake.count("HEAD", "/manifests/3.19") == 1
    assert fake.count("GET", "/manifests/3.19") == 1


async def test_not_found_is_remembered_for_negative_ttl(tmp_path: Path, fake: FakeRegistry) -> None:
    """An upstream 404 is answered from memory for negative_ttl, then asked again."""
    policy = 'negative_ttl = "30s"'
    async with gateway(tmp_path, fake, config(tmp_path, policy)) as gw:
        for _ in range(3):
            assert (await gw.client.get("/v2/library/nope/manifests/1")).status_code == 404
        assert fake.count("GET", "/manifests/1") == 1
        gw.clock.now += 31
        fake.add(make_image("library/nope", [b"now"]), "1")
        assert (await gw.client.get("/v2/library/nope/manifests/1")).status_code == 200


# ---------------------------------------------------------------------- blobs on bad days

PAYLOAD = bytes(range(256)) * (3 * MIB // 256)
DIGEST = Digest.of(PAYLOAD)


class CutBody(httpx.AsyncByteStream):
    """Sends ``cut`` bytes, then fails like a dropped connection."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut = data, cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: self.cut]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


def pull_for(
    tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response], mirrors: int = 1
) -> Pullthrough:
    urls = ", ".join(f'{{ url = "http://m{i}.test" }}' for i in range(mirrors))
    text = f'[cache]\ndirectory = "{tmp_path}"\n[upstreams."docker.io"]\nmirrors = [{urls}]\n'

    async def no_sleep(seconds: float) -> None:
        return None

    return Pullthrough(
        parse_settings(text, env={}),
        transport=httpx.MockTransport(handler),
        timing=Timing(sleep=no_sleep),
    )


async def read_blob(pull: Pullthrough) -> bytes:
    answer = await pull.blob(pull.settings.upstreams["docker.io"], "library/a", DIGEST)
    return b"".join([chunk async for chunk in answer.stream(0, None)])


@pytest.mark.parametrize("honours_range", [True, False])
async def test_blob_cut_mid_stream_resumes_from_its_offset(
    tmp_path: Path, honours_range: bool
) -> None:
    """A connection cut mid-blob resumes from the byte offset; the reader sees one stream."""
    requests: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.headers.get("range"))
        if len(requests) == 1:
            return httpx.Response(
                200,
                headers={"Content-Length": str(len(PAYLOAD))},
                stream=CutBody(PAYLOAD, MIB + 123),
            )
        if honours_range:
            start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
            headers = {"Content-Range": f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"}
            return httpx.Response(206, headers=headers, content=PAYLOAD[start:])
        return httpx.Response(200, content=PAYLOAD)  # ignores Range: the overlap is dropped

    pull = pull_for(tmp_path, handler)
    await pull.start()
    try:
        assert await read_blob(pull) == PAYLOAD
        assert requests == [None, f"bytes={MIB + 123}-"]  # resumed right where the cut was
        assert (
            await pull.blob(pull.settings.upstreams["docker.io"], "library/a", DIGEST)
        ).cache == "HIT"
    finally:
        await pull.close()


async def test_full_disk_streams_without_caching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the cache cannot write, the pull still succeeds, uncached, with a logged error."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=PAYLOAD)

    def full(self: object, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mirrorrouter.cache.filesystem._FileBlobWriter._write_sync", full)
    pull = pull_for(tmp_path, handler)
    await pull.start()
    try:
        assert await read_blob(pull) == PAYLOAD
        cache = FilesystemCache(tmp_path / "docker.io")
        assert await cache.blob_size(DIGEST) is None
        assert "streaming it from upstream uncached" in caplog.text
    finally:
        await pull.close()


async def test_slow_mirror_fails_over_to_the_next(tmp_path: Path) -> None:
    """A mirror that times out is retried, then the next mirror serves the blob."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "m0.test":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, content=PAYLOAD)

    pull = pull_for(tmp_path, handler, mirrors=2)
    await pull.start()
    try:
        assert await read_blob(pull) == PAYLOAD
    finally:
        await pull.close()


# ---------------------------------------------------------------------- hangs and hedges


def test_hedge_delay_is_the_usual_latency_within_its_bounds() -> None:
    """No history: 250 ms; else about the 90th percentile of the last 32 times to headers,
    never under 250 ms nor over 2 s or half the first-byte timeout."""
    latency = HeaderLatency()
    assert latency.hedge_delay(5.0) == 0.25
    for seconds in [0.1] * 17 + [0.8, 0.9, 1.0]:
        latency.record(seconds)
    assert latency.hedge_delay(5.0) == pytest.approx(0.81)  # the tail, not the max
    assert latency.hedge_delay(1.0) == 0.5  # half the first-byte timeout
    for _ in range(32):
        latency.record(0.01)  # the window moves on: the slow ones are forgotten
    assert latency.hedge_delay(5.0) == 0.25
    for _ in range(32):
        latency.record(5.0)
    assert latency.hedge_delay(30.0) == 2.0


class ManualTime:
    """A monotonic clock and a timer that move only when the test says so (``advance``)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._alarms: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def timer(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._alarms.append((self.now + seconds, future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move the clock, ring every alarm due, and let the woken tasks run."""
        self.now += seconds
        for when, future in self._alarms:
            if when <= self.now + 1e-9 and not future.done():
                future.set_result(None)
        self._alarms = [(w, f) for w, f in self._alarms if not f.done()]
        await settle()

    async def timing(self) -> Timing:
        async def no_sleep(seconds: float) -> None:
            return None

        return Timing(monotonic=self.monotonic, sleep=no_sleep, timer=self.timer)


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run until it waits on something outside the loop's control."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def finish(task: asyncio.Task[T]) -> T:
    """The task's result; a liveness bound turns a hang (a regression) into a failure."""
    return await asyncio.wait_for(task, 10)


class Body(httpx.AsyncByteStream):
    """A response body that counts the bytes it handed out and whether it was closed."""

    def __init__(self, data: bytes) -> None:
        self.data, self.sent, self.closed = data, 0, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), 64 * 1024):
            chunk = self.data[start : start + 64 * 1024]
            self.sent += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


class Mirrors:
    """An upstream of mirrors ``m0.test``, ``m1.test``... on a MockTransport: each answers
    as ``modes`` says ("ok", "hang", "gate" waits for ``gate``, or an HTTP status), after
    ``latency`` seconds of the manual clock; every request and response body is recorded."""

    def __init__(self, time: ManualTime) -> None:
        self.time = time
        self.modes: dict[str, str] = {}
        self.latency: dict[str, float] = {}
        self.asked: list[str] = []
        self.bodies: list[Body] = []
        self.gate = asyncio.Event()
        self.image = make_image("library/a", [PAYLOAD])

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.asked.append(host)
        mode = self.modes.get(host, "ok")
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "gate":
            await self.gate.wait()
        self.time.now += self.latency.get(host, 0.0)
        if mode.isdigit():
            return httpx.Response(int(mode), json={"errors": [{"code": "UNKNOWN"}]})
        if "/manifests/" in request.url.path:
            headers = {"Content-Type": self.image.media_type}
            headers["Docker-Content-Digest"] = self.image.digest
            return httpx.Response(200, headers=headers, content=self.image.manifest)
        body = Body(PAYLOAD)
        self.bodies.append(body)
        return httpx.Response(200, headers={"Content-Length": str(len(PAYLOAD))}, stream=body)

    def count(self, host: str) -> int:
        return self.asked.count(host)


def upstream_client(
    mirrors: Mirrors, timing: Timing, policy: str = "", mirror_list: str | None = None
) -> UpstreamClient:
    listed = mirror_list or '[{ url = "http://m0.test" }, { url = "http://m1.test" }]'
    text = f"""
[upstreams."docker.io"]
mirrors = {listed}
{policy}
"""
    settings = parse_settings(text, env={}).upstreams["docker.io"]
    return UpstreamClient(settings, transport=httpx.MockTransport(mirrors), timing=timing)


def counted(client: UpstreamClient, name: str, mirror: str) -> float:
    labels = {"upstream": "docker.io", "mirror": mirror}
    return client.metrics.registry.get_sample_value(f"mirrorrouter_{name}_total", labels) or 0.0


TAG = ImageReference.parse("docker.io/library/a:1")


async def test_first_byte_timeout_moves_on_at_once_and_never_retries_that_mirror() -> None:
    """With hedging off, a hung first mirror is given up after first_byte_timeout (5 s), not
    asked again though retries remain, and the second mirror answers."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes["m0.test"] = "hang"
    client = upstream_client(mirrors, await time.timing(), "hedge = false")
    try:
        fetch = asyncio.create_task(client.fetch_manifest(TAG))
        await settle()
        await time.advance(4.9)
        assert mirrors.asked == ["m0.test"]  # no hedge, no timeout yet
        await time.advance(0.1)
        fetched = await finish(fetch)
    finally:
        await client.aclose()
    assert fetched.mirror == "m1.test" and fetched.data == mirrors.image.manifest
    assert mirrors.asked == ["m0.test", "m1.test"]
    assert counted(client, "first_byte_timeouts", "m0.test") == 1
    assert counted(client, "hedges", "m1.test") == 0


async def test_every_mirror_hung_fails_within_the_timeout_listing_each_in_order() -> None:
    """A hung first mirror and a hedge target failing fast: the client's 503 comes at the
    first-byte timeout and its detail lists both mirrors in list order."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes.update({"m0.test": "hang", "m1.test": "503"})
    client = upstream_client(mirrors, await time.timing())
    try:
        fetch = asyncio.create_task(client.fetch_manifest(TAG))
        await settle()
        await time.advance(0.25)  # no history: hedged after the 250 ms floor
        assert mirrors.asked == ["m0.test", "m1.test", "m1.test", "m1.test"]  # retried 503s
        assert not fetch.done()  # a loser's failure is not the request's
        await time.advance(4.75)
        with pytest.raises(RegistryError) as raised:
            await finish(fetch)
    finally:
        await client.aclose()
    error = raised.value
    assert error.code is ErrorCode.UNAVAILABLE
    assert error.detail is not None
    assert [t["mirror"] for t in error.detail["tried"]] == ["m0.test", "m1.test"]
    assert "first_byte_timeout" in error.detail["tried"][0]["result"]
    assert error.detail["tried"][1]["result"] == "HTTP 503"


async def test_hedge_goes_out_after_the_mirrors_usual_latency() -> None:
    """A mirror that usually answers in 0.8 s is hedged at 0.8 s, not before; the hedge's
    answer wins and both the hedge and the win are counted."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.latency["m0.test"] = 0.8
    client = upstream_client(mirrors, await time.timing())
    try:
        for _ in range(5):
            assert (await client.fetch_manifest(TAG)).mirror == "m0.test"
        assert client.latency["http://m0.test"].hedge_delay(5.0) == pytest.approx(0.8)
        mirrors.modes["m0.test"] = "hang"
        fetch = asyncio.create_task(client.fetch_manifest(TAG))
        await settle()
        await time.advance(0.79)
        assert mirrors.count("m1.test") == 0
        await time.advance(0.02)
        fetched = await finish(fetch)
    finally:
        await client.aclose()
    assert fetched.mirror == "m1.test"
    assert counted(client, "hedges", "m1.test") == 1
    assert counted(client, "hedge_wins", "m1.test") == 1
    assert counted(client, "first_byte_timeouts", "m0.test") == 0  # abandoned, not timed out


async def test_mirror_overtaken_by_a_hedge_is_demoted_and_counts_against_its_breaker() -> None:
    """A hung first mirror loses a hedge: the loss counts against its breaker, and for a
    breaker_cooldown it is asked after the second mirror (only as its hedge), so later
    requests pay no hedge delay; after the cooldown it is asked first again."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes["m0.test"] = "hang"
    client = upstream_client(mirrors, await time.timing())
    try:
        fetch = asyncio.create_task(client.fetch_manifest(TAG))
        await settle()
        await time.advance(0.25)
        assert (await finish(fetch)).mirror == "m1.test"
        assert client.breakers["http://m0.test"].failures == 1
        assert counted(client, "mirror_demotions", "m0.test") == 1
        for _ in range(3):
            assert (await client.fetch_manifest(TAG)).mirror == "m1.test"  # at once
        assert mirrors.asked == ["m0.test", "m1.test", "m1.test", "m1.test", "m1.test"]
        mirrors.modes["m0.test"] = "ok"
        time.now += 31  # breaker_cooldown (30 s) is over
        assert (await client.fetch_manifest(TAG)).mirror == "m0.test"
    finally:
        await client.aclose()
    assert mirrors.asked[-1] == "m0.test"
    assert client.breakers["http://m1.test"].failures == 0


async def test_mirror_overtaken_by_hedges_opens_its_circuit() -> None:
    """Each hedge a hung first mirror loses counts against its breaker: with
    breaker_failures = 1 its circuit opens at the first loss; after the cooldown one request
    probes it, is hedged to the second mirror, and m0 answering first closes the circuit."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes["m0.test"] = "hang"
    client = upstream_client(mirrors, await time.timing(), "breaker_failures = 1")
    try:
        fetch = asyncio.create_task(client.fetch_manifest(TAG))
        await settle()
        await time.advance(0.25)
        assert (await finish(fetch)).mirror == "m1.test"
        assert client.breakers["http://m0.test"].state is CircuitState.OPEN
        assert (await client.fetch_manifest(TAG)).mirror == "m1.test"  # no wait for m0
        mirrors.modes.update({"m0.test": "gate", "m1.test": "hang"})
        time.now += 61  # cooldown and demotion (30 s) are over: the next request probes m0...
        fetch = asyncio.create_task(client.fetch_manifest(TAG))
        await settle()
        await time.advance(0.25)  # ...is hedged to m1...
        mirrors.gate.set()  # ...and answers first
        assert (await finish(fetch)).mirror == "m0.test"
    finally:
        await client.aclose()
    assert mirrors.asked == ["m0.test", "m1.test", "m1.test", "m0.test", "m1.test"]
    assert client.breakers["http://m0.test"].state is CircuitState.CLOSED
    assert client.breakers["http://m1.test"].failures == 0


async def test_hedged_blob_is_downloaded_once_and_every_response_closed() -> None:
    """Two mirrors answering a hedged blob GET at the same moment: one body is read, the
    other response is closed unread (bodies transferred, not requests, are counted)."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes.update({"m0.test": "gate", "m1.test": "gate"})
    client = upstream_client(mirrors, await time.timing())
    digest = Digest.of(PAYLOAD)
    try:

        async def read() -> bytes:
            async with client.open_blob("library/a", digest) as stream:
                return b"".join([chunk async for chunk in stream.chunks()])

        reading = asyncio.create_task(read())
        await settle()
        await time.advance(0.25)
        assert mirrors.asked == ["m0.test", "m1.test"]
        mirrors.gate.set()
        assert await finish(reading) == PAYLOAD
    finally:
        await client.aclose()
    assert sum(body.sent for body in mirrors.bodies) == len(PAYLOAD)
    assert all(body.closed for body in mirrors.bodies)


async def test_request_cancelled_mid_hedge_leaves_no_task_or_response_behind() -> None:
    """A client gone while two mirrors are asked: both runs end with the request, and a
    response that arrived meanwhile is closed."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes.update({"m0.test": "gate", "m1.test": "gate"})
    client = upstream_client(mirrors, await time.timing())
    before = asyncio.all_tasks()
    try:

        async def read() -> None:
            async with client.open_blob("library/a", Digest.of(PAYLOAD)) as stream:
                async for _ in stream.chunks():
                    await asyncio.Event().wait()  # the client stalls; then it goes

        reading = asyncio.create_task(read())
        await settle()
        await time.advance(0.25)
        mirrors.gate.set()
        await settle()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finish(reading)
        assert asyncio.all_tasks() == before
    finally:
        await client.aclose()
    assert len(mirrors.bodies) >= 1 and all(body.closed for body in mirrors.bodies)


async def test_tags_are_hedged_to_resolve_mirrors_and_blobs_to_pull_mirrors() -> None:
    """A hung first mirror: a tag's hedge skips the pull-only mirror for the resolve one, a
    blob's goes to the pull-only mirror."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes["m0.test"] = "hang"
    listed = (
        '[{ url = "http://m0.test" }, { url = "http://m1.test", capabilities = ["pull"] },'
        ' { url = "http://m2.test", capabilities = ["resolve"] }]'
    )
    client = upstream_client(mirrors, await time.timing(), mirror_list=listed)
    try:
        head = asyncio.create_task(client.head_manifest(TAG))
        await settle()
        await time.advance(0.25)
        assert (await finish(head)).mirror == "m2.test"
        assert mirrors.asked == ["m0.test", "m2.test"]
        client.demoted.clear()  # m0 lost that race; ask it first again to see the blob's hedge
        blob = asyncio.create_task(client.blob_exists("library/a", Digest.of(PAYLOAD)))
        await settle()
        await time.advance(0.25)
        assert await finish(blob)
    finally:
        await client.aclose()
    assert mirrors.asked[2:] == ["m0.test", "m1.test"]


async def test_every_circuit_open_lets_exactly_one_request_probe() -> None:
    """When every mirror's circuit is open, one request probes the mirror whose cooldown
    ends first while the others fail at once; the probe's success closes the circuit."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes.update({"m0.test": "503", "m1.test": "503"})
    policy = 'retry_attempts = 1\nbreaker_failures = 1\nbreaker_cooldown = "60s"\nhedge = false'
    client = upstream_client(mirrors, await time.timing(), policy)
    try:
        with pytest.raises(RegistryError):
            await client.fetch_manifest(TAG)  # opens m0's circuit, then m1's
        assert [b.state for b in client.breakers.values()] == [CircuitState.OPEN] * 2
        mirrors.modes.update({"m0.test": "gate", "m1.test": "ok"})
        mirrors.asked.clear()
        fetches = [asyncio.create_task(client.fetch_manifest(TAG)) for _ in range(3)]
        await settle()
        assert mirrors.asked == ["m0.test"]  # m0 opened first, so it reopens first
        refused = [f for f in fetches if f.done()]
        assert len(refused) == 2
        for fetch in refused:
            error = fetch.exception()
            assert isinstance(error, RegistryError) and error.code is ErrorCode.UNAVAILABLE
        mirrors.gate.set()
        probe = next(f for f in fetches if f not in refused)
        assert (await finish(probe)).mirror == "m0.test"
        assert client.breakers["http://m0.test"].state is CircuitState.CLOSED
        assert (await client.fetch_manifest(TAG)).mirror == "m0.test"
    finally:
        await client.aclose()
    assert mirrors.asked == ["m0.test", "m0.test"]


async def test_abandoned_probe_is_given_back() -> None:
    """A probe whose client went away ends with no verdict: the next request probes."""
    time = ManualTime()
    mirrors = Mirrors(time)
    mirrors.modes["m0.test"] = "503"
    policy = 'retry_attempts = 1\nbreaker_failures = 1\nbreaker_cooldown = "60s"'
    client = upstream_client(mirrors, await time.timing(), policy, '[{ url = "http://m0.test" }]')
    try:
        with pytest.raises(RegistryError):
            await client.fetch_manifest(TAG)
        mirrors.modes["m0.test"] = "hang"
        gone = asyncio.create_task(client.fetch_manifest(TAG))
        await settle()
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finish(gone)
        mirrors.modes["m0.test"] = "ok"
        assert (await client.fetch_manifest(TAG)).mirror == "m0.test"
    finally:
        await client.aclose()
    assert mirrors.asked == ["m0.test"] * 3


# ---------------------------------------------------------------------- across mirrors

LARGE = random.Random(14).randbytes(8 * MIB)  # over verify_before_send (4 MiB): streamed
SMALL = random.Random(7).randbytes(MIB)  # verified before its first byte is sent


class Faulty(httpx.AsyncByteStream):
    """A blob body in 1 MiB pieces that waits at ``hold`` after the first piece and breaks
    like a dropped connection after ``cut`` bytes (None: never)."""

    def __init__(self, data: bytes, cut: int | None, hold: asyncio.Event | None) -> None:
        self.data, self.cut, self.hold = data, cut, hold

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = len(self.data) if self.cut is None else self.cut
        for start in range(0, end, MIB):
            yield self.data[start : min(start + MIB, end)]
            if self.hold is not None:
                await self.hold.wait()
        if end < len(self.data):
            raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


class FakeMirrors:
    """Fake registries at http://m0.test, http://m1.test ..., each with its own log, all with
    one image; blob bodies of a mirror can be cut, held, or take time on the gateway's clock."""

    def __init__(self, count: int, layer: bytes) -> None:
        self.fakes = [FakeRegistry(host=f"m{i}.test") for i in range(count)]
        image = make_image("library/app", [layer])
        for fake in self.fakes:
            fake.add(image, "1")
        self.digest = sha256(layer)
        self.path = f"/v2/library/app/blobs/{self.digest}"
        self.cuts: dict[int, list[int | None]] = {}  # mirror -> bytes each next GET sends
        self.hold: dict[int, asyncio.Event] = {}  # mirror -> gate after the first MiB
        self.slow: dict[int, float] = {}  # mirror -> seconds each blob GET takes
        self.before: Callable[[int], None] | None = None  # told of each blob GET, by mirror
        self.clock: Clock | None = None

    def mirrors(self) -> str:
        return "[" + ", ".join(f'{{ url = "http://{f.host}" }}' for f in self.fakes) + "]"

    def wrap(self, _: httpx.ASGITransport) -> httpx.AsyncBaseTransport:
        apps = {fake.host: httpx.ASGITransport(app=fake.app) for fake in self.fakes}

        async def handler(request: httpx.Request) -> httpx.Response:
            index = int(request.url.host.removeprefix("m").removesuffix(".test"))
            blob_get = request.method == "GET" and "/blobs/" in request.url.path
            if blob_get and self.before is not None:
                self.before(index)
            response = await apps[request.url.host].handle_async_request(request)
            if not blob_get:
                return response
            if self.clock is not None:
                self.clock.now += self.slow.get(index, 0.0)
            cuts = self.cuts.get(index) or [None]
            cut = cuts.pop(0) if self.cuts.get(index) else None
            body = await response.aread()
            stream = Faulty(body, cut, self.hold.get(index))
            return httpx.Response(response.status_code, headers=response.headers, stream=stream)

        return httpx.MockTransport(handler)

    @asynccontextmanager
    async def gateway(self, tmp_path: Path, policy: str = "") -> AsyncIterator[Gateway]:
        text = config(tmp_path, policy, mirrors=self.mirrors())
        async with gateway(tmp_path, self.fakes[0], text, wrap=self.wrap) as gw:
            self.clock = gw.clock
            yield gw

    def gets(self, index: int) -> int:
        return self.fakes[index].count("GET", self.path)


def gateway_count(gw: Gateway, name: str, mirror: str) -> float:
    labels = {"upstream": "docker.io", "mirror": mirror}
    return gw.app.services.metrics.registry.get_sample_value(name, labels) or 0.0


def blob_file(gw: Gateway, digest: str) -> Path:
    return gw.cache_dir / "docker.io" / "blobs" / "sha256" / digest[7:9] / digest[7:]


async def test_cut_blob_resumes_from_the_next_mirror_at_the_exact_byte(tmp_path: Path) -> None:
    """A blob cut on mirror 1 continues from mirror 2 at the byte reached, verified as one."""
    mirrors = FakeMirrors(2, LARGE)
    cut = 3 * MIB + 5
    mirrors.cuts[0] = [cut]
    async with mirrors.gateway(tmp_path) as gw:
        response = await gw.client.get(mirrors.path)
        assert response.status_code == 200 and response.content == LARGE
        assert (await gw.client.get(mirrors.path)).headers["x-cache"] == "HIT"
        resumes = gateway_count(gw, "mirrorrouter_resumed_blobs_total", "m0.test")
    assert (mirrors.gets(0), mirrors.gets(1)) == (1, 1)  # not back to the one that broke
    assert mirrors.fakes[1].ranges == [(mirrors.path, f"bytes={cut}-")]
    assert resumes == 1


async def test_the_mirror_that_broke_is_asked_last_not_never(tmp_path: Path) -> None:
    """A resume asks the mirrors after the one that broke first; when they do not have the
    blob, the one that broke finishes it."""
    mirrors = FakeMirrors(3, LARGE)
    for fake in mirrors.fakes[1:]:
        del fake.blobs[("library/app", mirrors.digest)]
    mirrors.cuts[0] = [MIB]
    async with mirrors.gateway(tmp_path) as gw:
        response = await gw.client.get(mirrors.path)
    assert response.status_code == 200 and response.content == LARGE
    resumed = [(mirrors.path, f"bytes={MIB}-")]
    assert [fake.ranges for fake in mirrors.fakes] == [resumed] * 3


async def test_resume_with_no_mirror_left_names_what_each_answered(tmp_path: Path) -> None:
    """A small blob whose resume no mirror can serve is a 503 whose detail lists each
    mirror once, in the order asked."""
    mirrors = FakeMirrors(2, SMALL)
    del mirrors.fakes[1].blobs[("library/app", mirrors.digest)]
    mirrors.cuts[0] = [MIB // 2]

    def down_after_the_cut(index: int) -> None:
        if index == 0 and mirrors.gets(0) == 1:
            mirrors.fakes[0].faults["/blobs/"] = [503]

    mirrors.before = down_after_the_cut
    async with mirrors.gateway(tmp_path, "retry_attempts = 1") as gw:
        response = await gw.client.get(mirrors.path)
    assert response.status_code == 503
    tried = json.loads(response.content)["errors"][0]["detail"]["tried"]
    assert [(t["mirror"], t["result"]) for t in tried] == [
        ("m1.test", "HTTP 404 not found"),
        ("m0.test", "HTTP 503"),
    ]


async def test_resumes_that_keep_making_progress_go_on_past_five(tmp_path: Path) -> None:
    """Two mirrors that each cut every stream after 1 MiB still deliver the whole blob, in
    turns, with seven resumes (counted per mirror that cut)."""
    mirrors = FakeMirrors(2, LARGE)
    mirrors.cuts = {0: [MIB] * 8, 1: [MIB] * 8}
    async with mirrors.gateway(tmp_path) as gw:
        response = await gw.client.get(mirrors.path)
        assert response.status_code == 200 and response.content == LARGE
        resumes = [
            gateway_count(gw, "mirrorrouter_resumed_blobs_total", f"m{i}.test") for i in (0, 1)
        ]
    assert (mirrors.gets(0), mirrors.gets(1)) == (4, 4)
    assert [r for _, r in mirrors.fakes[1].ranges] == [f"bytes={n * MIB}-" for n in (1, 3, 5, 7)]
    assert resumes == [4, 3]


async def test_a_round_of_mirrors_without_progress_gives_up(tmp_path: Path) -> None:
    """When every mirror broke without adding a byte since the last progress, the client's
    transfer is cut, nothing is committed, and the next pull succeeds."""
    mirrors = FakeMirrors(2, LARGE)
    mirrors.cuts = {0: [MIB, 0], 1: [0]}
    async with mirrors.gateway(tmp_path) as gw:
        with pytest.raises(FillFailed):
            await gw.client.get(mirrors.path)
        assert (mirrors.gets(0), mirrors.gets(1)) == (2, 1)
        assert not blob_file(gw, mirrors.digest).exists()
        assert spooled(gw.cache_dir / "docker.io") == []
        again = await gw.client.get(mirrors.path)
        assert again.status_code == 200 and again.content == LARGE


async def test_resumes_stop_when_no_byte_came_for_the_retry_deadline(tmp_path: Path) -> None:
    """Resumes end once retry_deadline passed without progress, before the round is over."""
    mirrors = FakeMirrors(3, LARGE)
    mirrors.cuts = {0: [MIB], 1: [0]}
    mirrors.slow[1] = 61.0  # its answer takes a minute, and then it breaks
    async with mirrors.gateway(tmp_path, 'retry_deadline = "60s"') as gw:
        with pytest.raises(FillFailed):
            await gw.client.get(mirrors.path)
        assert not blob_file(gw, mirrors.digest).exists()
    assert [mirrors.gets(i) for i in range(3)] == [1, 1, 0]


async def test_a_mirror_announcing_another_size_is_that_mirrors_failure(tmp_path: Path) -> None:
    """A resume from a mirror whose blob has another size is not spliced in: that mirror
    counts a failure and the next one in turn finishes the blob."""
    mirrors = FakeMirrors(2, LARGE)
    mirrors.fakes[1].blobs[("library/app", mirrors.digest)] = LARGE + b"tail"
    mirrors.cuts[0] = [MIB]
    async with mirrors.gateway(tmp_path) as gw:
        response = await gw.client.get(mirrors.path)
        assert response.status_code == 200 and response.content == LARGE
        breakers = gw.app.services.pull.breakers(gw.app.services.settings.upstreams["docker.io"])
    assert (mirrors.gets(0), mirrors.gets(1)) == (2, 1)
    assert mirrors.fakes[0].ranges == [(mirrors.path, f"bytes={MIB}-")]
    assert breakers[1].failures == 1


async def test_corrupt_small_blob_costs_the_client_nothing(tmp_path: Path) -> None:
    """A small blob that mirror 1 serves corrupt reaches the client whole and right, from
    mirror 2, with a plain 200; mirror 1 counts a failure."""
    mirrors = FakeMirrors(2, SMALL)
    mirrors.fakes[0].corrupt.add(mirrors.digest)
    async with mirrors.gateway(tmp_path) as gw:
        response = await gw.client.get(mirrors.path)
        failovers = gateway_count(gw, "mirrorrouter_failovers_total", "m0.test")
        breakers = gw.app.services.pull.breakers(gw.app.services.settings.upstreams["docker.io"])
    assert response.status_code == 200 and response.content == SMALL
    assert response.headers["content-length"] == str(len(SMALL))
    assert (mirrors.gets(0), mirrors.gets(1)) == (1, 1)
    assert failovers == 1 and breakers[0].failures == 1


async def test_clients_waiting_for_a_small_blob_follow_its_refill(tmp_path: Path) -> None:
    """Four clients of one small blob wait for it verified: one download per mirror, the
    corrupt one's replacement followed, every client a 200 with the right bytes; a HEAD
    answers meanwhile without waiting for the body."""
    mirrors = FakeMirrors(2, SMALL + SMALL)  # 2 MiB: a first MiB, then the hold
    mirrors.fakes[0].corrupt.add(mirrors.digest)
    hold = mirrors.hold[0] = asyncio.Event()
    async with mirrors.gateway(tmp_path) as gw:
        site = await gw.app.services.pull.site(gw.app.services.settings.upstreams["docker.io"])
        tasks = [asyncio.create_task(gw.client.get(mirrors.path)) for _ in range(4)]
        digest = Digest.parse(mirrors.digest)

        def joined() -> bool:  # every client joined the download, held mid-blob
            fill = site.fills.get(digest)
            return fill is not None and fill.followers == 3 and fill.written >= MIB

        await until(joined)
        head = await gw.client.head(mirrors.path)
        assert head.status_code == 200 and head.headers["content-length"] == str(2 * MIB)
        assert not any(task.done() for task in tasks)  # nothing sent before the digest matched
        hold.set()
        responses = await asyncio.gather(*tasks)
    assert [(r.status_code, r.content == SMALL + SMALL) for r in responses] == [(200, True)] * 4
    assert (mirrors.gets(0), mirrors.gets(1)) == (1, 1)


async def test_corrupt_large_blob_cuts_the_first_client_and_the_next_pull_succeeds(
    tmp_path: Path,
) -> None:
    """A large blob streams as it lands: mirror 1's corrupt copy cuts the first client's
    transfer (never completed wrong); the refill from mirror 2 serves the next pull."""
    mirrors = FakeMirrors(2, LARGE)
    mirrors.fakes[0].corrupt.add(mirrors.digest)
    async with mirrors.gateway(tmp_path) as gw:
        with pytest.raises(FillFailed):
            await gw.client.get(mirrors.path)
        again = await gw.client.get(mirrors.path)
        assert again.status_code == 200 and again.content == LARGE
        assert blob_file(gw, mirrors.digest).read_bytes() == LARGE
    assert (mirrors.gets(0), mirrors.gets(1)) == (1, 1)


async def test_a_resume_that_brought_nothing_is_not_blamed_for_corrupt_bytes(
    tmp_path: Path,
) -> None:
    """Only the mirrors that sent bytes of a corrupt blob are suspects: the one whose resume
    broke at once serves the fresh download, and the next pull succeeds."""
    mirrors = FakeMirrors(2, LARGE)
    mirrors.fakes[0].corrupt.add(mirrors.digest)
    mirrors.cuts = {0: [MIB], 1: [0]}
    async with mirrors.gateway(tmp_path) as gw:
        with pytest.raises(FillFailed):
            await gw.client.get(mirrors.path)
        again = await gw.client.get(mirrors.path)
    assert again.status_code == 200 and again.content == LARGE
    assert (mirrors.gets(0), mirrors.gets(1)) == (2, 2)


async def test_a_mirror_that_ends_a_blob_wrong_is_blamed_even_without_bytes(
    tmp_path: Path,
) -> None:
    """A mirror answering a blob with an empty body is the suspect, not asked again: the
    client gets the right bytes from the next mirror."""
    mirrors = FakeMirrors(2, SMALL)
    mirrors.fakes[0].blobs[("library/app", mirrors.digest)] = b""
    async with mirrors.gateway(tmp_path) as gw:
        response = await gw.client.get(mirrors.path)
    assert response.status_code == 200 and response.content == SMALL
    assert (mirrors.gets(0), mirrors.gets(1)) == (1, 1)


def spooled(cache: Path) -> list[Path]:
    """Files in a cache's temp area other than the owner locks: writes left behind."""
    return [p for p in (cache / "tmp").rglob("*") if p.is_file() and p.name != ".lock"]
