"""What the gateway says about itself: the status page's snapshot (plain frozen values, which
statuspage.py draws), the /metrics text with fresh cache gauges, and readiness."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from mirrorrouter import __version__
from mirrorrouter.access.clientauth import Identity
from mirrorrouter.access.policy import AccessPolicy
from mirrorrouter.cache import Caches
from mirrorrouter.config import Settings, UpstreamSettings, redact_url
from mirrorrouter.hosted.schedule import GcRun, GcSchedule
from mirrorrouter.metrics import Metrics
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.upstream.breaker import CircuitState

# ---------------------------------------------------------------------- the snapshot


@dataclass(frozen=True, slots=True)
class MirrorStatus:
    """One mirror of an upstream, as this process's circuit breaker sees it."""

    url: str
    capabilities: tuple[str, ...]  # "resolve", "pull"
    circuit: str  # breaker.CircuitState value: "closed", "open" or "half-open"
    failures: int  # consecutive failures


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """One upstream: its mirrors in failover order, its cache and what it served."""

    name: str
    mirrors: tuple[MirrorStatus, ...]
    cache_bytes: int
    cache_entries: int
    hits: int
    misses: int
    stale: int
    bytes_from_cache: int
    bytes_from_upstream: int
    proxy: str | None = None  # the outbound proxy, redacted (it may carry credentials)

    @property
    def requests(self) -> int:
        """Answers with a cache result (HIT, MISS or STALE)."""
        return self.hits + self.misses + self.stale

    @property
    def hit_ratio(self) -> float | None:
        """HITs among all answers, 0.0 to 1.0; None before the first answer.

        A STALE answer came from the cache because every mirror failed: it counts as an
        answer, not as a hit.
        """
        return self.hits / self.requests if self.requests else None


@dataclass(frozen=True, slots=True)
class RecentPull:
    """One manifest or blob GET, newest first in ``StatusSnapshot.recent``."""

    time: float  # Unix seconds
    user: str  # "" for an anonymous client
    reference: str  # the canonical name with its tag or digest
    digest: str  # "" when not known
    upstream: str
    cache: str  # X-Cache (oci.CacheResult): "HIT", "MISS" or "STALE"
    bytes: int


