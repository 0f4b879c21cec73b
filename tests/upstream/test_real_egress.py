"""The real gateway behind a real proxy (squid): pulls from a real registry over http and over
TLS through CONNECT, and NO_PROXY sending the same pulls around the proxy.

The upstream is addressed as 0.0.0.0: loopback names are never proxied (as in Go), but
0.0.0.0 is not a loopback address, and on Linux a connection to it reaches the registry
listening on 127.0.0.1 -- directly, or from squid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clients import Skopeo
from tests.support.gateway import GatewayProcess
from tests.support.httpproxy import Squid
from tests.support.images import PushedImage, session_factory
from tests.support.registry import DistributionRegistry
from tests.support.testca import issue

pytestmark = pytest.mark.real

USER, PASSWORD = "alice", "pr0xy s3cret"


@dataclass(frozen=True)
class Upstreams:
    """One image served by two registries on the same storage: plain http and TLS."""

    plain: DistributionRegistry
    tls: DistributionRegistry
    image: PushedImage
    ca_bundle: Path


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    factory = session_factory(tmp_path_factory)
    root = tmp_path_factory.mktemp("egress")
    ca = issue(root, "ca")
    leaf = issue(root, "registry", ca, hosts=("0.0.0.0",))
    with DistributionRegistry(root / "plain") as plain:
        image = factory.push(factory.small("egress", seed=31), plain, "library/app", "1")
        tls_config = {
            "http": {"tls": {"certificate": str(leaf.cert_path), "key": str(leaf.key_path)}},
            "storage": {"filesystem": {"rootdirectory": str(plain.storage_dir)}},
        }
        with DistributionRegistry(root / "tls", extra_config=tls_config) as tls:
            yield Upstreams(plain, tls, image, ca.cert_path)


def gateway_config(cache: Path, mirror: str, ca_bundle: Path) -> str:
    return f"""
[cache]
directory = "{cache}"
[upstreams."docker.io"]
retry_attempts = 1
mirrors = [{{ url = "{mirror}" }}]
[upstreams."docker.io".tls]
ca_bundle = "{ca_bundle}"
"""


def pull(gateway: GatewayProcess, dest: Path, image: PushedImage) -> None:
    """skopeo pulls library/app:1 through the gateway: the upstream's digests, verified."""
    local = Skopeo().copy_to_local(f"{gateway.host}/library/app:1", dest)
    assert local.manifest_digest == image.digest
    assert local.blob_digests == {b.digest for b in image.blobs}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_pull_through_a_real_proxy_and_around_it(
    scheme: str, upstreams: Upstreams, tmp_path: Path
) -> None:
    """With HTTP(S)_PROXY naming squid (with credentials), a pull goes through it -- absolute
    requests for http, a CONNECT tunnel for https -- and gets the upstream's digests; the
    password appears in no gateway log; with NO_PROXY naming the upstream, squid sees nothing."""
    registry = upstreams.plain if scheme == "http" else upstreams.tls
    mirror = f"{scheme}://0.0.0.0:{registry.port}"
    image = upstreams.image
    with Squid(users={USER: PASSWORD}) as squid:
        env = {
            "HTTP_PROXY": squid.proxy_url(USER, PASSWORD),
            "HTTPS_PROXY": squid.proxy_url(USER, PASSWORD),
            "NO_PROXY": "127.0.0.1,localhost",  # the test harness's usual value
        }
        config = gateway_config(tmp_path / "cache-via", mirror, upstreams.ca_bundle)
        with GatewayProcess(tmp_path / "via", config, env=env) as gateway:
            pull(gateway, tmp_path / "pulled-via", image)
        assert PASSWORD not in gateway.log() and "s3cret" not in gateway.log()
        squid.sync()  # a CONNECT is logged when its tunnel closes: with the gateway's stop
        proxied = squid.requests()
        assert proxied, "nothing went through the proxy"
        assert {(r.user, r.status) for r in proxied} == {(USER, 200)}
        if scheme == "http":
            targets = {r.target for r in proxied}
            assert f"{mirror}/v2/library/app/manifests/1" in targets
            assert {f"{mirror}/v2/library/app/blobs/{b.digest}" for b in image.blobs} <= targets
        else:
            assert {(r.method, r.target) for r in proxied} == {
                ("CONNECT", f"0.0.0.0:{registry.port}")
            }

        env["NO_PROXY"] += ",0.0.0.0"
        config = gateway_config(tmp_path / "cache-direct", mirror, upstreams.ca_bundle)
        with GatewayProcess(tmp_path / "direct", config, env=env) as gateway:
            pull(gateway, tmp_path / "pulled-direct", image)
        squid.sync()
        assert squid.requests() == proxied
