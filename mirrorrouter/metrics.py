"""What the gateway counts: Prometheus metrics (``/metrics``) and the status page's numbers.

One ``Metrics`` object per app. Every layer records into it (endpoints: requests and cache
results; the pull-through: bytes, fills, followers; the upstream client: latency, retries,
failovers, hedges, first-byte timeouts, circuit states, Docker Hub's rate-limit headers)
through plain method calls, so the counting lives here and nowhere else.

Several uvicorn workers: ``mirrorrouter serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at an empty
directory before the workers start; prometheus_client then keeps each worker's values in
files there, and ``/metrics`` (from any worker) sums them. The status page's numbers are the
answering worker's own.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from mirrorrouter.oci import CacheResult

if TYPE_CHECKING:
    from mirrorrouter.mapping import Resolution

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CIRCUIT_VALUES = {"closed": 0, "half-open": 1, "open": 2}
RECENT_PULLS = 50


class GcRun(Protocol):
    """A garbage collection of a hosted set as it is counted (hosted/housekeeping.py's
    record of a run has these fields)."""

    @property
    def started(self) -> float: ...

    @property
    def outcome(self) -> str: ...

    @property
    def blobs(self) -> int: ...

    @property
    def manifests(self) -> int: ...

    @property
    def uploads(self) -> int: ...

    @property
    def freed(self) -> int: ...


@dataclass
class UpstreamTally:
    """Per-process numbers of one upstream, for the status page."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0


@dataclass(frozen=True, slots=True)
class Pull:
    time: float
    user: str
    reference: str
    digest: str
    upstream: str
    cache: CacheResult
    bytes: int
    resolution: Resolution  # what was pulled, for the access check of who may see it


@dataclass
class Tallies:
    upstreams: dict[str, UpstreamTally] = field(default_factory=dict)
    recent: collections.deque[Pull] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_PULLS)
    )

    def of(self, upstream: str) -> UpstreamTally:
        return self.upstreams.setdefault(upstream, UpstreamTally())


