"""The mapping table: which upstream serves a request, and under which canonical name.

Precedence (first match wins; docs/routing.md says the same for users):

1. a route prefix before ``/v2`` (containerd host URL with a path: ``/gcr/v2/...``);
2. a Host-name route (``gcr.mirror.corp``);
3. containerd's ``?ns=<registry>``;
4. the leading components after ``/v2/``: a named route prefix (longest first), else a
   registry host (``/v2/gcr.io/...``: the first component has a "." or ":" or is localhost);
5. the default registry (Docker daemon ``registry-mirrors`` send bare ``library/alpine``).

A route leads to a *target*: an upstream (pull-through), a hosted repository set (push and
pull), or a group of those (``member`` resolves a group request for one member).

Closed world: every step only selects configured targets, or hosts matched by
``routing.allow_unconfigured``. Anything else is refused here, before any DNS lookup or
connection. When ``ns`` is sent along with a prefix or Host route, it must name the same
registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mirrorrouter.config import Route, Settings, UpstreamSettings
from mirrorrouter.config.model import GroupSettings, HostedSettings, Target
from mirrorrouter.errors import ErrorCode, RegistryError, reference_error
from mirrorrouter.oci import OciRequest
from mirrorrouter.reference import (
    ImageReference,
    InvalidReference,
    looks_like_registry,
    normalize_repository,
    validate_registry,
)


class RouteKind(enum.Enum):
    """How a request was matched to its upstream."""

    PREFIX = "prefix"  # a named route prefix: /v2/gcr/... or /gcr/v2/...
    HOST = "host"  # a Host-name route
    NAMESPACE = "ns"  # containerd's ?ns=
    REGISTRY = "registry"  # a registry host as the first path component, or an image name
    DEFAULT = "default"  # no prefix, no ns: the default registry


def kind_of(target: Target) -> str:
    """``upstream``, ``hosted`` or ``group``: what a target is, in messages and output."""
    if isinstance(target, HostedSettings):
        return "hosted"
    if isinstance(target, GroupSettings):
        return "group"
    return "upstream"


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a request goes: the canonical reference, how it matched, and its target.

    For an upstream or a hosted set the reference is canonical (``docker.io/library/x``,
    ``team/x``); for a group it is the name as the client wrote it under the group's name,
    and ``Mapper.member`` makes each member's canonical resolution.
    """

    reference: ImageReference
    target: Target
    via: RouteKind
    route: Route | None = None
    group: GroupSettings | None = None  # the group this member resolution was made for

    @property
    def upstream(self) -> UpstreamSettings:
        """The upstream of a pull-through resolution (the caller checked ``target``)."""
        assert isinstance(self.target, UpstreamSettings), self.target
        return self.target

    @property
    def describe(self) -> str:
        """How the request was routed, for error details and logs."""
        target = f"{kind_of(self.target)} {self.target.name}"
        if self.group is not None:
            target = f"group {self.group.name} -> {target}"
        if self.route is not None:
            return f"{self.route.label} -> {target}"
        return f"{self.via.value} -> {target}"


