"""Bad days with real registries: upstreams down, a crash mid-ingest, faults on the wire.

Each test has upstreams of its own, since it stops, freezes or breaks them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.clients import ClientError, Containerd, Skopeo, write_hosts_toml
from tests.support.faultproxy import FaultProxy, HungServer, closed_port_url
from tests.support.gateway import GatewayProcess
from tests.support.images import Descriptor, ImageFactory, PushedImage
from tests.support.registry import DistributionRegistry, LoggedRequest
from tests.test_metrics import samples, value

pytestmark = pytest.mark.real


def hub_config(cache: Path, mirrors: list[str], policy: str = "") -> str:
    listed = ", ".join(f'{{ url = "{url}" }}' for url in mirrors)
    return f"""
[cache]
directory = "{cache}"
[upstreams."docker.io"]
mirrors = [{listed}]
{policy}
"""


def test_every_mirror_down_serves_known_tags_stale(
    factory: ImageFactory, upstream: DistributionRegistry, tmp_path: Path
) -> None:
    """With every mirror down, a pulled tag still pulls (skopeo, ctr); a new one gets an error."""
    pushed = factory.push(factory.runnable(), upstream, "library/app", "1")
    policy = 'tag_ttl = "0s"\nretry_attempts = 1\nretry_deadline = "5s"'
    config = hub_config(tmp_path / "cache", [upstream.url], policy)
    hosts = tmp_path / "hosts"
    with GatewayProcess(tmp_path / "gw", config) as gateway:
        write_hosts_toml(hosts, "docker.io", gateway.url, server=None)
        skopeo = Skopeo()
        assert (
            skopeo.copy_to_local(f"{gateway.host}/library/app:1", tmp_path / "warm").manifest_digest
            == pushed.digest
        )
        upstream.stop()
        stale = httpx.get(f"{gateway.url}/v2/library/app/manifests/1")
        assert stale.status_code == 200 and stale.headers["x-cache"] == "STALE"
        copied = skopeo.copy_to_local(f"{gateway.host}/library/app:1", tmp_path / "stale")
        assert copied.manifest_digest == pushed.digest
        with Containerd(base_dir=tmp_path) as containerd:
            assert containerd.ctr_pull("docker.io/library/app:1", hosts) == pushed.digest
        never = httpx.get(f"{gateway.url}/v2/library/never/manifests/1")
        assert never.status_code == 503
        error = json.loads(never.content)["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert error["detail"]["tried"][0]["mirror"] == upstream.host
        assert "ConnectError" in error["detail"]["tried"][0]["result"]


def test_kill_9_mid_ingest_leaves_nothing_partial(
    factory: ImageFactory, upstream: DistributionRegistry, tmp_path: Path
) -> None:
    """kill -9 during a blob download: after a restart no partial file remains or is served,
    and the next pull fetches the blob cleanly."""
    pushed = factory.push(factory.large(), upstream, "library/big", "1")
    layer = max(pushed.blobs, key=lambda b: b.size)
    cache = tmp_path / "cache"
    config = hub_config(cache, [upstream.url], 'read_timeout = "60s"')
    url_path = f"/v2/library/big/blobs/{layer.digest}"
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    try:
        httpx.get(f"{gateway.url}/v2/library/big/manifests/1").raise_for_status()
        with httpx.stream("GET", gateway.url + url_path, timeout=30) as response:
            first = next(response.iter_raw(64 * 1024))
            upstream.freeze()  # the fill stalls mid-blob
            assert first
            spools = _wait_for_spool(cache / "docker.io" / "tmp")
            gateway.kill()
    finally:
        upstream.thaw()
        gateway.stop()
    blob_file = cache / "docker.io" / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    assert spools and not blob_file.exists()
    with GatewayProcess(tmp_path / "gw2", config) as restarted:
        assert _spool_files(cache / "docker.io" / "tmp") == []  # swept at start
        digest = hashlib.sha256()
        with httpx.stream("GET", restarted.url + url_path, timeout=60) as response:
            assert response.headers["x-cache"] == "MISS"
            for chunk in response.iter_bytes():
                digest.update(chunk)
        assert "sha256:" + digest.hexdigest() == layer.digest
    assert hashlib.sha256(blob_file.read_bytes()).hexdigest() == layer.digest[7:]


def _spool_files(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if p.is_file() and p.name != ".lock"]


def _wait_for_spool(tmp: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spools = [p for p in _spool_files(tmp) if p.stat().st_size > 0]
        if spools:
            return spools
        time.sleep(0.02)
    return []


# ---------------------------------------------------------------------- faults on the wire


def stock(factory: ImageFactory, registry: DistributionRegistry) -> Stocked:
    small = factory.push(factory.small(), registry, "library/small", "1")
    large = factory.push(factory.large(), registry, "library/large", "1")
    multi = factory.push(factory.multiarch(), registry, "library/multi", "1")
    return Stocked(registry, small, large, multi)


@pytest.fixture(scope="module")
def stocked(tmp_path_factory: pytest.TempPathFactory, factory: ImageFactory) -> Iterator[Stocked]:
    """One registry with a small, a 110 MiB and a multi-arch image, shared by the fault tests
    (read-only)."""
    with DistributionRegistry(tmp_path_factory.mktemp("stocked")) as registry:
        yield stock(factory, registry)


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory, factory: ImageFactory) -> Iterator[Stocked]:
    """A second registry with the same images: the healthy second mirror (read-only)."""
    with DistributionRegistry(tmp_path_factory.mktemp("twin")) as registry:
        yield stock(factory, registry)


@dataclass
class Stocked:
    registry: DistributionRegistry
    small: PushedImage
    large: PushedImage
    multi: PushedImage

    @property
    def layer(self) -> Descriptor:
        return max(self.large.blobs, key=lambda b: b.size)


def fetch_digest(url: str, timeout: float = 60) -> str:
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=timeout) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def test_dead_and_failing_first_mirrors_fail_over(stocked: Stocked, tmp_path: Path) -> None:
    """A refused first mirror, a 503 one and one asking a long Retry-After all fail over."""
    with FaultProxy(stocked.registry.url) as broken:
        mirrors = [closed_port_url(), broken.url, stocked.registry.url]
        policy = "retry_attempts = 2"
        broken.status(503, path_contains="/manifests/", times=2)
        broken.status(429, path_contains="/blobs/", headers={"Retry-After": "3600"})
        with GatewayProcess(tmp_path / "gw", hub_config(tmp_path / "c", mirrors, policy)) as gw:
            manifest = httpx.get(f"{gw.url}/v2/library/small/manifests/1")
            assert manifest.headers["docker-content-digest"] == stocked.small.digest
            for blob in stocked.small.blobs:
                assert fetch_digest(f"{gw.url}/v2/library/small/blobs/{blob.digest}") == blob.digest
        assert broken.count("GET", "/manifests/", fault="status") == 2  # retried, then next
        blob_gets = broken.count("GET", "/blobs/")
        assert blob_gets == len(stocked.small.blobs)  # 429 + 3600 s: not retried


def test_blob_cut_mid_stream_resumes_with_range(stocked: Stocked, tmp_path: Path) -> None:
    """A connection cut 30 MiB into a 110 MiB blob resumes there: one logical fetch."""
    layer = stocked.layer
    with FaultProxy(stocked.registry.url) as proxy:
        proxy.cut_after(30 * 1024 * 1024, path_contains=layer.digest, times=1)
        with GatewayProcess(tmp_path / "gw", hub_config(tmp_path / "c", [proxy.url])) as gw:
            httpx.get(f"{gw.url}/v2/library/large/manifests/1").raise_for_status()
            assert fetch_digest(f"{gw.url}/v2/library/large/blobs/{layer.digest}") == layer.digest
            assert "resuming at byte" in gw.log()
        gets = [r for r in proxy.requests() if r.method == "GET" and layer.digest in r.path]
    # Resumed from the last byte received: at the cut, or a little before it when the
    # transport drops what it had buffered as the connection broke (aiohttp does).
    assert len(gets) == 2 and gets[0].range is None
    offset = int((gets[1].range or "").removeprefix("bytes=").rstrip("-"))
    assert 26 * 1024 * 1024 <= offset <= 30 * 1024 * 1024


def test_slow_mirror_fails_over_within_the_deadline(stocked: Stocked, tmp_path: Path) -> None:
    """A mirror slower than read_timeout is abandoned for the next one within seconds."""
    with FaultProxy(stocked.registry.url) as slow:
        slow.delay(30, path_contains="/manifests/")
        policy = 'read_timeout = "1s"\nretry_attempts = 1'
        mirrors = [slow.url, stocked.registry.url]
        with GatewayProcess(tmp_path / "gw", hub_config(tmp_path / "c", mirrors, policy)) as gw:
            started = time.monotonic()
            response = httpx.get(f"{gw.url}/v2/library/small/manifests/1", timeout=20)
            elapsed = time.monotonic() - started
    assert response.headers["docker-content-digest"] == stocked.small.digest
    assert elapsed < 10


# ---------------------------------------------------------------------- hung and slow mirrors

LIVENESS = 20.0  # seconds: only a stall misses this; speed is never asserted


def pull_both(gateway: GatewayProcess, dest: Path) -> float:
    """Cold skopeo pulls of the 110 MiB image and of every platform of the multi-arch
    index through the gateway; the wall seconds of both."""
    skopeo = Skopeo(timeout=LIVENESS * 3)
    dest.mkdir()
    started = time.monotonic()
    skopeo.copy_to_local(f"{gateway.host}/library/large:1", dest / "large")
    skopeo.copy_to_local(f"{gateway.host}/library/multi:1", dest / "multi", all_platforms=True)
    return time.monotonic() - started


def assert_each_blob_sent_once(stocked: Stocked, requests: list[LoggedRequest]) -> None:
    """The registry's own log: every blob of both images went out whole, exactly once."""
    for blob in {*stocked.large.blobs, *stocked.multi.blobs}:
        gets = [r for r in requests if r.method == "GET" and blob.digest in r.path]
        assert sum(r.size or 0 for r in gets) == blob.size, (blob, gets)


