"""The status page in a real browser: headless chromium loads it from loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mirrorrouter.api.monitor import MirrorStatus, RecentPull, StatusSnapshot, UpstreamStatus
from mirrorrouter.api.statuspage import render_status
from tests.support.browser import INSTALL_HINT, Chromium, PageServer, find_chromium

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(find_chromium() is None, reason=INSTALL_HINT),
]

MiB = 1024**2


def two_upstreams() -> StatusSnapshot:
    now = time.time()
    hub = UpstreamStatus(
        name="docker.io",
        mirrors=(
            MirrorStatus("https://registry-1.docker.io", ("pull", "resolve"), "closed", 0),
            MirrorStatus("https://mirror.gcr.io", ("pull",), "open", 5),
        ),
        cache_bytes=1536 * MiB,
        cache_entries=412,
        hits=90,
        misses=10,
        stale=0,
        bytes_from_cache=900 * MiB,
        bytes_from_upstream=120 * MiB,
    )
    gcr = UpstreamStatus(
        name="gcr.io",
        mirrors=(MirrorStatus("https://gcr.io", ("pull", "resolve"), "half-open", 5),),
        cache_bytes=80 * MiB,
        cache_entries=37,
        hits=6,
        misses=3,
        stale=1,
        bytes_from_cache=40 * MiB,
        bytes_from_upstream=25 * MiB,
    )
    digest = "sha256:" + "3f5ef9b2" * 8
    recent = (
        RecentPull(now - 4, "alice", "docker.io/library/alpine:3.19", digest, "docker.io",
                   "HIT", 3_400_000),
        RecentPull(now - 30, "", "gcr.io/distroless/static:nonroot", "", "gcr.io", "STALE",
                   1_520),
        RecentPull(now - 95, "ci-bot", "docker.io/library/python:3.11-slim",
                   "sha256:" + "9c0d2e41" * 8, "docker.io", "MISS", 29_100_000),
    )  # fmt: skip
    return StatusSnapshot("0.1.0", now - 2 * 3600 - 17 * 60, (hub, gcr), recent)


@pytest.fixture
def chromium(tmp_path: Path) -> Chromium:
    return Chromium(tmp_path / "chromium")


def test_the_page_shows_upstreams_and_ratio_in_a_browser(
    chromium: Chromium, tmp_path: Path
) -> None:
    with PageServer({"/_/": render_status(two_upstreams())}) as server:
        dom = chromium.dump_dom(f"{server.url}/_/")
        shot = chromium.screenshot(f"{server.url}/_/", tmp_path / "status.png", height=1000)
    assert server.requests.count("/_/") == 2  # loaded, and nothing else asked for
    assert set(server.requests) == {"/_/"}

    assert "<title>mirrorrouter status</title>" in dom
    assert ">docker.io</th>" in dom and ">gcr.io</th>" in dom
    assert "90.0%" in dom  # docker.io: 90 hits of 100
    assert "60.0%" in dom  # gcr.io: 6 of 10
    assert "87.3%" in dom  # both: 96 of 110
    assert "half-open" in dom and "3f5ef9b23f5e" in dom
    assert shot.stat().st_size > 10_000  # a page, not a blank