@dataclass(frozen=True, slots=True)
class HostedStatus:
    """One hosted set's housekeeping: its scheduled garbage collection."""

    name: str
    gc_interval: float  # seconds; 0: scheduled collection is off
    last_gc: GcRun | None  # by whichever worker or replica ran it
    next_gc: float | None  # Unix seconds; None when off


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Everything the page shows, taken at one moment."""

    version: str
    started_at: float  # Unix seconds
    upstreams: tuple[UpstreamStatus, ...]
    recent: tuple[RecentPull, ...]
    hosted: tuple[HostedStatus, ...] = ()

    @property
    def totals(self) -> UpstreamStatus:
        """The sums over every upstream (with no mirrors)."""
        ups = self.upstreams
        return UpstreamStatus(
            name="all upstreams",
            mirrors=(),
            cache_bytes=sum(u.cache_bytes for u in ups),
            cache_entries=sum(u.cache_entries for u in ups),
            hits=sum(u.hits for u in ups),
            misses=sum(u.misses for u in ups),
            stale=sum(u.stale for u in ups),
            bytes_from_cache=sum(u.bytes_from_cache for u in ups),
            bytes_from_upstream=sum(u.bytes_from_upstream for u in ups),
        )


# ---------------------------------------------------------------------- the monitor


class Monitor:
    """Status, metrics and readiness of one gateway process."""

    def __init__(
        self,
        settings: Settings,
        pull: Pullthrough,
        metrics: Metrics,
        access: AccessPolicy,
        caches: Caches,
        gc: Mapping[str, GcSchedule] | None = None,
    ) -> None:
        self.settings = settings
        self.pull = pull
        self.caches = caches
        self.metrics = metrics
        self.access = access
        self.gc = gc or {}
        self._usage: TTLCache[str, tuple[int, int]] = TTLCache(maxsize=1024, ttl=30)

    async def status(self, viewer: Identity | None = None) -> StatusSnapshot:
        """What the status page shows ``viewer``: every upstream's mirrors, cache and tallies;
        the recent pulls of references the viewer may pull (never a private reference, its
        digest or its puller to someone who may not pull it)."""
        upstreams = []
        for upstream in self.settings.upstreams.values():
            breakers = {b.name: b for b in self.pull.breakers(upstream)}
            mirrors = tuple(
                MirrorStatus(
                    mirror.url,
                    tuple(sorted(c.value for c in mirror.capabilities)),
                    breakers[mirror.name].state.value if mirror.name in breakers else "closed",
                    breakers[mirror.name].failures if mirror.name in breakers else 0,
                )
                for mirror in upstream.mirrors
            )
            size, entries = await self._cache_usage(upstream)
            tally = self.metrics.tallies.of(upstream.name)
            upstreams.append(
                UpstreamStatus(
                    upstream.name,
                    mirrors,
                    size,
                    entries,
                    tally.hits,
                    tally.misses,
                    tally.stale,
                    tally.bytes_from_cache,
                    tally.bytes_from_upstream,
                    redact_url(upstream.policy.proxy) if upstream.policy.proxy else None,
                )
            )
        recent = tuple(
            RecentPull(
                p.time,
                "" if p.user == "anonymous" else p.user,
                p.reference,
                p.digest,
                p.upstream,
                p.cache,
                p.bytes,
            )
            for p in self.metrics.tallies.recent
            if self.access.may_pull(viewer, p.resolution)
        )
        return StatusSnapshot(
            __version__, self.metrics.started_at, tuple(upstreams), recent, await self._hosted()
        )

    async def _hosted(self) -> tuple[HostedStatus, ...]:
        """Each hosted set's garbage collection, from the record every worker and replica
        shares (also setting the last-run gauge)."""
        statuses = []
        for name, schedule in self.gc.items():
            last = await schedule.last_run()
            statuses.append(HostedStatus(name, schedule.interval, last, schedule.next_run(last)))
        return tuple(statuses)

    async def _cache_usage(self, upstream: UpstreamSettings) -> tuple[int, int]:
        """Bytes and entries in an upstream's cache (also set as gauges); a scan at most
        every 30 s."""
        known = self._usage.get(upstream.name)
        if known is None:
            inventory = await self.caches.get(upstream.cache).inventory()
            known = (inventory.stored_bytes, len(inventory.blobs) + len(inventory.manifests))
            self._usage[upstream.name] = known
            self.metrics.cache_bytes.labels(upstream.name).set(known[0])
            self.metrics.cache_entries.labels(upstream.name).set(known[1])
        return known

    async def metrics_page(self) -> bytes:
        """The /metrics text, with the cache gauges fresh (to within 30 s) and each hosted
        set's last garbage collection as its record says."""
        for upstream in self.settings.upstreams.values():
            await self._cache_usage(upstream)
        await self._hosted()
        return self.metrics.exposition()

    def readiness(self, *, strict: bool = False) -> tuple[bool, dict[str, Any]]:
        """Ready: the config is loaded and every cache and hosted set is writable.

        An upstream whose mirrors are all circuit-open is reported as degraded but does not
        make the gateway unready: that is when its cache and stale tags matter most, and an
        orchestrator would otherwise take every replica out of service at once. ``strict``
        counts it as not ready too.
        """
        problems: dict[str, str] = {}
        degraded: dict[str, str] = {}
        for upstream in self.settings.upstreams.values():
            directory = upstream.cache.directory
            if not os.access(directory, os.W_OK):
                problems[upstream.name] = f"cache directory {directory} is not writable"
                continue
            breakers = self.pull.breakers(upstream)
            if breakers and all(b.state is CircuitState.OPEN for b in breakers):
                degraded[upstream.name] = "every mirror's circuit is open; serving from cache"
        for hosted in self.settings.hosted.values():
            if not os.access(hosted.storage.directory, os.W_OK):
                problems[hosted.name] = (
                    f"hosted directory {hosted.storage.directory} is not writable"
                )
        ready = not problems and not (strict and degraded)
        return ready, {"ready": ready, "problems": problems, "degraded": degraded}
