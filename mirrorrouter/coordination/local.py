"""``LocalCoordinator``: one replica on its own, the default. Fill locks, tag leases and
chore leases are in this process's memory; nothing else is shared (the sites' memory and
the local breakers are the whole truth)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from mirrorrouter.cache import TagRecord
from mirrorrouter.config.model import CoordinationSettings
from mirrorrouter.coordination.base import Holder, Lease, SharedCircuit
from mirrorrouter.errors import RegistryError
from mirrorrouter.reference import Digest


class LocalCoordinator:
    """One replica alone: fill locks and tag leases in this process's memory, nothing else
    shared."""

    shared = False

    def __init__(self, settings: CoordinationSettings | None = None) -> None:
        settings = settings or CoordinationSettings()
        self.lock_ttl = settings.lock_ttl
        self.advertise_url = settings.advertise_url
        self._locks: dict[tuple[str, ...], _LocalLease] = {}

    def _claim(self, key: tuple[str, ...]) -> Lease | None:
        if key in self._locks:
            return None
        lease = self._locks[key] = _LocalLease(self._locks, key)
        return lease

    async def claim(self, upstream: str, digest: Digest) -> Lease | None:
        return self._claim((upstream, str(digest)))

    async def holder(self, upstream: str, digest: Digest) -> Holder | None:
        lease = self._locks.get((upstream, str(digest)))
        return None if lease is None else Holder(lease.token, self.advertise_url)

    async def claim_tag(self, upstream: str, repository: str, tag: str) -> Lease | None:
        return self._claim(("tag", upstream, repository, tag))

    async def get_not_found(
        self, upstream: str, repository: str, reference: str
    ) -> RegistryError | None:
        return None  # the site's own memory is the negative cache

    async def put_not_found(
        self, upstream: str, repository: str, reference: str, error: RegistryError, ttl: float
    ) -> None:
        return None

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        return None  # the site's own memory and cache hold the tag records

    async def put_tag(
        self, upstream: str, repository: str, tag: str, record: TagRecord, ttl: float
    ) -> None:
        return None

    def circuit(
        self, upstream: str, mirror: str, *, threshold: int, cooldown: float
    ) -> SharedCircuit | None:
        return None

    async def put_upload(self, upload_id: str, ttl: float) -> None:
        return None  # one replica: every session is here

    async def upload_owner(self, upload_id: str) -> str | None:
        return None

    async def claim_chore(self, chore: str) -> Lease | None:
        return self._claim(("chore", chore))

    async def chore_record(self, chore: str) -> str | None:
        return None  # one replica: the chore keeps its record in its own storage

    async def put_chore_record(self, chore: str, record: str, ttl: float) -> None:
        return None

    async def bump_generation(self, hosted: str) -> None:
        return None  # one replica: the counter file is the whole truth

    async def generations(self, hosted: Sequence[str]) -> dict[str, int] | None:
        return None

    async def close(self) -> None:
        return None


class _LocalLease:
    def __init__(self, table: dict[tuple[str, ...], _LocalLease], key: tuple[str, ...]):
        self.token = secrets.token_hex(16)
        self.lost = False
        self._table = table
        self._key = key

    async def release(self) -> None:
        if self._table.get(self._key) is self:
            del self._table[self._key]
