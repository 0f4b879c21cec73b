"""The facts of the routing table that every client's configuration is derived from."""

from __future__ import annotations

from dataclasses import dataclass

from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.reference import PATH_COMPONENT_RE, looks_like_registry


@dataclass(frozen=True, slots=True)
class Registry:
    """A registry name clients use, and the upstream that serves it."""

    name: str  # as it stands in image names: the upstream's name, or one of its aliases
    upstream: UpstreamSettings

    @property
    def is_alias(self) -> bool:
        return self.name != self.upstream.name


class RoutingTable:
    """The facts of ``Settings`` that client configuration depends on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def default_registry(self) -> str:
        return self.settings.default_registry

    @property
    def allow_unconfigured(self) -> tuple[str, ...]:
        return self.settings.allow_unconfigured

    def upstreams(self) -> list[UpstreamSettings]:
        """The configured upstreams, in the order of the config file."""
        return list(self.settings.upstreams.values())

    def registries(self) -> list[Registry]:
        """Every upstream, each followed by its aliases (sorted)."""
        found = []
        for upstream in self.upstreams():
            found.append(Registry(upstream.name, upstream))
            found += [Registry(alias, upstream) for alias in sorted(upstream.aliases)]
        return found

    def prefixes(self, upstream: UpstreamSettings) -> list[str]:
        """The named prefix routes of ``upstream``, in config order."""
        return [
            r.prefix
            for r in self.settings.routes
            if r.target == upstream.name and r.prefix is not None
        ]

    def hosts(self, upstream: UpstreamSettings) -> list[str]:
        """The Host-name routes of ``upstream``, in config order."""
        return [
            r.host for r in self.settings.routes if r.target == upstream.name and r.host is not None
        ]

    def path_prefix(self, upstream: UpstreamSettings) -> str | None:
        """The path under which a client that sends no ``ns`` reaches ``upstream``.

        ``""`` for the default registry (the root), else its first named prefix, else its
        registry host when that can be a path component of an image name (no port, and
        recognizably a host: a dot, or localhost). None when there is no such path.
        """
        if upstream.name == self.default_registry:
            return ""
        return self.named_path(upstream)

    def named_path(self, upstream: UpstreamSettings) -> str | None:
        """Like :meth:`path_prefix`, but never the root: a prefix, else the registry host."""
        prefixes = self.prefixes(upstream)
        if prefixes:
            return prefixes[0]
        if host_is_path_component(upstream.name):
            return upstream.name
        return None


def host_is_path_component(registry: str) -> bool:
    """Whether ``/v2/<registry>/...`` is routed to that registry (gcr.io yes, h:5000 no)."""
    return bool(PATH_COMPONENT_RE.fullmatch(registry)) and looks_like_registry(registry)
