"""Read ``mirrors.toml`` into frozen, validated settings.

Every problem is reported with its key path (``upstreams."gcr.io".mirrors[0].url``), the
line it stands on where that can be found, and what was expected. All problems of a file are
collected and raised together as one ``ConfigError``. Unknown keys are errors: a typo must
never silently fall back to a default.

Relative paths are relative to the directory of the config file.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mirrorrouter.reference import (
    DOCKER_HUB,
    DOCKER_HUB_ALIASES,
    PATH_COMPONENT_RE,
    REGISTRY_RE,
    canonical_registry,
    registry_endpoint,
)

T = TypeVar("T")
KeyPath = tuple[str | int, ...]


class ConfigError(ValueError):
    """One or more problems in a configuration file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class Capability(enum.Enum):
    """What a mirror may be asked (containerd's host capabilities)."""

    PULL = "pull"  # content by digest: manifests by digest and blobs, always verified
    RESOLVE = "resolve"  # what digest a tag points to; only trusted mirrors get this


@dataclass(frozen=True, slots=True)
class Secret:
    """A credential value that never shows itself in a repr, a log or an error."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: Secret


@dataclass(frozen=True, slots=True)
class Mirror:
    """One endpoint of an upstream registry; the list order is the failover order."""

    url: str  # base URL without a trailing slash; requests go to url + "/v2/..."
    capabilities: frozenset[Capability]

    @property
    def can_resolve(self) -> bool:
        return Capability.RESOLVE in self.capabilities

    @property
    def name(self) -> str:
        """A short name for logs and error details: scheme-less host and path."""
        return self.url.split("://", 1)[-1]


@dataclass(frozen=True, slots=True)
class CacheSettings:
    backend: str
    directory: Path


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Everything about one upstream registry, keyed by its canonical registry name."""

    name: str
    aliases: frozenset[str]
    mirrors: tuple[Mirror, ...]
    credentials: Credentials | None
    cache: CacheSettings
    policy: UpstreamPolicy
    from_pattern: bool = False  # made on demand for a host matched by routing.allow_unconfigured


@dataclass(frozen=True, slots=True)
class Route:
    """A client-facing name for an upstream: a path prefix or a Host name."""

    upstream: str
    prefix: str | None = None
    host: str | None = None

    @property
    def label(self) -> str:
        return f"prefix {self.prefix}" if self.prefix is not None else f"host {self.host}"


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    """How one upstream is treated: cache lifetimes, timeouts, retries, circuit breaking.

    ``[defaults]`` sets these for every upstream; an upstream table overrides any of them.
    """

    tag_ttl: float = 300.0  # serve a tag from cache this long before revalidating
    max_stale: float = 7 * 86400.0  # serve a tag this long past its TTL when upstream fails
    negative_ttl: float = 30.0  # remember an upstream "not found" this long
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry_attempts: int = 3  # tries of one mirror before failing over to the next
    retry_deadline: float = 120.0  # all tries of one request, across mirrors
    breaker_failures: int = 5  # consecutive failures that open a mirror's circuit
    breaker_cooldown: float = 30.0  # how long an open circuit skips its mirror
    proxy: str | None = None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 5000
    workers: int = 1
    log_level: str = "info"
    access_log: bool = False  # uvicorn's per-request line costs about a fifth of throughput


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole, validated configuration."""

    server: ServerSettings
    cache: CacheSettings
    defaults: UpstreamPolicy
    upstreams: Mapping[str, UpstreamSettings]
    routes: tuple[Route, ...]
    default_registry: str
    allow_unconfigured: tuple[str, ...]
    source: Path | None = None

    def upstream_for(self, registry: str) -> UpstreamSettings | None:
        """The upstream serving a canonical registry name, or None when it is not routed."""
        found = self.upstreams.get(registry)
        if found is not None:
            return found
        for upstream in self.upstreams.values():
            if registry in upstream.aliases:
                return upstream
        if any(fnmatch.fnmatchcase(registry, pattern) for pattern in self.allow_unconfigured):
            return self._pattern_upstream(registry)
        return None

    def _pattern_upstream(self, registry: str) -> UpstreamSettings:
        return UpstreamSettings(
            name=registry,
            aliases=frozenset(),
            mirrors=(default_mirror(registry),),
            credentials=None,
            cache=CacheSettings(self.cache.backend, self.cache.directory / cache_dirname(registry)),
            policy=self.defaults,
            from_pattern=True,
        )


def default_mirror(registry: str) -> Mirror:
    """The registry's own endpoint, trusted for tags and content."""
    return Mirror(registry_endpoint(registry), frozenset(Capability))


def cache_dirname(registry: str) -> str:
    """A directory name for a registry's cache (``127.0.0.1:5000`` -> ``127.0.0.1_5000``)."""
    return registry.replace(":", "_").replace("[", "").replace("]", "")


