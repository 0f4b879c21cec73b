"""Where clients reach the mirror: the ``--mirror-url`` checked, or made from ``[server]``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from mirrorrouter.config import Settings
from mirrorrouter.reference import REGISTRY_RE

_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_LOOPBACK_NAMES = ("localhost",)


class ClientConfigError(ValueError):
    """A mirror URL or client name that configuration cannot be generated for."""


@dataclass(frozen=True, slots=True)
class MirrorURL:
    """Where clients reach the mirror: ``scheme://host[:port]``, no path."""

    scheme: str  # http or https
    authority: str  # host[:port] as clients write it in image names

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    @property
    def insecure(self) -> bool:
        """Plain HTTP: every client must be told to allow it."""
        return self.scheme == "http"

    @property
    def hostname(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # parse_mirror_url checked it
        return host

    @property
    def port_suffix(self) -> str:
        """``:5000`` when the URL names a port, else empty."""
        port = urlsplit(self.url).port
        return f":{port}" if port is not None else ""

    @property
    def is_loopback(self) -> bool:
        host = self.hostname
        if host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_mirror_url(text: str) -> MirrorURL:
    """Check a mirror URL: ``http://`` or ``https://``, a host, an optional port, no path."""
    example = "such as http://mirror.corp:5000"
    try:
        parts = urlsplit(text.strip())
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ClientConfigError(f"mirror URL {text!r} is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise ClientConfigError(
            f"mirror URL {text!r} must start with http:// or https://, {example}"
        )
    if not parts.hostname:
        raise ClientConfigError(f"mirror URL {text!r} names no host; give one, {example}")
    if parts.username is not None or parts.password is not None:
        raise ClientConfigError(f"mirror URL {text!r} must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ClientConfigError(
            f"mirror URL {text!r} must be scheme://host[:port] with no path, query or "
            f"fragment: the mirror serves /v2/ at its root, and containerd (which sends "
            f"?ns=) and the Docker daemon (which rejects a mirror with a path) need none"
        )
    authority = parts.netloc
    if not REGISTRY_RE.fullmatch(authority) or (port is not None and port == 0):
        raise ClientConfigError(
            f"mirror URL {text!r}: {authority!r} is not a host[:port] that can stand in an "
            f"image name, {example}"
        )
    return MirrorURL(parts.scheme, authority)


def default_mirror_url(settings: Settings) -> str:
    """``http://<server.host>:<server.port>``, with localhost for a wildcard address; with
    ``[server.tls]``, ``https://`` and its port."""
    host = settings.server.host
    if host in _WILDCARD_HOSTS:
        host = "localhost"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    if settings.server.tls is not None:
        return f"https://{host}:{settings.server.tls.port}"
    return f"http://{host}:{settings.server.port}"
