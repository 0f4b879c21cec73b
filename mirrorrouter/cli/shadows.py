"""What the commands say about shadowing (the rule and the guard are hosted/shadowing.py's):
``check-config`` explains each group's order and warns of ``allow_shadow`` patterns that
are too broad or cannot matter; ``gc --dry-run`` lists the hosted repositories that shadow
an upstream's, by this mirror's caches and, when asked, the upstreams' tag lists."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from mirrorrouter.cache import CacheBackend, open_backend
from mirrorrouter.config import Settings
from mirrorrouter.config.model import GroupSettings, HostedSettings
from mirrorrouter.errors import RegistryError
from mirrorrouter.hosted.shadowing import (
    cache_knows,
    exposures,
    groups_of,
    lists_tags,
    shadowable,
)
from mirrorrouter.timing import REAL_TIME, Timing
from mirrorrouter.upstream.client import UpstreamClient


def is_broad(pattern: str) -> bool:
    """Whether an ``allow_shadow`` pattern covers names of every namespace (``*``, ``*/app``)
    or every official docker.io image (``library/*``): check-config warns of those."""
    first, _, rest = pattern.partition("/")
    wildcard = frozenset("*?")
    return set(first) <= wildcard or (first == "library" and bool(rest) and set(rest) <= wildcard)


def explain_group(settings: Settings, group: GroupSettings) -> list[str]:
    """What ``check-config`` says of a group: the order pulls ask its members, and for each
    hosted member what it may shadow and what hides it."""
    members = []
    for name in group.members:
        kind = "hosted" if name in settings.hosted else "upstream"
        members.append(f"{name} ({kind}{', push target' if name == group.writable else ''})")
    lines = [f"group {group.name}: pulls ask {' > '.join(members)}"]
    for name in group.members:
        hosted = settings.hosted.get(name)
        if hosted is None:
            continue
        later = shadowable(settings, group, hosted)
        earlier = [m for m in group.members[: group.members.index(name)] if m in settings.upstreams]
        if later and hosted.allow_shadow:
            patterns = ", ".join(hosted.allow_shadow)
            lines.append(
                f"  {name}: may shadow {_either(later)} only where allow_shadow matches "
                f"({patterns}); pushes into other names {_owns(later)} are refused"
            )
        elif later:
            lines.append(
                f"  {name}: a push into a name {_either(later)} has is refused (shadowing "
                "guard; allow_shadow lifts it)"
            )
        if earlier:
            lines.append(
                f"  {name}: {_either(earlier)} {'is' if len(earlier) == 1 else 'are'} asked "
                f"first: a tag {_owns(earlier)} hides the same tag pushed to {name}"
            )
    return lines


def shadow_warnings(settings: Settings) -> list[str]:
    """What is valid in ``allow_shadow`` but probably not meant: patterns so broad that
    anyone who may push can replace what a group's clients pull, and patterns that cannot
    matter (the set is before no upstream in any group)."""
    warnings = []
    for hosted in settings.hosted.values():
        if not hosted.allow_shadow:
            continue
        exposed = [
            (group, later)
            for group in groups_of(settings, hosted)
            if (later := shadowable(settings, group, hosted))
        ]
        if not exposed:
            warnings.append(
                f"allow_shadow of hosted {hosted.name} has no effect: it is asked before no "
                "upstream member of any group"
            )
            continue
        for pattern in filter(is_broad, hosted.allow_shadow):
            for group, later in exposed:
                warnings.append(
                    f"hosted {hosted.name} may shadow {_either(later)} for every name "
                    f"matching {pattern!r} (allow_shadow): anyone who may push to "
                    f"{hosted.name} can replace what clients of group {group.name} pull; "
                    "list the repositories instead (see docs/security.md)"
                )
    return warnings


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" or {names[-1]}"


def _owns(names: list[str]) -> str:
    return "it has" if len(names) == 1 else "they have"


@dataclass(frozen=True, slots=True)
class Shadowed:
    """A hosted repository that shadows (or may shadow) an upstream's for a group's clients,
    as ``mirrorrouter gc --dry-run`` lists it."""

    repository: str  # in the hosted set
    group: str
    upstream: str
    upstream_repository: str
    allowed_by: str | None  # the allow_shadow pattern that permits it; None: pushed before
    # the guard, or by a set whose allow_shadow changed since
    known_by: str  # how the upstream was found to have it, or why it could not be asked
    certain: bool = True  # False: the upstream could not be asked (known_by says why)


async def shadowing_report(
    settings: Settings,
    hosted: HostedSettings,
    repositories: list[str],
    *,
    ask_upstreams: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    timing: Timing = REAL_TIME,
) -> list[Shadowed]:
    """Which of the hosted set's repositories shadow a later upstream member of one of its
    groups: by what this mirror's caches know (no network), and with ``ask_upstreams`` by
    the upstreams' tag lists too (``transport`` and ``timing`` replace the network and the
    clocks in tests). Works beside a running server: caches are only read."""
    found: list[Shadowed] = []
    caches: dict[str, CacheBackend] = {}
    clients: dict[str, UpstreamClient] = {}
    try:
        for repository in repositories:
            for exposure in exposures(settings, hosted, repository):
                upstream = exposure.upstream
                cache = caches.get(upstream.name) or open_backend(upstream.cache)
                caches[upstream.name] = cache
                certain, how = True, ""
                if await cache_knows(cache, exposure.repository):
                    how = "this mirror's cache of it"
                elif ask_upstreams:
                    client = clients.get(upstream.name) or UpstreamClient(
                        upstream, transport=transport, timing=timing
                    )
                    clients[upstream.name] = client
                    try:
                        how = (
                            "its tag list" if await lists_tags(client, exposure.repository) else ""
                        )
                    except RegistryError as error:
                        certain, how = False, f"could not be asked: {error.message}"
                if how:
                    found.append(
                        Shadowed(
                            repository,
                            exposure.group.name,
                            upstream.name,
                            exposure.repository,
                            exposure.allowed_by,
                            how,
                            certain,
                        )
                    )
    finally:
        for client in clients.values():
            await client.aclose()
    return found
