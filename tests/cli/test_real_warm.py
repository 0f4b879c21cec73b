"""warm, export and import as commands, with a real registry upstream and skopeo pulling.

Each test has an upstream of its own, since it stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.clients import Skopeo
from tests.support.gateway import GatewayProcess
from tests.support.images import ImageFactory
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real


def hub_config(cache: Path, upstream: DistributionRegistry) -> str:
    return f"""
[cache]
directory = "{cache}"
[upstreams."docker.io"]
mirrors = [{{ url = "{upstream.url}" }}]
retry_attempts = 1
retry_deadline = "5s"
"""


def mirrorrouter(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """``python -m mirrorrouter ARGS --config CONFIG`` as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [sys.executable, "-m", "mirrorrouter", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_warm_beside_a_running_gateway_then_pull_with_upstream_down(
    factory: ImageFactory, upstream: DistributionRegistry, tmp_path: Path
) -> None:
    """warm (every platform, names from a file) into the cache a gateway process serves,
    stop the upstream, pull with skopeo through the gateway: same digests."""
    multi = factory.push(factory.multiarch(), upstream, "library/multi", "1")
    small = factory.push(factory.small(), upstream, "library/small", "1")
    config = hub_config(tmp_path / "cache", upstream)
    listing = tmp_path / "images.txt"
    listing.write_text("# what the site needs\nlibrary/small:1\n")
    with GatewayProcess(tmp_path / "gw", config) as gateway:
        done = mirrorrouter(
            "warm",
            "docker.io/library/multi:1",
            "--file",
            str(listing),
            "--platform",
            "all",
            config=gateway.config_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "warmed 2 of 2 images"
        blobs = len({b.digest for b in (*multi.blobs, *small.blobs)})
        assert lines[2].startswith(f"  blobs (layers and configs): {blobs} fetched")
        assert f"ok      docker.io/library/multi:1  {multi.digest}" in done.stdout
        assert "[linux/amd64, linux/arm64]" in done.stdout

        again = mirrorrouter("warm", "library/small:1", config=gateway.config_path)
        assert again.returncode == 0
        assert f"0 fetched (0 bytes), {len(small.blobs)} already cached" in again.stdout

        upstream.stop()
        skopeo = Skopeo()
        every = skopeo.copy_to_local(
            f"{gateway.host}/library/multi:1", tmp_path / "multi", all_platforms=True
        )
        assert every.manifest_digest == multi.digest
        assert every.manifest_digests == {multi.digest, *multi.manifest_digests}
        one = skopeo.copy_to_local(f"{gateway.host}/library/small:1", tmp_path / "small")
        assert one.manifest_digest == small.digest
        assert "ConnectError" not in gateway.log()  # nothing was asked of the dead upstream

        failed = mirrorrouter("warm", "library/never:1", config=gateway.config_path)
        assert failed.returncode == 1
        assert "FAILED  docker.io/library/never:1" in failed.stdout


def test_export_import_into_an_empty_cache_then_pull_with_upstream_down(
    factory: ImageFactory, upstream: DistributionRegistry, tmp_path: Path
) -> None:
    """export (warming first) from one site, import into another site's EMPTY cache, pull
    there through a gateway with the upstream down: same digests, default platform only."""
    multi = factory.push(factory.multiarch(), upstream, "library/multi", "1")
    app = factory.push(factory.docker_image(), upstream, "team/app", "v1")
    connected = tmp_path / "connected.toml"
    connected.write_text(hub_config(tmp_path / "cache-a", upstream))
    archive = tmp_path / "images.tar"
    done = mirrorrouter(
        "export", "library/multi:1", "team/app:v1", "-o", str(archive), config=connected
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"wrote {archive}: 2 images")
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert names == ["docker.io/library/multi:1", "docker.io/team/app:v1"]
    upstream.stop()

    # skopeo reads the tarball as the OCI image layout it is (its oci transport takes OCI
    # media types only, so the multi-platform OCI image, not the Docker one).
    skopeo = Skopeo()
    from_archive = skopeo.copy_to_local(
        f"oci-archive:{archive}:docker.io/library/multi:1", tmp_path / "from-archive"
    )
    assert from_archive.manifest_digest == multi.platform_manifests["linux/amd64"]

    air_gapped = hub_config(tmp_path / "cache-b", upstream)  # the upstream is down there
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / "mirrors.toml").write_text(air_gapped)
    imported = mirrorrouter("import", str(archive), config=tmp_path / "gw" / "mirrors.toml")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert imported.stdout.startswith("imported 2 images from")

    with GatewayProcess(tmp_path / "gw", air_gapped) as gateway:
        amd64 = skopeo.copy_to_local(f"{gateway.host}/library/multi:1", tmp_path / "multi")
        assert amd64.manifest_digest == multi.platform_manifests["linux/amd64"]
        pulled = skopeo.copy_to_local(f"{gateway.host}/team/app:v1", tmp_path / "app")
        assert pulled.manifest_digest == app.digest
        assert pulled.blob_digests == {b.digest for b in app.blobs}
