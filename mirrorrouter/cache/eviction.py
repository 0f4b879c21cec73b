"""Cache bounds: size limits per upstream cache and for all caches together, enforced by
evicting whole images (images.py), least recently accessed first.

- **What is counted**: the bytes of committed blobs and manifests, plus downloads in
  progress (at their announced size, so room is made for a blob while it arrives). Tag
  records and links are a few bytes each and are not counted.
- **What is evicted together**: an image with what only it reaches; never a pinned one
  (pins.py), nor anything a pin reaches.
- **In use**: an image with a blob being read, written or held is skipped whole.
- **Order**: each upstream cache over its own ``max_size`` first, then all caches together
  over ``[cache] max_size``, oldest image first.

Several worker processes may each run an ``Evictor``; one at a time evicts (an ``flock`` on
``<cache directory>/.evict.lock``), the others skip that round.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from mirrorrouter.cache import CacheBackend, Caches
from mirrorrouter.cache.base import Removal, Removed
from mirrorrouter.cache.images import CacheArea, Image, Survey, cache_areas, stored_bytes, survey_of
from mirrorrouter.cache.pins import Pins, PinsError, load_pins
from mirrorrouter.config import CacheSettings, Settings
from mirrorrouter.manifests import referenced_digests
from mirrorrouter.reference import Digest
from mirrorrouter.timing import REAL_TIME, Timing

log = logging.getLogger("mirrorrouter.eviction")

DEFAULT_INTERVAL = 60.0  # seconds between two rounds of the background task
LOCK_FILE = ".evict.lock"
LOCK_POLL_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class Evicted:
    upstream: str
    image: Image
    freed: int


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A limit eviction could not reach: what is left is pinned or in use."""

    scope: str  # an upstream's name, or "total"
    usage: int
    limit: int


@dataclass(slots=True)
class EvictionReport:
    dry_run: bool = False
    busy: bool = False  # another process was evicting: nothing was done
    evicted: list[Evicted] = field(default_factory=list)
    in_use: list[tuple[str, Image]] = field(default_factory=list)  # skipped images
    shortfalls: list[Shortfall] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)  # per upstream, after
    limits: dict[str, int | None] = field(default_factory=dict)  # per upstream
    total_limit: int | None = None

    @property
    def freed(self) -> int:
        return sum(e.freed for e in self.evicted)

    @property
    def total(self) -> int:
        return sum(self.usage.values())

    @property
    def ok(self) -> bool:
        """Every limit in scope is met (or would be, for a dry run)."""
        return not self.busy and not self.shortfalls


