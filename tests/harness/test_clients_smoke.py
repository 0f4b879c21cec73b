"""The real-client runners in tests/support/clients.py work against a plain local registry.

Each test pulls one tiny OCI image (built here, offline, with fixed bytes) from a CNCF
distribution registry on 127.0.0.1 and checks the client ended up with the manifest digest the
registry holds; the registry's access log shows what each client asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clients import (
    ClientError,
    Containerd,
    Podman,
    Skopeo,
    mounts_under,
    registries_conf_with_mirror,
    write_hosts_toml,
)
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class SmokeImage:
    """An OCI layout holding one linux/amd64 image under ``tag``."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digest: str


def _canonical(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def build_smoke_image(layout: Path, tag: str = "v1") -> SmokeImage:
    """Write an OCI layout: one uncompressed tar layer with one file, fixed bytes throughout."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        (blobs / hexdigest).write_bytes(data)
        return f"sha256:{hexdigest}"

    content = b"hello from mirrorrouter\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        member = tarfile.TarInfo("hello.txt")
        member.size, member.mtime, member.mode = len(content), 0, 0o644
        tar.addfile(member, io.BytesIO(content))
    layer = buffer.getvalue()
    layer_digest = put(layer)
    config = _canonical(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    )
    config_digest = put(config)
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    )
    manifest_digest = put(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_bytes(_canonical(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return SmokeImage(layout, tag, manifest_digest, config_digest, layer_digest)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as started:
        yield started


@pytest.fixture(scope="module")
def smoke(registry: DistributionRegistry, tmp_path_factory: pytest.TempPathFactory) -> SmokeImage:
    """The smoke image, pushed as ``library/smoke:v1`` with its digests preserved."""
    image = build_smoke_image(tmp_path_factory.mktemp("oci") / "layout")
    pushed = Skopeo().copy(
        f"oci:{image.layout}:{image.tag}",
        f"{registry.host}/library/smoke:{image.tag}",
        extra=("--preserve-digests",),
    )
    assert pushed == image.manifest_digest
    return image


def test_skopeo_reads_back_the_exact_manifest(
    registry: DistributionRegistry, smoke: SmokeImage, tmp_path: Path
) -> None:
    """skopeo sees the pushed bytes: raw manifest, digest, and a verified local copy."""
    skopeo = Skopeo()
    ref = f"{registry.host}/library/smoke:v1"

    raw = skopeo.inspect_raw(ref)
    assert f"sha256:{hashlib.sha256(raw).hexdigest()}" == smoke.manifest_digest
    assert skopeo.inspect_digest(ref) == smoke.manifest_digest

    for layout in ("dir", "oci"):
        local = skopeo.copy_to_local(ref, tmp_path / layout, layout=layout, tag="v1")
        assert local.manifest_digest == smoke.manifest_digest
        assert local.blob_digests == {smoke.config_digest, smoke.layer_digest}


def test_skopeo_uses_a_mirror_and_never_a_public_registry(
    registry: DistributionRegistry, smoke: SmokeImage, tmp_path: Path
) -> None:
    """A docker.io name fails fast at the proxy sinkhole unless registries.conf mirrors it."""
    skopeo = Skopeo()
    with pytest.raises(ClientError) as failure:
        skopeo.inspect_digest("docker.io/library/smoke:v1")
    assert "127.0.0.1:9" in failure.value.stderr

    conf = tmp_path / "registries.conf"
    conf.write_text(
        registries_conf_with_mirror("docker.io/library/smoke", f"{registry.host}/library/smoke")
    )
    digest = skopeo.inspect_digest("docker.io/library/smoke:v1", registries_conf=conf)
    assert digest == smoke.manifest_digest


def test_podman_pulls_through_a_registries_conf_mirror(
    registry: DistributionRegistry, smoke: SmokeImage
) -> None:
    """podman pulls docker.io/library/smoke:v1 from the mirror entry and records its digest."""
    conf = registries_conf_with_mirror("docker.io/library/smoke", f"{registry.host}/library/smoke")
    mark = registry.mark()
    with Podman(registries_conf=conf) as podman:
        image_id = podman.pull("docker.io/library/smoke:v1")
        assert image_id == smoke.config_digest.removeprefix("sha256:")
        assert podman.image_digest("docker.io/library/smoke:v1") == smoke.manifest_digest
        base = podman.base
    assert not base.exists()
    assert mounts_under(base) == []
    assert registry.count("GET", "/v2/library/smoke/manifests/v1", since=mark) == 1


def test_podman_logs_in_and_pushes(
    registry: DistributionRegistry, smoke: SmokeImage, tmp_path: Path
) -> None:
    """podman login + push reach an htpasswd registry; creds= works for a pull elsewhere."""
    users = {"alice": "secret"}
    with DistributionRegistry(tmp_path / "auth-registry", users=users) as private:
        pushed_ref = f"{private.host}/pushed/smoke:v1"
        with Podman() as podman:
            podman.pull(f"{registry.host}/library/smoke:v1")
            podman.login(private.host, "alice", "secret")
            pushed = podman.push(f"{registry.host}/library/smoke:v1", pushed_ref)
        skopeo = Skopeo()
        assert skopeo.inspect_digest(pushed_ref, creds=("alice", "secret")) == pushed
        with pytest.raises(ClientError):
            skopeo.inspect_raw(pushed_ref)
        with Podman() as podman:
            with pytest.raises(ClientError):
                podman.pull(pushed_ref)
            podman.pull(pushed_ref, creds="alice:secret")
            assert podman.image_digest(pushed_ref) == pushed


def test_ctr_pulls_through_hosts_toml(
    registry: DistributionRegistry, smoke: SmokeImage, tmp_path: Path
) -> None:
    """ctr pulls docker.io and any-registry names from the local host, sending ?ns=<name>."""
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "docker.io", registry.url)
    write_hosts_toml(hosts, "_default", registry.url)
    with Containerd() as containerd:
        mark = registry.mark()
        assert containerd.ctr_pull("docker.io/library/smoke:v1", hosts) == smoke.manifest_digest
        seen = registry.requests(mark)
        assert seen, "containerd sent nothing"
        assert (seen[0].method, seen[0].path_only) == ("HEAD", "/v2/library/smoke/manifests/v1")
        assert all(r.query == "ns=docker.io" for r in seen)
        assert not any(r.path_only == "/v2/" for r in seen)

        digest = containerd.ctr_pull("quay.io/library/smoke:v1", hosts, unpack=False)
        assert digest == smoke.manifest_digest
        assert registry.count("HEAD", "manifests/v1?ns=quay.io", since=mark) == 1
        base = containerd.base
    assert not base.exists()
    assert mounts_under(base) == []
