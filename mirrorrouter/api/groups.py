"""Groups: several upstreams and hosted sets behind one name, asked in order (a Nexus group).

- A pull (manifest, blob) is answered by the **first member that has it**: a member that
  does not (not found, not allowed for this client, or unreachable) passes to the next.
  Each member answers from its own state, so a tag just pushed to a hosted member is
  served from there at once; nothing is cached under the group's name to go stale.
- ``tags/list`` is the union of the members' tags; ``referrers`` the union of their
  referrers.
- A push goes to the group's one ``writable`` hosted member.
- Access rules are the members': the group asks each member with the client's identity.

Members are asked through the same typed calls the endpoints make of any target
(``Targets``: a ``ManifestAnswer``, a ``BlobAnswer``, a ``TagList``, ``Referrers``); the
answering member's call comes back with its answer, so the answer is written as that
member's.

When no member has the reference, the answer is the most useful failure: a member that was
unreachable or throttling (503/429: the content may well be there, so clients retry), then
a login prompt, then a refusal, then "not found".

**From memory** (``memory_manifest``, the fast path of app.py): a manifest is answered
without asking the members in turn when memory is certain of the same answer: every member
before the answering one refuses this client (the same access check) or is known not to
have the reference (a hosted set at its current generation, an upstream within its
negative_ttl), and the answering member's memory answers by its own rules (a hosted set at
its current generation; an upstream's linked digest or tag within tag_ttl).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeAlias, TypeVar

from mirrorrouter.access.clientauth import Identity
from mirrorrouter.access.policy import AccessPolicy
from mirrorrouter.api.calls import Call
from mirrorrouter.api.targets import Targets
from mirrorrouter.config import Route
from mirrorrouter.config.model import GroupSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.manifests import Descriptor, referrers_index
from mirrorrouter.mapping import Mapper, Resolution, RouteKind
from mirrorrouter.oci import RequestKind
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.served import BlobAnswer, ManifestAnswer, Memory, Referrers, TagList

T = TypeVar("T")

# A member answering one of these does not have the reference (for this client): next.
MEMBER_MISSES = frozenset(
    {
        ErrorCode.MANIFEST_UNKNOWN,
        ErrorCode.BLOB_UNKNOWN,
        ErrorCode.NAME_UNKNOWN,
        ErrorCode.NAME_INVALID,
        ErrorCode.DENIED,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.UNAVAILABLE,
        ErrorCode.TOOMANYREQUESTS,
    }
)
PLANS = 10_000  # member resolutions of group pulls remembered (then forgotten at once)
# A group pull's reference, how it was routed, and who asks.
PlanKey: TypeAlias = tuple[ImageReference, RouteKind, Route | None, Identity | None]
# Which failure to answer when every member missed: the first code in this order.
_PREFERENCE = (
    ErrorCode.UNAVAILABLE,
    ErrorCode.TOOMANYREQUESTS,
    ErrorCode.UNAUTHORIZED,
    ErrorCode.DENIED,
)


class GroupApi:
    """Answers requests whose route leads to a group, by asking its members."""

    def __init__(self, mapper: Mapper, access: AccessPolicy, targets: Targets) -> None:
        self.mapper = mapper
        self.access = access
        self.targets = targets  # asks a member (an upstream or a hosted set)
        self._plans: dict[PlanKey, tuple[Resolution | RegistryError, ...]] = {}

    # ------------------------------------------------------------------ the first member

    async def manifest(self, call: Call) -> tuple[Call, ManifestAnswer]:
        """The first member's manifest, with the member's call."""
        return await self._first(call, self.targets.manifest)

    async def blob(self, call: Call) -> tuple[Call, BlobAnswer]:
        """The first member's blob, with the member's call."""
        return await self._first(call, self.targets.blob)

    def writer(self, call: Call) -> Call:
        """The call as the group's writable member takes a push."""
        group = call.resolution.target
        assert isinstance(group, GroupSettings)
        if group.writable is None:
            raise RegistryError(
                ErrorCode.UNSUPPORTED,
                f"group {group.name} has no hosted member to push to",
            )
        return self._member(call, group.writable, push=True)

    async def _first(self, call: Call, ask: Callable[[Call], Awaitable[T]]) -> tuple[Call, T]:
        group = call.resolution.target
        assert isinstance(group, GroupSettings)
        misses: dict[str, RegistryError] = {}
        for name in group.members:
            try:
                member = self._member(call, name)
                return member, await ask(member)
            except RegistryError as error:
                if error.code not in MEMBER_MISSES:
                    raise
                misses[name] = error
        raise _no_member_has(group, call, misses)

    def memory_manifest(self, call: Call) -> tuple[Call, ManifestAnswer] | None:
        """The group's manifest answer from memory alone, with the member call that gives
        it; None when memory is not certain of it (the full path then asks the members)."""
        accept = call.oci.accept
        for member in self._plan(call):
            if isinstance(member, RegistryError):
                if member.code in MEMBER_MISSES:
                    continue  # refused or not a name there: the full path passes on too
                return None
            found = self.targets.remembered(member, accept)
            if found is None:
                return None
            if found is Memory.MISSING:
                continue
            return Call(call.oci, member, call.identity, call.client, call.scope), found
        return None  # no member has it: the full path says which failure

    def _plan(self, call: Call) -> tuple[Resolution | RegistryError, ...]:
        """Each member's resolution of the call, in order, or why this client may not ask it
        there: what ``_member`` decides, remembered (it depends only on the configuration,
        the name and the client, and every pull through the group asks it)."""
        resolution = call.resolution
        key = (resolution.reference, resolution.via, resolution.route, call.identity)
        plan = self._plans.get(key)
        if plan is None:
            group = resolution.target
            assert isinstance(group, GroupSettings)
            steps: list[Resolution | RegistryError] = []
            for name in group.members:
                try:
                    steps.append(self._member_resolution(call, name))
                except RegistryError as error:
                    steps.append(error)
            if len(self._plans) >= PLANS:
                self._plans.clear()
            plan = self._plans[key] = tuple(steps)
        return plan

    def _member(self, call: Call, name: str, *, push: bool = False) -> Call:
        """The call as one member sees it: its canonical name, its access rules."""
        resolution = self._member_resolution(call, name, push=push)
        return Call(call.oci, resolution, call.identity, call.client, call.scope)

    def _member_resolution(self, call: Call, name: str, *, push: bool = False) -> Resolution:
        resolution = self.mapper.member(call.resolution, name)
        self.access.check(call.identity, resolution, push=push)
        return resolution

    # ------------------------------------------------------------------ unions

    async def tags(self, call: Call) -> TagList:
        """The union of the members' tags (paginated by the gateway)."""
        tags: set[str] = set()
        for answer in await self._each(call, self.targets.tags):
            tags.update(answer.names())
        return TagList(tuple(sorted(tags)))

    async def referrers(self, call: Call) -> Referrers:
        """The union of the members' referrers, one descriptor per digest."""
        seen: dict[Digest, Descriptor] = {}
        for answer in await self._each(call, self.targets.referrers):
            for descriptor in answer.descriptors():
                seen.setdefault(descriptor.digest, descriptor)
        filtered = bool(call.oci.query_value("artifactType"))
        listed = tuple(seen.values())
        return Referrers(referrers_index(listed), filtered, listed)

    async def _each(self, call: Call, ask: Callable[[Call], Awaitable[T]]) -> list[T]:
        """Every member's answer to a GET of the same endpoint (for the unions)."""
        group = call.resolution.target
        assert isinstance(group, GroupSettings)
        # Pagination and HEAD are the group's: members are asked for everything.
        oci = replace(
            call.oci,
            method="GET",
            query=tuple((k, v) for k, v in call.oci.query if k not in ("n", "last")),
        )
        answers, misses = [], {}
        for name in group.members:
            try:
                member = self._member(replace(call, oci=oci), name)
                answers.append(await ask(member))
            except RegistryError as error:
                if error.code not in MEMBER_MISSES:
                    raise
                misses[name] = error
        if not answers:
            raise _no_member_has(group, call, misses)
        prompt = _login_first(group, call, misses)
        if prompt is not None:
            raise prompt
        return answers