def test_hung_first_mirror_costs_a_cold_pull_no_stall(stocked: Stocked, tmp_path: Path) -> None:
    """A first mirror that accepts and never answers: cold skopeo pulls of a large image and
    a multi-arch index succeed within the liveness bound, each blob fetched once."""
    since = stocked.registry.mark()
    with HungServer() as hung:
        mirrors = [hung.url, stocked.registry.url]
        with GatewayProcess(tmp_path / "gw", hub_config(tmp_path / "c", mirrors)) as gw:
            elapsed = pull_both(gw, tmp_path / "pulled")
        assert hung.connections > 0  # it was asked, and hedged around
    assert elapsed < LIVENESS
    assert_each_blob_sent_once(stocked, stocked.registry.requests(since))


def test_slow_first_mirror_is_hedged(stocked: Stocked, tmp_path: Path) -> None:
    """A first mirror answering after 2 s: the first request is hedged to the second mirror,
    which wins; the slow one is then demoted, so the rest of the cold pulls ask the second
    mirror first (no more hedges); both counted on /metrics, each blob fetched once."""
    since = stocked.registry.mark()
    with FaultProxy(stocked.registry.url) as slow:
        slow.delay(2)
        mirrors = [slow.url, stocked.registry.url]
        with GatewayProcess(tmp_path / "gw", hub_config(tmp_path / "c", mirrors)) as gw:
            elapsed = pull_both(gw, tmp_path / "pulled")
            found = samples(httpx.get(f"{gw.url}/metrics").text)
    second = stocked.registry.host
    hedges = value(found, "mirrorrouter_hedges_total", upstream="docker.io", mirror=second)
    wins = value(found, "mirrorrouter_hedge_wins_total", upstream="docker.io", mirror=second)
    demoted = value(
        found, "mirrorrouter_mirror_demotions_total", upstream="docker.io", mirror=slow.host
    )
    assert elapsed < LIVENESS
    assert hedges >= 1 and wins >= 1 and demoted >= 1
    assert_each_blob_sent_once(stocked, stocked.registry.requests(since))


