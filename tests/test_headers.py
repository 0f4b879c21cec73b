"""Header syntax: the Host grammar the gateway accepts, and challenges built of quoted strings."""

from __future__ import annotations

import re

import pytest

from mirrorrouter.errors import RegistryError
from mirrorrouter.headers import Authority, challenge, parse_host, quoted_string
from mirrorrouter.oci import parse_request


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mirror.corp", Authority("mirror.corp")),
        ("Mirror.Corp:5000", Authority("mirror.corp", 5000)),
        ("localhost:0", Authority("localhost", 0)),
        ("127.0.0.1:5000", Authority("127.0.0.1", 5000)),
        ("registry_1.internal", Authority("registry_1.internal")),
        ("mirror.corp.", Authority("mirror.corp.")),
        ("[::1]", Authority("[::1]")),
        ("[2001:DB8::1]:443", Authority("[2001:db8::1]", 443)),
        ("[::ffff:10.0.0.1]:80", Authority("[::ffff:10.0.0.1]", 80)),
        ("a" * 63 + "." + "b" * 63, Authority("a" * 63 + "." + "b" * 63)),
    ],
)
def test_valid_hosts_parse_to_host_and_port(value: str, expected: Authority) -> None:
    """host[:port] with a DNS name, an IPv4 address or a bracketed IPv6 literal is accepted."""
    assert parse_host(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        'x",service="y',
        "mirror.corp\r\nX-Injected: 1",
        "mirror corp",
        "mirror.corp/path",
        "user@mirror.corp",
        "mirror..corp",
        ".mirror.corp",
        "-mirror.corp",
        "mirror.corp:",
        "mirror.corp:65536",
        "mirror.corp:5000:1",
        "mirror.corp:+80",
        "mirror.corp:\uff10",  # a full-width digit: str.isdigit() says yes
        "\uff4dirror.corp",  # a full-width letter
        "a" * 64,
        ("a" * 60 + ".") * 5,
        "::1",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[fe80::1%eth0]",
        "[not-an-address]",
        "[127.0.0.1]",
    ],
)
def test_anything_else_is_refused(value: str) -> None:
    """Quotes, CR/LF, spaces, paths, user info, empty labels, bad ports and overlong names."""
    with pytest.raises(ValueError):
        parse_host(value)


def test_authority_prints_as_written_in_a_url() -> None:
    """An Authority reads back as host[:port], the form a URL's authority takes."""
    assert str(parse_host("Mirror.Corp:5000")) == "mirror.corp:5000"
    assert str(parse_host("[::1]:5000")) == "[::1]:5000"
    assert str(parse_host("mirror.corp")) == "mirror.corp"


def test_a_bad_host_is_a_name_invalid_400_at_the_door() -> None:
    """parse_request refuses a forged Host with NAME_INVALID (400), naming what was expected."""
    with pytest.raises(RegistryError) as refused:
        parse_request("GET", "/v2/", host='x",service="y')
    assert refused.value.code.name == "NAME_INVALID"
    assert refused.value.status == 400
    assert "host[:port]" in refused.value.message
    assert parse_request("GET", "/v2/", host="Mirror.Corp:5000").host == "mirror.corp"
    assert parse_request("GET", "/v2/", host="[::1]:5000").host == "[::1]"
    assert parse_request("GET", "/v2/", host="").host == ""  # HTTP/1.0: no Host


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", '"plain"'),
        ('x",service="y', '"x\\",service=\\"y"'),
        ("back\\slash", '"back\\\\slash"'),
        ('\\"', '"\\\\\\""'),
        ("cr\r\nlf\x00\x7f", '"crlf"'),
        ("tab\tstays", '"tab\tstays"'),
        ("", '""'),
    ],
)
def test_quoted_string_escapes_quote_and_backslash(value: str, quoted: str) -> None:
    """ " and \\ are escaped; control characters a quoted string cannot hold are dropped."""
    assert quoted_string(value) == quoted


# RFC 9110 auth-param with a quoted-string value: token "=" DQUOTE *( qdtext / quoted-pair ) DQUOTE
_PARAM_RE = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)="((?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\.)*)"')


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """A strict parse of one challenge whose parameters are all quoted strings."""
    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM_RE.match(rest, position)
        assert match, f"not an auth-param at {rest[position:]!r}"
        assert match.group(1) not in params, f"{match.group(1)} given twice"
        params[match.group(1)] = re.sub(r"\\(.)", r"\1", match.group(2))
        position = match.end()
        if position < len(rest):
            assert rest[position] == ",", rest[position:]
            position += 1
    return scheme, params


def test_challenge_values_cannot_add_parameters() -> None:
    """A value holding quotes and commas stays one parameter and reads back unchanged."""
    hostile = 'http://x",service="evil/auth/token'
    value = challenge("Bearer", realm=hostile, service="mirrorrouter", scope=None)
    assert parse_challenge(value) == ("Bearer", {"realm": hostile, "service": "mirrorrouter"})
    scope = "repository:a/b:pull,push"
    value = challenge("Bearer", realm="http://m/auth/token", service="s", scope=scope)
    assert parse_challenge(value)[1]["scope"] == scope
