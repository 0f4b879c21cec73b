"""One upstream at run time: its client, its cache, its downloads, and memory indexes.

Memory indexes are this replica's; what the replicas share (tag checks, "not found"
answers) goes through the coordinator (coordination/), which is asked only when memory
cannot answer, right before an upstream request would be made.
"""

from __future__ import annotations

from collections.abc import Callable

from cachetools import LRUCache, TTLCache

from mirrorrouter.cache import CacheBackend, StoredManifest, TagRecord
from mirrorrouter.config import UpstreamSettings
from mirrorrouter.coordination import Coordinator, LocalCoordinator
from mirrorrouter.errors import RegistryError
from mirrorrouter.pull.singleflight import BlobFill, Coalescer
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.upstream.client import UpstreamClient

MANIFEST_MEMORY_BYTES = 64 * 1024 * 1024
TAG_MEMORY_ENTRIES = 100_000
NOT_FOUND_ENTRIES = 10_000
LINK_MEMORY_ENTRIES = 200_000
SUSPECT_SECONDS = 3600.0


class UpstreamSite:
    """One upstream at run time: its client, its cache, its fills and memory indexes."""

    def __init__(
        self,
        settings: UpstreamSettings,
        client: UpstreamClient,
        cache: CacheBackend,
        clock: Callable[[], float],
        coordinator: Coordinator | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.clock = clock  # wall clock: tag records are dated with it
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self.fills: dict[Digest, BlobFill] = {}  # in progress; the Filler's alone to change
        self.coalescer = Coalescer()
        self.manifests: LRUCache[Digest, StoredManifest] = LRUCache(
            maxsize=MANIFEST_MEMORY_BYTES, getsizeof=lambda m: len(m.data) + 200
        )
        self.tags: LRUCache[tuple[str, str], TagRecord] = LRUCache(maxsize=TAG_MEMORY_ENTRIES)
        # (repository, digest) pairs known to be linked: the hot path does no stat.
        self.links: LRUCache[tuple[str, Digest], bool] = LRUCache(maxsize=LINK_MEMORY_ENTRIES)
        # Mirrors that served content failing verification, per digest: not asked again.
        self.suspects: TTLCache[Digest, frozenset[str]] = TTLCache(
            maxsize=NOT_FOUND_ENTRIES, ttl=SUSPECT_SECONDS, timer=clock
        )
        # Upstream "not found" answers by (repository, reference), for negative_ttl.
        self.not_found: TTLCache[tuple[str, str], RegistryError] = TTLCache(
            maxsize=NOT_FOUND_ENTRIES, ttl=max(settings.policy.negative_ttl, 1e-9), timer=clock
        )

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        stored = self.manifests.get(digest)
        if stored is None:
            stored = await self.cache.get_manifest(digest)
            if stored is not None:
                self.manifests[digest] = stored
        return stored

    async def is_linked(self, repository: str, digest: Digest) -> bool:
        if (repository, digest) in self.links:
            return True
        if await self.cache.is_linked(repository, digest):
            self.links[(repository, digest)] = True
            return True
        return False

    async def link(self, repository: str, digests: list[Digest]) -> None:
        await self.cache.link(repository, digests)
        for digest in digests:
            self.links[(repository, digest)] = True

    def cached_manifest(self, ref: ImageReference, now: float) -> StoredManifest | None:
        """The manifest for ``ref`` when memory alone can answer for certain: a linked digest,
        or a tag within its TTL. The hot path of every pull, with no I/O."""
        if ref.digest is not None:
            if (ref.repository, ref.digest) not in self.links:
                return None
            return self.manifests.get(ref.digest)
        record = self.tags.get((ref.repository, ref.tag or ""))
        if record is None or now - record.checked_at >= self.settings.policy.tag_ttl:
            return None
        return self.manifests.get(record.digest)

    async def get_tag(self, repository: str, tag: str) -> TagRecord | None:
        record = self.tags.get((repository, tag))
        if record is None:
            record = await self.cache.get_tag(repository, tag)
            if record is not None:
                self.tags[(repository, tag)] = record
        return record

    async def put_tag(
        self, repository: str, tag: str, record: TagRecord, *, share: bool = True
    ) -> None:
        """Record a tag check; ``share`` publishes it to the other replicas for what is left
        of its tag_ttl (False for a record learnt from them)."""
        self.tags[(repository, tag)] = record
        await self.cache.put_tag(repository, tag, record)
        if share:
            ttl = self.settings.policy.tag_ttl - (self.clock() - record.checked_at)
            await self.coordinator.put_tag(self.settings.name, repository, tag, record, ttl)

    async def shared_tag(self, repository: str, tag: str) -> TagRecord | None:
        """The tag as another replica last confirmed it upstream, within tag_ttl."""
        return await self.coordinator.get_tag(self.settings.name, repository, tag)

    async def known_not_found(self, repository: str, reference: str) -> RegistryError | None:
        """An upstream "not found" remembered here or by another replica (negative_ttl)."""
        error = self.not_found.get((repository, reference))
        if error is None and self.settings.policy.negative_ttl > 0:
            error = await self.coordinator.get_not_found(self.settings.name, repository, reference)
        return error

    async def remember_not_found(
        self, repository: str, reference: str, error: RegistryError
    ) -> None:
        """Remember an upstream "not found" for negative_ttl, here and for the others."""
        if self.not_found.get((repository, reference)) is error:
            return  # coalesced callers share one error: remembered once
        self.not_found[(repository, reference)] = error
        await self.coordinator.put_not_found(
            self.settings.name, repository, reference, error, self.settings.policy.negative_ttl
        )