def test_single_hung_mirror_serves_stale_or_503_well_before_clients_give_up(
    stocked: Stocked, tmp_path: Path
) -> None:
    """The only mirror hangs: a cached tag comes back STALE and an uncached one as 503, each
    after about the first-byte timeout (5 s), well before a client's usual 30 s."""
    with FaultProxy(stocked.registry.url) as mirror:
        config = hub_config(tmp_path / "c", [mirror.url], 'tag_ttl = "0s"')
        with GatewayProcess(tmp_path / "gw", config) as gw:
            url = f"{gw.url}/v2/library/small/manifests/1"
            httpx.get(url).raise_for_status()  # cached while the mirror answered
            mirror.delay(3600)  # from now on it accepts requests and never answers
            started = time.monotonic()
            stale = httpx.get(url, timeout=30)
            stale_seconds = time.monotonic() - started
            started = time.monotonic()
            never = httpx.get(f"{gw.url}/v2/library/never/manifests/1", timeout=30)
            never_seconds = time.monotonic() - started
    assert stale.status_code == 200 and stale.headers["x-cache"] == "STALE"
    assert stale.headers["docker-content-digest"] == stocked.small.digest
    assert never.status_code == 503
    tried = json.loads(never.content)["errors"][0]["detail"]["tried"]
    assert "first_byte_timeout" in tried[0]["result"]
    assert stale_seconds < 15 and never_seconds < 15


