"""The hosted repository sets of one process: a ``HostedStore`` per set, the chores that
keep them (housekeeping.py: each set's upload sweep and quota recount, its scheduled gc),
the view of the generations other replicas bump (sets on an object store), and what pulls
read from them (``manifest``, ``memory_manifest``, ``blob``, ``tags``, ``referrers``).
The push API over HTTP is api.py's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from mirrorrouter.cache import StoredManifest
from mirrorrouter.config import Settings
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.coordination import Coordinator, LocalCoordinator
from mirrorrouter.coordination.generation import SharedGenerations
from mirrorrouter.hosted.housekeeping import Chore, Housekeeper, sweep_interval
from mirrorrouter.hosted.schedule import GcSchedule
from mirrorrouter.hosted.store import HostedStore, StoredBlob
from mirrorrouter.manifests import Descriptor, accepts, child_for_client
from mirrorrouter.metrics import Metrics
from mirrorrouter.oci import CacheResult
from mirrorrouter.reference import ImageReference
from mirrorrouter.served import ManifestAnswer, Memory

log = logging.getLogger("mirrorrouter.hosted")


class HostedSets:
    """Every hosted set of the configuration, open while the app runs."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        coordinator: Coordinator | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``coordinator`` shares generations, gc leases and records with other replicas."""
        self.settings = settings
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self.stores = {
            name: HostedStore(hosted, clock=clock, coordinator=self.coordinator)
            for name, hosted in settings.hosted.items()
        }
        # Keeps the view of the generations other replicas bump fresh (sets on an object store)
        self.generations = SharedGenerations([s.generation for s in self.stores.values()])
        self.gc = {
            name: GcSchedule(store, self.coordinator, metrics=metrics)
            for name, store in self.stores.items()
        }
        self.housekeeper = Housekeeper(
            [
                Chore(
                    f"hosted {name}",
                    sweep_interval(store.settings.upload_ttl),
                    _sweep(store, metrics),
                )
                for name, store in self.stores.items()
            ]
            + [
                Chore(f"gc of hosted {name}", schedule.check_interval, schedule.tick)
                for name, schedule in self.gc.items()
                if schedule.interval
            ]
        )

    async def start(self) -> None:
        await asyncio.gather(*(store.open() for store in self.stores.values()))
        self.housekeeper.start()
        self.generations.start()

    async def close(self) -> None:
        await self.generations.stop()
        await self.housekeeper.stop()
        await asyncio.gather(*(store.close() for store in self.stores.values()))

    def store(self, hosted: HostedSettings) -> HostedStore:
        return self.stores[hosted.name]

    async def manifest(
        self, hosted: HostedSettings, ref: ImageReference, accept: tuple[str, ...]
    ) -> StoredManifest:
        """The manifest in a form the client accepts (an index's linux/amd64 child for a
        client that takes no index types, as for pulled images)."""
        store = self.store(hosted)
        stored = await store.manifest(ref.repository, ref.tag, ref.digest)
        child = child_for_client(stored, accept)
        if child is None:
            return stored
        return await store.manifest(ref.repository, None, child)

    def memory_manifest(
        self, hosted: HostedSettings, ref: ImageReference, accept: tuple[str, ...]
    ) -> ManifestAnswer | Literal[Memory.MISSING] | None:
        """The answer memory gives for certain (memory.py, ``known_manifest``): the manifest,
        ``Memory.MISSING`` when the repository has no such reference, None when memory cannot
        say (then the full path reads the storage). A manifest the client does not accept
        (an index for a client without index types) is the full path's to answer."""
        known = self.stores[hosted.name].known_manifest(ref.repository, ref.digest or ref.tag or "")
        if known is None:
            return None
        if known.manifest is None:
            return Memory.MISSING
        if not accepts(accept, known.manifest.media_type):
            return None
        return ManifestAnswer(known.manifest, CacheResult.HOSTED, hosted.name)

    async def blob(self, hosted: HostedSettings, ref: ImageReference) -> StoredBlob:
        assert ref.digest is not None
        return await self.store(hosted).blob(ref.repository, ref.digest)

    async def tags(self, hosted: HostedSettings, ref: ImageReference) -> list[str]:
        return await self.store(hosted).tags(ref.repository)

    async def referrers(
        self, hosted: HostedSettings, ref: ImageReference, artifact_type: str | None
    ) -> list[Descriptor]:
        assert ref.digest is not None
        return await self.store(hosted).referrers(ref.repository, ref.digest, artifact_type)


def _sweep(store: HostedStore, metrics: Metrics | None) -> Callable[[], Awaitable[None]]:
    """One housekeeping round of a hosted set, counted, and logged when it removed
    something."""

    async def sweep() -> None:
        swept = await store.housekeep()
        if metrics is not None:
            metrics.upload_sweep(store.settings.name, swept.sessions)
        if swept.sessions:
            log.info(
                "hosted %s: swept %d upload sessions idle longer than %.0fs (%d bytes)",
                store.settings.name,
                swept.sessions,
                store.settings.upload_ttl,
                swept.bytes,
            )

    return sweep
