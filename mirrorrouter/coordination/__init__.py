"""Coordination among replicas: fill locks, shared negative and tag caches, circuit state.

mirrorrouter may run as N stateless replicas behind a load balancer, sharing one object
store (the cache) and one Redis for coordination. ``Coordinator`` is what the rest sees:

- **fill locks**: ``claim(upstream, digest)`` takes the cluster-wide lock on one blob's
  download (a ``Lease``), or returns None while another replica holds it; ``holder`` names
  that replica's ``advertise_url`` so followers stream the download from it (fill.py);
- **tag leases**: ``claim_tag(upstream, repository, tag)``, the same kind of lock on asking
  upstream about one tag: the holder asks and shares the answer (the tag record below, the
  manifest in the shared store), the others wait for it (pullthrough.py);
- **shared negative cache**: an upstream "not found" per (upstream, repository, reference),
  for the upstream's ``negative_ttl``;
- **shared tag checks**: the last upstream confirmation of a tag, so a tag checked through
  one replica is fresh on every replica within ``tag_ttl``, with no upstream request;
- **shared circuits**: a mirror's consecutive failures and open window, so one replica's
  failures open the circuit for all (``circuit``, consulted by breaker.py);
- **housekeeping chores**: ``claim_chore`` takes the cluster-wide lease on a chore that one
  replica at a time runs (a hosted set's scheduled garbage collection), and the chore's
  record (``chore_record``, when it last ran and what it did) is kept for all to read.
- **hosted generations**: a counter per hosted set that every push bumps, so memory
  answers for the set stay certain on every replica (generation.py).

``LocalCoordinator`` is one replica on its own (the default): fill locks in memory, nothing
else shared (the site's memory caches and the local breakers are the whole truth).
``RedisCoordinator`` (redisbacked.py) keeps everything in Redis. Its keys (``P`` is
``key_prefix``, ``U`` the upstream's name, ``R`` a repository)::

    P:fill:U@<digest>              "<token> <advertise_url>"  PX lock_ttl, renewed every
                                                              lock_ttl/3 by the holder
    P:resolve:U/R:<tag>            "<token> <advertise_url>"  the same, for a tag lease
    P:tag:U/R:<tag>                JSON tag record            PX what is left of tag_ttl
    P:notfound:U/R:<reference>     JSON error                 PX negative_ttl
    P:circuit:U:<mirror>:failures  consecutive failures       PX FAILURE_WINDOW (INCR)
    P:circuit:U:<mirror>:open      "1"                        PX the breaker's cooldown
    P:upload:<id>                  the holder's advertise_url PX the hosted set's gc_grace
    P:chore:<chore>                "<token> <advertise_url>"  PX lock_ttl, renewed (a lease)
    P:chore:<chore>:record         JSON, the chore's last run PX what the chore asks
    P:generation:<hosted set>      a counter (INCR; created   no expiry
                                   at a random value)

A lock is released by compare-and-delete (a Lua script), so a replica never deletes a lock
it no longer holds; a holder that dies stops renewing and its lock expires after lock_ttl.

**Redis never fails a pull.** Every Redis error (down, timeout, a bad answer) is logged as a
warning once per outage and the operation falls back to local behaviour (fail open): a
claim is granted by the local lock table, lookups miss, writes are dropped, and Redis is
not asked again for ``OUTAGE_BACKOFF`` seconds. At worst two replicas fetch one blob or
revalidate one tag each; nothing is served that was not verified.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mirrorrouter.cache import TagRecord
from mirrorrouter.config.model import CoordinationSettings
from mirrorrouter.errors import RegistryError
from mirrorrouter.reference import Digest
from mirrorrouter.upstream.breaker import SharedCircuit

log = logging.getLogger("mirrorrouter.coordination")


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a fill lock: its lease token and how other replicas reach it."""

    token: str
    url: str | None


class Lease(Protocol):
    """A held fill lock; kept alive until ``release``."""

    @property
    def token(self) -> str:
        """Proves the holder to its peers (fill.py's peer endpoint checks it)."""
        ...

    @property
    def lost(self) -> bool:
        """The lock expired while held (another replica may have taken it)."""
        ...

    async def release(self) -> None: ...


class Coordinator(Protocol):
    """What replicas share; every method fails open (see the module docstring)."""

    @property
    def shared(self) -> bool:
        """Whether anything is shared with other replicas (False: one replica alone)."""
        ...

    @property
    def lock_ttl(self) -> float: ...

    @property
    def advertise_url(self) -> str | None:
        """How the other replicas reach this one; None: they cannot follow its downloads."""
        ...

    async def claim(self, upstream: str, digest: Digest) -> Lease | None:
        """The cluster-wide lock on one blob's download; None while another holds it."""
        ...

    async def holder(self, upstream: str, digest: Digest) -> Holder | None: ...

    async def claim_tag(self, upstream: str, repository: str, tag: str) -> Lease | None:
        """The cluster-wide lease on asking upstream about one tag; None while another holds
        it (it shares the answer through ``put_tag``)."""
        ...

    async def get_not_found(
        self, upstream: str, repository: str, reference: str
    ) -> RegistryError | None:
        """An upstream "not found" another replica remembered, within negative_ttl."""
        ...

    async def put_not_found(
        self, upstream: str, repository: str, reference: str, error: RegistryError, ttl: float
    ) -> None: ...

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        """A tag as some replica last confirmed it upstream (within the TTL it was put with)."""
        ...

    async def put_tag(
        self, upstream: str, repository: str, tag: str, record: TagRecord, ttl: float
    ) -> None: ...

    def circuit(
        self, upstream: str, mirror: str, *, threshold: int, cooldown: float
    ) -> SharedCircuit | None:
        """The shared circuit state of one mirror (by URL); None: the breaker is local."""
        ...

    async def put_upload(self, upload_id: str, ttl: float) -> None:
        """Say that this replica holds a push's upload session (hosted repositories)."""
        ...

    async def upload_owner(self, upload_id: str) -> str | None:
        """The ``advertise_url`` of the replica holding an upload session; None: unknown."""
        ...

    async def claim_chore(self, chore: str) -> Lease | None:
        """The cluster-wide lease on a housekeeping chore; None while another replica runs
        it. Redis out: granted (each machine's own lock still holds its workers back)."""
        ...

    async def chore_record(self, chore: str) -> str | None:
        """What the chore's last run recorded, by whichever replica; None: nothing known."""
        ...

    async def put_chore_record(self, chore: str, record: str, ttl: float) -> None: ...

    async def bump_generation(self, hosted: str) -> None:
        """A hosted set changed: move its shared generation (generation.py)."""
        ...

    async def generations(self, hosted: Sequence[str]) -> dict[str, int] | None:
        """The shared generations of these hosted sets (0: never bumped); None when nothing
        is shared or the answer could not be had."""
        ...

    async def close(self) -> None: ...


def open_coordinator(
    settings: CoordinationSettings, *, clock: Callable[[], float] = time.monotonic
) -> Coordinator:
    """The coordinator the settings name (``backend`` "local" or "redis")."""
    if settings.backend == "redis":
        # Imported here: redisbacked builds on this module's types.
        from mirrorrouter.coordination.redisbacked import RedisCoordinator

        return RedisCoordinator(settings, clock=clock)
    if settings.backend == "local":
        return LocalCoordinator(settings)
    raise ValueError(f"unknown coordination backend {settings.backend!r}")


# ---------------------------------------------------------------------- one replica


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