def test_single_mirror_back_from_an_open_circuit_is_probed_at_once(
    stocked: Stocked, tmp_path: Path
) -> None:
    """The only mirror failed until its circuit opened (cooldown 1 h); once it is back, the
    next pull probes it at once and succeeds, instead of being refused for the cooldown."""
    policy = 'retry_attempts = 1\nbreaker_failures = 2\nbreaker_cooldown = "1h"'
    with FaultProxy(stocked.registry.url) as mirror:
        config = hub_config(tmp_path / "c", [mirror.url], policy)
        with GatewayProcess(tmp_path / "gw", config) as gw:
            failing = mirror.status(503)
            for tag in ("a", "b", "c"):  # a and b open the circuit; c finds every one open
                down = httpx.get(f"{gw.url}/v2/library/small/manifests/{tag}")
                assert down.status_code == 503
            probed = json.loads(down.content)["errors"][0]["detail"]["tried"][0]["result"]
            mirror.remove(failing)
            pulled = Skopeo(timeout=LIVENESS * 3).copy_to_local(
                f"{gw.host}/library/small:1", tmp_path / "pulled"
            )
            log = gw.log()
    assert failing.applied == 3 and probed == "HTTP 503"  # c probed it, not "circuit open"
    assert pulled.manifest_digest == stocked.small.digest
    assert "has its circuit open: probing" in log


# ---------------------------------------------------------------------- a healthy second mirror

MIB = 1024 * 1024


def pull_cold(
    client: str,
    workdir: Path,
    mirrors: list[str],
    images: list[PushedImage],
    policy: str = "",
    *,
    node_each: bool = False,
) -> tuple[list[str], str]:
    """Pull ``images`` (every platform) with a real client through one gateway with an empty
    cache; the digests the client got (``"failed"`` for a failed pull) and the gateway log.
    ``node_each``: each ctr pull from a containerd of its own (another node)."""
    config = hub_config(workdir / "cache", mirrors, policy)
    pulled: list[str] = []
    with GatewayProcess(workdir / "gw", config) as gateway:
        if client == "skopeo":
            for i, image in enumerate(images):
                ref = image.path_reference(gateway.host)
                try:
                    local = Skopeo().copy_to_local(ref, workdir / f"pull{i}", all_platforms=True)
                    pulled.append(local.manifest_digest)
                except ClientError:
                    pulled.append("failed")
            return pulled, gateway.log()
        hosts = workdir / "hosts"
        write_hosts_toml(hosts, "docker.io", gateway.url, server=None)
        for batch in [[image] for image in images] if node_each else [images]:
            with Containerd(base_dir=workdir) as containerd:
                for image in batch:
                    ref = image.path_reference("docker.io")
                    try:
                        pulled.append(
                            containerd.ctr_pull(ref, hosts, all_platforms=True, unpack=False)
                        )
                    except ClientError:
                        pulled.append("failed")
        return pulled, gateway.log()


def layer_gets(requests: list[Any], digest: str) -> list[Any]:
    return [r for r in requests if r.method == "GET" and digest in r.path]


