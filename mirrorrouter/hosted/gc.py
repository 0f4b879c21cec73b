"""Garbage collection of a hosted set: what stays, what goes.

Every manifest linked into a repository stays, and everything those reference,
transitively (an index's child manifests, configs, layers); the rest goes once older than
``gc_grace``, so a blob pushed just before its manifest is never collected in between.
Upload sessions idle longer than ``upload_ttl`` that no request holds go too. The server
runs it every ``gc_interval`` (schedule.py), ``mirrorrouter gc`` on demand; both through
``HostedStore.collect_garbage``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mirrorrouter.cache import CacheBackend
from mirrorrouter.cache.base import Inventory, Removal, StoredObject
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.coordination.generation import Generation
from mirrorrouter.hosted.uploads import UploadSessions
from mirrorrouter.manifests import INLINE_PARSE_BYTES, referenced_digests
from mirrorrouter.reference import Digest


@dataclass(frozen=True, slots=True)
class GcReport:
    blobs: int  # removed
    manifests: int
    freed: int  # bytes
    uploads: int  # abandoned upload sessions removed
    kept: int  # blobs and manifests still referenced (or too young)


class GarbageCollector:
    """Collects the garbage of one hosted set's storage (a ``HostedStore`` holds one)."""

    def __init__(
        self,
        settings: HostedSettings,
        storage: CacheBackend,
        sessions: UploadSessions,
        generation: Generation,
        *,
        clock: Callable[[], float],
        recount: Callable[[], Awaitable[None]],
    ) -> None:
        """``recount`` counts the set's bytes afresh for its quota after a collection."""
        self.settings = settings
        self.storage = storage
        self.sessions = sessions
        self.generation = generation
        self.clock = clock
        self.recount = recount

    async def collect(self, *, dry_run: bool = False) -> GcReport:
        """Remove blobs and manifests no linked manifest reaches, older than ``gc_grace``,
        and upload sessions idle longer than ``upload_ttl`` that no request holds.

        It walks the whole set, so it keeps off the event loop: the inventory, the sums over
        it and the removal run in threads (taking no lock that waits), and each manifest is
        read with an await, so requests are served between them."""
        inventory = await self.storage.inventory()
        live = await self._reachable(inventory)
        horizon = self.clock() - self.settings.gc_grace
        dead, links = await asyncio.to_thread(_garbage, inventory, live, horizon)
        kept = len(inventory.blobs) + len(inventory.manifests) - len(dead)
        idle = self.clock() - self.settings.upload_ttl
        swept = await asyncio.to_thread(self.sessions.sweep, idle, dry_run=dry_run)
        sessions = swept.sessions
        if dry_run:
            blobs = sum(1 for d in dead if d in inventory.blobs)
            freed = sum(o.size for o in dead.values())
            return GcReport(blobs, len(dead) - blobs, freed, sessions, kept)
        try:
            removed = await self.storage.remove(Removal(frozenset(dead), links=links))
            if removed.in_use:  # all or nothing: collect the rest, leave the busy ones for later
                rest = frozenset(dead) - removed.in_use
                links = tuple(link for link in links if link[1] in rest)
                removed = await self.storage.remove(Removal(rest, links=links))
        finally:
            if dead:
                await self.generation.bump()
        await self.recount()
        blobs = sum(1 for d in removed.removed if d in inventory.blobs)
        return GcReport(
            blobs,
            len(removed.removed) - blobs,
            removed.freed,
            sessions,
            kept + len(dead) - len(removed.removed),
        )

    async def _reachable(self, inventory: Inventory) -> set[Digest]:
        """Every manifest linked into a repository, and everything those reference,
        transitively (an index's child manifests, configs, layers)."""
        manifests = inventory.manifests
        live: set[Digest] = set()
        pending = [d for linked in inventory.links.values() for d in linked if d in manifests]
        while pending:
            digest = pending.pop()
            if digest in live:
                continue
            live.add(digest)
            stored = await self.storage.peek_manifest(digest)
            if stored is None:
                continue
            if len(stored.data) > INLINE_PARSE_BYTES:
                children = await asyncio.to_thread(referenced_digests, stored)
            else:
                children = referenced_digests(stored)
            for child in children:
                if child in manifests:
                    pending.append(child)
                else:
                    live.add(child)
        return live


def _garbage(
    inventory: Inventory, live: set[Digest], horizon: float
) -> tuple[dict[Digest, StoredObject], tuple[tuple[str, Digest], ...]]:
    """What garbage collection removes: the blobs and manifests not ``live`` last touched
    before ``horizon``, and the repository links naming them."""
    dead = {
        digest: obj
        for table in (inventory.blobs, inventory.manifests)
        for digest, obj in table.items()
        if digest not in live and obj.accessed < horizon
    }
    links = tuple(
        (repository, digest)
        for repository, linked in inventory.links.items()
        for digest in linked
        if digest in dead
    )
    return dead, links
