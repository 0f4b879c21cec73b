"""What a target serves a pull, in typed values: the answers of an upstream through its
cache (pull/) and of a hosted set (hosted/), which the HTTP layer renders and a group
passes on from the member that answered (api/groups.py)."""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mirrorrouter.cache import BlobFile, StoredManifest
from mirrorrouter.manifests import Descriptor, referrers_in
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
    file: BlobFile | None = None  # a committed blob's local file: zero-copy sending
    # Where the client may fetch a cached blob instead (a presigned object-store URL).
    location: str | None = None


@dataclass(frozen=True, slots=True)
class TagList:
    """A target's tags: a hosted set's (``tags``, paginated by the gateway), or an
    upstream's page as it answered (``page``, passed to the client byte for byte, with the
    ``link`` to its next page)."""

    tags: tuple[str, ...] = ()
    upstream: str | None = None  # the upstream whose own page this is
    page: bytes | None = None
    link: str | None = None

    def names(self) -> list[str]:
        """Every tag it names; of an upstream's page, what is a string in its ``tags``
        (upstreams are not ours to fix)."""
        if self.page is None:
            return list(self.tags)
        try:
            body = json.loads(self.page)
        except ValueError:
            return []
        if isinstance(body, dict) and isinstance(body.get("tags"), list):
            return [t for t in body["tags"] if isinstance(t, str)]
        return []


@dataclass(frozen=True, slots=True)
class Referrers:
    """The referrers of a digest: the OCI index to answer with, whether ``artifactType``
    filtered it, and the descriptors it lists (``None``: read from the index, which an
    upstream wrote)."""

    index: bytes
    filtered: bool
    listed: tuple[Descriptor, ...] | None = None
    upstream: str | None = None  # the upstream whose own index this is

    def descriptors(self) -> tuple[Descriptor, ...]:
        return self.listed if self.listed is not None else referrers_in(self.index)
