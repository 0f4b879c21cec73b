"""Pulling through the gateway with real registries upstream and real clients downstream.

Upstreams: three distribution registries on loopback standing in for docker.io
(anonymous), gcr.io (htpasswd Basic auth) and quay.io (token auth behind a Docker-Hub-style
token server, with a private namespace). Clients: skopeo, podman and containerd's ctr, all
with their proxies pointed at a closed loopback port so nothing can leave the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.clients import (
    Containerd,
    Podman,
    Skopeo,
    registries_conf_text,
    registry_block,
    write_hosts_toml,
)
from tests.support.gateway import GatewayProcess
from tests.support.images import ImageFactory, PushedImage, session_factory
from tests.support.registry import DistributionRegistry
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.real

USER, PASSWORD = "alice", "secret"


@dataclass
class World:
    hub: DistributionRegistry
    gcr: DistributionRegistry
    quay: DistributionRegistry
    tokens: TokenServer
    images: dict[str, PushedImage]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Three real upstream registries with the test images pushed."""
    root = tmp_path_factory.mktemp("upstreams")
    factory: ImageFactory = session_factory(tmp_path_factory)
    with (
        TokenServer(users={USER: PASSWORD}, workdir=root / "tokens") as tokens,
        DistributionRegistry(root / "hub") as hub,
        DistributionRegistry(root / "gcr", users={USER: PASSWORD}) as gcr,
        DistributionRegistry(root / "quay", token=tokens.settings()) as quay,
    ):
        creds = (USER, PASSWORD)
        images = {
            "alpine": factory.push(factory.small(), hub, "library/alpine", "3"),
            "multi": factory.push(factory.multiarch(), hub, "library/multi", "1"),
            "dlist": factory.push(factory.docker_list(), hub, "library/dlist", "1"),
            "nested": factory.push(factory.no_media_type(), hub, "team/sub/app", "v1"),
            "large": factory.push(factory.large(), hub, "library/large", "1"),
            "runnable": factory.push(factory.runnable(), hub, "library/runnable", "1"),
            "pilot": factory.push(
                factory.small("pilot", seed=11), gcr, "istio-release/pilot", "1.9.1", creds=creds
            ),
            "etcd": factory.push(
                factory.multiarch("etcd", seed=12), quay, "coreos/etcd", "v3", creds=creds
            ),
            "secret": factory.push(
                factory.small("secret", seed=13), quay, "private/secret", "1", creds=creds
            ),
        }
        yield World(hub, gcr, quay, tokens, images)


def gateway_config(world: World, cache: Path) -> str:
    return f"""
[server]
access_log = true
[cache]
directory = "{cache}"
[upstreams."docker.io"]
mirrors = [{{ url = "{world.hub.url}" }}]
[upstreams."gcr.io"]
mirrors = [{{ url = "{world.gcr.url}" }}]
[upstreams."gcr.io".credentials]
username = "{USER}"
password_env = "GCR_PASSWORD"
[upstreams."quay.io"]
mirrors = [{{ url = "{world.quay.url}" }}]
[upstreams."quay.io".credentials]
username = "{USER}"
password_env = "QUAY_PASSWORD"
[[routes]]
prefix = "gcr"
upstream = "gcr.io"
[[routes]]
prefix = "quay"
upstream = "quay.io"
[[routes]]
prefix = "hub"
upstream = "docker.io"
"""


@pytest.fixture
def gateway(world: World, tmp_path: Path) -> Iterator[GatewayProcess]:
    """A gateway process with an empty cache in front of the three upstreams."""
    env = {"GCR_PASSWORD": PASSWORD, "QUAY_PASSWORD": PASSWORD}
    with GatewayProcess(
        tmp_path / "gateway", gateway_config(world, tmp_path / "cache"), env=env
    ) as gw:
        yield gw


