"""mirrors.toml: the defaults, every key's validation, and messages naming key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorrouter.config import (
    Capability,
    ConfigError,
    UpstreamPolicy,
    load_settings,
    parse_duration,
    parse_settings,
    redact_url,
)

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[upstreams."docker.io"]
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, source=Path("/etc/m/mirrors.toml"), env=env or {})
    return info.value.problems


def test_default_config_covers_the_big_registries() -> None:
    """The shipped mirrors.toml is valid and covers docker.io, gcr.io, quay.io, ghcr.io, k8s."""
    settings = load_settings(ROOT / "mirrors.toml")
    assert set(settings.upstreams) == {
        "docker.io",
        "gcr.io",
        "quay.io",
        "ghcr.io",
        "registry.k8s.io",
    }
    assert settings.default_registry == "docker.io"
    assert settings.server.port == 5000
    assert settings.cache.backend == "filesystem"
    hub = settings.upstreams["docker.io"]
    assert hub.mirrors[0].url == "https://registry-1.docker.io"
    assert {"index.docker.io", "registry-1.docker.io"} <= hub.aliases
    assert hub.cache.directory == ROOT / "cache" / "docker.io"
    assert settings.allow_unconfigured == ()


def test_minimal_config_gets_defaults() -> None:
    """An upstream with no mirrors gets its own endpoint, trusted for resolve and pull."""
    settings = parse_settings(MINIMAL, env={})
    hub = settings.upstreams["docker.io"]
    assert [m.url for m in hub.mirrors] == ["https://registry-1.docker.io"]
    assert hub.mirrors[0].capabilities == frozenset(Capability)
    assert hub.policy.tag_ttl == 300 and hub.credentials is None


def test_server_connection_keys_have_defaults_and_read_durations() -> None:
    """The connection keys default to 10 s, 30 s, 5 s, 60 s and 4096; durations parse."""
    server = parse_settings(MINIMAL, env={}).server
    assert (server.header_timeout, server.body_timeout, server.keepalive_timeout) == (10, 30, 5)
    assert (server.send_timeout, server.max_connections) == (60, 4096)
    text = '[server]\nheader_timeout = "2s"\nbody_timeout = "1m"\nmax_connections = 100\n'
    server = parse_settings(text + MINIMAL, env={}).server
    assert (server.header_timeout, server.body_timeout, server.max_connections) == (2, 60, 100)


def test_mirror_order_and_capabilities_are_kept() -> None:
    """The mirror list keeps its order (the failover order) and each mirror's capabilities."""
    settings = parse_settings(
        """
        [upstreams."docker.io"]
        mirrors = [
          { url = "https://mirror.gcr.io/", capabilities = ["pull"] },
          { url = "https://registry-1.docker.io" },
        ]
        """,
        env={},
    )
    mirrors = settings.upstreams["docker.io"].mirrors
    assert [m.url for m in mirrors] == ["https://mirror.gcr.io", "https://registry-1.docker.io"]
    assert not mirrors[0].can_resolve and mirrors[1].can_resolve


def test_credentials_come_from_env_and_files(tmp_path: Path) -> None:
    """Credentials are read from environment variables or files and never shown in a repr."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = parse_settings(
        f"""
        [upstreams."docker.io".credentials]
        username_env = "HUB_USER"
        password_file = "{secret}"
        [upstreams."quay.io".credentials]
        username = "bot"
        password_env = "QUAY_TOKEN"
        """,
        env={"HUB_USER": "alice", "QUAY_TOKEN": "tok"},
    )
    hub = settings.upstreams["docker.io"].credentials
    quay = settings.upstreams["quay.io"].credentials
    assert hub is not None and quay is not None
    assert (hub.username, hub.password.value) == ("alice", "s3cret")
    assert (quay.username, quay.password.value) == ("bot", "tok")
    assert "s3cret" not in repr(settings) and "tok'" not in repr(settings)


def test_typo_key_is_named_with_its_line() -> None:
    """A misspelt key is refused with its key path, its line and the keys expected."""
    found = problems(
        """
[upstreams."docker.io"]
tag_tll = "5m"
"""
    )
    assert len(found) == 1
    assert found[0].startswith('/etc/m/mirrors.toml:3: upstreams."docker.io".tag_tll: unknown key')
    assert "tag_ttl" in found[0]


def test_route_naming_unknown_upstream_is_refused() -> None:
    """A route to an upstream that is not configured names routes[i].upstream."""
    found = problems(
        MINIMAL
        + """
[[routes]]
prefix = "hub"
upstream = "docker.io"

[[routes]]
prefix = "gcr"
upstream = "gcr.oi"
"""
    )
    assert len(found) == 1
    assert "routes[1].upstream" in found[0] and "'gcr.oi'" in found[0]
    assert found[0].startswith("/etc/m/mirrors.toml:10:")


def test_bad_duration_is_refused() -> None:
    """A duration that does not parse names its key and shows the expected form."""
    found = problems(
        """
