"""Load the security tables: ``[auth]``, ``[access]``, ``[audit]``, ``[server.tls]``, and per
upstream its ``[[upstreams."x".access]]`` rules and ``[upstreams."x".tls]``."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mirrorrouter.config.model import (
    AccessRule,
    AccessSettings,
    AuditSettings,
    AuthSettings,
    ServerSettings,
    ServerTlsSettings,
    TlsSettings,
)
from mirrorrouter.config.reader import KeyPath, Reader, Table, between, one_of, strings

TLS_VERSIONS = ("1.2", "1.3")


def load_auth(reader: Reader, table: Table, base_dir: Path, cache_dir: Path) -> AuthSettings | None:
    """``[auth]``: absent means no client authentication (every client is anonymous)."""
    if not table.present:
        table.finish()
        return None
    htpasswd = table.get("htpasswd", str, None, required=True)
    secret = table.get("secret_file", str, None)
    ttl = table.duration("token_ttl", 900.0, positive=True)
    realm = table.get("realm", str, None, check=_url)
    service = table.get("service", str, "mirrorrouter")
    groups_t = table.table("groups")
    groups = {
        name: frozenset(groups_t.get(name, list, [], check=strings)) for name in groups_t.names()
    }
    groups_t.finish()
    monitoring = table.get("monitoring", list, ["authenticated"], check=_principals)
    _check_groups(reader, (*table.path, "monitoring"), monitoring, groups)
    table.finish()
    if htpasswd is None:
        return None
    path = base_dir / htpasswd
    if not path.is_file():
        reader.problem((*table.path, "htpasswd"), f"no readable file at {path}")
    return AuthSettings(
        htpasswd=path,
        secret_file=base_dir / secret if secret else cache_dir / ".token-secret",
        token_ttl=ttl,
        groups=groups,
        realm=realm,
        service=service,
        monitoring=frozenset(monitoring),
    )


def load_access(table: Table) -> AccessSettings:
    """``[access]``: gateway-wide allow and deny lists of canonical repository names."""
    access = AccessSettings(
        allow=tuple(table.get("allow", list, [], check=_patterns)),
        deny=tuple(table.get("deny", list, [], check=_patterns)),
    )
    table.finish()
    return access


def load_audit(table: Table, base_dir: Path) -> AuditSettings:
    """``[audit]``: where the JSON lines of the audit log go."""
    file = table.get("file", str, None)
    table.finish()
    return AuditSettings(file=base_dir / file if file else None)


def load_access_rules(tables: list[Table], *, push: bool = False) -> tuple[AccessRule, ...]:
    """``[[upstreams."x".access]]`` (pull) and ``[[hosted."x".access]]`` (pull and push):
    ordered rules; the first whose repositories match decides."""
    rules = []
    for table in tables:
        repositories = table.get("repositories", list, ["*"], check=_patterns)
        pull = table.get("pull", list, None, check=_principals, required=not push)
        pushers = table.get("push", list, [], check=_principals_or_none) if push else []
        table.finish()
        if pull is not None or push:
            rules.append(AccessRule(tuple(repositories), frozenset(pull or ()), frozenset(pushers)))
    return tuple(rules)


def load_tls(table: Table, base_dir: Path) -> TlsSettings:
    """``[upstreams."x".tls]``: a CA bundle for TLS inspection, a client certificate."""
    values = {}
    for key in ("ca_bundle", "client_cert", "client_key"):
        value = table.get(key, str, None)
        if value is not None:
            path = base_dir / value
            if not path.is_file():
                table.reader.problem((*table.path, key), f"no readable file at {path}")
            values[key] = path
    verify = table.get("verify", bool, True)
    table.finish()
    if ("client_cert" in values) != ("client_key" in values):
        table.reader.problem(table.path, "set both client_cert and client_key, or neither")
    return TlsSettings(verify=verify, **values)


def load_server_tls(table: Table, base_dir: Path) -> ServerTlsSettings | None:
    """``[server.tls]``: the HTTPS listener; absent means none. The files must be there;
    what is in them is checked by ``check-config`` and at start (tls.py)."""
    if not table.present:
        table.finish()
        return None
    port = table.get("port", int, None, check=between(1, 65535), required=True)
    paths: dict[str, Path] = {}
    for key in ("certificate", "key", "client_ca"):
        value = table.get(key, str, None, required=key != "client_ca")
        if value is not None:
            path = base_dir / value
            if not path.is_file():
                table.reader.problem((*table.path, key), f"no readable file at {path}")
            paths[key] = path
    min_version = table.get("min_version", str, "1.2", check=one_of(*TLS_VERSIONS))
    table.finish()
    if port is None or "certificate" not in paths or "key" not in paths:
        return None
    return ServerTlsSettings(port, min_version=min_version, **paths)


def check_listeners(reader: Reader, server: ServerSettings) -> None:
    """Something must listen, and the two listeners need two ports."""
    if server.port == 0 and server.tls is None:
        reader.problem(
            ("server", "port"),
            "0 turns the plain-HTTP listener off, which needs a [server.tls] listener",
        )
    if server.tls is not None and server.tls.port == server.port:
        reader.problem(
            ("server", "tls", "port"),
            f"the plain-HTTP listener already uses port {server.port}; give each its own",
        )


def check_principals(
    reader: Reader,
    owners: Mapping[tuple[str, str], tuple[AccessRule, ...]],
    auth: AuthSettings | None,
) -> None:
    """Rules naming users or groups need [auth]; named groups must be defined.

    ``owners`` maps a table (``("upstreams", "ghcr.io")``, ``("hosted", "team")``) to its rules.
    """
    for (kind, name), rules in owners.items():
        for index, rule in enumerate(rules):
            for action, principals in (("pull", rule.pull), ("push", rule.push)):
                path = (kind, name, "access", index, action)
                if principals and "anonymous" not in principals and auth is None:
                    reader.problem(path, "rules other than 'anonymous' need an [auth] table")
                _check_groups(reader, path, principals, auth.groups if auth else {})


def _check_groups(
    reader: Reader, path: KeyPath, principals: Iterable[str], groups: Mapping[str, object]
) -> None:
    """Every ``group:<name>`` among the principals names a group of ``[auth.groups]``."""
    for principal in principals:
        group = principal.removeprefix("group:")
        if principal.startswith("group:") and group not in groups:
            reader.problem(path, f"group {group!r} is not defined in [auth.groups]")


def repository_matches(patterns: tuple[str, ...], name: str) -> bool:
    """Whether a repository name matches any glob pattern (``*`` also matches ``/``)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _patterns(value: list[Any]) -> str | None:
    if all(isinstance(v, str) and v for v in value):
        return None
    return "a list of glob patterns such as 'docker.io/library/*'"


def _principals(value: list[Any]) -> str | None:
    if value and all(isinstance(v, str) and v and v == v.strip() for v in value):
        return None
    return "a non-empty list of 'anonymous', 'authenticated', user names or 'group:<name>'"


def _principals_or_none(value: list[Any]) -> str | None:
    return None if not value else _principals(value)


def _url(value: str) -> str | None:
    if value.startswith(("http://", "https://")):
        return None
    return "an absolute http:// or https:// URL"
