"""The pull-through policy: what is served from cache, what is asked upstream, and when.

- **Digests never change**: manifests and blobs by digest are served from cache first,
  fetched upstream (verified) on a miss.
- **Tags move**: within the upstream's ``tag_ttl`` the cached answer is served with no
  upstream request; after it, a HEAD revalidates (Docker Hub does not count HEADs against
  its pull quota) and a GET follows only when the digest changed.
- **One upstream fetch per digest** however many clients ask at once (``singleflight``;
  the download itself is in ``fill.py``); concurrent fetches of one tag are coalesced the
  same way.
- **Repository links**: a cached blob or manifest is served for a repository only if that
  repository's manifest referenced it or the upstream confirmed it there, so a private
  blob never leaks through another repository's name.
- **Replicas share** (``coordination.py``): one download per blob across replicas, tag
  checks and "not found" answers, circuit state. Without Redis a replica is on its own.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from mirrorrouter.breaker import CircuitBreaker
from mirrorrouter.cache import (
    BlobFile,
    StoredManifest,
    TagRecord,
    open_backend,
)
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.coordination import Coordinator, Lease, open_coordinator
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.fill import Filler
from mirrorrouter.manifests import (
    INDEX_MEDIA_TYPES,
    accepts,
    child_for_client,
    filter_referrers,
    referenced_digests,
    referrers_index,
)
from mirrorrouter.metrics import Metrics
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.site import UpstreamSite
from mirrorrouter.timing import REAL_TIME, Timing
from mirrorrouter.upstream import FetchedManifest, ListAnswer, UpstreamClient

log = logging.getLogger("mirrorrouter.pullthrough")

REDIRECT_SECONDS = 600.0  # how long a presigned blob URL handed to a client stays valid
TAG_LEASE_POLL = 0.05  # seconds between looks at what the replica asking about a tag shared


class CacheStatus:
    HIT = "HIT"
    MISS = "MISS"
    STALE = "STALE"  # the last known answer, served because every mirror failed


class Memory(enum.Enum):
    """What memory alone may say of a member of a group besides an answer."""

    MISSING = "missing"  # for certain, the member does not have the reference


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    manifest: StoredManifest
    cache: str
    upstream: str
    mirror: str | None = None  # the mirror that served a miss


@dataclass(frozen=True, slots=True)
class BlobAnswer:
    """A blob to serve: from the cache, or from a fill in progress."""

    size: int | None
    cache: str
    upstream: str
    stream: Callable[[int, int | None], AsyncIterator[bytes]]
    mirror: str | None = None  # the mirror a miss comes from
    file: BlobFile | None = None  # a committed blob's local file: zero-copy sending


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
        peer_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``coordinator`` is what replicas share; None: the one ``settings.coordination``
        names (a ``LocalCoordinator`` unless it says redis), closed with this object.
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
        # The blob downloads (fill.py)
        self.filler = Filler(
            self.metrics, timing, coordinator=self.coordinator, peer_transport=peer_transport
        )

    async def start(self) -> None:
        """Open every configured upstream's cache (sweeping interrupted writes)."""
        for upstream in self.settings.upstreams.values():
            await self.site(upstream)

    async def close(self) -> None:
        await self.filler.close()
        for site in self._sites.values():
            await site.client.aclose()
            await site.cache.close()
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
                cache = open_backend(upstream.cache)
                await cache.open()
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
        return await self._manifest_by_tag(site, ref)

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
        return ManifestAnswer(stored, CacheStatus.HIT, upstream.name)

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
            return ManifestAnswer(stored, CacheStatus.HIT, site.settings.name)
        fetched = await self._fetch(site, ref)
        stored = await self._store_manifest(site, ref.repository, fetched)
        return ManifestAnswer(stored, CacheStatus.MISS, site.settings.name, fetched.mirror)

    async def _manifest_by_tag(self, site: UpstreamSite, ref: ImageReference) -> ManifestAnswer:
        assert ref.tag is not None
        record = await site.get_tag(ref.repository, ref.tag)
        stored = await site.get_manifest(record.digest) if record is not None else None
        if record is None or stored is None or not self._fresh(site, record):
            shared = await self._shared_tag(site, ref, record)
            if shared is not None and shared[1] is not None:
                record, stored = shared
        if record is not None and stored is not None and self._fresh(site, record):
            return ManifestAnswer(stored, CacheStatus.HIT, site.settings.name)
        # Upstream must be asked: once for every caller here (coalesced), and once in the
        # cluster (the tag lease).
        return await site.coalescer.run(
            ("tag", ref.repository, ref.tag),
            lambda: self._resolve_tag(site, ref, record, stored),
        )

    async def _resolve_tag(
        self,
        site: UpstreamSite,
        ref: ImageReference,
        record: TagRecord | None,
        stored: StoredManifest | None,
    ) -> ManifestAnswer:
        """Ask upstream about a tag that is not fresh here (``record`` and ``stored``: what
        this replica knows of it), holding the tag's lease; while another replica holds it,
        take the answer it shares instead."""
        lease = await self._tag_lease(site, ref, record)
        if isinstance(lease, ManifestAnswer):
            return lease
        try:
            return await self._ask_upstream(site, ref, record, stored)
        finally:
            if lease is not None:
                await lease.release()

    async def _tag_lease(
        self, site: UpstreamSite, ref: ImageReference, known: TagRecord | None
    ) -> Lease | ManifestAnswer | None:
        """The cluster-wide lease on asking upstream about the tag, or what the replica
        holding it shared meanwhile: its tag record (in Redis) with the manifest (in the
        shared store), or its "not found" (raised). None: ask without the lease (the
        holder's answer cannot be read here, or it took longer than ``retry_deadline``).

        The wait polls on the event loop; a holder that dies stops renewing its lease, which
        expires after ``lock_ttl``: then a waiter takes it over."""
        assert ref.tag is not None
        upstream, policy = site.settings.name, site.settings.policy
        deadline = self.timing.monotonic() + policy.retry_deadline
        while True:
            lease = await self.coordinator.claim_tag(upstream, ref.repository, ref.tag)
            try:
                # Also right after taking the lease: its last holder may have shared its
                # answer just before releasing it.
                shared = await self._shared_tag(site, ref, known)
            except BaseException:  # a cancelled request must not keep the lease renewed
                if lease is not None:
                    await lease.release()
                raise
            if shared is not None:
                if lease is not None:
                    await lease.release()
                stored = shared[1]
                if stored is None:
                    return None  # the manifest is not in this replica's cache: ask for it
                return ManifestAnswer(stored, CacheStatus.HIT, upstream)
            if lease is not None:
                return lease
            missing = await site.known_not_found(ref.repository, ref.tag)
            if missing is not None:
                raise missing
            if self.timing.monotonic() >= deadline:
                log.warning(
                    "%s/%s:%s: the replica asking upstream took over %.0fs; asking as well",
                    upstream,
                    ref.repository,
                    ref.tag,
                    policy.retry_deadline,
                )
                return None
            await self.timing.sleep(TAG_LEASE_POLL)

    async def _ask_upstream(
        self,
        site: UpstreamSite,
        ref: ImageReference,
        record: TagRecord | None,
        stored: StoredManifest | None,
    ) -> ManifestAnswer:
        """Revalidate a known tag with a HEAD, or GET it; the last known answer on a bad day."""
        assert ref.tag is not None
        if record is not None and stored is not None:
            try:
                if await self._still_current(site, ref, record):
                    return ManifestAnswer(stored, CacheStatus.HIT, site.settings.name)
            except RegistryError as error:
                return self._stale_or_raise(site, record, stored, error)
        try:
            fetched = await self._fetch(site, ref)
        except RegistryError as error:
            if record is None or stored is None:
                raise
            return self._stale_or_raise(site, record, stored, error)
        stored = await self._store_manifest(site, ref.repository, fetched)
        await site.put_tag(
            ref.repository,
            ref.tag,
            TagRecord(stored.digest, stored.media_type, len(stored.data), self.clock()),
        )
        return ManifestAnswer(stored, CacheStatus.MISS, site.settings.name, fetched.mirror)

    def _fresh(self, site: UpstreamSite, record: TagRecord) -> bool:
        return self.clock() - record.checked_at < site.settings.policy.tag_ttl

    async def _shared_tag(
        self, site: UpstreamSite, ref: ImageReference, known: TagRecord | None
    ) -> tuple[TagRecord, StoredManifest | None] | None:
        """The tag as another replica confirmed it upstream within tag_ttl, when that is
        newer than what this replica knows, with its manifest when the cache holds it (a
        shared object store does; then no upstream request is needed, and the record is
        kept here too)."""
        assert ref.tag is not None
        record = await site.shared_tag(ref.repository, ref.tag)
        if record is None or not self._fresh(site, record):
            return None
        if known is not None and record.checked_at <= known.checked_at:
            return None
        stored = await site.get_manifest(record.digest)
        if stored is not None:
            await site.put_tag(ref.repository, ref.tag, record, share=False)
        return record, stored

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

    async def _still_current(
        self, site: UpstreamSite, ref: ImageReference, record: TagRecord
    ) -> bool:
        """Revalidate an expired tag with a HEAD; refresh its record when unchanged.

        False when the tag moved or is gone (the GET decides); raises when no mirror could
        answer at all (the caller may serve stale).
        """
        assert ref.tag is not None
        try:
            head = await site.coalescer.run(
                ("head", ref.repository, ref.tag), lambda: site.client.head_manifest(ref)
            )
        except RegistryError as error:
            if error.code is ErrorCode.MANIFEST_UNKNOWN:
                return False
            raise
        if head.digest != record.digest:
            return False
        refreshed = TagRecord(record.digest, record.media_type, record.size, self.clock())
        await site.put_tag(ref.repository, ref.tag, refreshed)
        return True

    def _stale_or_raise(
        self, site: UpstreamSite, record: TagRecord, stored: StoredManifest, error: RegistryError
    ) -> ManifestAnswer:
        """Serve the last known manifest when upstream is down or throttling, within max_stale.

        Never hand a client an upstream 429 when a cached copy exists: containerd retries a
        429 five times at once and then fails the pull.
        """
        policy = site.settings.policy
        age = self.clock() - record.checked_at
        temporary = error.code in (ErrorCode.UNAVAILABLE, ErrorCode.TOOMANYREQUESTS)
        if not temporary or age > policy.tag_ttl + policy.max_stale:
            raise error
        log.warning(
            "serving %s stale (%.0fs old) from %s: %s",
            record.digest,
            age,
            site.settings.name,
            error.message,
        )
        return ManifestAnswer(stored, CacheStatus.STALE, site.settings.name)

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
                CacheStatus.HIT,
                upstream.name,
                _stored(site, digest, size),
                file=functools.partial(site.cache.open_blob, digest),
            )
        fill = site.fills.get(digest)
        if fill is None:
            fill = self.filler.start(site, repository, digest)
        else:
            fill.followers += 1
            self.metrics.followers.labels(upstream.name).inc()
            if fill.repository != repository:
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
            return BlobAnswer(fill.size, CacheStatus.MISS, upstream.name, stream, fill.mirror, file)
        return BlobAnswer(fill.size, CacheStatus.MISS, upstream.name, fill.read, fill.mirror)

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