[defaults]
tag_ttl = "5 minutes"
[upstreams."docker.io"]
read_timeout = 0
"""
    )
    assert any(
        p.startswith("/etc/m/mirrors.toml:3: defaults.tag_ttl: expected a duration") for p in found
    )
    assert any('upstreams."docker.io".read_timeout: expected a duration' in p for p in found)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[server]\nport = "5000"', "server.port: expected an integer"),
        ("[server]\nport = 70000", "server.port: expected a number from 0 to 65535"),
        ("[server]\nworkers = true", "server.workers: expected an integer"),
        ('[server]\nheader_timeout = "soon"', "server.header_timeout: expected a duration"),
        ("[server]\nbody_timeout = 0", "server.body_timeout: expected a duration"),
        ('[server]\nkeepalive_timeout = "-1s"', "server.keepalive_timeout: expected"),
        ("[server]\nmax_connections = 0", "server.max_connections: expected a number from 1"),
        ('[cache]\nbackend = "s4"', "cache.backend: expected one of 'filesystem'"),
        ("[bogus]\nx = 1", "bogus: unknown key"),
        ('[upstreams."docker.io"]\nmirrors = [{ url = "ftp://x" }]', "mirrors[0].url: expected"),
        ('[upstreams."docker.io"]\nmirrors = [{ url = "https://x/v2" }]', "without /v2"),
        (
            '[upstreams."docker.io"]\nmirrors = [{ uri = "https://x" }]',
            "mirrors[0].uri: unknown key",
        ),
        (
            '[upstreams."docker.io"]\nmirrors = [{ url = "https://x", capabilities = ["push"] }]',
            "capabilities: expected a non-empty list of 'pull' and/or 'resolve'",
        ),
        (
            '[upstreams."docker.io"]\nmirrors = [{ url = "https://x", capabilities = ["pull"] }]',
            "no mirror has the 'resolve' capability",
        ),
        ('[upstreams."index.docker.io"]', "name the table by its canonical registry name"),
        ('[upstreams."not a host"]', "must be a registry host"),
        ('[upstreams."docker.io"]\nproxy = "proxy:3128"', "proxy: expected a proxy URL"),
        (MINIMAL + '[routing]\ndefault_registry = "quay.io"', "routing.default_registry"),
        (MINIMAL + "[routing]\nallow_unconfigured = [1]", "expected a list of strings"),
        (MINIMAL + '[[routes]]\nprefix = "gcr.io"\nupstream = "docker.io"', "without dots"),
        (MINIMAL + '[[routes]]\nupstream = "docker.io"', "set exactly one of prefix or host"),
        (MINIMAL + '[[routes]]\nprefix = "x"', "routes[0].upstream: is required"),
        (
            MINIMAL + '[[routes]]\nprefix = "x"\nupstream = "docker.io"\n'
            '[[routes]]\nprefix = "x"\nupstream = "docker.io"',
            "routes[1].prefix: 'x' is routed twice",
        ),
        (
            '[upstreams."docker.io".credentials]\nusername = "a"',
            "set exactly one of password_env or password_file",
        ),
        (
            '[upstreams."docker.io".credentials]\nusername = "a"\npassword_env = "NOPE"',
            "password_env: $NOPE is not set",
        ),
        ("[server\nport = 1", "not valid TOML"),
    ],
)
def test_each_bad_value_gets_a_named_message(text: str, fragment: str) -> None:
    """Each bad value is refused with a message that names the key and what was expected."""
    found = problems(text)
    assert any(fragment in p for p in found), found


def test_proxy_credentials_are_never_shown() -> None:
    """A proxy URL's user:password is redacted in a config error and left out of the repr."""
    found = problems('[defaults]\nproxy = "ftp://alice:s3cret@proxy.corp:21"')
    assert any("ftp://***@proxy.corp:21" in p for p in found), found
    assert not any("s3cret" in p for p in found)
    text = '[defaults]\nproxy = "http://alice:s3cret@proxy.corp:3128"\n[upstreams."docker.io"]'
    settings = parse_settings(text, env={})
    assert settings.upstreams["docker.io"].policy.proxy == "http://alice:s3cret@proxy.corp:3128"
    assert "s3cret" not in repr(settings)


def test_policy_inherits_from_defaults_and_overrides_per_upstream() -> None:
    """[defaults] sets every upstream's policy; an upstream table overrides single keys."""
    settings = parse_settings(
        """
        [defaults]
        max_stale = "1d"
        retry_attempts = 5
        breaker_cooldown = "1m"
        [upstreams."docker.io"]
        retry_attempts = 2
        negative_ttl = 0
        [upstreams."quay.io"]
        """,
        env={},
    )
    hub = settings.upstreams["docker.io"].policy
    quay = settings.upstreams["quay.io"].policy
    assert (hub.retry_attempts, hub.max_stale, hub.negative_ttl) == (2, 86400, 0)
    assert (quay.retry_attempts, quay.breaker_cooldown, quay.negative_ttl) == (5, 60, 30)


