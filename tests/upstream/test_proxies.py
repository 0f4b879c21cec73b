"""Which proxy a request URL takes: HTTP(S)_PROXY and NO_PROXY as Go's httpproxy reads them."""

from __future__ import annotations

import base64

import pytest

from mirrorrouter.config.model import redact_url as redact
from mirrorrouter.upstream.proxies import ProxyEndpoint, ProxyRefused, ProxyRules

P = "http://proxy.corp:3128"  # HTTP_PROXY
S = "http://secure.corp:3129"  # HTTPS_PROXY
BOTH = {"HTTP_PROXY": P, "HTTPS_PROXY": S}


def no_proxy(value: str) -> dict[str, str]:
    return {**BOTH, "NO_PROXY": value}


# (environment, request URL, the proxy chosen or None for a direct connection)
TABLE: list[tuple[dict[str, str], str, str | None]] = [
    # Each scheme has its own variable, never the other one.
    (BOTH, "http://registry.corp/v2/", P),
    (BOTH, "https://registry.corp/v2/", S),
    ({"HTTP_PROXY": P}, "https://registry.corp/v2/", None),
    ({"HTTPS_PROXY": S}, "http://registry.corp/v2/", None),
    ({}, "https://registry.corp/v2/", None),
    # Upper case wins over lower case; an empty value counts as unset.
    ({"HTTP_PROXY": P, "http_proxy": "http://lower:1"}, "http://r.corp/", P),
    ({"HTTP_PROXY": "", "http_proxy": "http://lower:1"}, "http://r.corp/", "http://lower:1"),
    ({"https_proxy": S}, "https://r.corp/", S),
    ({**BOTH, "NO_PROXY": "a.corp", "no_proxy": "b.corp"}, "https://a.corp/", None),
    ({**BOTH, "NO_PROXY": "a.corp", "no_proxy": "b.corp"}, "https://b.corp/", S),
    ({**BOTH, "no_proxy": "b.corp"}, "https://b.corp/", None),
    # A value without a scheme is an http:// proxy; socks5:// is kept.
    ({"HTTPS_PROXY": "proxy.corp:3128"}, "https://r.corp/", "http://proxy.corp:3128"),
    ({"HTTPS_PROXY": "10.0.0.1:3128"}, "https://r.corp/", "http://10.0.0.1:3128"),
    ({"HTTPS_PROXY": "socks5://s.corp:1080"}, "https://r.corp/", "socks5://s.corp:1080"),
    # localhost and loopback addresses are never proxied; 0.0.0.0 is not loopback.
    (BOTH, "http://localhost:5000/v2/", None),
    (BOTH, "https://127.0.0.1/v2/", None),
    (BOTH, "https://127.9.9.9/v2/", None),
    (BOTH, "https://[::1]:5000/v2/", None),
    (BOTH, "https://[::ffff:127.0.0.1]/v2/", None),
    (BOTH, "https://0.0.0.0:5000/v2/", S),
    # "*" means nothing is proxied.
    (no_proxy("*"), "https://registry.corp/", None),
    (no_proxy("a.corp, *"), "https://registry.corp/", None),
    # A domain matches itself and its subdomains, never a longer name.
    (no_proxy("corp.example"), "https://corp.example/", None),
    (no_proxy("corp.example"), "https://reg.corp.example/", None),
    (no_proxy("corp.example"), "https://a.b.corp.example/", None),
    (no_proxy("corp.example"), "https://notcorp.example/", S),
    (no_proxy("corp.example"), "https://corp.example.com/", S),
    # A leading "." or "*." matches subdomains only.
    (no_proxy(".corp.example"), "https://corp.example/", S),
    (no_proxy(".corp.example"), "https://reg.corp.example/", None),
    (no_proxy("*.corp.example"), "https://corp.example/", S),
    (no_proxy("*.corp.example"), "https://reg.corp.example/", None),
    # Case-insensitive, blanks and empty entries ignored.
    (no_proxy("Corp.Example"), "https://REG.CORP.EXAMPLE/", None),
    (no_proxy(" ,  other.example ,  corp.example , "), "https://corp.example/", None),
    # host:port entries match that port only; a URL without a port has the scheme's port.
    (no_proxy("corp.example:5000"), "https://corp.example:5000/", None),
    (no_proxy("corp.example:5000"), "https://corp.example/", S),
    (no_proxy("corp.example:443"), "https://corp.example/", None),
    (no_proxy("corp.example:443"), "http://corp.example/", P),
    (no_proxy("corp.example:80"), "http://corp.example/", None),
    # IP addresses, with and without a port.
    (no_proxy("10.1.2.3"), "http://10.1.2.3:5000/", None),
    (no_proxy("10.1.2.3"), "http://10.1.2.4/", P),
    (no_proxy("10.1.2.3:5000"), "http://10.1.2.3:5000/", None),
    (no_proxy("10.1.2.3:5000"), "http://10.1.2.3/", P),
    (no_proxy("10.1.2.3"), "http://[::ffff:10.1.2.3]/", None),
    (no_proxy("0.0.0.0"), "https://0.0.0.0:5000/", None),
    # CIDR ranges match addresses, never names.
    (no_proxy("10.0.0.0/8"), "https://10.9.9.9/", None),
    (no_proxy("10.0.0.0/8"), "https://11.0.0.1/", S),
    (no_proxy("10.0.0.0/8"), "https://ten.corp/", S),
    (no_proxy("10.1.2.3/8"), "https://10.200.0.1/", None),  # host bits are ignored
    # IPv6: bare, bracketed with a port, CIDR.
    (no_proxy("2001:db8::1"), "https://[2001:db8::1]/", None),
    (no_proxy("2001:DB8::1"), "https://[2001:db8::1]:5000/", None),
    (no_proxy("[2001:db8::1]:5000"), "https://[2001:db8::1]:5000/", None),
    (no_proxy("[2001:db8::1]:5000"), "https://[2001:db8::1]/", S),
    (no_proxy("2001:db8::/32"), "https://[2001:db8:ffff::1]/", None),
    (no_proxy("2001:db8::/32"), "https://[2001:db9::1]/", S),
    # Domains compare as text, so a partial address matches by suffix (as in Go).
    (no_proxy("2.3.4"), "http://1.2.3.4/", None),
    # Internationalised names match their punycode form.
    (no_proxy("bücher.example"), "https://xn--bcher-kva.example/", None),
    # Malformed entries are skipped, not taken as "everything".
    (no_proxy(":80, 10.0.0.0/99, [::1"), "https://registry.corp/", S),
    # In a CGI environment HTTPS_PROXY still applies.
    ({**BOTH, "REQUEST_METHOD": "GET"}, "https://registry.corp/", S),
]


