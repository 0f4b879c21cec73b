"""Load the targets a route may lead to besides upstreams, and the routes themselves:
``[hosted."<name>"]``, ``[groups."<name>"]``, ``[[routes]]``, and the checks that keep
every name and alias unique (see load.py for how problems are reported)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrorrouter.config.model import (
    DEFAULT_GC_INTERVAL,
    DEFAULT_MAX_BLOB_SIZE,
    CacheSettings,
    GroupSettings,
    HostedSettings,
    Route,
    UpstreamSettings,
)
from mirrorrouter.config.reader import Reader, Table, between
from mirrorrouter.config.security import load_access_rules
from mirrorrouter.reference import PATH_COMPONENT_RE, REGISTRY_RE, canonical_registry


@dataclass(frozen=True, slots=True)
class Targets:
    """Every name a route, an ``ns`` or the default registry may lead to."""

    upstreams: Mapping[str, UpstreamSettings]
    hosted: Mapping[str, HostedSettings]
    groups: Mapping[str, GroupSettings]

    def name_of(self, name: str) -> str | None:
        """The configured target a name denotes (an upstream by its canonical name)."""
        if name in self.hosted or name in self.groups:
            return name
        canonical = canonical_registry(name) if REGISTRY_RE.fullmatch(name) else name
        return canonical if canonical in self.upstreams else None

    def listing(self) -> str:
        names = [*sorted(self.upstreams), *sorted(self.hosted), *sorted(self.groups)]
        return ", ".join(names) or "none"

    def everything(self) -> list[tuple[str, str, frozenset[str]]]:
        """(table, name, aliases) of every target."""
        return [
            *(("upstreams", n, u.aliases) for n, u in self.upstreams.items()),
            *(("hosted", n, h.aliases) for n, h in self.hosted.items()),
            *(("groups", n, g.aliases) for n, g in self.groups.items()),
        ]


def _target_name(
    reader: Reader, table: Table, name: str, upstreams: Mapping[str, UpstreamSettings]
) -> bool:
    """A hosted set or group name: one path component without dots, not an upstream's."""
    if not PATH_COMPONENT_RE.fullmatch(name) or "." in name:
        reader.problem(
            table.path,
            "the table name must be a short name like 'team' (lower-case letters, digits, "
            "'-' and '_'; no dots: names with dots are registry hosts)",
        )
        return False
    if name in upstreams:
        reader.problem(table.path, f"{name!r} is already an upstream")
        return False
    return True


def load_hosted(
    reader: Reader,
    table: Table,
    name: str,
    cache: CacheSettings,
    base_dir: Path,
    upstreams: Mapping[str, UpstreamSettings],
) -> HostedSettings | None:
    aliases = frozenset(
        canonical_registry(a) for a in table.get("aliases", list, [], check=registries)
    )
    directory = table.get("directory", str, None)
    hosted = HostedSettings(
        name=name,
        aliases=aliases,
        storage=CacheSettings(
            backend=cache.backend,
            directory=base_dir / directory if directory else cache.directory / "_hosted" / name,
            object_store=cache.object_store,
            key=f"_hosted/{name}",
        ),
        access=load_access_rules(table.tables("access"), push=True),
        delete=table.get("delete", bool, False),
        gc_grace=table.duration("gc_grace", 3600.0),
        gc_interval=_duration_or_off(table, "gc_interval", DEFAULT_GC_INTERVAL),
        max_blob_size=_size_or_none(table, "max_blob_size", DEFAULT_MAX_BLOB_SIZE),
        quota=_size_or_none(table, "quota", None),
        max_uploads=table.get("max_uploads", int, 1000, check=between(1, 1_000_000)),
        upload_ttl=table.duration("upload_ttl", 3600.0, positive=True),
        allow_shadow=tuple(table.get("allow_shadow", list, [], check=_shadow_patterns)),
    )
    table.finish()
    return hosted if _target_name(reader, table, name, upstreams) else None


def _duration_or_off(table: Table, key: str, default: float) -> float:
    """A duration, or ``"off"`` / ``"0"`` / ``0`` for never (0.0)."""
    if table.data.get(key) in ("off", "0"):
        table.used.add(key)
        return 0.0
    return table.duration(key, default)


def _size_or_none(table: Table, key: str, default: int | None) -> int | None:
    """A byte size, or ``"none"`` for no limit."""
    if table.data.get(key) == "none":
        table.used.add(key)
        return None
    return table.size(key, default)


