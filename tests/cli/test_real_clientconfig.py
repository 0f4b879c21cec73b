"""The files `mirrorrouter client-config` generates, used by the real clients they are for.

Three distribution registries on loopback stand in for docker.io, gcr.io and quay.io; the
gateway runs in front of them with a named route for quay.io only (so podman reaches gcr.io
by its registry host, /v2/gcr.io/...). The command runs as a process, as a user would run it,
and its output is handed to ctr and podman unchanged. Every client has its proxies aimed at a
closed loopback port: a pull that left the mirror for a public registry would fail.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clients import Containerd, Podman
from tests.support.gateway import GatewayProcess
from tests.support.images import ImageFactory, PushedImage, session_factory
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real


@dataclass
class World:
    hub: DistributionRegistry
    gcr: DistributionRegistry
    quay: DistributionRegistry
    images: dict[str, PushedImage]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Three upstream registries with one image each (a multi-platform index on quay.io)."""
    root = tmp_path_factory.mktemp("clientconfig-upstreams")
    factory: ImageFactory = session_factory(tmp_path_factory)
    with (
        DistributionRegistry(root / "hub") as hub,
        DistributionRegistry(root / "gcr") as gcr,
        DistributionRegistry(root / "quay") as quay,
    ):
        images = {
            "x": factory.push(factory.runnable("x", seed=21), hub, "library/x", "1"),
            "pilot": factory.push(
                factory.small("pilot", seed=22), gcr, "istio-release/pilot", "1.9.1"
            ),
            "etcd": factory.push(factory.multiarch("etcd", seed=23), quay, "coreos/etcd", "v3"),
        }
        yield World(hub, gcr, quay, images)


@pytest.fixture
def gateway(world: World, tmp_path: Path) -> Iterator[GatewayProcess]:
    config = f"""
[server]
access_log = true
[cache]
directory = "{tmp_path / "cache"}"
[upstreams."docker.io"]
mirrors = [{{ url = "{world.hub.url}" }}]
[upstreams."gcr.io"]
mirrors = [{{ url = "{world.gcr.url}" }}]
[upstreams."quay.io"]
mirrors = [{{ url = "{world.quay.url}" }}]
[[routes]]
prefix = "quay"
upstream = "quay.io"
"""
    with GatewayProcess(tmp_path / "gateway", config) as gw:
        yield gw


def client_config(gateway: GatewayProcess, client: str, *args: str) -> str:
    """Run ``mirrorrouter client-config --for CLIENT`` against the gateway's config."""
    argv = [sys.executable, "-m", "mirrorrouter", "client-config", "--for", client]
    argv += ["--config", str(gateway.config_path), "--mirror-url", gateway.url, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_ctr_pulls_through_generated_hosts_toml(
    world: World, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """ctr with the --output-dir files pulls docker.io and gcr.io images via ?ns=."""
    hosts = tmp_path / "certs.d"
    client_config(gateway, "containerd", "--output-dir", str(hosts))
    assert {p.name for p in hosts.iterdir()} == {
        "docker.io",
        "index.docker.io",
        "registry-1.docker.io",
        "gcr.io",
        "quay.io",
    }
    with Containerd(base_dir=tmp_path) as containerd:
        assert containerd.ctr_pull("docker.io/library/x:1", hosts) == world.images["x"].digest
        pilot = containerd.ctr_pull("gcr.io/istio-release/pilot:1.9.1", hosts, unpack=False)
        assert pilot == world.images["pilot"].digest
    log = gateway.log()
    assert "/v2/library/x/manifests/1?ns=docker.io" in log
    assert "/v2/istio-release/pilot/manifests/1.9.1?ns=gcr.io" in log


def test_ctr_pulls_through_the_hosts_toml_written_for_kind(
    world: World, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """The hosts.toml files Kind nodes would mount serve a quay.io index to ctr."""
    out = tmp_path / "kind"
    client_config(gateway, "kind", "--output-dir", str(out))
    assert str(out.resolve() / "certs.d") in (out / "kind-cluster.yaml").read_text()
    with Containerd(base_dir=tmp_path) as containerd:
        etcd = containerd.ctr_pull("quay.io/coreos/etcd:v3", out / "certs.d", unpack=False)
        assert etcd == world.images["etcd"].digest
    assert "/v2/coreos/etcd/manifests/v3?ns=quay.io" in gateway.log()


def test_podman_pulls_through_generated_registries_conf(
    world: World, gateway: GatewayProcess
) -> None:
    """podman with the printed registries.conf pulls docker.io, quay.io and gcr.io images.

    No --tls-verify flag: plain HTTP to the mirror must come from the file's insecure = true.
    """
    conf = client_config(gateway, "podman")
    with Podman(registries_conf=conf) as podman:
        for ref, name in [
            ("docker.io/library/x:1", "x"),
            ("quay.io/coreos/etcd:v3", "etcd"),
            ("gcr.io/istio-release/pilot:1.9.1", "pilot"),
        ]:
            podman.run("pull", "--quiet", "--authfile", str(podman.authfile), ref)
            assert podman.image_digest(ref) == world.images[name].digest
    log = gateway.log()
    assert "/v2/docker.io/library/x/manifests/1 " in log  # the default registry, by host
    assert "/v2/quay/coreos/etcd/manifests/v3 " in log  # the named route
    assert "/v2/gcr.io/istio-release/pilot/manifests/1.9.1 " in log  # the registry host