@pytest.mark.parametrize("client", ["skopeo", "ctr"])
def test_cut_on_the_first_mirror_is_resumed_on_the_second(
    stocked: Stocked, twin: Stocked, tmp_path: Path, client: str
) -> None:
    """Every blob cut on the first mirror (the 110 MiB layer 30 MiB in) is resumed on the
    second at the byte reached: cold pulls of a large and a multi-arch image succeed, and
    the large layer crosses the wire about once."""
    layer, since = stocked.layer, twin.registry.mark()
    with FaultProxy(stocked.registry.url) as proxy:
        proxy.cut_after(30 * MIB, path_contains=layer.digest)
        proxy.cut_after(100, path_contains="/blobs/")
        images = [stocked.large, stocked.multi]
        pulled, log = pull_cold(client, tmp_path, [proxy.url, twin.registry.url], images)
        first = layer_gets(proxy.requests(), layer.digest)
        cut = [r for r in proxy.requests() if r.method == "GET" and "/blobs/" in r.path]
    assert pulled == [stocked.large.digest, stocked.multi.digest]
    assert "resuming at byte" in log
    second = layer_gets(twin.registry.requests(since), layer.digest)
    assert len(first) == 1 and first[0].body_bytes == 30 * MIB
    assert [r.status for r in second] == [206]  # a Range request, at the byte reached
    # The resume starts where the gateway's bytes ended: at the cut, or a little before it
    # when the transport dropped what it had buffered as the connection broke.
    assert second[0].size is not None
    assert layer.size <= first[0].body_bytes + second[0].size <= layer.size + 4 * MIB
    assert all(r.fault == "cut_after" for r in cut)
    assert len({r.path for r in cut}) == len(cut)  # never back to the mirror that broke


def test_stall_on_the_first_mirror_is_resumed_on_the_second(
    stocked: Stocked, twin: Stocked, tmp_path: Path
) -> None:
    """A layer stalled 30 MiB in on the first mirror goes on from the second once
    read_timeout passed, well before the stall would end."""
    layer, since = stocked.layer, twin.registry.mark()
    with FaultProxy(stocked.registry.url) as proxy:
        proxy.stall_after(30 * MIB, 60, path_contains=layer.digest)
        mirrors = [proxy.url, twin.registry.url]
        started = time.monotonic()
        pulled, log = pull_cold("skopeo", tmp_path, mirrors, [stocked.large], 'read_timeout = "1s"')
        elapsed = time.monotonic() - started
    assert pulled == [stocked.large.digest] and "resuming at byte" in log
    assert [r.status for r in layer_gets(twin.registry.requests(since), layer.digest)] == [206]
    assert elapsed < 20


@pytest.mark.parametrize("client", ["skopeo", "ctr"])
def test_corrupt_small_blobs_on_the_first_mirror_cost_the_client_nothing(
    stocked: Stocked, twin: Stocked, tmp_path: Path, client: str
) -> None:
    """Configs and small layers the first mirror serves corrupt are verified before their
    first byte: cold pulls succeed at once from the second mirror's copies, each blob asked
    once of each mirror, and only right bytes are cached."""
    since = twin.registry.mark()
    with FaultProxy(stocked.registry.url) as bad:
        bad.corrupt(path_contains="/blobs/")
        images = [stocked.small, stocked.multi]
        pulled, log = pull_cold(client, tmp_path, [bad.url, twin.registry.url], images)
        corrupted = [r for r in bad.requests() if r.method == "GET" and r.fault == "corrupt"]
    assert pulled == [stocked.small.digest, stocked.multi.digest]
    assert "failed verification" in log
    refetched = [r.path for r in twin.registry.blob_gets(since)]
    assert corrupted and sorted(refetched) == sorted(r.path for r in corrupted)
    for blob in {b.digest for image in images for b in image.blobs}:
        stored = tmp_path / "cache" / "docker.io" / "blobs" / "sha256" / blob[7:9] / blob[7:]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == blob[7:]


@pytest.mark.parametrize("client", ["skopeo", "ctr"])
def test_corrupt_large_blob_cuts_the_first_pull_and_the_next_succeeds(
    stocked: Stocked, twin: Stocked, tmp_path: Path, client: str
) -> None:
    """A large layer served corrupt by the first mirror streams to the first client, whose
    transfer is then cut (never completed wrong); the next pull gets the second mirror's
    copy, fetched once.

    The next ctr pull runs on another node: containerd keeps the bytes it received and
    resumes with Range, so its own copy of the corrupt blob fails its digest check until
    containerd drops that download."""
    layer, since = stocked.layer, twin.registry.mark()
    with FaultProxy(stocked.registry.url) as bad:
        bad.corrupt(path_contains=layer.digest)
        images = [stocked.large, stocked.large]  # the first pull, then the next
        mirrors = [bad.url, twin.registry.url]
        pulled, log = pull_cold(client, tmp_path, mirrors, images, node_each=True)
        corrupted = layer_gets(bad.requests(), layer.digest)
    assert pulled == ["failed", stocked.large.digest]
    assert "failed verification" in log
    assert len(corrupted) == 1
    assert len(layer_gets(twin.registry.requests(since), layer.digest)) == 1
