"""HTTP header syntax the gateway reads from clients and writes back to them.

- ``parse_host``: the ``Host`` header is ``host[:port]`` (RFC 9110 §7.2, RFC 3986 §3.2.2):
  a DNS name or IPv4 address, or an IPv6 literal in brackets. The gateway routes on it and
  builds its token realm's URL from it, so anything else is refused rather than pasted.
- ``challenge``: a ``WWW-Authenticate`` value whose every parameter is a quoted string
  (RFC 9110 §11.2, §5.6.4), so no value can end its string and add a parameter.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

# Labels of letters, digits, '-' and '_' (internal names use '_'), dot-separated, with an
# optional trailing dot (an absolute name); IPv4 addresses match too.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
MAX_NAME_LENGTH = 253
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB: not in a quoted string


class Authority(NamedTuple):
    """A validated ``Host``: the host in lower case (an IPv6 literal keeps its brackets)."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def parse_host(value: str) -> Authority:
    """``host[:port]`` of a Host header; raises ``ValueError`` for anything else."""
    if value.startswith("["):
        literal, bracket, after = value[1:].partition("]")
        if not bracket:
            raise ValueError("an IPv6 literal without its closing bracket")
        try:
            if "%" in literal:  # a zone: local to the client, meaningless in a URL here
                raise ValueError
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ValueError("not an IPv6 address in brackets") from None
        if after and not after.startswith(":"):
            raise ValueError("text after the IPv6 literal")
        host, colon, port = f"[{literal.lower()}]", after[:1], after[1:]
    else:
        host, colon, port = value.partition(":")
        if len(host) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(host):
            raise ValueError("not a host name or address")
        host = host.lower()
    if not colon:
        return Authority(host)
    if not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ValueError("the port is not a number from 0 to 65535")
    return Authority(host, int(port))


def quoted_string(value: str) -> str:
    """``value`` as an HTTP quoted string: ``"`` and ``\\`` escaped; control characters,
    which a quoted string cannot hold, are dropped."""
    escaped = _CONTROL_RE.sub("", value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def challenge(scheme: str, **params: str | None) -> str:
    """A ``WWW-Authenticate`` challenge: ``Bearer realm="...",service="..."``; parameters
    given as None are left out."""
    pairs = ",".join(f"{name}={quoted_string(v)}" for name, v in params.items() if v is not None)
    return f"{scheme} {pairs}"