class Evictor:
    """Keeps every cache under its limits; see the module docstring for the rules.

    In the app: ``start()`` in the lifespan (a round every ``interval``), ``committed()``
    after each commit (cheap; a round starts early when a limit is crossed), ``stop()`` at
    shutdown. ``enforce()`` is one round, awaited; ``survey()`` is what the operator
    commands list.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        caches: Caches | None = None,
        timing: Timing = REAL_TIME,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        """``caches``: the open backends it shares with the pull-through (None: its own)."""
        self.settings = settings
        self.caches = caches or Caches()
        self.timing = timing
        self.interval = interval
        self._references: dict[Digest, tuple[Digest, ...]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._kicked: asyncio.Task[None] | None = None
        self._again = False
        self._usage: dict[str, int] = {}  # per upstream: last round's figure plus commits
        self._lock_fd: int | None = None  # the flock among processes, while held

    # -- limits

    @property
    def bounded(self) -> bool:
        """Whether any limit is configured."""
        return self.settings.cache.max_size is not None or any(
            u.cache.max_size is not None for u in self.settings.upstreams.values()
        )

    def areas(self) -> list[CacheArea]:
        return cache_areas(self.settings)

    def _backend(self, area: CacheArea) -> CacheBackend:
        return self.caches.get(area.cache or CacheSettings("filesystem", area.directory))

    # -- the background task

    def start(self, interval: float | None = None) -> None:
        """Run ``run(interval)`` as a task of the running loop (the app's lifespan)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(interval))

    async def stop(self) -> None:
        """Stop the background task and any round ``committed()`` started."""
        tasks = [t for t in (self._task, self._kicked) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._kicked = None

    async def run(self, interval: float | None = None) -> None:
        """A round now and then every ``interval`` seconds, until cancelled. Accesses
        recorded in memory are persisted every round, limits or not."""
        interval = self.interval if interval is None else interval
        while True:
            await self._enforce_logged()
            await self.timing.sleep(interval)

    async def _enforce_logged(self) -> None:
        try:
            await self.enforce()
        except PinsError as exc:
            log.error("%s; nothing is evicted until it is fixed", exc)
        except Exception:
            log.exception("cache eviction failed")

    def committed(self, upstream: str, size: int) -> None:
        """Note ``size`` bytes committed to ``upstream``'s cache (no I/O). When that takes a
        cache over its limit, a round starts in the background."""
        if not self.bounded:
            return
        if upstream in self._usage:
            self._usage[upstream] += size
        if self._over():
            self._kick()

    async def wait_idle(self) -> None:
        """Wait for the rounds ``committed()`` started, if any."""
        while self._kicked is not None and not self._kicked.done():
            await asyncio.shield(self._kicked)

    def _over(self) -> bool:
        limits = {u.name: u.cache.max_size for u in self.settings.upstreams.values()}
        if any(name not in self._usage for name in limits):
            return True  # not measured yet
        if any(m is not None and self._usage[n] > m for n, m in limits.items()):
            return True
        total = self.settings.cache.max_size
        return total is not None and sum(self._usage.values()) > total

    def _kick(self) -> None:
        if self._kicked is not None and not self._kicked.done():
            self._again = True
            return

        async def rounds() -> None:
            self._again = True
            while self._again:
                self._again = False
                await self._enforce_logged()

        self._kicked = asyncio.get_running_loop().create_task(rounds())

    # -- one round

    async def enforce(
        self,
        *,
        upstream: str | None = None,
        to: int | None = None,
        dry_run: bool = False,
        wait: float = 0.0,
    ) -> EvictionReport:
        """Bring caches under their limits: each upstream under its ``max_size``, then all
        under ``[cache] max_size``, oldest image first, never a pinned or in-use one.

        ``upstream`` evicts from that cache only; ``to`` replaces the limit (that
        upstream's, or the total's); ``dry_run`` plans without removing. ``wait`` is how
        long to wait for another process's round (else this round is skipped, ``busy``).
        """
        report = EvictionReport(dry_run=dry_run, total_limit=self.settings.cache.max_size)
        async with self._lock:
            await self._flush()
            if not self.bounded and to is None:
                return report
            with self._process_lock(dry_run) as held:
                if not held and wait > 0:
                    deadline = self.timing.monotonic() + wait
                    while not held and self.timing.monotonic() < deadline:
                        await self.timing.sleep(LOCK_POLL_SECONDS)
                        held = self._try_lock()
                if not held:
                    report.busy = True
                    return report
                await self._round(report, upstream, to, dry_run)
        return report

    async def _round(
        self, report: EvictionReport, upstream: str | None, to: int | None, dry_run: bool
    ) -> None:
        pins = load_pins(self.settings)
        surveys = [await self._survey(area, pins) for area in self.areas()]
        scope = [s for s in surveys if upstream is None or s.area.name == upstream]
        for survey in scope:
            limit = to if upstream is not None and to is not None else survey.area.max_size
            if limit is not None:
                await self._evict_until(report, [survey], [survey], limit, dry_run)
        total_limit = self.settings.cache.max_size
        if to is not None and upstream is None:
            total_limit = report.total_limit = to
        elif to is not None:
            total_limit = None  # an upstream brought to a size: that is the whole request
        if total_limit is not None:
            await self._evict_until(report, scope, surveys, total_limit, dry_run)
        for survey in surveys:
            report.usage[survey.area.name] = survey.usage
            report.limits[survey.area.name] = survey.area.max_size
        if not dry_run:
            self._usage = dict(report.usage)

    async def _evict_until(
        self,
        report: EvictionReport,
        surveys: list[Survey],
        counted: list[Survey],
        limit: int,
        dry_run: bool,
    ) -> None:
        """Evict images of ``surveys``, oldest first, until ``counted`` hold ``limit``."""
        scope = counted[0].area.name if len(counted) == 1 else "total"
        candidates = sorted(
            ((s, i) for s in surveys for i in s.images if not i.evicted and i.pinned_by is None),
            key=lambda pair: (pair[1].accessed, -pair[1].size),
        )
        for survey, image in candidates:
            if sum(s.usage for s in counted) <= limit:
                break
            freed = await self._evict(report, survey, image, dry_run)
            if freed is not None:
                survey.usage -= freed
        usage = sum(s.usage for s in counted)
        if usage > limit:
            report.shortfalls.append(Shortfall(scope, usage, limit))
            log.warning(
                "%s: %d bytes cached, over the limit of %d; the rest is pinned or in use",
                "all caches" if scope == "total" else f"cache of {scope}",
                usage,
                limit,
            )

    async def _evict(
        self, report: EvictionReport, survey: Survey, image: Image, dry_run: bool
    ) -> int | None:
        """Remove an image (what only it reaches); the bytes freed, or None if in use."""
        owned = frozenset(
            d for d in image.members if survey.owners[d] == 1 and d not in survey.pinned
        )
        inventory = survey.inventory
        removal = Removal(
            owned,
            tags=tuple(k for k, r in inventory.tags.items() if r.digest in owned),
            links=tuple(
                (repository, d)
                for repository, linked in inventory.links.items()
                for d in linked & owned
            ),
        )
        backend = self._backend(survey.area)
        if dry_run:
            busy = frozenset(d for d in owned if d in inventory.blobs and backend.in_use(d))
            result = (
                Removed(frozenset(), 0, busy)
                if busy
                else Removed(owned, stored_bytes(survey, owned))
            )
        else:
            result = await backend.remove(removal)
        if result.in_use:
            report.in_use.append((survey.area.name, image))
            return None
        image.evicted = True
        for digest in image.members:
            survey.owners[digest] -= 1
        report.evicted.append(Evicted(survey.area.name, image, result.freed))
        if not dry_run:
            log.info(
                "evicted %s from the %s cache: %d bytes (%s)",
                image.root,
                survey.area.name,
                result.freed,
                ", ".join(f"{r}:{t}" for r, t in image.tags) or "untagged",
            )
        return result.freed

    # -- surveys

    async def survey(self, upstream: str | None = None) -> list[Survey]:
        """Each cache's images, sizes, accesses and pins (what ``cache ls`` and ``du``
        show); ``upstream`` limits it to that cache."""
        await self._flush()
        pins = load_pins(self.settings)
        return [
            await self._survey(a, pins)
            for a in self.areas()
            if upstream is None or a.name == upstream
        ]

    async def _flush(self) -> None:
        for backend in {id(b): b for b in map(self._backend, self.areas())}.values():
            await backend.flush_access()

    async def _survey(self, area: CacheArea, pins: Pins) -> Survey:
        backend = self._backend(area)
        inventory = await backend.inventory()
        references: dict[Digest, tuple[Digest, ...]] = {}
        for digest in inventory.manifests:
            known = self._references.get(digest)
            if known is None:
                stored = await backend.peek_manifest(digest)
                known = tuple(referenced_digests(stored)) if stored is not None else ()
                self._references[digest] = known  # content by digest never changes
            references[digest] = known
        return survey_of(area, inventory, references, pins)

    # -- the lock among processes

    @contextlib.contextmanager
    def _process_lock(self, dry_run: bool) -> Iterator[bool]:
        if dry_run or not self.settings.cache.directory.is_dir():
            yield True  # a dry run removes nothing; a missing directory holds nothing
            return
        try:
            yield self._try_lock()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _try_lock(self) -> bool:
        if self._lock_fd is None:
            path = self.settings.cache.directory / LOCK_FILE
            self._lock_fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