# --------------------------------------------------------------------------- loading


def load_settings(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate a config file; raises ``ConfigError`` naming every problem."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from exc
    return parse_settings(text, source=source, env=env)


def parse_settings(
    text: str, *, source: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Validate TOML text; relative paths resolve against ``source``'s directory."""
    label = str(source) if source else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{label}: not valid TOML: {exc}"]) from exc
    reader = _Reader(label, _KeyLines(text), env if env is not None else os.environ)
    base_dir = source.parent.resolve() if source else Path.cwd()
    settings = _build(reader, _Table(reader, data, ()), base_dir, source)
    if reader.problems:
        raise ConfigError(reader.problems)
    assert settings is not None
    return settings


_TOP_KEYS = ("server", "cache", "routing", "defaults", "upstreams", "routes")


def _build(reader: _Reader, root: _Table, base_dir: Path, source: Path | None) -> Settings | None:
    server_t = root.table("server")
    server = ServerSettings(
        host=server_t.get("host", str, "0.0.0.0"),
        port=server_t.get("port", int, 5000, check=_between(1, 65535)),
        workers=server_t.get("workers", int, 1, check=_between(1, 64)),
        log_level=server_t.get(
            "log_level", str, "info", check=_one_of("debug", "info", "warning", "error")
        ),
        access_log=server_t.get("access_log", bool, False),
    )
    server_t.finish()

    cache_t = root.table("cache")
    cache = CacheSettings(
        backend=cache_t.get("backend", str, "filesystem", check=_one_of("filesystem")),
        directory=base_dir / cache_t.get("directory", str, "cache"),
    )
    cache_t.finish()

    defaults_t = root.table("defaults")
    defaults = _policy(defaults_t, UpstreamPolicy())
    defaults_t.finish()

    upstreams: dict[str, UpstreamSettings] = {}
    upstreams_t = root.table("upstreams")
    for name in upstreams_t.names():
        upstream = _upstream(reader, upstreams_t.table(name), name, defaults, cache)
        if upstream is not None:
            upstreams[upstream.name] = upstream
    _check_aliases(reader, upstreams)

    routing_t = root.table("routing")
    default_registry = routing_t.get("default_registry", str, DOCKER_HUB)
    allow = tuple(routing_t.get("allow_unconfigured", list, [], check=_strings))
    routing_t.finish()
    if canonical_registry(default_registry) not in upstreams and not reader.problems:
        reader.problem(
            ("routing", "default_registry"),
            f"{default_registry!r} is not a configured upstream; "
            f"configured: {', '.join(sorted(upstreams)) or 'none'}",
        )

    routes = tuple(
        r
        for route_t in root.tables("routes")
        if (r := _route(reader, route_t, upstreams)) is not None
    )
    _check_routes(reader, routes)
    root.finish(_TOP_KEYS)
    return Settings(
        server=server,
        cache=cache,
        defaults=defaults,
        upstreams=upstreams,
        routes=routes,
        default_registry=canonical_registry(default_registry),
        allow_unconfigured=allow,
        source=source,
    )


def _upstream(
    reader: _Reader,
    table: _Table,
    name: str,
    defaults: UpstreamPolicy,
    cache: CacheSettings,
) -> UpstreamSettings | None:
    if not REGISTRY_RE.fullmatch(name):
        reader.problem(table.path, "the table name must be a registry host[:port] like gcr.io")
        return None
    if name.lower() in DOCKER_HUB_ALIASES or name != name.lower():
        reader.problem(
            table.path,
            f"name the table by its canonical registry name, "
            f'[upstreams."{canonical_registry(name)}"]',
        )
        return None
    aliases = frozenset(
        canonical_registry(a) for a in table.get("aliases", list, [], check=_registries)
    )
    if name == DOCKER_HUB:
        aliases |= DOCKER_HUB_ALIASES
    mirrors = tuple(m for m_t in table.tables("mirrors") if (m := _mirror(m_t)) is not None) or (
        default_mirror(name),
    )
    if not any(m.can_resolve for m in mirrors):
        reader.problem(
            (*table.path, "mirrors"),
            "no mirror has the 'resolve' capability, so no tag could ever be resolved",
        )
    cache_t = table.table("cache")
    upstream_cache = CacheSettings(
        backend=cache.backend,
        directory=cache.directory / cache_t.get("directory", str, cache_dirname(name)),
    )
    cache_t.finish()
    upstream = UpstreamSettings(
        name=name,
        aliases=aliases,
        mirrors=mirrors,
        credentials=_credentials(reader, table.table("credentials")),
        cache=upstream_cache,
        policy=_policy(table, defaults),
    )
    table.finish()
    return upstream


def _policy(table: _Table, base: UpstreamPolicy) -> UpstreamPolicy:
    """The policy keys of ``[defaults]`` or an upstream table, falling back to ``base``."""
    return UpstreamPolicy(
        tag_ttl=table.duration("tag_ttl", base.tag_ttl),
        max_stale=table.duration("max_stale", base.max_stale),
        negative_ttl=table.duration("negative_ttl", base.negative_ttl),
        connect_timeout=table.duration("connect_timeout", base.connect_timeout, positive=True),
        read_timeout=table.duration("read_timeout", base.read_timeout, positive=True),
        retry_attempts=table.get("retry_attempts", int, base.retry_attempts, check=_between(1, 10)),
        retry_deadline=table.duration("retry_deadline", base.retry_deadline, positive=True),
        breaker_failures=table.get(
            "breaker_failures", int, base.breaker_failures, check=_between(1, 1000)
        ),
        breaker_cooldown=table.duration("breaker_cooldown", base.breaker_cooldown),
        proxy=table.get("proxy", str, base.proxy, check=_proxy_url),
    )


def _mirror(table: _Table) -> Mirror | None:
    url = table.get("url", str, None, check=_mirror_url, required=True)
    caps = table.get("capabilities", list, ["pull", "resolve"], check=_capabilities)
    table.finish()
    if url is None:
        return None
    return Mirror(url.rstrip("/"), frozenset(Capability(c) for c in caps))


def _credentials(reader: _Reader, table: _Table) -> Credentials | None:
    if not table.present:
        return None
    username = table.get("username", str, None)
    username_env = table.get("username_env", str, None)
    password_env = table.get("password_env", str, None)
    password_file = table.get("password_file", str, None)
    table.finish()
    if (username is None) == (username_env is None):
        reader.problem(table.path, "set exactly one of username or username_env")
        return None
    if (password_env is None) == (password_file is None):
        reader.problem(table.path, "set exactly one of password_env or password_file")
        return None
    if username_env is not None:
        username = reader.env.get(username_env)
        if username is None:
            reader.problem((*table.path, "username_env"), f"${username_env} is not set")
            return None
    if password_env is not None:
        password = reader.env.get(password_env)
        if password is None:
            reader.problem((*table.path, "password_env"), f"${password_env} is not set")
            return None
    else:
        assert password_file is not None
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            reader.problem((*table.path, "password_file"), f"cannot read: {exc.strerror}")
            return None
    assert username is not None
    return Credentials(username, Secret(password))


def _route(
    reader: _Reader, table: _Table, upstreams: Mapping[str, UpstreamSettings]
) -> Route | None:
    prefix = table.get("prefix", str, None, check=_route_prefix)
    host = table.get("host", str, None, check=_host_name)
    upstream = table.get("upstream", str, None, required=True)
    table.finish()
    if (prefix is None) == (host is None):
        reader.problem(table.path, "set exactly one of prefix or host")
        return None
    if upstream is None:
        return None
    if canonical_registry(upstream) not in upstreams:
        reader.problem(
            (*table.path, "upstream"),
            f"no upstream named {upstream!r}; configured: {', '.join(sorted(upstreams)) or 'none'}",
        )
        return None
    return Route(upstream=canonical_registry(upstream), prefix=prefix, host=host and host.lower())


def _check_aliases(reader: _Reader, upstreams: Mapping[str, UpstreamSettings]) -> None:
    owner: dict[str, str] = {}
    for upstream in upstreams.values():
        for alias in upstream.aliases:
            if alias in upstreams and alias != upstream.name:
                reader.problem(
                    ("upstreams", upstream.name, "aliases"), f"{alias!r} is an upstream of its own"
                )
            elif alias in owner:
                reader.problem(
                    ("upstreams", upstream.name, "aliases"),
                    f"{alias!r} is already an alias of {owner[alias]!r}",
                )
            owner[alias] = upstream.name


def _check_routes(reader: _Reader, routes: tuple[Route, ...]) -> None:
    seen: set[tuple[str, str]] = set()
    for index, route in enumerate(routes):
        key = ("prefix", route.prefix) if route.prefix is not None else ("host", route.host or "")
        if key in seen:
            reader.problem(("routes", index, key[0]), f"{key[1]!r} is routed twice")
        seen.add(key)


# --------------------------------------------------------------------------- value checks

Check = Callable[[Any], str | None]  # returns what was expected, or None when fine

_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float | None:
    """Seconds from a number or a string like ``90s``, ``5m``, ``1h30m``, ``7d``; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if isinstance(value, str) and _DURATION_RE.fullmatch(value):
        return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(value))
    return None


def _between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"a number from {low} to {high}"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def _strings(value: list[Any]) -> str | None:
    return None if all(isinstance(v, str) for v in value) else "a list of strings"


def _registries(value: list[Any]) -> str | None:
    ok = all(isinstance(v, str) and REGISTRY_RE.fullmatch(v) for v in value)
    return None if ok else "a list of registry hosts like gcr.io or registry.corp:5000"


def _capabilities(value: list[Any]) -> str | None:
    names = {c.value for c in Capability}
    if value and all(v in names for v in value):
        return None
    return "a non-empty list of 'pull' and/or 'resolve'"


def _mirror_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        return "an http:// or https:// base URL such as https://registry-1.docker.io"
    if parts.path.rstrip("/").endswith("/v2"):
        return "the base URL without /v2 (it is appended to every request)"
    return None


def _proxy_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme in ("http", "https", "socks5") and parts.netloc:
        return None
    return "a proxy URL such as http://proxy.corp:3128"


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


# --------------------------------------------------------------------------- the reader


class _Missing:
    pass


_MISSING: Any = _Missing()
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", bool: "true or false"}


class _Reader:
    """Collects problems, each with its key path and line."""

    def __init__(self, label: str, lines: _KeyLines, env: Mapping[str, str]) -> None:
        self.label = label
        self.lines = lines
        self.env = env
        self.problems: list[str] = []

    def problem(self, path: KeyPath, message: str) -> None:
        line = self.lines.locate(path)
        where = f"{self.label}:{line}" if line else self.label
        self.problems.append(f"{where}: {format_path(path)}: {message}")


class _Table:
    """A TOML table being read; remembers which keys were used so that the rest are errors."""

    def __init__(self, reader: _Reader, data: Any, path: KeyPath, present: bool = True) -> None:
        self.reader = reader
        self.path = path
        self.present = present
        if not isinstance(data, dict):
            reader.problem(path, "expected a table")
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def names(self) -> list[str]:
        self.used.update(self.data)
        return list(self.data)

    def get(
        self,
        key: str,
        kind: type[T],
        default: T | None,
        *,
        check: Check | None = None,
        required: bool = False,
    ) -> T | Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                self.reader.problem((*self.path, key), "is required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.reader.problem((*self.path, key), f"expected {_TYPE_NAMES.get(kind, kind)}")
            return default
        expected = check(value) if check else None
        if expected:
            self.reader.problem((*self.path, key), f"expected {expected}, got {value!r}")
            return default
        return value

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        self.used.add(key)
        if key not in self.data:
            return default
        seconds = parse_duration(self.data[key])
        if seconds is None or (positive and seconds == 0):
            self.reader.problem(
                (*self.path, key),
                f"expected a duration such as 30s, 5m, 1h30m or 7d (or seconds), "
                f"got {self.data[key]!r}",
            )
            return default
        return seconds

    def table(self, key: str) -> _Table:
        self.used.add(key)
        return _Table(self.reader, self.data.get(key, {}), (*self.path, key), key in self.data)

    def tables(self, key: str) -> list[_Table]:
        self.used.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.reader.problem((*self.path, key), "expected a list of tables")
            return []
        return [_Table(self.reader, item, (*self.path, key, i)) for i, item in enumerate(value)]

    def finish(self, known: tuple[str, ...] | None = None) -> None:
        allowed = set(known) if known is not None else self.used
        for key in self.data:
            if key not in allowed:
                hint = ", ".join(sorted(allowed)) or "none"
                self.reader.problem((*self.path, key), f"unknown key; expected one of: {hint}")


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: KeyPath) -> str:
    """``("upstreams", "gcr.io", "mirrors", 0, "url")`` -> ``upstreams."gcr.io".mirrors[0].url``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part if _BARE_KEY_RE.fullmatch(part) else f'"{part}"'
            text += f".{shown}" if text else shown
    return text or "<top level>"


class _KeyLines:
    """Best-effort map from key paths to line numbers, read off the TOML text.

    tomllib keeps no positions, so table headers (``[a."b"]``, ``[[routes]]``) and
    ``key =`` lines are scanned; a key inside an inline table is located at its parent.
    """

    _HEADER_RE = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(?:#.*)?$")
    _KEY_RE = re.compile(r'^\s*("[^"]*"|[A-Za-z0-9_.-]+)\s*=')

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        current: KeyPath = ()
        counts: dict[KeyPath, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER_RE.match(line)
            if header:
                path = _split_key(header.group(2))
                if header.group(1) == "[[":
                    index = counts.get(path, 0)
                    counts[path] = index + 1
                    path = (*path, index)
                current = path
                self.lines.setdefault(current, number)
                continue
            key = self._KEY_RE.match(line)
            if key:
                self.lines.setdefault((*current, *_split_key(key.group(1))), number)

    def locate(self, path: KeyPath) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _split_key(text: str) -> KeyPath:
    return tuple(p.strip().strip('"') for p in re.findall(r'"[^"]*"|[^.]+', text))
