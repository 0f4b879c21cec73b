"""Load ``mirrors.toml``: validate every table into the model (model.py).

Every problem is reported with its key path (``upstreams."gcr.io".mirrors[0].url``), the
line it stands on where that can be found, and what was expected. All problems of a file are
collected and raised together as one ``ConfigError``. Unknown keys are errors: a typo must
never silently fall back to a default.

Relative paths are relative to the directory of the config file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirrorrouter.config.model import (
    CacheSettings,
    Capability,
    ConfigError,
    Credentials,
    GroupSettings,
    HostedSettings,
    Mirror,
    Secret,
    ServerSettings,
    Settings,
    UpstreamPolicy,
    UpstreamSettings,
    cache_dirname,
    default_mirror,
    pin_pattern_problem,
    redact_url,
)
from mirrorrouter.config.reader import (
    KeyLines,
    Reader,
    Table,
    between,
    format_path,
    one_of,
    strings,
)
from mirrorrouter.config.security import (
    check_listeners,
    check_principals,
    load_access,
    load_access_rules,
    load_audit,
    load_auth,
    load_server_tls,
    load_tls,
)
from mirrorrouter.config.storage import (
    BACKENDS,
    check_backend,
    load_coordination,
    load_object_store,
)
from mirrorrouter.config.targets import (
    Targets,
    check_aliases,
    check_routes,
    load_group,
    load_hosted,
    load_route,
    registries,
)
from mirrorrouter.reference import (
    DOCKER_HUB,
    DOCKER_HUB_ALIASES,
    REGISTRY_RE,
    canonical_registry,
)


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
    reader = Reader(label, KeyLines(text), env if env is not None else os.environ)
    base_dir = source.parent.resolve() if source else Path.cwd()
    settings = _build(reader, Table(reader, data, ()), base_dir, source)
    if reader.problems:
        raise ConfigError(reader.problems)
    assert settings is not None
    return settings


_TOP_KEYS = (
    "server",
    "cache",
    "routing",
    "defaults",
    "upstreams",
    "routes",
    "auth",
    "access",
    "audit",
    "hosted",
    "groups",
    "coordination",
)


def _build(reader: Reader, root: Table, base_dir: Path, source: Path | None) -> Settings | None:
    server_t = root.table("server")
    default = ServerSettings()
    server = ServerSettings(
        host=server_t.get("host", str, "0.0.0.0"),
        port=server_t.get("port", int, 5000, check=between(0, 65535)),
        workers=server_t.get("workers", int, 1, check=between(1, 64)),
        log_level=server_t.get(
            "log_level", str, "info", check=one_of("debug", "info", "warning", "error")
        ),
        access_log=server_t.get("access_log", bool, False),
        header_timeout=server_t.duration("header_timeout", default.header_timeout, positive=True),
        body_timeout=server_t.duration("body_timeout", default.body_timeout, positive=True),
        keepalive_timeout=server_t.duration(
            "keepalive_timeout", default.keepalive_timeout, positive=True
        ),
        send_timeout=server_t.duration("send_timeout", default.send_timeout, positive=True),
        max_connections=server_t.get(
            "max_connections", int, default.max_connections, check=between(1, 1_000_000)
        ),
        tls=load_server_tls(server_t.table("tls"), base_dir),
    )
    server_t.finish()
    check_listeners(reader, server)

    cache_t = root.table("cache")
    backend = cache_t.get("backend", str, "filesystem", check=one_of(*BACKENDS))
    store = load_object_store(reader, cache_t.table("s3"), None)
    check_backend(reader, ("cache", "backend"), backend, store)
    cache = CacheSettings(
        backend=backend,
        directory=base_dir / cache_t.get("directory", str, "cache"),
        max_size=cache_t.size("max_size"),
        pins=tuple(cache_t.get("pins", list, [], check=_pin_patterns)),
        object_store=store,
    )
    cache_t.finish()

    defaults_t = root.table("defaults")
    defaults = _policy(defaults_t, UpstreamPolicy())
    defaults_t.finish()

    upstreams: dict[str, UpstreamSettings] = {}
    upstreams_t = root.table("upstreams")
    for name in upstreams_t.names():
        upstream = _upstream(reader, upstreams_t.table(name), name, defaults, cache, base_dir)
        if upstream is not None:
            upstreams[upstream.name] = upstream
    hosted: dict[str, HostedSettings] = {}
    hosted_t = root.table("hosted")
    for name in hosted_t.names():
        found = load_hosted(reader, hosted_t.table(name), name, cache, base_dir, upstreams)
        if found is not None:
            hosted[name] = found
    groups: dict[str, GroupSettings] = {}
    groups_t = root.table("groups")
    for name in groups_t.names():
        group = load_group(reader, groups_t.table(name), name, upstreams, hosted)
        if group is not None:
            groups[name] = group
    targets = Targets(upstreams, hosted, groups)
    check_aliases(reader, targets)

    routing_t = root.table("routing")
    default_registry = routing_t.get("default_registry", str, DOCKER_HUB)
    allow = tuple(routing_t.get("allow_unconfigured", list, [], check=strings))
    routing_t.finish()
    default_target = targets.name_of(default_registry)
    if default_target is None and not reader.problems:
        reader.problem(
            ("routing", "default_registry"),
            f"{default_registry!r} is not a configured upstream, hosted set or group; "
            f"configured: {targets.listing()}",
        )

    routes = tuple(
        route
        for route_t in root.tables("routes")
        if (route := load_route(reader, route_t, targets)) is not None
    )
    check_routes(reader, routes)
    auth = load_auth(reader, root.table("auth"), base_dir, cache.directory)
    access = load_access(root.table("access"))
    audit = load_audit(root.table("audit"), base_dir)
    coordination = load_coordination(reader, root.table("coordination"))
    rules = {("upstreams", u.name): u.access for u in upstreams.values()}
    rules.update({("hosted", h.name): h.access for h in hosted.values()})
    check_principals(reader, rules, auth)
    root.finish(_TOP_KEYS)
    return Settings(
        server=server,
        cache=cache,
        defaults=defaults,
        upstreams=upstreams,
        routes=routes,
        default_registry=default_target or default_registry,
        allow_unconfigured=allow,
        auth=auth,
        access=access,
        audit=audit,
        source=source,
        hosted=hosted,
        groups=groups,
        coordination=coordination,
    )


def _upstream(
    reader: Reader,
    table: Table,
    name: str,
    defaults: UpstreamPolicy,
    cache: CacheSettings,
    base_dir: Path,
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
        canonical_registry(a) for a in table.get("aliases", list, [], check=registries)
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
    directory = cache_t.get("directory", str, cache_dirname(name))
    backend = cache_t.get("backend", str, cache.backend, check=one_of(*BACKENDS))
    store = load_object_store(reader, cache_t.table("s3"), cache.object_store)
    check_backend(reader, (*table.path, "cache", "backend"), backend, store)
    upstream_cache = CacheSettings(
        backend=backend,
        directory=cache.directory / directory,
        max_size=cache_t.size("max_size"),
        pins=cache.pins,
        object_store=store,
        key=directory,
    )
    cache_t.finish()
    upstream = UpstreamSettings(
        name=name,
        aliases=aliases,
        mirrors=mirrors,
        credentials=_credentials(reader, table.table("credentials")),
        cache=upstream_cache,
        policy=_policy(table, defaults),
        access=load_access_rules(table.tables("access")),
        tls=load_tls(table.table("tls"), base_dir),
    )
    table.finish()
    return upstream


def _policy(table: Table, base: UpstreamPolicy) -> UpstreamPolicy:
    """The policy keys of ``[defaults]`` or an upstream table, falling back to ``base``."""
    return UpstreamPolicy(
        tag_ttl=table.duration("tag_ttl", base.tag_ttl),
        max_stale=table.duration("max_stale", base.max_stale),
        negative_ttl=table.duration("negative_ttl", base.negative_ttl),
        connect_timeout=table.duration("connect_timeout", base.connect_timeout, positive=True),
        read_timeout=table.duration("read_timeout", base.read_timeout, positive=True),
        first_byte_timeout=table.duration(
            "first_byte_timeout", base.first_byte_timeout, positive=True
        ),
        hedge=table.get("hedge", bool, base.hedge),
        retry_attempts=table.get("retry_attempts", int, base.retry_attempts, check=between(1, 10)),
        retry_deadline=table.duration("retry_deadline", base.retry_deadline, positive=True),
        breaker_failures=table.get(
            "breaker_failures", int, base.breaker_failures, check=between(1, 1000)
        ),
        breaker_cooldown=table.duration("breaker_cooldown", base.breaker_cooldown),
        max_list_bytes=table.size("max_list_bytes", base.max_list_bytes) or base.max_list_bytes,
        proxy=_proxy(table, base.proxy),
        verify_before_send=table.size("verify_before_send", base.verify_before_send, zero=True),
    )


def _mirror(table: Table) -> Mirror | None:
    url = table.get("url", str, None, check=_mirror_url, required=True, shown=_redacted)
    caps = table.get("capabilities", list, ["pull", "resolve"], check=_capabilities)
    table.finish()
    if url is None:
        return None
    if "@" in urlsplit(url).netloc:
        # Mirror URLs are shown everywhere (check-config, resolve, the status page, logs,
        # error details): credentials have a table of their own, read from the environment.
        credentials = format_path((*table.path[:2], "credentials"))
        table.reader.problem(
            (*table.path, "url"),
            f"a mirror URL must not carry user:password@ (got {_redacted(url)}); give the "
            f"credentials in [{credentials}] as username (or username_env) and "
            f"password_env (or password_file)",
        )
        return None
    return Mirror(url.rstrip("/"), frozenset(Capability(c) for c in caps))


def _credentials(reader: Reader, table: Table) -> Credentials | None:
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


# --------------------------------------------------------------------------- value checks


def _pin_patterns(value: list[Any]) -> str | None:
    for item in value:
        if not isinstance(item, str):
            return "a list of strings"
        problem = pin_pattern_problem(item)
        if problem is not None:
            return f"a list of {problem} ({item!r} is not one)"
    return None


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


def _redacted(value: Any) -> str:
    """A refused URL value for a problem message, without what may be credentials."""
    return repr(redact_url(value)) if isinstance(value, str) else repr(value)


def _proxy(table: Table, default: str | None) -> str | None:
    """The ``proxy`` key; a proxy URL may carry credentials, so a bad one is shown redacted."""
    value = table.get("proxy", str, None)
    if value is None:
        return default
    parts = urlsplit(value)
    if parts.scheme in ("http", "https", "socks5") and parts.hostname:
        return str(value)
    table.reader.problem(
        (*table.path, "proxy"),
        f"expected a proxy URL such as http://proxy.corp:3128, got {_redacted(value)}",
    )
    return default
