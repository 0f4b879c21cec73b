"""Three gateway replicas sharing a real S3 store (SeaweedFS) and a real Redis, in front of
a real distribution registry standing in for docker.io (behind a fault proxy, to slow a
download down on purpose). Everything on loopback.

- 30 concurrent pulls of one cold large image spread over the replicas: exactly one
  upstream GET per blob, every client gets the right bytes;
- the replica doing a download is killed mid-blob: another takes the download over and
  every client of the surviving replicas gets the right digest;
- a tag pulled through replica A is answered by replica B within the TTL with zero upstream
  requests;
- concurrent cold pulls of one tag over the replicas ask upstream for it once (the tag
  lease); the replica asking is killed mid-answer: another takes over;
- a tag pushed to a hosted member through one replica is answered by the others' memory
  within the documented bound (the shared generation), never stale after it;
- a push whose requests land on different replicas (no session affinity) works: each
  request for an upload session goes to the replica holding it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mirrorrouter.coordination.generation import SHARED_TRUST
from tests.support.fakeregistry import Image, make_image
from tests.support.faultproxy import FaultProxy
from tests.support.gateway import HOSTED_FIRST_GROUP, GatewayProcess
from tests.support.images import PushedImage, session_factory
from tests.support.redisserver import RedisServer
from tests.support.registry import DistributionRegistry
from tests.support.seaweed import SeaweedS3, session_seaweed

pytestmark = pytest.mark.real

MIB = 1024 * 1024
LARGE = 48 * MIB
OCI_ACCEPT = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


@dataclass
class Upstream:
    hub: DistributionRegistry
    proxy: FaultProxy
    redis: RedisServer
    seaweed: SeaweedS3
    images: dict[str, PushedImage]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    root = tmp_path_factory.mktemp("scaling")
    factory = session_factory(tmp_path_factory)
    with (
        DistributionRegistry(root / "hub") as hub,
        FaultProxy(hub.url) as proxy,
        RedisServer(root / "redis") as redis,
    ):
        images = {
            "large": factory.push(
                factory.large("scale", size=LARGE, seed=41), hub, "library/big", "1"
            ),
            "doomed": factory.push(
                factory.large("doomed", size=LARGE, seed=42), hub, "library/doomed", "1"
            ),
            "small": factory.push(factory.small("tagged", seed=43), hub, "library/tagged", "1"),
            "leased": factory.push(factory.small("leased", seed=44), hub, "library/leased", "1"),
            "orphan": factory.push(factory.small("orphan", seed=45), hub, "library/orphan", "1"),
        }
        yield Upstream(hub, proxy, redis, session_seaweed(), images)


def replica_config(up: Upstream, spool: Path, port: int, prefix: str) -> str:
    return f"""
[server]
access_log = true
[cache]
backend = "s3"
directory = "{spool}"
[cache.s3]
bucket = "{up.seaweed.bucket}"
endpoint = "{up.seaweed.endpoint}"
prefix = "{prefix}"
access_key_id_env = "S3_KEY"
secret_access_key_env = "S3_SECRET"
[upstreams."docker.io"]
tag_ttl = "10m"
mirrors = [{{ url = "{up.proxy.url}" }}]
{HOSTED_FIRST_GROUP}
[[routes]]
prefix = "team"
hosted = "team"
[coordination]
backend = "redis"
redis_url = "{up.redis.redis_url}"
key_prefix = "{prefix}"
lock_ttl = "2s"
advertise_url = "http://127.0.0.1:{port}"
"""


@pytest.fixture
def replicas(upstream: Upstream, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Three replicas with a fresh key prefix in the bucket and in Redis: a cold cluster."""
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    env = {"S3_KEY": upstream.seaweed.access_key, "S3_SECRET": upstream.seaweed.secret_key}
    started: list[GatewayProcess] = []
    try:
        for index in range(3):
            gateway = GatewayProcess(tmp_path / f"replica{index}", "", env=env)
            gateway.config_path.write_text(
                replica_config(upstream, tmp_path / f"spool{index}", gateway.port, prefix)
            )
            started.append(gateway.start())
        yield started
    finally:
        for gateway in started:
            gateway.stop()
        upstream.proxy.clear()


