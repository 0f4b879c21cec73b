"""The pull-through policy: what is served from cache, what is asked upstream, and when.

- **Digests never change**: manifests and blobs by digest are served from cache first,
  fetched upstream (verified) on a miss.
- **Tags move** (``tags.py``): within the upstream's ``tag_ttl`` the cached answer is
  served with no upstream request; after it, a HEAD revalidates (Docker Hub does not count
  HEADs against its pull quota) and a GET follows only when the digest changed.
- **One upstream fetch per digest** however many clients ask at once (``singleflight``;
  the download itself is in ``fill.py``); concurrent fetches of one tag are coalesced the
  same way.
- **Repository links**: a cached blob or manifest is served for a repository only if that
  repository's manifest referenced it or the upstream confirmed it there, so a private
  blob never leaks through another repository's name.
- **Replicas share** (``coordination/``): one download per blob across replicas, tag
  checks and "not found" answers, circuit state. Without Redis a replica is on its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Literal

import httpx

from mirrorrouter.cache import Caches, StoredManifest
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.coordination import Coordinator, open_coordinator
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.manifests import (
    INDEX_MEDIA_TYPES,
    accepts,
    child_for_client,
    filter_referrers,
    referenced_digests,
    referrers_index,
)
from mirrorrouter.metrics import Metrics
from mirrorrouter.oci import CacheResult
from mirrorrouter.pull.fill import Filler
from mirrorrouter.pull.singleflight import BlobFill
from mirrorrouter.pull.site import UpstreamSite
from mirrorrouter.pull.tags import TagResolver
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.served import BlobAnswer, ManifestAnswer, Memory
from mirrorrouter.timing import REAL_TIME, Timing
from mirrorrouter.upstream.breaker import CircuitBreaker
from mirrorrouter.upstream.client import UpstreamClient
from mirrorrouter.upstream.results import FetchedManifest, ListAnswer

log = logging.getLogger("mirrorrouter.pullthrough")

REDIRECT_SECONDS = 600.0  # how long a presigned blob URL handed to a client stays valid


class Pullthrough:
    """Serves pulls for every upstream through its cache."""

    def __init__(
        self,
        settings: Settings,
        *,
        timing: Timing = REAL_TIME,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
        coordinator: Coordinator | None = None,
        caches: Caches | None = None,
        on_commit: Callable[[str, int], None] | None = None,
        peer_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``coordinator`` is what replicas share; None: the one ``settings.coordination``
        names (a ``LocalCoordinator`` unless it says redis). ``caches`` holds the open
        cache backends; None: a ``Caches`` of its own. What this object made, it closes.
        ``on_commit`` is told (upstream, bytes) after each blob commit (the evictor);
        ``peer_transport`` replaces the network to other replicas (tests)."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.timing = timing
        self.clock = timing.wall
        self._transport = transport
        self._sites: dict[str, UpstreamSite] = {}
        self._site_lock = asyncio.Lock()
        self._owns_coordinator = coordinator is None
        self.coordinator = coordinator or open_coordinator(
            settings.coordination, clock=timing.monotonic
        )
        self._owns_caches = caches is None
        self.caches = caches or Caches()
        # The blob downloads (fill.py)
        self.filler = Filler(
            self.metrics,
            timing,
            coordinator=self.coordinator,
            on_commit=on_commit,
            peer_transport=peer_transport,
        )
        # What a tag means now (tags.py): within tag_ttl, revalidated, shared, or stale.
        self.tag_resolver = TagResolver(
            self.coordinator, timing, fetch=self._fetch, store=self._store_manifest
        )

    async def start(self) -> None:
        """Open every configured upstream's cache (sweeping interrupted writes)."""
        for upstream in self.settings.upstreams.values():
            await self.site(upstream)

    async def close(self) -> None:
        await self.filler.close()
        for site in self._sites.values():
            await site.client.aclose()
        if self._owns_caches:
            await self.caches.close()
        if self._owns_coordinator:
            await self.coordinator.close()

    def breakers(self, upstream: UpstreamSettings) -> list[CircuitBreaker]:
        """The circuit breakers of an upstream's mirrors (none before its first use)."""
        site = self._sites.get(upstream.name)
        return list(site.client.breakers.values()) if site else []

    async def site(self, upstream: UpstreamSettings) -> UpstreamSite:
        site = self._sites.get(upstream.name)
        if site is not None:
            return site
        async with self._site_lock:
            site = self._sites.get(upstream.name)
            if site is None:
                cache = await self.caches.opened(upstream.cache)
                client = UpstreamClient(
                    upstream,
                    transport=self._transport,
                    timing=self.timing,
                    metrics=self.metrics,
                    coordinator=self.coordinator,
                )
                site = self._sites[upstream.name] = UpstreamSite(
                    upstream, client, cache, self.clock, self.coordinator
                )
        return site

    # ------------------------------------------------------------------ manifests

    async def manifest(self, upstream: UpstreamSettings, ref: ImageReference) -> ManifestAnswer:
        site = await self.site(upstream)
        if ref.digest is not None:
            return await self._manifest_by_digest(site, ref, ref.digest)
        return await self.tag_resolver.manifest(site, ref)

    async def manifest_for_client(
        self, upstream: UpstreamSettings, ref: ImageReference, accept: tuple[str, ...]
    ) -> ManifestAnswer:
        """The manifest in a form the client accepts.

        A client that does not accept index types gets the linux/amd64 manifest of an
        index (what the distribution registry does for old Docker clients).
        """
        answer = self.memory_manifest(upstream, ref, accept)
        if answer is not None:
            return answer
        answer = await self.manifest(upstream, ref)
        child = child_for_client(answer.manifest, accept)
        if child is None:
            return answer
        return await self.manifest(
            upstream, ImageReference(ref.registry, ref.repository, None, child)
        )

    def memory_manifest(
        self, upstream: UpstreamSettings, ref: ImageReference, accept: tuple[str, ...]
    ) -> ManifestAnswer | None:
        """A cache hit answered from memory alone, or None (then the full path decides)."""
        site = self._sites.get(upstream.name)
        if site is None:
            return None
        stored = site.cached_manifest(ref, self.clock())
        if stored is None or not accepts(accept, stored.media_type):
            return None
        site.cache.touch(stored.digest)  # a memory hit is an access too (eviction is LRU)
        return ManifestAnswer(stored, CacheResult.HIT, upstream.name)

    def remembered(
        self, upstream: UpstreamSettings, ref: ImageReference, accept: tuple[str, ...]
    ) -> ManifestAnswer | Literal[Memory.MISSING] | None:
        """What memory alone says of ``ref`` as a member of a group: the answer
        (``memory_manifest``), ``Memory.MISSING`` when the upstream answered "not found"
        within negative_ttl and nothing is remembered for it since, or None (the full path
        decides)."""
        answer = self.memory_manifest(upstream, ref, accept)
        if answer is not None:
            return answer
        site = self._sites.get(upstream.name)
        if site is None or (ref.repository, ref.reference) not in site.not_found:
            return None
        if site.cached_manifest(ref, self.clock()) is not None:
            return None  # remembered, but not in a form this client takes
        return Memory.MISSING

    async def _manifest_by_digest(
        self, site: UpstreamSite, ref: ImageReference, digest: Digest
    ) -> ManifestAnswer:
        stored = await site.get_manifest(digest)
        if stored is not None and await site.is_linked(ref.repository, digest):
            return ManifestAnswer(stored, CacheResult.HIT, site.settings.name)
        fetched = await self._fetch(site, ref)
        stored = await self._store_manifest(site, ref.repository, fetched)
        return ManifestAnswer(stored, CacheResult.MISS, site.settings.name, fetched.mirror)

    async def _fetch(self, site: UpstreamSite, ref: ImageReference) -> FetchedManifest:
        """GET a manifest upstream, coalesced, remembering a "not found" for negative_ttl
        (shared with the other replicas)."""
        key = (ref.repository, ref.reference)
        remembered = await site.known_not_found(*key)
        if remembered is not None:
            raise remembered
        try:
            return await site.coalescer.run(
                ("manifest", *key), lambda: site.client.fetch_manifest(ref)
            )
        except RegistryError as error:
            if error.code is ErrorCode.MANIFEST_UNKNOWN and site.settings.policy.negative_ttl > 0:
                await site.remember_not_found(*key, error)
            raise

    async def _store_manifest(
        self, site: UpstreamSite, repository: str, fetched: FetchedManifest
    ) -> StoredManifest:
        stored = StoredManifest(fetched.digest, fetched.media_type, fetched.data)
        await site.cache.put_manifest(stored)
        site.manifests[stored.digest] = stored
        await site.link(repository, [stored.digest, *referenced_digests(stored)])
        return stored

    # ------------------------------------------------------------------ blobs

    async def blob_redirect(self, upstream: UpstreamSettings, digest: Digest) -> str | None:
        """Where a client may fetch a cached blob straight from object storage (``redirect``
        in ``[cache.s3]``), or None to serve it here. Asked after ``blob`` found it cached
        and visible to the client."""
        site = await self.site(upstream)
        url = await site.cache.presigned_url(digest, REDIRECT_SECONDS)
        if url is not None:
            site.cache.touch(digest)  # a redirected read is an access too (LRU)
        return url

    async def blob(
        self, upstream: UpstreamSettings, repository: str, digest: Digest, *, body: bool = True
    ) -> BlobAnswer:
        """A blob from the cache, or from its download (one per blob, however many ask).

        A blob the upstream announces at up to ``verify_before_send`` bytes is answered once
        it is verified and committed (``body``: the caller sends the bytes; a HEAD needs only
        the size), so a corrupt mirror costs the client nothing while another mirror has
        the blob. Larger ones (and those of unknown size) stream as they land, the last
        byte held back until the digest matched."""
        site = await self.site(upstream)
        size = await site.cache.blob_size(digest)
        if size is not None:
            await self._check_visible(site, repository, digest)
            return BlobAnswer(
                size,
                CacheResult.HIT,
                upstream.name,
                _stored(site, digest, size),
                file=functools.partial(site.cache.open_blob, digest),
            )
        fill = self.filler.join_or_start(site, repository, digest)
        if fill.repository != repository:  # joined another repository's download
            await self._check_visible(site, repository, digest)
        fill = await fill.begun()
        small = fill.size is not None and fill.size <= site.settings.policy.verify_before_send
        if body and small:
            fill = await fill.settled()
        if fill.error is not None:
            if isinstance(fill.error, RegistryError):
                raise fill.error
            raise RegistryError(ErrorCode.UNAVAILABLE, f"fetching {digest} failed: {fill.error}")
        if fill.done and fill.size is not None:
            stream = _stored(site, digest, fill.size)  # verified: served like a hit
            file = functools.partial(site.cache.open_blob, digest)
            return BlobAnswer(fill.size, CacheResult.MISS, upstream.name, stream, fill.mirror, file)
        return BlobAnswer(fill.size, CacheResult.MISS, upstream.name, fill.read, fill.mirror)

    async def leased_fill(
        self, upstream: UpstreamSettings, digest: Digest, token: str
    ) -> BlobFill | None:
        """This replica's download of a blob under the lease ``token``, for the replica
        following it (api/peer.py); None when there is none."""
        return self.filler.leased(await self.site(upstream), digest, token)

    async def _check_visible(self, site: UpstreamSite, repository: str, digest: Digest) -> None:
        if await site.is_linked(repository, digest):
            return
        if await site.client.blob_exists(repository, digest):
            await site.link(repository, [digest])
            return
        raise RegistryError(
            ErrorCode.BLOB_UNKNOWN,
            f"blob {digest} is not known in repository {repository}",
            detail={"upstream": site.settings.name},
        )

    # ------------------------------------------------------------------ tags, referrers

    async def tags(
        self, upstream: UpstreamSettings, repository: str, query: dict[str, str]
    ) -> ListAnswer:
        site = await self.site(upstream)
        return await site.client.get_tags(repository, query)

    async def referrers(
        self, upstream: UpstreamSettings, ref: ImageReference, artifact_type: str | None
    ) -> tuple[bytes, bool]:
        """The referrers index of a digest, and whether it was filtered by artifactType.

        Upstreams without the referrers API get the tag-schema fallback: the index
        tagged ``<alg>-<hex>``, filtered here; an empty index when there is none.
        """
        assert ref.digest is not None
        site = await self.site(upstream)
        response = await site.client.get_referrers(ref.repository, ref.digest, artifact_type)
        if response is not None:
            filtered = "artifactType" in response.headers.get("oci-filters-applied", "")
            if artifact_type and not filtered:
                return filter_referrers(response.data, artifact_type), True
            return response.data, filtered
        fallback_tag = f"{ref.digest.algorithm}-{ref.digest.hex}"
        tagged = ImageReference(ref.registry, ref.repository, fallback_tag)
        try:
            answer = await self.manifest(upstream, tagged)
        except RegistryError as exc:
            if exc.code is not ErrorCode.MANIFEST_UNKNOWN:
                raise
            return referrers_index(()), bool(artifact_type)
        if answer.manifest.media_type not in INDEX_MEDIA_TYPES:
            return referrers_index(()), bool(artifact_type)
        if artifact_type:
            return filter_referrers(answer.manifest.data, artifact_type), True
        return answer.manifest.data, False


def _stored(
    site: UpstreamSite, digest: Digest, size: int
) -> Callable[[int, int | None], AsyncIterator[bytes]]:
    """Reads of a committed blob of ``size`` bytes from the cache."""
    return lambda start, end: site.cache.read_blob(digest, start, size if end is None else end)
