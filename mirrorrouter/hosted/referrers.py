"""The referrers of a hosted repository: its manifests whose ``subject`` names a digest,
as an OCI index lists them (``GET /v2/<name>/referrers/<digest>``).

Every manifest linked into the repository is a candidate. Whether a manifest has a subject,
and the descriptor it is listed by, depends on its bytes alone, so it is remembered by
digest (the last ``REMEMBERED_MANIFESTS``) and never goes stale: a listing reads the
repository's links, and only the manifests it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachetools import LRUCache

from mirrorrouter.cache import CacheBackend
from mirrorrouter.manifests import Descriptor, as_referrer, read_tolerant
from mirrorrouter.reference import Digest

REMEMBERED_MANIFESTS = 10_000  # manifests whose subject (or lack of one) is remembered


@dataclass(frozen=True, slots=True)
class _Referrer:
    """A manifest with a ``subject``, as the referrers index of that subject lists it."""

    subject: Digest
    descriptor: Descriptor


class ReferrerIndex:
    """The referrers of the repositories of one hosted set's storage."""

    def __init__(self, storage: CacheBackend) -> None:
        self.storage = storage
        self._referrers: LRUCache[Digest, _Referrer | None] = LRUCache(maxsize=REMEMBERED_MANIFESTS)

    async def referrers(
        self, repository: str, digest: Digest, artifact_type: str | None
    ) -> list[Descriptor]:
        """The repository's manifests whose subject is ``digest``, as an OCI index lists them."""
        descriptors = []
        for candidate in sorted(await self.storage.linked(repository), key=str):
            referrer = await self._referrer(candidate)
            if referrer is None or referrer.subject != digest:
                continue
            if artifact_type and referrer.descriptor.artifact_type != artifact_type:
                continue
            descriptors.append(referrer.descriptor)
        return descriptors

    async def _referrer(self, digest: Digest) -> _Referrer | None:
        """The manifest as a referrer; None when it has no subject (or is unreadable)."""
        if digest in self._referrers:
            return self._referrers[digest]
        stored = await self.storage.peek_manifest(digest)
        parsed = read_tolerant(stored.data, stored.media_type) if stored is not None else None
        referrer = None
        if stored is not None and parsed is not None and parsed.subject is not None:
            descriptor = as_referrer(parsed, digest, len(stored.data))
            referrer = _Referrer(parsed.subject.digest, descriptor)
        self._referrers[digest] = referrer
        return referrer
