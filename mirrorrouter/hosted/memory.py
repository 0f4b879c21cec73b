"""What pulls of a hosted set read of its manifests, remembered with a generation.

Every change a pull can see (a blob or manifest linked, a tag put or deleted, a manifest
deleted, garbage collected) bumps the set's generation (coordination/generation.py) once
stored. What a pull read of a manifest, or of its absence, is remembered under the
generation read *before* it, so a push meanwhile moves the generation on and the memory is
not trusted; it is answered from (``recall``) only while the generation has not moved. It
is the hot path of group pulls: no I/O. The memory holds up to ``KNOWN_MEMORY_BYTES`` of
manifests, the least recently used forgotten first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import LRUCache

from mirrorrouter.cache import StoredManifest
from mirrorrouter.coordination.generation import Generation, Stamp
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.reference import Digest

KNOWN_MEMORY_BYTES = 64 * 1024 * 1024  # manifests (and absences) remembered, with a generation


@dataclass(frozen=True, slots=True)
class KnownManifest:
    """What a pull read of a reference, under the generation read before it."""

    stamp: Stamp
    learnt: float  # monotonic seconds
    manifest: StoredManifest | None  # None: the repository does not have the reference


class ManifestMemory:
    """The manifests (and absences) pulls of one hosted set read, by repository and tag or
    digest."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self._known: LRUCache[tuple[str, Digest | str], KnownManifest] = LRUCache(
            maxsize=KNOWN_MEMORY_BYTES,
            getsizeof=lambda k: 200 + (len(k.manifest.data) if k.manifest else 0),
        )

    async def read(
        self,
        repository: str,
        reference: Digest | str,
        read: Callable[[], Awaitable[StoredManifest]],
    ) -> StoredManifest:
        """What ``read`` finds of the reference, remembered: the manifest, or that there is
        none (it raises ``MANIFEST_UNKNOWN``)."""
        key = (repository, reference)
        stamp = self.generation.stamp()  # before reading: a push meanwhile moves it on
        learnt = self.generation.monotonic()
        try:
            stored = await read()
        except RegistryError as error:
            if error.code is ErrorCode.MANIFEST_UNKNOWN:
                self._known[key] = KnownManifest(stamp, learnt, None)
            raise
        self._known[key] = KnownManifest(stamp, learnt, stored)
        return stored

    def recall(self, repository: str, reference: Digest | str) -> KnownManifest | None:
        """What memory knows for certain of the reference; None when it cannot say (never
        read, or the set changed since)."""
        known = self._known.get((repository, reference))
        if known is None or not self.generation.confirms(known.stamp, known.learnt):
            return None
        return known
