"""What the instances over one bucket root share within one process (``SHARED``): the
spool's ``SharedState`` plus the downloads claimed here and the bucket reads being kept as
local copies. The claim across replicas is the coordinator's business, not this backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mirrorrouter.cache.spool import SharedState
from mirrorrouter.reference import Digest


@dataclass(slots=True)
class SharedBucketState(SharedState):
    """``SharedState`` plus the claims of downloads made in this process and the blobs
    whose bucket reads are being kept as local copies."""

    claims: set[Digest] = field(default_factory=set)
    warming: set[Digest] = field(default_factory=set)


SHARED: dict[tuple[str, str, str], SharedBucketState] = {}


class MemoryClaim:
    """A digest's download claimed within this process."""

    def __init__(self, claims: set[Digest], digest: Digest) -> None:
        self._claims: set[Digest] | None = claims
        self._digest = digest

    def release(self) -> None:
        if self._claims is not None:
            self._claims.discard(self._digest)
            self._claims = None
