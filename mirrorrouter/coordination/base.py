"""What the rest of the gateway sees of coordination: the ``Coordinator`` protocol, the
``Lease`` a claim gives, the ``Holder`` of a claim, and a mirror's ``SharedCircuit``
(the breaker in upstream/breaker.py consults it). The module docstring of the package says
what is shared and how.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mirrorrouter.cache import TagRecord
from mirrorrouter.errors import RegistryError
from mirrorrouter.reference import Digest


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


class SharedCircuit(Protocol):
    """A mirror's circuit as every replica sees it (coordination/redisbacked.py keeps it in Redis).

    Reads answer from the view of the last ``refresh``; writes go out in the background;
    nothing here raises (when the shared store is out, the local breaker decides alone).
    """

    def open_for(self) -> float:
        """Seconds the shared open window still runs, as last seen (0: not open)."""
        ...

    async def refresh(self) -> None:
        """Fetch the shared view."""
        ...

    def failure(self) -> None:
        """Count a failure; at the threshold the circuit opens for every replica."""
        ...

    def opened(self) -> None:
        """This process opened the circuit (a failed probe, or its own count)."""
        ...

    def success(self) -> None:
        """A healthy answer: reset the shared count and close the shared circuit."""
        ...