def test_skopeo_copies_through_host_prefix_and_named_alias(
    world: World, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """skopeo copies via /v2/gcr.io/... and via the gcr alias; digests equal the upstream's."""
    skopeo = Skopeo()
    pilot = world.images["pilot"]
    by_host = skopeo.copy_to_local(
        f"{gateway.host}/gcr.io/istio-release/pilot:1.9.1", tmp_path / "a"
    )
    by_alias = skopeo.copy_to_local(f"{gateway.host}/gcr/istio-release/pilot:1.9.1", tmp_path / "b")
    assert by_host.manifest_digest == by_alias.manifest_digest == pilot.digest
    assert set(by_host.blob_digests) == {b.digest for b in pilot.blobs}


@pytest.mark.parametrize("name", ["multi", "dlist", "nested", "etcd"])
def test_skopeo_copies_every_manifest_kind_byte_exact(
    world: World, gateway: GatewayProcess, tmp_path: Path, name: str
) -> None:
    """OCI indexes, Docker lists, manifests without mediaType and 3-level names stay byte-exact."""
    pushed = world.images[name]
    prefix = {"docker.io": "hub", "quay.io": "quay"}["quay.io" if name == "etcd" else "docker.io"]
    ref = f"{gateway.host}/{prefix}/{pushed.repository}:{pushed.tag}"
    local = Skopeo().copy_to_local(ref, tmp_path / "img", all_platforms=True)
    assert local.manifest_digest == pushed.digest
    assert set(local.manifest_digests) == {pushed.digest, *pushed.manifest_digests}
    assert set(local.blob_digests) == {b.digest for b in pushed.blobs}


def test_private_repository_through_token_auth(world: World, gateway: GatewayProcess) -> None:
    """The token-auth upstream serves its private namespace with the upstream's credentials."""
    secret = world.images["secret"]
    raw = Skopeo().inspect_raw(f"docker://{gateway.host}/quay/private/secret:1")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == secret.digest
    users = {
        r.user for r in world.tokens.requests if any("private/secret" in s for s in r.scope_strings)
    }
    assert users == {USER}


def test_second_pull_makes_no_upstream_requests(
    world: World, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A second pull of the same image makes zero upstream blob and manifest requests."""
    skopeo = Skopeo()
    ref = f"{gateway.host}/team/sub/app:v1"
    start = world.hub.mark()
    first = skopeo.copy_to_local(ref, tmp_path / "one")
    cold = world.hub.requests(start)
    assert any("/blobs/" in r.path for r in cold)
    middle = world.hub.mark()
    second = skopeo.copy_to_local(ref, tmp_path / "two")
    assert first.manifest_digest == second.manifest_digest == world.images["nested"].digest
    warm = [r for r in world.hub.requests(middle) if r.path.startswith("/v2/team/")]
    assert warm == []


def test_ten_concurrent_cold_pulls_make_one_upstream_fetch(
    world: World, gateway: GatewayProcess
) -> None:
    """Ten concurrent GETs of one cold 110 MiB blob make exactly one upstream blob GET."""
    large = world.images["large"]
    layer = max(large.blobs, key=lambda b: b.size)
    url = f"{gateway.url}/v2/library/large/blobs/{layer.digest}"
    start = world.hub.mark()

    async def fetch(client: httpx.AsyncClient) -> tuple[str, int, str]:
        digest = hashlib.sha256()
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                digest.update(chunk)
        length = int(response.headers["content-length"])
        return "sha256:" + digest.hexdigest(), length, response.headers["x-cache"]

    async def main() -> list[tuple[str, int, str]]:
        async with httpx.AsyncClient(timeout=120) as client:
            await client.get(f"{gateway.url}/v2/library/large/manifests/1")
            return await asyncio.gather(*(fetch(client) for _ in range(10)))

    results = asyncio.run(main())
    # All ten were answered while the fill ran (MISS): they followed it, none waited for it.
    assert results == [(layer.digest, layer.size, "MISS")] * 10
    gets = [r for r in world.hub.requests(start) if r.method == "GET" and layer.digest in r.path]
    assert len(gets) == 1


def test_podman_pulls_through_registries_conf_mirrors(
    world: World, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """podman pulls docker.io (mirror at the root) and quay.io (mirror at /quay) by name."""
    conf = registries_conf_text(
        registry_block("docker.io", [gateway.host], insecure=True),
        registry_block("quay.io", [f"{gateway.host}/quay"], insecure=True),
    )
    with Podman(registries_conf=conf) as podman:
        podman.pull("docker.io/library/multi:1")
        assert podman.image_digest("docker.io/library/multi:1") == world.images["multi"].digest
        podman.pull("quay.io/coreos/etcd:v3")
        assert podman.image_digest("quay.io/coreos/etcd:v3") == world.images["etcd"].digest


def test_containerd_pulls_docker_gcr_and_quay_through_hosts_toml(
    world: World, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """ctr with hosts.toml naming the gateway for docker.io, gcr.io and quay.io gets the digests."""
    hosts = tmp_path / "hosts"
    for registry in ("docker.io", "gcr.io", "quay.io"):
        write_hosts_toml(hosts, registry, gateway.url, server=None)
    with Containerd(base_dir=tmp_path) as containerd:
        assert (
            containerd.ctr_pull("docker.io/library/runnable:1", hosts)
            == world.images["runnable"].digest
        )
        assert (
            containerd.ctr_pull("gcr.io/istio-release/pilot:1.9.1", hosts, unpack=False)
            == world.images["pilot"].digest
        )
        assert (
            containerd.ctr_pull("quay.io/coreos/etcd:v3", hosts, unpack=False)
            == world.images["etcd"].digest
        )
    log = gateway.log()  # the gateway's access lines: containerd routed by ?ns=
    for ns in ("docker.io", "gcr.io", "quay.io"):
        assert f"?ns={ns} 200" in log


def test_two_worker_processes_fetch_a_cold_blob_once(world: World, tmp_path: Path) -> None:
    """Two gateway processes sharing one cache fetch a cold blob from upstream once."""
    large = world.images["large"]
    layer = max(large.blobs, key=lambda b: b.size)
    config = gateway_config(world, tmp_path / "shared-cache")
    env = {"GCR_PASSWORD": PASSWORD, "QUAY_PASSWORD": PASSWORD}
    with (
        GatewayProcess(tmp_path / "a", config, env=env) as first,
        GatewayProcess(tmp_path / "b", config, env=env) as second,
    ):
        start = world.hub.mark()

        async def fetch(client: httpx.AsyncClient, base: str) -> str:
            digest = hashlib.sha256()
            async with client.stream("GET", f"{base}/v2/library/large/blobs/{layer.digest}") as r:
                async for chunk in r.aiter_bytes():
                    digest.update(chunk)
            return "sha256:" + digest.hexdigest()

        async def main() -> list[str]:
            async with httpx.AsyncClient(timeout=120) as client:
                for base in (first.url, second.url):
                    await client.get(f"{base}/v2/library/large/manifests/1")
                bases = [first.url, second.url] * 3
                return await asyncio.gather(*(fetch(client, b) for b in bases))

        assert asyncio.run(main()) == [layer.digest] * 6
        gets = [
            r for r in world.hub.requests(start) if r.method == "GET" and layer.digest in r.path
        ]
        assert len(gets) == 1
