"""Metrics and readiness of a real gateway process after real pulls, with 1 and 2 workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.clients import Skopeo
from tests.support.gateway import GatewayProcess
from tests.support.images import PushedImage, session_factory
from tests.support.registry import DistributionRegistry
from tests.test_metrics import samples, value

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DistributionRegistry, PushedImage]]:
    factory = session_factory(tmp_path_factory)
    with DistributionRegistry(tmp_path_factory.mktemp("hub")) as registry:
        yield registry, factory.push(factory.small("metrics", seed=31), registry, "library/m", "1")


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_match_the_upstream_log(
    upstream: tuple[DistributionRegistry, PushedImage], tmp_path: Path, workers: int
) -> None:
    """After two skopeo pulls, upstream blob fetches and bytes on /metrics equal what the
    upstream registry logged and served, summed over workers; /readyz is ready."""
    registry, image = upstream
    config = f"""
[server]
workers = {workers}
[cache]
directory = "{tmp_path / "cache"}"
[upstreams."docker.io"]
mirrors = [{{ url = "{registry.url}" }}]
"""
    start = registry.mark()
    with GatewayProcess(tmp_path / "gw", config) as gateway:
        for attempt in range(2):
            local = Skopeo().copy_to_local(
                f"{gateway.host}/library/m:1", tmp_path / f"pull{attempt}"
            )
            assert local.manifest_digest == image.digest
        # Several scrapes: with two workers each may answer; every one must show the sum.
        pages = [httpx.get(f"{gateway.url}/metrics").text for _ in range(4)]
        ready = httpx.get(f"{gateway.url}/readyz")
    upstream_blob_gets = [
        r for r in registry.requests(start) if r.method == "GET" and "/blobs/" in r.path
    ]
    blob_bytes = sum(b.size for b in image.blobs)
    for page in pages:
        found = samples(page)
        assert value(
            found,
            "mirrorrouter_cache_results_total",
            upstream="docker.io",
            kind="blob",
            result="MISS",
        ) == len(upstream_blob_gets)
        assert (
            value(found, "mirrorrouter_bytes_total", upstream="docker.io", source="upstream")
            == blob_bytes
        )
        assert (
            value(found, "mirrorrouter_bytes_total", upstream="docker.io", source="cache")
            == blob_bytes
        )
    assert len(upstream_blob_gets) == len(image.blobs)
    assert ready.status_code == 200 and ready.json()["ready"] is True
