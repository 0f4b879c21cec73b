"""Tags move: what a tag names now, asked upstream no more often than it must be.

- Within the upstream's ``tag_ttl`` the cached answer is served with no upstream request
  (also when another replica confirmed the tag within it: the coordinator shares tag
  records).
- After it, a HEAD revalidates (Docker Hub does not count HEADs against its pull quota) and
  a GET follows only when the digest changed.
- Upstream is asked once for every caller of this process (coalesced) and once in the
  cluster: the tag's lease (``P:resolve:...``); the other replicas poll, on the event loop,
  for what the holder shares, its tag record (in Redis) with the manifest (in the shared
  store), or its "not found".
- When every mirror fails or throttles, the last known manifest is served (stale-if-error,
  bounded by ``max_stale``) rather than an error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from mirrorrouter.cache import StoredManifest, TagRecord
from mirrorrouter.coordination import Coordinator, Lease
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.oci import CacheResult
from mirrorrouter.pull.site import UpstreamSite
from mirrorrouter.reference import ImageReference
from mirrorrouter.served import ManifestAnswer
from mirrorrouter.timing import Timing
from mirrorrouter.upstream.results import FetchedManifest

log = logging.getLogger("mirrorrouter.pullthrough")

TAG_LEASE_POLL = 0.05  # seconds between looks at what the replica asking about a tag shared


class TagResolver:
    """Answers manifests by tag for the pull-through (see the module docstring)."""

    def __init__(
        self,
        coordinator: Coordinator,
        timing: Timing,
        *,
        fetch: Callable[[UpstreamSite, ImageReference], Awaitable[FetchedManifest]],
        store: Callable[[UpstreamSite, str, FetchedManifest], Awaitable[StoredManifest]],
    ) -> None:
        """``fetch`` GETs a manifest upstream (coalesced, "not found" remembered) and
        ``store`` keeps what came, as the pull-through does for any manifest."""
        self.coordinator = coordinator
        self.timing = timing
        self.clock = timing.wall
        self.fetch = fetch
        self.store = store

    async def manifest(self, site: UpstreamSite, ref: ImageReference) -> ManifestAnswer:
        """The manifest ``ref``'s tag names, by the rules above."""
        assert ref.tag is not None
        record = await site.get_tag(ref.repository, ref.tag)
        stored = await site.get_manifest(record.digest) if record is not None else None
        if record is None or stored is None or not self._fresh(site, record):
            shared = await self._shared_tag(site, ref, record)
            if shared is not None and shared[1] is not None:
                record, stored = shared
        if record is not None and stored is not None and self._fresh(site, record):
            return ManifestAnswer(stored, CacheResult.HIT, site.settings.name)
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
                return ManifestAnswer(stored, CacheResult.HIT, upstream)
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
                    return ManifestAnswer(stored, CacheResult.HIT, site.settings.name)
            except RegistryError as error:
                return self._stale_or_raise(site, record, stored, error)
        try:
            fetched = await self.fetch(site, ref)
        except RegistryError as error:
            if record is None or stored is None:
                raise
            return self._stale_or_raise(site, record, stored, error)
        stored = await self.store(site, ref.repository, fetched)
        await site.put_tag(
            ref.repository,
            ref.tag,
            TagRecord(stored.digest, stored.media_type, len(stored.data), self.clock()),
        )
        return ManifestAnswer(stored, CacheResult.MISS, site.settings.name, fetched.mirror)

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
        return ManifestAnswer(stored, CacheResult.STALE, site.settings.name)