def test_first_byte_timeout_and_hedge_default_and_override() -> None:
    """first_byte_timeout (5 s) and hedge (on) come from [defaults] and may be set per upstream."""
    settings = parse_settings(
        """
        [defaults]
        first_byte_timeout = "3s"
        [upstreams."docker.io"]
        hedge = false
        [upstreams."quay.io"]
        first_byte_timeout = "750ms"
        """,
        env={},
    )
    hub = settings.upstreams["docker.io"].policy
    quay = settings.upstreams["quay.io"].policy
    assert (hub.first_byte_timeout, hub.hedge) == (3.0, False)
    assert (quay.first_byte_timeout, quay.hedge) == (0.75, True)
    assert (UpstreamPolicy().first_byte_timeout, UpstreamPolicy().hedge) == (5.0, True)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "[defaults]\nretry_attempts = 0",
            "defaults.retry_attempts: expected a number from 1 to 10",
        ),
        ('[defaults]\nretry_deadline = "0s"', "defaults.retry_deadline: expected a duration"),
        ("[defaults]\nbreaker_failures = -1", "defaults.breaker_failures: expected a number"),
        ('[defaults]\nmax_stale = "forever"', "defaults.max_stale: expected a duration"),
        ("[defaults]\nfirst_byte_timeout = 0", "defaults.first_byte_timeout: expected a duration"),
        ('[defaults]\nhedge = "yes"', "defaults.hedge: expected true or false"),
        (
            '[upstreams."quay.io"]\nhedge = 1',
            'upstreams."quay.io".hedge: expected true or false',
        ),
        (
            '[upstreams."quay.io"]\nfirst_byte_timeout = "soon"',
            'upstreams."quay.io".first_byte_timeout: expected a duration',
        ),
        ('[defaults]\nverify_before_send = "4 parsecs"', "defaults.verify_before_send: expected a"),
        ("[defaults]\nverify_before_send = -1", "defaults.verify_before_send: expected a size"),
        (
            '[upstreams."quay.io"]\nverify_before_send = true',
            'upstreams."quay.io".verify_before_send: expected a size',
        ),
    ],
)
def test_bad_policy_values(text: str, fragment: str) -> None:
    """Policy keys are range-checked with the key path named."""
    assert any(fragment in p for p in problems(text + "\n" + MINIMAL))


def test_verify_before_send_is_a_size_set_in_defaults_or_per_upstream() -> None:
    """verify_before_send reads sizes like max_size, defaults to 4 MiB, and 0 turns it off."""
    settings = parse_settings(
        """
        [defaults]
        verify_before_send = "16MiB"
        [upstreams."docker.io"]
        verify_before_send = 0
        [upstreams."quay.io"]
        """,
        env={},
    )
    assert settings.upstreams["docker.io"].policy.verify_before_send == 0
    assert settings.upstreams["quay.io"].policy.verify_before_send == 16 * 1024 * 1024
    plain = parse_settings('[upstreams."docker.io"]\nverify_before_send = "1.5MB"', env={})
    assert plain.upstreams["docker.io"].policy.verify_before_send == 1_500_000
    assert parse_settings(MINIMAL, env={}).upstreams["docker.io"].policy.verify_before_send == (
        4 * 1024 * 1024
    )


