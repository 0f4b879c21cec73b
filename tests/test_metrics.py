"""Metrics, health and readiness after pulls through the in-process gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fakeregistry import FakeRegistry, Image, sha256
from tests.support.inprocess import config, gateway

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_happened(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """Requests, cache results and bytes on /metrics match the pulls that were made."""
    layer = sha256(b"layer-one" * 1000)
    async with gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")  # MISS
        await gw.client.get("/v2/library/alpine/manifests/3.19")  # HIT (fast path)
        await gw.client.get(f"/v2/library/alpine/blobs/{layer}")  # MISS
        await gw.client.get(f"/v2/library/alpine/blobs/{layer}")  # HIT
        await gw.client.get("/v2/library/nothing/manifests/1")  # 404
        found = samples((await gw.client.get("/metrics")).text)
    size = len(b"layer-one" * 1000)
    assert (
        value(
            found,
            "mirrorrouter_requests_total",
            route="default",
            upstream="docker.io",
            method="GET",
            status="200",
        )
        == 4
    )
    assert (
        value(
            found,
            "mirrorrouter_requests_total",
            route="default",
            upstream="docker.io",
            method="GET",
            status="404",
        )
        == 1
    )
    assert (
        value(
            found,
            "mirrorrouter_cache_results_total",
            upstream="docker.io",
            kind="manifest",
            result="HIT",
        )
        == 1
    )
    assert (
        value(
            found,
            "mirrorrouter_cache_results_total",
            upstream="docker.io",
            kind="blob",
            result="MISS",
        )
        == 1
    )
    assert value(found, "mirrorrouter_bytes_total", upstream="docker.io", source="upstream") == size
    assert value(found, "mirrorrouter_bytes_total", upstream="docker.io", source="cache") == size
    assert fake.count("GET", f"/blobs/{layer}") == 1  # one upstream fetch, as counted
    assert value(found, "mirrorrouter_cache_bytes", upstream="docker.io") >= size
    assert value(found, "mirrorrouter_cache_entries", upstream="docker.io") >= 2
    assert (
        value(
            found,
            "mirrorrouter_upstream_request_seconds_count",
            upstream="docker.io",
            mirror="upstream.test",
            outcome="ok",
        )
        >= 2
    )


async def test_failing_mirror_shows_in_metrics_and_readiness(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Retries, failovers and an open circuit are counted; an upstream with every mirror open
    is reported degraded (not ready only with ?strict=true); /healthz stays up."""
    policy = 'retry_attempts = 2\nbreaker_failures = 1\nbreaker_cooldown = "1h"'
    fake.faults["/manifests/"] = [503] * 10
    async with gateway(tmp_path, fake, config(tmp_path, policy)) as gw:
        assert (await gw.client.get("/readyz")).status_code == 200
        assert (await gw.client.get("/v2/library/x/manifests/1")).status_code == 503
        found = samples((await gw.client.get("/metrics")).text)
        ready = await gw.client.get("/readyz")
        strict = await gw.client.get("/readyz?strict=true")
        health = await gw.client.get("/healthz")
    assert (
        value(found, "mirrorrouter_retries_total", upstream="docker.io", mirror="upstream.test")
        == 1
    )
    assert (
        value(found, "mirrorrouter_failovers_total", upstream="docker.io", mirror="upstream.test")
        == 1
    )
    assert (
        value(found, "mirrorrouter_circuit_state", upstream="docker.io", mirror="upstream.test")
        == 2
    )
    # Degraded, still ready (the cache serves); strict readiness counts the open circuits.
    assert ready.status_code == 200
    assert ready.json()["degraded"] == {
        "docker.io": "every mirror's circuit is open; serving from cache"
    }
    assert strict.status_code == 503 and strict.json()["ready"] is False
    assert health.status_code == 200 and health.json() == {"status": "ok"}


async def test_docker_hub_rate_limit_becomes_a_gauge(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """Docker Hub's ratelimit-remaining header is exported as a gauge."""

    def with_header(app: httpx.ASGITransport) -> httpx.AsyncBaseTransport:
        async def handler(request: httpx.Request) -> httpx.Response:
            response = await app.handle_async_request(request)
            response.headers["ratelimit-remaining"] = "76;w=21600"
            return response

        return httpx.MockTransport(handler)

    async with gateway(tmp_path, fake, wrap=with_header) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        found = samples((await gw.client.get("/metrics")).text)
    assert value(found, "mirrorrouter_upstream_ratelimit_remaining", upstream="docker.io") == 76
