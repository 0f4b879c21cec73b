"""The mapping table: which upstream serves a request, and under which canonical name.

Precedence (first match wins; docs/routing.md says the same for users):

1. a route prefix before ``/v2`` (containerd host URL with a path: ``/gcr/v2/...``);
2. a Host-name route (``gcr.mirror.corp``);
3. containerd's ``?ns=<registry>``;
4. the leading components after ``/v2/``: a named route prefix (longest first), else a
   registry host (``/v2/gcr.io/...``: the first component has a "." or ":" or is localhost);
5. the default registry (Docker daemon ``registry-mirrors`` send bare ``library/alpine``).

Closed world: every step only selects configured upstreams, or hosts matched by
``routing.allow_unconfigured``. Anything else is refused here, before any DNS lookup or
connection. When ``ns`` is sent along with a prefix or Host route, it must name the same
registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mirrorrouter.config import Route, Settings, UpstreamSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.oci import OciRequest
from mirrorrouter.reference import (
    ImageReference,
    ReferenceError,
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


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a request goes: the canonical reference, how it matched, the upstream's mirrors."""

    reference: ImageReference
    upstream: UpstreamSettings
    via: RouteKind
    route: Route | None = None

    @property
    def describe(self) -> str:
        """How the request was routed, for error details and logs."""
        if self.route is not None:
            return f"{self.route.label} -> upstream {self.upstream.name}"
        return f"{self.via.value} -> upstream {self.upstream.name}"


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
            registry = self._registry_upstream(request.prefix, request)
            return self._build(request, registry, request.name, RouteKind.REGISTRY)
        host_route = self._hosts.get(request.host)
        if host_route is not None:
            return self._routed(request, host_route, request.name)
        if request.ns:
            upstream = self._registry_upstream(request.ns, request)
            return self._build(request, upstream, request.name, RouteKind.NAMESPACE)
        for route in self._prefixes:
            assert route.prefix is not None
            if request.name.startswith(route.prefix + "/"):
                return self._routed(request, route, request.name[len(route.prefix) + 1 :])
        first, slash, rest = request.name.partition("/")
        if slash and looks_like_registry(first):
            upstream = self._registry_upstream(first, request)
            return self._build(request, upstream, rest, RouteKind.REGISTRY)
        upstream = self._upstream(self.settings.default_registry)
        return self._build(request, upstream, request.name, RouteKind.DEFAULT)

    def resolve_image(self, image: ImageReference) -> Resolution:
        """Route an image name the way a client naming that registry (``ns``) is routed."""
        upstream = self.settings.upstream_for(image.registry)
        if upstream is None:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, self._not_routed_message(image.registry))
        return Resolution(image, upstream, RouteKind.REGISTRY)

    def routes_to(self, upstream: UpstreamSettings) -> list[Route]:
        """The named routes (prefixes and hosts) that lead to ``upstream``."""
        return [r for r in self.settings.routes if r.upstream == upstream.name]

    # ------------------------------------------------------------------ internals

    def _route_for_prefix(self, prefix: str) -> Route | None:
        return next((r for r in self._prefixes if r.prefix == prefix), None)

    def _routed(self, request: OciRequest, route: Route, repository: str) -> Resolution:
        upstream = self._upstream(route.upstream)
        self._check_ns(request, upstream, f"the {route.label}, which leads to {upstream.name}")
        return self._build(request, upstream, repository, RouteKind.PREFIX, route)

    def _build(
        self,
        request: OciRequest,
        upstream: UpstreamSettings,
        repository: str,
        via: RouteKind,
        route: Route | None = None,
    ) -> Resolution:
        try:
            repository = normalize_repository(upstream.name, repository)
        except ReferenceError as exc:
            raise RegistryError(ErrorCode.NAME_INVALID, str(exc)) from exc
        if route is not None and route.host is not None:
            via = RouteKind.HOST
        reference = ImageReference(upstream.name, repository, request.tag, request.digest)
        return Resolution(reference, upstream, via, route)

    def _registry_upstream(self, host: str, request: OciRequest) -> UpstreamSettings:
        registry = _canonical(host)
        upstream = self.settings.upstream_for(registry)
        if upstream is None:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, self._not_routed_message(registry))
        self._check_ns(request, upstream, f"registry {registry}")
        return upstream

    def _check_ns(self, request: OciRequest, upstream: UpstreamSettings, what: str) -> None:
        """An ``ns`` sent along with a prefix or Host route must name the same registry."""
        if not request.ns:
            return
        named = self.settings.upstream_for(_canonical(request.ns))
        if named is None or named.name != upstream.name:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, f"ns={request.ns} does not match {what}")

    def _upstream(self, name: str) -> UpstreamSettings:
        upstream = self.settings.upstream_for(name)
        if upstream is None:  # config validation makes this unreachable
            raise RegistryError(ErrorCode.NAME_UNKNOWN, self._not_routed_message(name))
        return upstream

    def _not_routed_message(self, registry: str) -> str:
        configured = ", ".join(sorted(self.settings.upstreams)) or "none"
        return (
            f"registry {registry} is not configured on this mirror (configured upstreams: "
            f"{configured}); add it under [upstreams] or to routing.allow_unconfigured"
        )


def _canonical(host: str) -> str:
    try:
        return validate_registry(host)
    except ReferenceError as exc:
        raise RegistryError(ErrorCode.NAME_INVALID, str(exc)) from exc
