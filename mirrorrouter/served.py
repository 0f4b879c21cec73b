"""What a target serves a pull, in typed values: the answers of an upstream through its
cache (pull/) and of a hosted set (hosted/), which the HTTP layer renders and a group
passes on from the member that answered (api/groups.py)."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mirrorrouter.cache import StoredManifest
from mirrorrouter.oci import CacheResult


class Memory(enum.Enum):
    """What memory alone may say of a member of a group besides an answer."""

    MISSING = "missing"  # for certain, the member does not have the reference


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    manifest: StoredManifest
    cache: CacheResult
    upstream: str
    mirror: str | None = None  # the mirror that served a miss


@dataclass(frozen=True, slots=True)
class BlobAnswer:
    """A blob to serve: from the cache, or from a fill in progress."""

    size: int | None
    cache: CacheResult
    upstream: str
    stream: Callable[[int, int | None], AsyncIterator[bytes]]
    mirror: str | None = None  # the mirror a miss comes from
