"""Which proxy an upstream request takes: the standard variables, read the way Go reads them.

containerd, the Docker daemon and most registry tooling are Go programs; they read
``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY`` with ``golang.org/x/net/http/httpproxy``.
The gateway reads them the same way, so one environment routes the gateway and the
cluster's clients alike. The rules, decided per request URL (a CDN that a blob redirect
leads to may be NO_PROXY'd while the registry is not):

- ``HTTPS_PROXY`` serves ``https://`` URLs and ``HTTP_PROXY`` serves ``http://`` URLs, never
  the other way round. The upper-case name wins over the lower-case one; an empty value
  counts as unset. A value without a scheme (``proxy.corp:3128``) means ``http://``.
- A ``proxy`` configured for an upstream stands for both, for that upstream only;
  ``NO_PROXY`` still applies to it.
- ``localhost`` and loopback addresses are never proxied: a proxy's loopback is not ours.
- ``NO_PROXY`` is a comma-separated list, case-insensitive, blanks ignored:
  ``*`` (nothing is proxied); an IP address (``10.1.2.3``, ``2001:db8::1``); a CIDR range
  (``10.0.0.0/8``); a domain (``corp.example`` matches itself and every subdomain); a leading
  ``.`` or ``*.`` (``.corp.example``) matches subdomains only. An IP address or a domain may
  carry a port (``registry.corp:5000``, ``[2001:db8::1]:443``) and then matches only requests
  to that port (80 and 443 when a URL names none). Domains are compared as text, so
  ``2.3.4`` also matches the address ``1.2.3.4``, as in Go.
- In a CGI environment (``REQUEST_METHOD`` set) ``HTTP_PROXY`` may come from a request's
  ``Proxy:`` header ("httpoxy"): an ``http://`` URL it would apply to is refused
  (``ProxyRefused``), as Go refuses it.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_PROXY_SCHEMES = ("http", "https", "socks5")


class ProxyRefused(ValueError):
    """HTTP_PROXY would apply, but a CGI environment may have set it from a request."""


def _ip(text: str) -> _IP | None:
    """The address ``text`` names, IPv4-mapped IPv6 addresses as IPv4 (Go's net.IP equality)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _idna(host: str) -> str:
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _split_port(entry: str) -> tuple[str, str]:
    """``host:port``, ``[v6]:port`` -> (host, port); a bare host or address -> (host, "")."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:  # an IPv6 address has several colons and no port
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""


@dataclass(frozen=True, slots=True)
class _Network:
    """An address (a one-address network, maybe with a port) or a CIDR range."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: str = ""

    def matches(self, ip: _IP, port: str) -> bool:
        return ip in self.network and (not self.port or self.port == port)


@dataclass(frozen=True, slots=True)
class _Domain:
    suffix: str  # always starts with "."
    itself: bool  # the entry had no leading dot: the domain itself matches too
    port: str = ""

    def matches(self, host: str, port: str) -> bool:
        named = host.endswith(self.suffix) or (self.itself and host == self.suffix[1:])
        return named and (not self.port or self.port == port)


def _parse_no_proxy(text: str) -> tuple[bool, tuple[_Network, ...], tuple[_Domain, ...]]:
    """(everything, networks, domains) of a NO_PROXY value; malformed entries are skipped."""
    networks: list[_Network] = []
    domains: list[_Domain] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True, (), ()
        if "/" in entry:
            with contextlib.suppress(ValueError):
                networks.append(_Network(ipaddress.ip_network(entry, strict=False)))
            continue
        host, port = _split_port(entry)
        if not host:
            continue
        address = _ip(host)
        if address is not None:
            networks.append(_Network(ipaddress.ip_network(address), port))
            continue
        if host.startswith("*."):
            host = host[1:]
        itself = not host.startswith(".")
        domains.append(_Domain("." + _idna(host.removeprefix(".")), itself, port))
    return False, tuple(networks), tuple(domains)


def _proxy_url(value: str) -> str | None:
    """An environment value as a proxy URL: ``host:port`` means ``http://host:port``."""
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme.lower() in _PROXY_SCHEMES and parts.netloc:
        return value
    return "http://" + value


def _first(env: Mapping[str, str], *names: str) -> str:
    return next((env[n] for n in names if env.get(n)), "")


class ProxyRules:
    """The proxy for each request URL of one upstream. Immutable; ``proxy_for`` is pure."""

    __slots__ = ("_cgi", "_domains", "_everything", "_http", "_https", "_networks")

    def __init__(
        self,
        http: str | None = None,
        https: str | None = None,
        no_proxy: str = "",
        *,
        cgi: bool = False,
    ) -> None:
        self._http = http
        self._https = https
        self._cgi = cgi
        self._everything, self._networks, self._domains = _parse_no_proxy(no_proxy)

    @classmethod
    def from_environment(cls, env: Mapping[str, str], configured: str | None = None) -> ProxyRules:
        """The rules for an upstream: its ``configured`` proxy, else the proxy variables."""
        no_proxy = _first(env, "NO_PROXY", "no_proxy")
        if configured is not None:
            return cls(configured, configured, no_proxy)
        return cls(
            _proxy_url(_first(env, "HTTP_PROXY", "http_proxy")),
            _proxy_url(_first(env, "HTTPS_PROXY", "https_proxy")),
            no_proxy,
            cgi=bool(env.get("REQUEST_METHOD")),
        )

    def proxies(self) -> Iterator[str]:
        """Every proxy URL these rules may choose."""
        yield from dict.fromkeys(p for p in (self._http, self._https) if p)

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL a request to ``url`` goes through, or None to connect directly."""
        if self._http is None and self._https is None:
            return None  # the common case, on every upstream request
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "https":
            proxy = self._https
        elif scheme == "http":
            proxy = self._http
            if proxy is not None and self._cgi:
                raise ProxyRefused(
                    "refusing to use HTTP_PROXY in a CGI environment (REQUEST_METHOD is set)"
                )
        else:
            return None
        if proxy is None:
            return None
        try:
            port = str(parts.port or _DEFAULT_PORTS[scheme])
        except ValueError:
            port = _DEFAULT_PORTS[scheme]
        return proxy if self._use_proxy(_idna(parts.hostname or ""), port) else None

    def _use_proxy(self, host: str, port: str) -> bool:
        if host == "localhost":
            return False
        address = _ip(host)
        if address is not None and address.is_loopback:
            return False
        if self._everything:
            return False
        if address is not None and any(n.matches(address, port) for n in self._networks):
            return False
        return not any(d.matches(host, port) for d in self._domains)


NO_PROXIES = ProxyRules()


@dataclass(frozen=True, slots=True)
class ProxyEndpoint:
    """A proxy URL split for a client: the URL without credentials, and the
    ``Proxy-Authorization`` value the credentials make (None without any)."""

    url: str
    authorization: str | None

    @classmethod
    def parse(cls, proxy: str) -> ProxyEndpoint:
        parts = urlsplit(proxy)
        if parts.username is None:
            return cls(proxy, None)
        host = parts.netloc.rpartition("@")[2]
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        return cls(
            parts._replace(netloc=host).geturl(),
            "Basic " + base64.b64encode(credentials.encode()).decode("ascii"),
        )