class Mapper:
    """Resolves requests and image names against the configured routing table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Longest prefix first, so that "mirrors/quay" wins over "mirrors".
        self._prefixes = sorted(
            (r for r in settings.routes if r.prefix is not None),
            key=lambda r: (-(r.prefix or "").count("/"), -len(r.prefix or "")),
        )
        self._hosts = {r.host: r for r in settings.routes if r.host is not None}

    def resolve(self, request: OciRequest) -> Resolution:
        """Route an API request; raises ``RegistryError`` when it names nothing configured."""
        if request.prefix:
            route = self._route_for_prefix(request.prefix)
            if route is not None:
                return self._routed(request, route, request.name)
            registry = self._registry_target(request.prefix, request)
            return self._build(request, registry, request.name, RouteKind.REGISTRY)
        host_route = self._hosts.get(request.host)
        if host_route is not None:
            return self._routed(request, host_route, request.name)
        if request.ns:
            target = self._registry_target(request.ns, request)
            return self._build(request, target, request.name, RouteKind.NAMESPACE)
        for route in self._prefixes:
            assert route.prefix is not None
            if request.name.startswith(route.prefix + "/"):
                return self._routed(request, route, request.name[len(route.prefix) + 1 :])
        first, slash, rest = request.name.partition("/")
        if slash and looks_like_registry(first):
            target = self._registry_target(first, request)
            return self._build(request, target, rest, RouteKind.REGISTRY)
        target = self._target(self.settings.default_registry)
        return self._build(request, target, request.name, RouteKind.DEFAULT)

    def resolve_image(self, image: ImageReference) -> Resolution:
        """Route an image name the way a client naming that registry (``ns``) is routed."""
        target = self.settings.target_for(image.registry)
        if target is None:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, self._not_routed_message(image.registry))
        if not isinstance(target, UpstreamSettings):  # the canonical name is under its own name
            image = ImageReference(target.name, image.repository, image.tag, image.digest)
        return Resolution(image, target, RouteKind.REGISTRY)

    def member(self, resolution: Resolution, name: str) -> Resolution:
        """A group request resolved for one of the group's members."""
        group = resolution.target
        assert isinstance(group, GroupSettings)
        target = self._target(name)
        ref = resolution.reference
        repository = _repository(target, ref.repository)
        reference = ImageReference(target.name, repository, ref.tag, ref.digest)
        return Resolution(reference, target, resolution.via, resolution.route, group)

    def routes_to(self, target: Target) -> list[Route]:
        """The named routes (prefixes and hosts) that lead to ``target``."""
        return [r for r in self.settings.routes if r.target == target.name]

    # ------------------------------------------------------------------ internals

    def _route_for_prefix(self, prefix: str) -> Route | None:
        return next((r for r in self._prefixes if r.prefix == prefix), None)

    def _routed(self, request: OciRequest, route: Route, repository: str) -> Resolution:
        target = self._target(route.target)
        self._check_ns(request, target, f"the {route.label}, which leads to {target.name}")
        return self._build(request, target, repository, RouteKind.PREFIX, route)

    def _build(
        self,
        request: OciRequest,
        target: Target,
        repository: str,
        via: RouteKind,
        route: Route | None = None,
    ) -> Resolution:
        repository = _repository(target, repository)
        if route is not None and route.host is not None:
            via = RouteKind.HOST
        reference = ImageReference(target.name, repository, request.tag, request.digest)
        return Resolution(reference, target, via, route)

    def _registry_target(self, host: str, request: OciRequest) -> Target:
        registry = _canonical(host)
        target = self.settings.target_for(registry)
        if target is None:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, self._not_routed_message(registry))
        self._check_ns(request, target, f"registry {registry}")
        return target

    def _check_ns(self, request: OciRequest, target: Target, what: str) -> None:
        """An ``ns`` sent along with a prefix or Host route must name the same registry."""
        if not request.ns:
            return
        named = self.settings.target_for(_canonical(request.ns))
        if named is None or named.name != target.name:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, f"ns={request.ns} does not match {what}")

    def _target(self, name: str) -> Target:
        target = self.settings.target_for(name)
        if target is None:  # config validation makes this unreachable
            raise RegistryError(ErrorCode.NAME_UNKNOWN, self._not_routed_message(name))
        return target

    def _not_routed_message(self, registry: str) -> str:
        configured = (
            ", ".join(
                [*sorted(self.settings.upstreams), *self.settings.hosted, *self.settings.groups]
            )
            or "none"
        )
        return (
            f"registry {registry} is not configured on this mirror (configured upstreams: "
            f"{configured}); add it under [upstreams] or to routing.allow_unconfigured"
        )


def _repository(target: Target, repository: str) -> str:
    """The repository path within a target: validated; docker.io one-component names get
    ``library/`` (a group keeps the name as written: each member normalizes it)."""
    try:
        return normalize_repository(target.name, repository)
    except InvalidReference as exc:
        raise reference_error(ErrorCode.NAME_INVALID, exc) from exc


def _canonical(host: str) -> str:
    try:
        return validate_registry(host)
    except InvalidReference as exc:
        raise reference_error(ErrorCode.NAME_INVALID, exc) from exc