class Metrics:
    """The Prometheus series and the live tallies of one gateway."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tallies = Tallies()
        # Labelled children of the per-request counters, looked up once: labels() takes a lock
        # and builds its key on every call, which the manifest hot path felt.
        self._request_children: dict[tuple[str, str, str, int], Counter] = {}
        self._cache_children: dict[tuple[str, str, str], Counter] = {}
        self.started_at = time.time()
        r = self.registry
        self.requests = Counter(
            "mirrorrouter_requests",
            "Requests answered, by route, upstream, method and HTTP status.",
            ["route", "upstream", "method", "status"],
            registry=r,
        )
        self.cache_results = Counter(
            "mirrorrouter_cache_results",
            "Manifest and blob answers by cache result (HIT, MISS, STALE).",
            ["upstream", "kind", "result"],
            registry=r,
        )
        self.bytes = Counter(
            "mirrorrouter_bytes",
            "Blob bytes served from the cache, and fetched from upstream.",
            ["upstream", "source"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "mirrorrouter_upstream_request_seconds",
            "Time to an upstream mirror's answer (headers), by outcome.",
            ["upstream", "mirror", "outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.retries = Counter(
            "mirrorrouter_retries",
            "Retries of an upstream mirror.",
            ["upstream", "mirror"],
            registry=r,
        )
        self.failovers = Counter(
            "mirrorrouter_failovers",
            "Requests that moved on from a mirror to the next one.",
            ["upstream", "mirror"],
            registry=r,
        )
        self.hedges = Counter(
            "mirrorrouter_hedges",
            "Requests also sent to this mirror because the one asked before it was slower "
            "than usual (hedged requests).",
            ["upstream", "mirror"],
            registry=r,
        )
        self.hedge_wins = Counter(
            "mirrorrouter_hedge_wins",
            "Hedged requests this mirror answered first (the other request was closed).",
            ["upstream", "mirror"],
            registry=r,
        )
        self.demotions = Counter(
            "mirrorrouter_mirror_demotions",
            "Times a mirror was overtaken by a hedge while past its usual time and so asked "
            "after the others for a breaker_cooldown.",
            ["upstream", "mirror"],
            registry=r,
        )
        self.first_byte_timeouts = Counter(
            "mirrorrouter_first_byte_timeouts",
            "Requests to a mirror that gave no response headers within first_byte_timeout.",
            ["upstream", "mirror"],
            registry=r,
        )
        self.resumes = Counter(
            "mirrorrouter_resumed_blobs",
            "Blob downloads continued with Range after a cut, by the mirror that cut.",
            ["upstream", "mirror"],
            registry=r,
        )
        self.followers = Counter(
            "mirrorrouter_singleflight_followers",
            "Requests that followed a download another request had started.",
            ["upstream"],
            registry=r,
        )
        self.circuit = Gauge(
            "mirrorrouter_circuit_state",
            "Circuit breaker per mirror: 0 closed, 1 half-open, 2 open.",
            ["upstream", "mirror"],
            multiprocess_mode="max",
            registry=r,
        )
        self.ratelimit = Gauge(
            "mirrorrouter_upstream_ratelimit_remaining",
            "Pulls left in Docker Hub's window (its ratelimit-remaining header).",
            ["upstream"],
            multiprocess_mode="min",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "mirrorrouter_cache_bytes",
            "Bytes of committed content in an upstream's cache.",
            ["upstream"],
            multiprocess_mode="max",
            registry=r,
        )
        self.cache_entries = Gauge(
            "mirrorrouter_cache_entries",
            "Blobs and manifests in an upstream's cache.",
            ["upstream"],
            multiprocess_mode="max",
            registry=r,
        )
        # Hosted sets' housekeeping (housekeeping.py): counted by the worker that did it.
        self.gc_runs = Counter(
            "mirrorrouter_gc_runs",
            "Scheduled garbage collections of a hosted set, by outcome (ok, failed).",
            ["hosted", "outcome"],
            registry=r,
        )
        self.gc_removed = Counter(
            "mirrorrouter_gc_removed",
            "What scheduled garbage collection removed, by kind (blob, manifest, upload).",
            ["hosted", "kind"],
            registry=r,
        )
        self.gc_freed = Counter(
            "mirrorrouter_gc_freed_bytes",
            "Bytes scheduled garbage collection freed.",
            ["hosted"],
            registry=r,
        )
        self.gc_last_run = Gauge(
            "mirrorrouter_gc_last_run_timestamp_seconds",
            "When the last garbage collection of a hosted set began (by any worker or "
            "replica), Unix seconds.",
            ["hosted"],
            multiprocess_mode="max",
            registry=r,
        )
        self.upload_sweeps = Counter(
            "mirrorrouter_upload_sweeps",
            "Sweeps of a hosted set's abandoned upload sessions (every worker sweeps).",
            ["hosted"],
            registry=r,
        )
        self.uploads_swept = Counter(
            "mirrorrouter_uploads_swept",
            "Abandoned upload sessions the sweeps removed.",
            ["hosted"],
            registry=r,
        )

    # ------------------------------------------------------------------ recording

    def request(self, route: str, upstream: str, method: str, status: int) -> None:
        key = (route, upstream, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(
                route, upstream, method, str(status)
            )
        child.inc()

    def cache_result(self, upstream: str, kind: str, result: CacheResult) -> None:
        key = (upstream, kind, result)
        child = self._cache_children.get(key)
        if child is None:
            child = self._cache_children[key] = self.cache_results.labels(upstream, kind, result)
        child.inc()
        tally = self.tallies.of(upstream)
        if result == CacheResult.HIT:
            tally.hits += 1
        elif result == CacheResult.STALE:
            tally.stale += 1
        else:
            tally.misses += 1

    def served_from_cache(self, upstream: str, count: int) -> None:
        self.bytes.labels(upstream, "cache").inc(count)
        self.tallies.of(upstream).bytes_from_cache += count

    def fetched(self, upstream: str, count: int) -> None:
        self.bytes.labels(upstream, "upstream").inc(count)
        self.tallies.of(upstream).bytes_from_upstream += count

    def pulled(self, pull: Pull) -> None:
        self.tallies.recent.appendleft(pull)

    def mirror_answer(self, upstream: str, mirror: str, outcome: str, seconds: float) -> None:
        self.upstream_seconds.labels(upstream, mirror, outcome).observe(seconds)

    def circuit_changed(self, upstream: str, mirror: str, state: str) -> None:
        self.circuit.labels(upstream, mirror).set(CIRCUIT_VALUES[state])

    def ratelimit_remaining(self, upstream: str, header: str) -> None:
        """Docker Hub's ``ratelimit-remaining: 76;w=21600``."""
        value = header.split(";", 1)[0].strip()
        if value.isdigit():
            self.ratelimit.labels(upstream).set(int(value))

    def gc_ran(self, hosted: str, run: GcRun) -> None:
        """A scheduled garbage collection this worker ran."""
        self.gc_runs.labels(hosted, run.outcome).inc()
        removed = (("blob", run.blobs), ("manifest", run.manifests), ("upload", run.uploads))
        for kind, count in removed:
            self.gc_removed.labels(hosted, kind).inc(count)
        self.gc_freed.labels(hosted).inc(run.freed)
        self.gc_seen(hosted, run)

    def gc_seen(self, hosted: str, run: GcRun) -> None:
        """The last garbage collection of a hosted set, as its record says (any worker)."""
        self.gc_last_run.labels(hosted).set(run.started)

    def upload_sweep(self, hosted: str, sessions: int) -> None:
        """A sweep of abandoned upload sessions ran and removed ``sessions``."""
        self.upload_sweeps.labels(hosted).inc()
        self.uploads_swept.labels(hosted).inc(sessions)

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """The text format of every metric, summed over worker processes when there are several."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