@pytest.mark.parametrize(("env", "url", "expected"), TABLE)
def test_proxy_for(env: dict[str, str], url: str, expected: str | None) -> None:
    """Each request URL gets the proxy Go's httpproxy would give it for that environment."""
    assert ProxyRules.from_environment(env).proxy_for(url) == expected


def test_cgi_environment_refuses_http_proxy() -> None:
    """With REQUEST_METHOD set, an http:// URL that HTTP_PROXY would serve is refused,
    since a request's Proxy: header can set HTTP_PROXY there ("httpoxy")."""
    rules = ProxyRules.from_environment({**BOTH, "REQUEST_METHOD": "GET", "NO_PROXY": "r.corp"})
    with pytest.raises(ProxyRefused):
        rules.proxy_for("http://r.corp/v2/")
    assert ProxyRules.from_environment({"REQUEST_METHOD": "GET"}).proxy_for("http://r/") is None


def test_configured_proxy_serves_both_schemes_and_keeps_no_proxy() -> None:
    """An upstream's configured proxy replaces both variables; NO_PROXY still applies."""
    configured = "http://upstream-proxy:8080"
    env = {**BOTH, "NO_PROXY": "cdn.corp", "REQUEST_METHOD": "GET"}
    rules = ProxyRules.from_environment(env, configured)
    assert rules.proxy_for("http://registry.corp/v2/") == configured
    assert rules.proxy_for("https://registry.corp/v2/") == configured
    assert rules.proxy_for("https://cdn.corp/blob") is None
    assert list(rules.proxies()) == [configured]


def test_credentials_become_a_header_and_are_redacted() -> None:
    """User info of a proxy URL becomes Proxy-Authorization (percent-decoded); shown, it is
    replaced by ***."""
    endpoint = ProxyEndpoint.parse("http://alice:p%40ss@proxy.corp:3128")
    assert endpoint.url == "http://proxy.corp:3128"
    assert endpoint.authorization == "Basic " + base64.b64encode(b"alice:p@ss").decode()
    assert ProxyEndpoint.parse("http://proxy.corp:3128").authorization is None
    assert redact("http://alice:p%40ss@proxy.corp:3128") == "http://***@proxy.corp:3128"
    assert redact("http://proxy.corp:3128") == "http://proxy.corp:3128"
    assert redact("alice:s3cret@proxy.corp:3128") == "***@proxy.corp:3128"
    assert redact("socks5://a:b@s.corp:1080/x@y") == "socks5://***@s.corp:1080/x@y"
