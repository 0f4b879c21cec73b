"""Logging in to the mirror with real clients: podman login, skopeo and ctr credentials."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tests.support.clients import ClientError, Containerd, Podman, Skopeo, write_hosts_toml
from tests.support.gateway import GatewayProcess
from tests.support.images import PushedImage, session_factory
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DistributionRegistry, PushedImage, PushedImage]]:
    """A registry standing in for docker.io with a public and a private image."""
    factory = session_factory(tmp_path_factory)
    with DistributionRegistry(tmp_path_factory.mktemp("hub")) as registry:
        public = factory.push(factory.small("pub", seed=21), registry, "library/pub", "1")
        private = factory.push(factory.runnable("priv", seed=22), registry, "team/app", "1")
        yield registry, public, private


@pytest.fixture
def gateway(
    upstream: tuple[DistributionRegistry, PushedImage, PushedImage], tmp_path: Path
) -> Iterator[GatewayProcess]:
    registry, _, _ = upstream
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (tmp_path / "htpasswd").write_text(f"alice:{hashed}\nmallory:{hashed}\n")
    config = f"""
[server]
access_log = true
[cache]
directory = "{tmp_path / "cache"}"
[auth]
htpasswd = "htpasswd"
[audit]
file = "audit.jsonl"
[upstreams."docker.io"]
mirrors = [{{ url = "{registry.url}" }}]
[[upstreams."docker.io".access]]
repositories = ["team/*"]
pull = ["alice"]
[[upstreams."docker.io".access]]
pull = ["anonymous"]
"""
    workdir = tmp_path / "gw"
    workdir.mkdir()
    (workdir / "htpasswd").write_text((tmp_path / "htpasswd").read_text())
    with GatewayProcess(workdir, config) as gw:
        yield gw


def test_podman_login_then_pull_private_image(
    upstream: tuple[DistributionRegistry, PushedImage, PushedImage], gateway: GatewayProcess
) -> None:
    """podman login to the mirror, then a private pull gets the upstream's digest; anonymous
    podman is refused; a public image stays anonymous."""
    _, public, private = upstream
    with Podman() as podman:
        with pytest.raises(ClientError) as refused:
            podman.pull(f"{gateway.host}/team/app:1")
        assert "unauthorized" in refused.value.stderr.lower() or "401" in refused.value.stderr
        podman.pull(f"{gateway.host}/library/pub:1")
        assert podman.image_digest(f"{gateway.host}/library/pub:1") == public.digest
        podman.login(gateway.host, "alice", PASSWORD)
        podman.pull(f"{gateway.host}/team/app:1")
        assert podman.image_digest(f"{gateway.host}/team/app:1") == private.digest


def test_skopeo_and_ctr_with_credentials(
    upstream: tuple[DistributionRegistry, PushedImage, PushedImage],
    gateway: GatewayProcess,
    tmp_path: Path,
) -> None:
    """skopeo with --src-creds and ctr with --user pull the private image; mallory is denied."""
    _, _, private = upstream
    skopeo = Skopeo()
    ref = f"docker://{gateway.host}/team/app:1"
    assert skopeo.inspect_digest(ref, ("alice", PASSWORD)) == private.digest
    with pytest.raises(ClientError) as denied:
        skopeo.inspect_digest(ref, ("mallory", PASSWORD))
    assert "denied" in denied.value.stderr.lower()
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "docker.io", gateway.url, server=None)
    with Containerd(base_dir=tmp_path) as containerd:
        pulled = containerd.ctr_pull("docker.io/team/app:1", hosts, user=f"alice:{PASSWORD}")
        assert pulled == private.digest


def test_audit_log_of_a_real_pull_holds_no_secrets(
    upstream: tuple[DistributionRegistry, PushedImage, PushedImage],
    gateway: GatewayProcess,
    tmp_path: Path,
) -> None:
    """A logged-in pull writes audit lines naming the user; no log holds a password or token."""
    _, _, private = upstream
    local = Skopeo().copy_to_local(
        f"{gateway.host}/team/app:1", tmp_path / "img", creds=("alice", PASSWORD)
    )
    assert local.manifest_digest == private.digest
    gateway.stop()
    audit = (gateway.workdir / "audit.jsonl").read_text()
    entries = [json.loads(line) for line in audit.splitlines()]
    assert {e["user"] for e in entries} == {"alice"}
    assert {e["digest"] for e in entries} >= {private.digest, *(b.digest for b in private.blobs)}
    for text in (audit, gateway.log()):
        assert PASSWORD not in text
        assert "Bearer ey" not in text and "eyJ" not in text
