"""Shadowing: what a push into a hosted set may hide from the clients of a group, and the
blobs such a push shares with an upstream.

**Why a guard.** A group asks its members in order, so a hosted member placed before
docker.io answers for every name pushed to it: a push of ``library/alpine:3.19`` would
then mean the pusher's image for every client of the group (dependency confusion; Nexus
groups have the same weakness). The guard protects names, not users: it applies with and
without ``[auth]``, after the access rules allowed the push.

**What it refuses.** A push into repository R of hosted set H is checked against every
group H is a member of, and in each against the upstream members placed *after* H (those
before H answer first, so H cannot hide them): R as that upstream U names it (``alpine``
is ``library/alpine`` on docker.io). The push is refused with ``403 DENIED`` naming U when
U has that repository:

- this mirror's cache of U knows it (tag records or repository links), or
- U answers for it: its tag list names a tag, or, at a manifest ``PUT`` by tag, the tag
  itself answers a ``HEAD`` (for registries whose tag lists are closed).

When U cannot be asked (unreachable, 5xx, throttling, circuit open), the push is refused
with ``503 UNAVAILABLE`` naming U: fail closed, since a push let through then may shadow
it once it is back. H's ``allow_shadow`` patterns (repository globs, over R as H names it
or as U does) lift the guard where they match; a push rule is no such permission. A push
straight to H's own route is treated the same as one through the group: what the guard
protects is what the group's clients see, whichever way the content came in.

**When it checks.** At the start of every upload (the ``POST`` of a session, a monolithic
upload or a mount), so a push is refused before its layers travel, and at every manifest
``PUT``, the decisive point where a tag or digest becomes visible. The chunks of an admitted
session are not checked again. Verdicts are remembered per (upstream, repository) and
(upstream, repository, tag) for ``VERDICT_SECONDS`` in this process, so a push of twenty
layers asks the upstream once; concurrent checks share one question; failures are never
remembered.

What ``check-config`` and ``gc --dry-run`` say about shadowing is cli/shadows.py's.

**Copy-in.** A client pushing next to an upstream name (``dev/library/alpine:patched``,
allowed by ``allow_shadow``) finds the shared base layers through the group with a blob
``HEAD`` (answered by the upstream member, as for a pull) and does not upload them; the
manifest ``PUT`` into H then names blobs H lacks. ``copy_sources`` lets the hosted store
copy exactly those blobs in, verified by digest, from the upstream members of H's groups
that the pusher may pull, through the pull-through path (the cached blob, or fetched):
see ``HostedStore.put_manifest`` and blobs.py's ``copy_in``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from cachetools import TTLCache

from mirrorrouter.access.clientauth import Identity
from mirrorrouter.access.policy import AccessPolicy
from mirrorrouter.cache import CacheBackend
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.config.model import GroupSettings, HostedSettings
from mirrorrouter.config.security import repository_matches
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.blobs import BlobFinder, FoundBlob
from mirrorrouter.mapping import Resolution, RouteKind
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.pull.singleflight import Coalescer
from mirrorrouter.reference import Digest, ImageReference, InvalidReference, normalize_repository
from mirrorrouter.upstream.client import UpstreamClient

log = logging.getLogger("mirrorrouter.shadowing")

VERDICT_SECONDS = 60.0  # how long an upstream's "has it" / "has it not" is remembered
VERDICT_ENTRIES = 10_000

# An upstream's answers that mean "not there" (for this mirror: Docker Hub answers 401 for
# a repository that does not exist); anything else means it could not be asked.
_ABSENT = frozenset({ErrorCode.NAME_UNKNOWN, ErrorCode.MANIFEST_UNKNOWN})
# A source member answering these may still have the blob: say so rather than "unknown".
_TEMPORARY = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.TOOMANYREQUESTS})


@dataclass(frozen=True, slots=True)
class Exposure:
    """One upstream a hosted repository could shadow: a later member of one group."""

    group: GroupSettings
    upstream: UpstreamSettings
    repository: str  # the repository as the upstream names it
    allowed_by: str | None  # the allow_shadow pattern that permits shadowing it, if any


def groups_of(settings: Settings, hosted: HostedSettings) -> list[GroupSettings]:
    """The groups the hosted set is a member of."""
    return [g for g in settings.groups.values() if hosted.name in g.members]


def shadowable(settings: Settings, group: GroupSettings, hosted: HostedSettings) -> list[str]:
    """The upstream members of ``group`` asked after ``hosted``: what it could shadow."""
    later = group.members[group.members.index(hosted.name) + 1 :]
    return [name for name in later if name in settings.upstreams]


def exposures(settings: Settings, hosted: HostedSettings, repository: str) -> list[Exposure]:
    """Every upstream that a push into ``repository`` of ``hosted`` could shadow."""
    found = []
    for group in groups_of(settings, hosted):
        for name in shadowable(settings, group, hosted):
            upstream = settings.upstreams[name]
            try:
                theirs = normalize_repository(upstream.name, repository)
            except InvalidReference:
                continue  # a name the upstream cannot have (too long with its registry)
            names = (repository, theirs)  # a pattern may name either
            allowed_by = next(
                (p for p in hosted.allow_shadow if any(repository_matches((p,), n) for n in names)),
                None,
            )
            found.append(Exposure(group, upstream, theirs, allowed_by))
    return found


async def cache_knows(cache: CacheBackend, repository: str) -> bool:
    """Whether an upstream's cache holds tag records or links of the repository: it was
    pulled through this mirror, so the upstream has (or had) it."""
    return bool(await cache.list_tags(repository)) or bool(await cache.linked(repository))


async def lists_tags(client: UpstreamClient, repository: str) -> bool:
    """Whether the upstream's tag list of the repository names a tag; raises the upstream's
    ``RegistryError`` when it cannot be asked."""
    try:
        answer = await client.get_tags(repository, {"n": "1"})
    except RegistryError as error:
        if error.code in _ABSENT:
            return False
        raise
    try:
        tags = json.loads(answer.data).get("tags")
    except (ValueError, AttributeError):
        return False  # the upstream client checked it is an object with a tag list
    return bool(tags)


async def has_tag(client: UpstreamClient, repository: str, tag: str) -> bool:
    """Whether the upstream answers a ``HEAD`` of the tag's manifest; raises the upstream's
    ``RegistryError`` when it cannot be asked."""
    try:
        await client.head_manifest(ImageReference(client.name, repository, tag))
    except RegistryError as error:
        if error.code in _ABSENT:
            return False
        raise
    return True


class Shadowing:
    """The guard of pushes into hosted sets, and the sources of blobs they may copy in."""

    def __init__(
        self,
        settings: Settings,
        access: AccessPolicy,
        pull: Pullthrough,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.access = access
        self.pull = pull
        # (upstream, repository, tag or None) -> how it was found, "" when it was not.
        self._verdicts: TTLCache[tuple[str, str, str | None], str] = TTLCache(
            maxsize=VERDICT_ENTRIES, ttl=VERDICT_SECONDS, timer=clock
        )
        self._asking = Coalescer()

    # ------------------------------------------------------------------ the guard

    async def check(self, hosted: HostedSettings, repository: str, tag: str | None = None) -> None:
        """Return when a push into ``repository`` (``tag``: a manifest PUT by tag) shadows
        no upstream it may not; raise 403 ``DENIED`` or 503 ``UNAVAILABLE`` naming it."""
        for exposure in exposures(self.settings, hosted, repository):
            if exposure.allowed_by is not None:
                continue
            found = await self._found(exposure, tag)
            if found:
                raise _shadows(hosted, repository, exposure, found)

    async def _found(self, exposure: Exposure, tag: str | None) -> str:
        """How the upstream was found to have the repository ("" when it was not)."""
        upstream, repository = exposure.upstream, exposure.repository
        site = await self.pull.site(upstream)

        async def repository_known() -> str:
            if await cache_knows(site.cache, repository):
                return "this mirror's cache of it"
            return "its tag list" if await lists_tags(site.client, repository) else ""

        found = await self._verdict(exposure, (upstream.name, repository, None), repository_known)
        if found or tag is None:
            return found

        async def tag_known() -> str:
            return f"its tag {tag}" if await has_tag(site.client, repository, tag) else ""

        return await self._verdict(exposure, (upstream.name, repository, tag), tag_known)

    async def _verdict(
        self,
        exposure: Exposure,
        key: tuple[str, str, str | None],
        ask: Callable[[], Awaitable[str]],
    ) -> str:
        found = self._verdicts.get(key)
        if found is None:
            try:
                found = await self._asking.run(key, ask)
            except RegistryError as error:
                raise _cannot_ask(exposure, error) from error
            self._verdicts[key] = found
        return found

    # ------------------------------------------------------------------ copy-in

    def copy_sources(
        self, hosted: HostedSettings, repository: str, identity: Identity | None
    ) -> BlobFinder | None:
        """Where a manifest pushed into ``repository`` of ``hosted`` may take the blobs it
        names and the set lacks: the same repository on each upstream member of the set's
        groups (in their order) that ``identity`` may pull, as a pull through the group
        would find them; None when there is no such member (nothing is copied)."""
        members: list[Resolution] = []
        for group in groups_of(self.settings, hosted):
            for name in group.members:
                upstream = self.settings.upstreams.get(name)
                if upstream is None or any(m.target is upstream for m in members):
                    continue
                try:
                    theirs = normalize_repository(upstream.name, repository)
                except InvalidReference:
                    continue
                ref = ImageReference(upstream.name, theirs)
                resolution = Resolution(ref, upstream, RouteKind.REGISTRY, group=group)
                if self.access.may_pull(identity, resolution):
                    members.append(resolution)
        if not members:
            return None

        async def find(digest: Digest) -> FoundBlob | None:
            failures: list[RegistryError] = []
            for member in members:
                upstream, theirs = member.upstream, member.reference.repository
                try:
                    answer = await self.pull.blob(upstream, theirs, digest)
                except RegistryError as error:
                    if error.code in _TEMPORARY:
                        failures.append(error)
                    continue
                log.info("copying %s into hosted %s from %s", digest, hosted.name, upstream.name)
                return FoundBlob(upstream.name, answer.size, _as_registry_errors(answer.stream))
            if failures:
                raise RegistryError(
                    ErrorCode.UNAVAILABLE,
                    f"blob {digest} is not in {hosted.name}/{repository} and could not be "
                    f"copied in: {failures[0].message}",
                    detail=failures[0].detail,
                )
            return None

        return find


Stream = Callable[[int, int | None], AsyncIterator[bytes]]


def _as_registry_errors(stream: Stream) -> Stream:
    """A source's bytes, whose failures (a download cut short, a digest mismatch upstream)
    reach the pusher as 503s rather than 500s."""

    async def wrapped(start: int, end: int | None) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream(start, end):
                yield chunk
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(
                ErrorCode.UNAVAILABLE, f"copying the blob in failed: {exc or type(exc).__name__}"
            ) from exc

    return wrapped


def _shadows(
    hosted: HostedSettings, repository: str, exposure: Exposure, found: str
) -> RegistryError:
    upstream, group = exposure.upstream.name, exposure.group.name
    return RegistryError(
        ErrorCode.DENIED,
        f"{upstream} has {exposure.repository} ({found}): a push to "
        f"{hosted.name}/{repository} would shadow it for every client of group {group}, "
        f'which asks {hosted.name} first; allow_shadow of [hosted."{hosted.name}"] '
        "permits this where it must be",
        detail={
            "upstream": upstream,
            "repository": exposure.repository,
            "group": group,
            "hosted": hosted.name,
        },
    )


def _cannot_ask(exposure: Exposure, error: RegistryError) -> RegistryError:
    upstream = exposure.upstream.name
    return RegistryError(
        ErrorCode.UNAVAILABLE,
        f"cannot tell whether {upstream} has {exposure.repository} ({error.message}): a push "
        f"that could shadow it for the clients of group {exposure.group.name} waits until "
        f"{upstream} answers",
        detail={"upstream": upstream, "group": exposure.group.name, "cause": error.detail},
    )