def _login_first(
    group: GroupSettings, call: Call, misses: dict[str, RegistryError]
) -> RegistryError | None:
    """The login prompt of a member, for a client that sent no credentials at all.

    A union (tags, referrers) is what the client may see; without this, a client that has
    credentials would get the public members' part with a 200 and never log in (the
    distribution-spec conformance suite, logged in, found 0 of 5 referrers). It comes back
    with a token (an anonymous one when it has no credentials: realms give those) and then
    gets the union that token may see."""
    if call.identity is not None:
        return None
    for name, error in misses.items():
        if error.code is ErrorCode.UNAUTHORIZED:
            return RegistryError(
                ErrorCode.UNAUTHORIZED,
                f"member {name} of group {group.name} asks for a login: {error.message}",
                headers=error.headers,
            )
    return None


def _no_member_has(
    group: GroupSettings, call: Call, misses: dict[str, RegistryError]
) -> RegistryError:
    chosen = next(
        (e for code in _PREFERENCE for e in misses.values() if e.code is code),
        next(iter(misses.values()), None),
    )
    what = call.oci.name
    if call.oci.kind in (RequestKind.MANIFEST, RequestKind.BLOB):
        what += f":{call.oci.reference}"
    message = f"no member of group {group.name} has {what}"
    if chosen is None:
        return RegistryError(ErrorCode.NAME_UNKNOWN, message)
    detail = {name: error.message for name, error in misses.items()}
    return RegistryError(chosen.code, message, detail={"members": detail}, headers=chosen.headers)