def test_all_problems_are_reported_together() -> None:
    """Several problems in one file come back together, not one per run."""
    found = problems('[server]\nport = "x"\nworkers = 0\n[upstreams."docker.io"]\ntag_ttl = "?"')
    assert len(found) == 3


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("7d", 604800.0),
        ("250ms", 0.25),
        ("2w", 1209600.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    """Durations are seconds, or strings of number-unit pairs."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5", "5 m", "m5", -1, True, "1y", None])
def test_bad_durations(value: object) -> None:
    """Anything else is not a duration."""
    assert parse_duration(value) is None


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.toml")


def test_object_storage_and_coordination_settings(tmp_path: Path) -> None:
    """[cache.s3] for every upstream (keys from the environment), an upstream overriding the
    backend and part of the bucket settings, and [coordination] with Redis."""
    text = f"""
[cache]
backend = "s3"
directory = "{tmp_path}"
[cache.s3]
bucket = "mirror"
endpoint = "http://127.0.0.1:8333"
prefix = "/prod/"
access_key_id_env = "KEY"
secret_access_key_env = "SECRET"
[upstreams."docker.io"]
[upstreams."gcr.io"]
[upstreams."gcr.io".cache]
directory = "google"
[upstreams."gcr.io".cache.s3]
bucket = "other"
[upstreams."quay.io".cache]
backend = "filesystem"
[hosted."team"]
[coordination]
backend = "redis"
redis_url_env = "REDIS"
lock_ttl = "10s"
advertise_url_env = "ME"
"""
    env = {
        "KEY": "AKIA",
        "SECRET": "shh",
        "REDIS": "redis://:pw@127.0.0.1:6379/0",
        "ME": "http://10.0.0.5:5000/",
    }
    settings = parse_settings(text, env=env)
    hub = settings.upstreams["docker.io"].cache
    assert hub.backend == "s3" and hub.key == "docker.io"
    assert hub.object_store is not None
    assert (hub.object_store.bucket, hub.object_store.prefix) == ("mirror", "prod")
    assert hub.object_store.secret_access_key is not None
    assert hub.object_store.secret_access_key.value == "shh"
    assert "shh" not in repr(settings)
    gcr = settings.upstreams["gcr.io"].cache
    assert gcr.key == "google" and gcr.object_store is not None
    assert (gcr.object_store.bucket, gcr.object_store.endpoint) == (
        "other",
        "http://127.0.0.1:8333",
    )
    assert settings.upstreams["quay.io"].cache.backend == "filesystem"
    assert settings.hosted["team"].storage.key == "_hosted/team"
    coordination = settings.coordination
    assert coordination.backend == "redis" and coordination.lock_ttl == 10.0
    assert coordination.redis_url is not None and "pw" not in repr(coordination)
    assert coordination.advertise_url == "http://10.0.0.5:5000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[cache]\nbackend = "s3"\n', 'cache.backend: backend "s3" needs a [cache.s3] table'),
        ('[cache]\nbackend = "nfs"\n', "cache.backend: expected one of 'filesystem', 's3'"),
        ('[cache.s3]\nendpoint = "x"\n', "cache.s3.endpoint: expected an http://"),
        ('[cache.s3]\nbucket = "b"\naccess_key_id_env = "NOPE"\n', "$NOPE is not set"),
        ('[coordination]\nbackend = "redis"\n', "needs redis_url or redis_url_env"),
        ('[coordination]\nbackend = "zookeeper"\n', "coordination.backend: expected one of"),
        ('[coordination]\nredis_url = "http://x"\n', "coordination.redis_url: expected a URL"),
        ("[coordination]\nbogus = 1\n", "coordination.bogus: unknown key"),
    ],
)
def test_storage_config_errors_name_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text + '[upstreams."docker.io"]\n', env={})
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "url", ["https://bob:hunter2@registry.corp", "https://hunter2@registry.corp/hub"]
)
def test_user_info_in_a_mirror_url_is_an_error(url: str) -> None:
    """A mirror URL with user:password@ is refused, naming the key and the credentials table,
    and the password is never repeated in the message."""
    text = f'[upstreams."docker.io"]\nmirrors = [{{ url = "{url}" }}]\n'
    found = problems(text)
    assert len(found) == 1
    assert found[0].startswith('/etc/m/mirrors.toml:2: upstreams."docker.io".mirrors[0].url: ')
    assert '[upstreams."docker.io".credentials]' in found[0] and "password_env" in found[0]
    assert "hunter2" not in found[0]


def test_proxy_credentials_are_accepted_and_never_shown() -> None:
    """A proxy URL may carry credentials; they stay out of reprs and out of problems."""
    text = '[defaults]\nproxy = "http://ops:s3cret@proxy.corp:3128"\n' + MINIMAL
    settings = parse_settings(text, env={})
    policy = settings.upstreams["docker.io"].policy
    assert policy.proxy == "http://ops:s3cret@proxy.corp:3128"
    assert "s3cret" not in repr(settings)
    found = problems('[defaults]\nproxy = "ops:s3cret@proxy.corp:3128"\n' + MINIMAL)
    assert len(found) == 1 and "defaults.proxy: expected a proxy URL" in found[0]
    assert "s3cret" not in found[0]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://ops:s3cret@proxy.corp:3128", "http://***@proxy.corp:3128"),
        ("socks5://tok@proxy:1080/", "socks5://***@proxy:1080/"),
        ("http://proxy.corp:3128", "http://proxy.corp:3128"),
        (
            "ProxyError: http://a:b@p:1 refused, https://c:d@q:2",
            "ProxyError: http://***@p:1 refused, https://***@q:2",
        ),
        ("http://a:p@ss@p:1/x?y=z@w", "http://***@p:1/x?y=z@w"),
    ],
)
def test_redact_url_hides_user_info(text: str, shown: str) -> None:
    """redact_url hides every URL's user:password@ and leaves the rest as it was."""
    assert redact_url(text) == shown
