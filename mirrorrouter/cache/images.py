"""A cache's content arranged into images, the unit of eviction.

- An *image* is a top-level manifest (one no other cached manifest references: an image
  manifest or an index) with every manifest and blob it reaches (an index's child
  manifests, their config and layers). Its manifests, its tag records and the blobs no
  other remaining image references go together, so a kept manifest is never stripped of
  its blobs by eviction. A blob that no cached manifest references (its manifest was never
  cached, or was removed by hand) is an image of its own. A manifest can still lack blobs
  it never had (a client pulled one platform of an index); a pull then fetches them
  upstream like any miss.
- The **last access** of an image is the latest access of its manifests and of the blobs
  only it references (a base layer shared with a busy image does not keep an idle image
  alive).
- Everything a pin reaches is marked pinned (pins.py).

The areas are the caches eviction looks at: every configured upstream's, and caches of
registries admitted by ``allow_unconfigured`` found on disk; never a hosted set's.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mirrorrouter.cache.base import Inventory
from mirrorrouter.cache.pins import Pins
from mirrorrouter.config import CacheSettings, Settings
from mirrorrouter.reference import Digest


@dataclass(frozen=True, slots=True)
class CacheArea:
    """One upstream's cache directory as eviction sees it."""

    name: str  # the upstream's registry name
    directory: Path
    max_size: int | None
    configured: bool  # False: found on disk (a registry admitted by allow_unconfigured)
    cache: CacheSettings | None = None  # how to open it; None: a filesystem cache there


def cache_areas(settings: Settings) -> list[CacheArea]:
    """Every configured upstream's cache, and caches of unconfigured registries on disk.

    Hosted repository sets are never areas: they are the only copy of what was pushed,
    wherever their directory is.
    """
    areas = [
        CacheArea(u.name, u.cache.directory, u.cache.max_size, True, u.cache)
        for u in settings.upstreams.values()
    ]
    known = {os.path.abspath(a.directory) for a in areas}
    known |= {os.path.abspath(h.storage.directory) for h in settings.hosted.values()}
    with contextlib.suppress(OSError):
        for entry in sorted(settings.cache.directory.iterdir()):
            if (
                entry.is_dir()
                and not entry.name.startswith("_")  # _hosted/: hosted sets by default
                and os.path.abspath(entry) not in known
                and (entry / "blobs").is_dir()
            ):
                areas.append(CacheArea(_registry_of(entry.name), entry, None, False))
    return areas


def _registry_of(dirname: str) -> str:
    """The registry name of a cache directory (``cache_dirname`` turned ``:`` into ``_``)."""
    match = re.fullmatch(r"(.+)_(\d+)", dirname)
    return f"{match[1]}:{match[2]}" if match else dirname


@dataclass(slots=True)
class Image:
    """The unit of eviction: a top-level manifest with what it reaches, or a loose blob."""

    root: Digest
    is_manifest: bool
    members: frozenset[Digest]  # the stored manifests and blobs it reaches (root included)
    size: int  # bytes of its members, shared ones included
    accessed: float
    complete: bool  # every digest it references is stored
    pinned_by: str | None = None
    tags: tuple[tuple[str, str], ...] = ()  # (repository, tag) naming the root
    evicted: bool = False


@dataclass(slots=True)
class Survey:
    """One cache's content arranged into images, with its pins."""

    area: CacheArea
    inventory: Inventory
    references: dict[Digest, tuple[Digest, ...]]  # per stored manifest
    images: list[Image]
    pinned: dict[Digest, str]  # every digest a pin reaches -> the pattern
    owners: Counter[Digest]  # how many images (not evicted) reach each digest
    usage: int  # stored bytes + in flight, kept current as images go

    def reach(self, digest: Digest) -> set[Digest]:
        """``digest`` and everything reachable from it through stored manifests."""
        seen: set[Digest] = set()
        stack = [digest]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            stack.extend(self.references.get(current, ()))
        return seen

    def describe(self, digest: Digest) -> tuple[int, float, bool]:
        """Stored bytes, last access and completeness of what ``digest`` reaches."""
        inventory = self.inventory
        reached = self.reach(digest)
        stored = [inventory.manifests.get(d) or inventory.blobs.get(d) for d in reached]
        objects = [o for o in stored if o is not None]
        accessed = max((o.accessed for o in objects), default=0.0)
        return sum(o.size for o in objects), accessed, len(objects) == len(reached)


def survey_of(
    area: CacheArea,
    inventory: Inventory,
    references: dict[Digest, tuple[Digest, ...]],
    pins: Pins,
) -> Survey:
    """The cache's content (``inventory``, with what each stored manifest references)
    arranged into images, with what pins reach."""
    survey = Survey(area, inventory, references, [], {}, Counter(), 0)
    survey.usage = inventory.stored_bytes + inventory.in_flight
    _pin(survey, pins)
    _arrange(survey)
    return survey


def stored_bytes(survey: Survey, digests: frozenset[Digest]) -> int:
    inventory = survey.inventory
    return sum(
        o.size
        for d in digests
        for o in (inventory.blobs.get(d), inventory.manifests.get(d))
        if o is not None
    )


def _pin(survey: Survey, pins: Pins) -> None:
    """Mark everything a pinned tag (or pinned digest) reaches."""
    registry = survey.area.name
    inventory = survey.inventory
    for (repository, tag), record in inventory.tags.items():
        pattern = pins.match_tag(f"{registry}/{repository}", tag)
        if pattern is not None:
            for digest in survey.reach(record.digest):
                survey.pinned.setdefault(digest, pattern)
    if not any("@" in p for p in pins.patterns):
        return
    for repository, linked in inventory.links.items():
        for digest in linked:
            if digest in inventory.manifests:
                pattern = pins.match_digest(f"{registry}/{repository}", digest)
                if pattern is not None:
                    for reached in survey.reach(digest):
                        survey.pinned.setdefault(reached, pattern)


def _arrange(survey: Survey) -> None:
    """Group the stored content into images and count who reaches what."""
    inventory = survey.inventory
    children = {d for refs in survey.references.values() for d in refs}
    images: list[Image] = []
    for digest in inventory.manifests:
        if digest in children:
            continue
        reached = survey.reach(digest)
        members = frozenset(d for d in reached if d in inventory.manifests or d in inventory.blobs)
        survey.owners.update(members)
        images.append(
            Image(
                digest,
                True,
                members,
                stored_bytes(survey, members),
                0.0,
                complete=len(members) == len(reached),
                pinned_by=survey.pinned.get(digest),
            )
        )
    for image in images:
        # A manifest is in every image that reaches it; a shared blob does not count, or a
        # busy image's base layer would keep every idle image over it alive.
        times = [
            o.accessed
            for d in image.members
            for o in (inventory.manifests.get(d), inventory.blobs.get(d))
            if o is not None and (d in inventory.manifests or survey.owners[d] == 1)
        ]
        image.accessed = max(times, default=0.0)
        image.tags = tuple(sorted(k for k, r in inventory.tags.items() if r.digest == image.root))
    for digest, stored in inventory.blobs.items():
        if survey.owners[digest] == 0:
            survey.owners[digest] = 1
            images.append(
                Image(
                    digest,
                    False,
                    frozenset({digest}),
                    stored.size,
                    stored.accessed,
                    complete=True,
                    pinned_by=survey.pinned.get(digest),
                )
            )
    survey.images = images
