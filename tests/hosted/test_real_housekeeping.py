"""Scheduled garbage collection in the real gateway process with two workers: an orphan
blob is collected by the server on its own, exactly once, no more often than gc_interval
across both workers, and /metrics (summed over the workers) and the status page say so.
The scheduling rules themselves are tested in-process in test_housekeeping.py."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.api.test_statuspage import Page
from tests.support.gateway import GatewayProcess
from tests.test_metrics import samples, value

pytestmark = pytest.mark.real

INTERVAL = 2.0  # seconds: gc_interval
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def test_two_workers_collect_an_orphan_blob_once(tmp_path: Path) -> None:
    """A blob pushed without a manifest goes at the next scheduled run; over several
    intervals the runs of both workers together stay within one per interval, the blob is
    removed (and logged) once, and the metrics and status page report it."""
    config = f"""
[server]
workers = 2
[cache]
directory = "{tmp_path / "cache"}"
[routing]
default_registry = "team"
[hosted."team"]
gc_interval = "{INTERVAL:g}s"
gc_grace = "0s"
[[routes]]
prefix = "team"
hosted = "team"
"""
    data = b"a layer whose manifest never came"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    began = time.monotonic()
    with GatewayProcess(tmp_path / "gw", config) as gateway:
        pushed = httpx.post(
            f"{gateway.url}/v2/team/app/blobs/uploads/", params={"digest": digest}, content=data
        )
        assert pushed.status_code == 201, pushed.text
        found = poll_metrics(gateway, lambda f: removed(f) >= 1)
        assert removed(found) == 1
        assert value(found, "mirrorrouter_gc_freed_bytes_total", hosted="team") == len(data)
        head = httpx.head(f"{gateway.url}/v2/team/app/blobs/{digest}")
        assert head.status_code == 404
        # Let a few more intervals pass: each run must find nothing more to remove.
        found = poll_metrics(gateway, lambda f: runs(f) >= runs(found) + 3)
        elapsed = time.monotonic() - began
        page = Page(httpx.get(f"{gateway.url}/_/").text).visible
        log = gateway.log()
    assert removed(found) == 1
    assert runs(found) <= elapsed / INTERVAL + 1, (runs(found), elapsed)
    assert value(found, "mirrorrouter_gc_runs_total", hosted="team", outcome="failed") == 0
    assert value(found, "mirrorrouter_gc_last_run_timestamp_seconds", hosted="team") > 0
    assert "Hosted sets: garbage collection" in page and "| ok |" in page
    assert log.count("garbage collection removed 1 blobs") == 1


def removed(found: Samples) -> float:
    return value(found, "mirrorrouter_gc_removed_total", hosted="team", kind="blob")


def runs(found: Samples) -> float:
    return value(found, "mirrorrouter_gc_runs_total", hosted="team", outcome="ok")


def poll_metrics(
    gateway: GatewayProcess,
    done: Callable[[Samples], bool],
    timeout: float = 60.0,
) -> Samples:
    """Scrape /metrics until ``done(samples)`` holds (either worker may answer)."""
    deadline = time.monotonic() + timeout
    while True:
        found = samples(httpx.get(f"{gateway.url}/metrics").text)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"timed out; last scrape: {found}"
        time.sleep(0.2)