def load_group(
    reader: Reader,
    table: Table,
    name: str,
    upstreams: Mapping[str, UpstreamSettings],
    hosted: Mapping[str, HostedSettings],
) -> GroupSettings | None:
    aliases = frozenset(
        canonical_registry(a) for a in table.get("aliases", list, [], check=registries)
    )
    members = table.get("members", list, None, check=_member_names, required=True)
    writable = table.get("writable", str, None)
    table.finish()
    if not _target_name(reader, table, name, upstreams) or members is None:
        return None
    resolved = []
    for index, member in enumerate(members):
        target = member if member in hosted else canonical_registry(member)
        if target not in hosted and target not in upstreams:
            reader.problem(
                (*table.path, "members", index),
                f"{member!r} is neither an upstream nor a hosted set; configured: "
                f"{', '.join([*sorted(upstreams), *sorted(hosted)]) or 'none'}",
            )
        elif target in resolved:
            reader.problem((*table.path, "members", index), f"{member!r} is listed twice")
        else:
            resolved.append(target)
    writable_members = [m for m in resolved if m in hosted]
    if writable is not None and writable not in writable_members:
        reader.problem(
            (*table.path, "writable"),
            f"{writable!r} is not a hosted member of this group; hosted members: "
            f"{', '.join(writable_members) or 'none'}",
        )
    if writable is None and len(writable_members) > 1:
        reader.problem(
            (*table.path, "writable"),
            f"several hosted members ({', '.join(writable_members)}): say which one takes pushes",
        )
    if writable is None and len(writable_members) == 1:
        writable = writable_members[0]
    return GroupSettings(name, aliases, tuple(resolved), writable)


_ROUTE_TARGETS = ("upstream", "hosted", "group")


def load_route(reader: Reader, table: Table, targets: Targets) -> Route | None:
    prefix = table.get("prefix", str, None, check=_route_prefix)
    host = table.get("host", str, None, check=_host_name)
    named = {key: table.get(key, str, None) for key in _ROUTE_TARGETS}
    table.finish()
    if (prefix is None) == (host is None):
        reader.problem(table.path, "set exactly one of prefix or host")
        return None
    given = [(key, value) for key, value in named.items() if value is not None]
    if len(given) != 1:
        reader.problem(
            (*table.path, "upstream"),
            "is required: set exactly one of upstream, hosted or group"
            if not given
            else "set exactly one of upstream, hosted or group",
        )
        return None
    key, value = given[0]
    table_of = {"upstream": targets.upstreams, "hosted": targets.hosted, "group": targets.groups}
    target = canonical_registry(value) if key == "upstream" else value
    if target not in table_of[key]:
        configured = ", ".join(sorted(table_of[key])) or "none"
        reader.problem((*table.path, key), f"no {key} named {value!r}; configured: {configured}")
        return None
    return Route(target=target, prefix=prefix, host=host and host.lower())


def check_aliases(reader: Reader, targets: Targets) -> None:
    owner: dict[str, str] = {}
    names = {name for _, name, _ in targets.everything()}
    for kind, name, aliases in targets.everything():
        for alias in sorted(aliases):
            if alias in names and alias != name:
                reader.problem((kind, name, "aliases"), f"{alias!r} is an upstream of its own")
            elif alias in owner:
                reader.problem(
                    (kind, name, "aliases"), f"{alias!r} is already an alias of {owner[alias]!r}"
                )
            owner[alias] = name


def check_routes(reader: Reader, routes: tuple[Route, ...]) -> None:
    seen: set[tuple[str, str]] = set()
    for index, route in enumerate(routes):
        key = ("prefix", route.prefix) if route.prefix is not None else ("host", route.host or "")
        if key in seen:
            reader.problem(("routes", index, key[0]), f"{key[1]!r} is routed twice")
        seen.add(key)


def registries(value: list[Any]) -> str | None:
    ok = all(isinstance(v, str) and REGISTRY_RE.fullmatch(v) for v in value)
    return None if ok else "a list of registry hosts like gcr.io or registry.corp:5000"


def _shadow_patterns(value: list[Any]) -> str | None:
    """Repository globs without a registry: they match the repository path a push names
    (``library/alpine``, ``team-*/*``), never a canonical ``docker.io/...`` name."""
    for pattern in value:
        if not isinstance(pattern, str) or not pattern or any(c.isspace() for c in pattern):
            break
        first = pattern.split("/", 1)[0]
        if "/" in pattern and ("." in first or ":" in first or first == "localhost"):
            break
    else:
        return None
    return "a list of repository globs without a registry, such as 'library/alpine' or 'team-*/*'"


def _member_names(value: list[Any]) -> str | None:
    if value and all(isinstance(v, str) and v for v in value):
        return None
    return "a non-empty list of upstream and hosted names, in the order they are asked"


def _route_prefix(value: str) -> str | None:
    parts = value.split("/")
    if all(PATH_COMPONENT_RE.fullmatch(p) and "." not in p for p in parts):
        return None
    return "path components without dots such as 'gcr' or 'mirrors/quay'"
    return None


def _host_name(value: str) -> str | None:
    if REGISTRY_RE.fullmatch(value) and ":" not in value:
        return None
    return "a host name without port such as gcr.mirror.corp"