async def pull(
    client: httpx.AsyncClient, base: str, image: PushedImage, received: list[int] | None = None
) -> dict[str, str]:
    """Manifest by tag, then every blob; the sha256 of each as received. ``received``
    counts the blob bytes that arrived so far (for a test waiting until they flow)."""
    manifest = await client.get(
        f"{base}/v2/{image.repository}/manifests/{image.tag}", headers={"Accept": OCI_ACCEPT}
    )
    manifest.raise_for_status()
    digests = {"manifest": "sha256:" + hashlib.sha256(manifest.content).hexdigest()}
    for blob in image.blobs:
        hasher = hashlib.sha256()
        async with client.stream("GET", f"{base}/v2/{image.repository}/blobs/{blob.digest}") as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                hasher.update(chunk)
                if received is not None:
                    received.append(len(chunk))
        digests[blob.digest] = "sha256:" + hasher.hexdigest()
    return digests


def expected(image: PushedImage) -> dict[str, str]:
    return {"manifest": image.digest, **{b.digest: b.digest for b in image.blobs}}


def blob_gets(up: Upstream, since: int, digest: str) -> int:
    return sum(1 for r in up.hub.requests(since) if r.method == "GET" and digest in r.path)


def test_thirty_concurrent_cold_pulls_fetch_each_blob_once(
    upstream: Upstream, replicas: list[GatewayProcess]
) -> None:
    image = upstream.images["large"]
    start = upstream.hub.mark()

    async def everyone() -> list[dict[str, str]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=120, trust_env=False, limits=limits) as client:
            return await asyncio.gather(
                *(pull(client, replicas[i % 3].url, image) for i in range(30))
            )

    results = asyncio.run(everyone())
    assert all(result == expected(image) for result in results)
    for blob in image.blobs:
        assert blob_gets(upstream, start, blob.digest) == 1, blob.digest


