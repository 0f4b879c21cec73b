"""Configuration: ``mirrors.toml`` read into frozen, validated settings.

- ``model.py``: the settings as the rest of mirrorrouter sees them;
- ``load.py``: reading and validating the file, table by table;
- ``reader.py``: the key-path-aware TOML reading that names every problem;
- ``security.py``, ``targets.py``, ``storage.py``: the tables of access and logins, of
  hosted sets, groups and routes, of object stores and coordination;
- ``discovery.py``: which file is read when none is named (one rule for every command).
"""

from __future__ import annotations

from mirrorrouter.config.load import load_settings, parse_settings
from mirrorrouter.config.model import (
    AccessRule,
    AccessSettings,
    AuditSettings,
    AuthSettings,
    CacheSettings,
    Capability,
    ConfigError,
    Credentials,
    Mirror,
    Route,
    Secret,
    ServerSettings,
    ServerTlsSettings,
    Settings,
    TlsSettings,
    UpstreamPolicy,
    UpstreamSettings,
    cache_dirname,
    default_mirror,
    redact_url,
)
from mirrorrouter.config.reader import format_path, parse_duration

__all__ = [
    "AccessRule",
    "AccessSettings",
    "AuditSettings",
    "AuthSettings",
    "CacheSettings",
    "Capability",
    "ConfigError",
    "Credentials",
    "Mirror",
    "Route",
    "Secret",
    "ServerSettings",
    "ServerTlsSettings",
    "Settings",
    "TlsSettings",
    "UpstreamPolicy",
    "UpstreamSettings",
    "cache_dirname",
    "default_mirror",
    "format_path",
    "load_settings",
    "parse_duration",
    "parse_settings",
    "redact_url",
]