def test_replica_killed_mid_download_another_takes_over(
    upstream: Upstream, replicas: list[GatewayProcess]
) -> None:
    """Replica A starts the download (the upstream stalls it 16 MiB in); B and C follow it;
    A is killed; B or C takes the download over (resuming upstream with Range) once A's lock
    expires, and their clients get the right bytes."""
    image = upstream.images["doomed"]
    layer = max(image.blobs, key=lambda b: b.size)
    upstream.proxy.stall_after(16 * MIB, 30.0, path_contains=layer.digest, method="GET", times=1)
    first, survivors = replicas[0], replicas[1:]
    proxy_start = upstream.proxy.mark()

    async def scenario() -> list[dict[str, str]]:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            doomed = asyncio.create_task(pull(client, first.url, image))
            # A's download is under way (and stalled) before the others ask.
            deadline = time.monotonic() + 20
            while not any(layer.digest in r.path for r in upstream.proxy.requests(proxy_start)):
                assert time.monotonic() < deadline, "A never asked upstream for the layer"
                await asyncio.sleep(0.05)
            received: list[list[int]] = [[] for _ in survivors for _ in range(3)]
            followers = [
                asyncio.create_task(pull(client, survivors[i // 3].url, image, received[i]))
                for i in range(len(received))
            ]
            # Every follower's client gets bytes of the layer: B and C stream A's download
            # (the config and the layer are the image's blobs; the layer is the big one).
            deadline = time.monotonic() + 30
            while not all(sum(r) > MIB for r in received):
                assert time.monotonic() < deadline, [sum(r) for r in received]
                await asyncio.sleep(0.05)
            first.kill()
            with pytest.raises(httpx.HTTPError):
                await doomed
            return await asyncio.gather(*followers)

    results = asyncio.run(scenario())
    assert all(result == expected(image) for result in results)
    gets = [
        r
        for r in upstream.proxy.requests(proxy_start)
        if r.method == "GET" and layer.digest in r.path
    ]
    # A's, cut by its death, and the takeover's, resuming where its own copy ended.
    assert len(gets) == 2, gets
    assert gets[0].range is None
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    assert int(gets[1].range.removeprefix("bytes=").split("-")[0]) > 0


def test_tag_pulled_through_a_is_served_by_b_without_upstream_requests(
    upstream: Upstream, replicas: list[GatewayProcess]
) -> None:
    image = upstream.images["small"]
    a, b = replicas[0], replicas[1]

    async def through(gateway: GatewayProcess) -> dict[str, str]:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            return await pull(client, gateway.url, image)

    assert asyncio.run(through(a)) == expected(image)
    start = upstream.hub.mark()
    assert asyncio.run(through(b)) == expected(image)
    assert upstream.hub.requests(start) == []


def test_push_across_replicas_needs_no_session_affinity(
    upstream: Upstream, replicas: list[GatewayProcess]
) -> None:
    """POST on one replica, PATCH, GET and PUT on the others, then the manifest on a third:
    every replica serves the pushed image from the shared bucket."""
    data = hashlib.sha256(b"pushed").digest() * (3 * MIB // 32)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"config":{{"mediaType":"application/vnd.oci.image.config.v1+json",'
        f'"digest":"{config_digest}","size":{len(config)}}},'
        f'"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar",'
        f'"digest":"{digest}","size":{len(data)}}}]}}'
    ).encode()
    r0, r1, r2 = (gateway.url for gateway in replicas)
    with httpx.Client(timeout=60, trust_env=False) as client:
        started = client.post(f"{r0}/v2/team/app/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["location"]
        first = client.patch(
            r1 + location, content=data[:MIB], headers={"Content-Range": f"0-{MIB - 1}"}
        )
        assert first.status_code == 202, first.text
        assert first.headers["range"] == f"0-{MIB - 1}"
        assert first.headers["location"] == location
        status = client.get(r2 + location)
        assert status.status_code == 204 and status.headers["range"] == f"0-{MIB - 1}"
        rest = client.patch(
            r0 + location, content=data[MIB:], headers={"Content-Range": f"{MIB}-{len(data) - 1}"}
        )
        assert rest.status_code == 202, rest.text
        done = client.put(r1 + location, params={"digest": digest})
        assert done.status_code == 201, done.text
        assert done.headers["docker-content-digest"] == digest
        assert client.get(r2 + location).status_code == 404  # the session is over everywhere
        pushed = client.post(
            f"{r2}/v2/team/app/blobs/uploads/", params={"digest": config_digest}, content=config
        )
        assert pushed.status_code == 201
        put = client.put(
            f"{r0}/v2/team/app/manifests/v1",
            content=manifest,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert put.status_code == 201, put.text
        for base in (r0, r1, r2):
            got = client.get(f"{base}/v2/team/app/manifests/v1")
            assert got.status_code == 200 and got.content == manifest
            blob = client.get(f"{base}/v2/team/app/blobs/{digest}")
            assert blob.status_code == 200
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest


def tag_gets(up: Upstream, since: int, image: PushedImage) -> list[str]:
    """The upstream manifest GETs by tag of ``image`` since ``since`` (the hub's own log)."""
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    return [r.path for r in up.hub.requests(since) if r.method == "GET" and r.path_only == path]


def test_concurrent_cold_pulls_of_a_tag_ask_upstream_once(
    upstream: Upstream, replicas: list[GatewayProcess]
) -> None:
    """Twelve concurrent cold pulls of one tag over three replicas (the upstream's answer
    held back a moment, so that they overlap): ONE upstream manifest GET for the tag, no
    HEAD; the replicas without the tag's lease read the holder's answer from the shared
    store; every client gets the right digest."""
    image = upstream.images["leased"]
    start = upstream.hub.mark()
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    upstream.proxy.delay(1.0, path_contains=path, method="GET", times=1)

    async def everyone() -> list[dict[str, str]]:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            return await asyncio.gather(
                *(pull(client, replicas[i % 3].url, image) for i in range(12))
            )

    results = asyncio.run(everyone())
    assert all(result == expected(image) for result in results)
    assert len(tag_gets(upstream, start, image)) == 1, upstream.hub.requests(start)
    heads = [r for r in upstream.hub.requests(start) if r.method == "HEAD" and path in r.path]
    assert heads == []


def test_replica_killed_while_asking_about_a_tag_hands_it_over(
    upstream: Upstream, replicas: list[GatewayProcess]
) -> None:
    """Replica A holds the tag's lease and its upstream GET hangs; B and C wait for it. A is
    killed: once its lease expires (lock_ttl) one of them asks upstream, and every client of
    B and C gets the right manifest."""
    image = upstream.images["orphan"]
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    upstream.proxy.stall_after(0, 30.0, path_contains=path, method="GET", times=1)
    first, survivors = replicas[0], replicas[1:]
    proxy_start = upstream.proxy.mark()

    def asked() -> list[str]:
        return [
            r.path
            for r in upstream.proxy.requests(proxy_start)
            if r.method == "GET" and path in r.path
        ]

    async def scenario() -> list[httpx.Response]:
        followers = 2 * len(survivors)
        all_sent = asyncio.Event()
        sent: list[str] = []

        async def note(request: httpx.Request) -> None:
            sent.append(str(request.url))
            if len(sent) == 1 + followers:
                all_sent.set()

        async with httpx.AsyncClient(
            timeout=60, trust_env=False, event_hooks={"request": [note]}
        ) as client:
            doomed = asyncio.create_task(client.get(first.url + path))
            deadline = time.monotonic() + 20
            while not asked():  # A holds the lease and waits for the upstream
                assert time.monotonic() < deadline, "A never asked upstream for the tag"
                await asyncio.sleep(0.05)
            waiting = [
                asyncio.create_task(client.get(gateway.url + path, headers={"Accept": OCI_ACCEPT}))
                for gateway in survivors
                for _ in range(followers // len(survivors))
            ]
            await asyncio.wait_for(all_sent.wait(), 20)  # B and C are asked while A holds it
            first.kill()
            with pytest.raises(httpx.HTTPError):
                await doomed
            return await asyncio.gather(*waiting)

    answers = asyncio.run(scenario())
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["docker-content-digest"] == image.digest
        assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == image.digest
    assert len(asked()) == 2, asked()  # A's, hung, and the one replica's that took over


def test_push_through_one_replica_reaches_the_others_memory_within_the_bound(
    upstream: Upstream, replicas: list[GatewayProcess]
) -> None:
    """A group's hosted tag answered from memory on every replica moves through replica A:
    B and C answer the new digest at the latest SHARED_TRUST after A's 201 (the shared
    generation), and from memory again afterwards; never the old one after the bound."""
    old, new = make_image("app", [b"old"]), make_image("app", [b"new"])
    path = "/v2/dev/app/manifests/v1"
    a, others = replicas[0], replicas[1:]

    def push(image: Image) -> float:
        with httpx.Client(base_url=a.url, trust_env=False, timeout=30) as client:
            for digest, data in image.blobs.items():
                posted = client.post(
                    "/v2/dev/app/blobs/uploads/", params={"digest": digest}, content=data
                )
                assert posted.status_code == 201, posted.text
            put = client.put(
                path, content=image.manifest, headers={"Content-Type": image.media_type}
            )
            assert put.status_code == 201, put.text
        return time.monotonic()

    def remembered(gateway: GatewayProcess) -> int:
        return sum(
            1
            for e in gateway.access_lines()
            if e.get("message") == f"GET {path} 200" and e.get("cache") == "HOSTED"
        )

    push(old)
    with httpx.Client(trust_env=False, timeout=30) as client:
        deadline = time.monotonic() + 30
        while not all(remembered(g) for g in others):  # B and C answer from memory
            assert time.monotonic() < deadline
            for gateway in others:
                got = client.get(gateway.url + path)
                assert got.headers["docker-content-digest"] == old.digest
        before = [remembered(g) for g in others]
        acknowledged = push(new)
        late: list[tuple[float, str]] = []
        while True:
            for gateway in others:
                asked = time.monotonic() - acknowledged
                got = client.get(gateway.url + path)
                digest = got.headers["docker-content-digest"]
                if asked >= SHARED_TRUST:
                    late.append((asked, digest))
            memory_again = all(remembered(g) > n for g, n in zip(others, before, strict=True))
            if len(late) >= 20 and memory_again:
                break
            assert time.monotonic() - acknowledged < 60, (late[-5:], before)
    assert {digest for _, digest in late} == {new.digest}, late
