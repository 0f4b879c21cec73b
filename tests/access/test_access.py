"""Client authentication, access rules, the audit log, and credentials that stay home."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from mirrorrouter.config import ConfigError, parse_settings
from tests.support.fakeregistry import FakeRegistry, Image, make_image, sha256
from tests.support.inprocess import Gateway, gateway

pytestmark = pytest.mark.anyio

USERS = {"alice": "wonderland", "bob": "builder", "eve": "listening"}


def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode().replace('$2b$', '$2y$')}"
        for user, pw in USERS.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def secured(tmp_path: Path, extra: str = "") -> str:
    return f"""
[cache]
directory = "{tmp_path / "cache"}"
[auth]
htpasswd = "{htpasswd(tmp_path)}"
secret_file = "{tmp_path / "secret"}"
[auth.groups]
builders = ["bob"]
[access]
deny = ["*/*miner*"]
[audit]
file = "{tmp_path / "audit.jsonl"}"
[upstreams."docker.io"]
tag_ttl = "60s"
mirrors = [{{ url = "http://upstream.test" }}]
[[upstreams."docker.io".access]]
repositories = ["private/*"]
pull = ["alice", "group:builders"]
[[upstreams."docker.io".access]]
repositories = ["*"]
pull = ["anonymous"]
[upstreams."quay.io"]
mirrors = [{{ url = "http://quay.test" }}]
[upstreams."quay.io".credentials]
username = "quaybot"
password_env = "HUB_PASSWORD"
{extra}
"""


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def token(client: httpx.AsyncClient, user: str | None = None) -> dict[str, str]:
    headers = basic(user, USERS[user]) if user else {}
    response = await client.get("/auth/token?service=mirrorrouter&scope=x", headers=headers)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


@asynccontextmanager
async def secured_gateway(tmp_path: Path, fake: FakeRegistry) -> AsyncIterator[Gateway]:
    async with gateway(tmp_path, fake, secured(tmp_path)) as gw:
        yield gw


@pytest.fixture
def private(fake: FakeRegistry) -> Image:
    return fake.add(make_image("private/app", [b"secret layer"]), "1")


async def test_login_flow_like_docker(tmp_path: Path, fake: FakeRegistry) -> None:
    """/v2/ challenges; the realm gives anonymous and user tokens; tokens open /v2/."""
    async with secured_gateway(tmp_path, fake) as gw:
        challenge = await gw.client.get("/v2/")
        assert challenge.status_code == 401
        assert challenge.headers["www-authenticate"] == (
            'Bearer realm="http://mirror/auth/token",service="mirrorrouter"'
        )
        assert json.loads(challenge.content)["errors"][0]["code"] == "UNAUTHORIZED"
        for user in (None, "alice"):
            assert (
                await gw.client.get("/v2/", headers=await token(gw.client, user))
            ).status_code == 200
        wrong = await gw.client.get("/auth/token", headers=basic("alice", "guess"))
        assert wrong.status_code == 401
        assert (await gw.client.get("/v2/", headers=basic("alice", "guess"))).status_code == 401
        assert (
            await gw.client.get("/v2/", headers={"Authorization": "Bearer forged"})
        ).status_code == 401


async def test_oauth2_form_and_refresh_tokens(tmp_path: Path, fake: FakeRegistry) -> None:
    """The OAuth2 POST form takes a password and a refresh token; refresh tokens open nothing."""
    async with secured_gateway(tmp_path, fake) as gw:
        form = {"grant_type": "password", "username": "bob", "password": "builder", "service": "m"}
        first = (await gw.client.post("/auth/token", data=form)).json()
        again = await gw.client.post(
            "/auth/token",
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
        )
        assert again.status_code == 200
        bearer = {"Authorization": f"Bearer {again.json()['access_token']}"}
        assert (await gw.client.get("/v2/", headers=bearer)).status_code == 200
        as_access = {"Authorization": f"Bearer {first['refresh_token']}"}
        assert (await gw.client.get("/v2/", headers=as_access)).status_code == 401
        bad = await gw.client.post("/auth/token", data={**form, "password": "x"})
        assert bad.status_code == 401


async def test_tokens_expire(tmp_path: Path, fake: FakeRegistry) -> None:
    """A token is refused after token_ttl."""
    async with secured_gateway(tmp_path, fake) as gw:
        bearer = await token(gw.client, "alice")
        gw.clock.now += 901
        assert (await gw.client.get("/v2/", headers=bearer)).status_code == 401


async def test_private_repository_needs_an_allowed_user(
    tmp_path: Path, fake: FakeRegistry, private: Image
) -> None:
    """Anonymous gets 401 with a scoped challenge, eve 403 DENIED, alice and bob (a group) 200."""
    async with secured_gateway(tmp_path, fake) as gw:
        anonymous = await gw.client.get("/v2/private/app/manifests/1")
        assert anonymous.status_code == 401
        assert 'scope="repository:private/app:pull"' in anonymous.headers["www-authenticate"]
        eve = await gw.client.get(
            "/v2/private/app/manifests/1", headers=await token(gw.client, "eve")
        )
        error = json.loads(eve.content)["errors"][0]
        assert eve.status_code == 403 and error["code"] == "DENIED"
        assert "eve may not pull docker.io/private/app" in error["message"]
        for user in ("alice", "bob"):
            ok = await gw.client.get(
                "/v2/private/app/manifests/1", headers=await token(gw.client, user)
            )
            assert ok.status_code == 200 and ok.content == private.manifest
        # The manifest is now cached: the fast path must apply the same rules.
        again = await gw.client.get("/v2/private/app/manifests/1")
        assert again.status_code == 401
        layer = sha256(b"secret layer")
        assert (await gw.client.get(f"/v2/private/app/blobs/{layer}")).status_code == 401
    assert fake.count("GET", "/manifests/1") == 1


async def test_public_repositories_stay_anonymous(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """With auth on, repositories a rule gives to anonymous pull without any login."""
    async with secured_gateway(tmp_path, fake) as gw:
        response = await gw.client.get("/v2/library/alpine/manifests/3.19")
    assert response.status_code == 200 and response.content == image.manifest


async def test_denied_repository_gets_an_actionable_message(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """A name matching access.deny is refused with the pattern named, before any upstream call."""
    async with secured_gateway(tmp_path, fake) as gw:
        response = await gw.client.get(
            "/v2/someone/coinminer/manifests/1", headers=await token(gw.client, "alice")
        )
    error = json.loads(response.content)["errors"][0]
    assert response.status_code == 403 and error["code"] == "DENIED"
    assert "access.deny '*/*miner*'" in error["message"]
    assert fake.requests == []


async def test_allow_list_admits_only_its_names(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A non-empty access.allow admits only matching canonical names."""
    text = f"""
[cache]
directory = "{tmp_path / "cache"}"
[access]
allow = ["docker.io/library/*"]
[upstreams."docker.io"]
mirrors = [{{ url = "http://upstream.test" }}]
"""
    fake.add(make_image("bitnami/redis", [b"r"]), "7")
    async with gateway(tmp_path, fake, text) as gw:
        assert (await gw.client.get("/v2/library/alpine/manifests/3.19")).status_code == 200
        refused = await gw.client.get("/v2/bitnami/redis/manifests/7")
    assert refused.status_code == 403
    assert (
        "not in this mirror's access.allow list"
        in json.loads(refused.content)["errors"][0]["message"]
    )


async def test_unconfigured_host_is_never_dialled(tmp_path: Path, fake: FakeRegistry) -> None:
    """A request naming a host that is not configured makes no upstream request at all."""
    async with secured_gateway(tmp_path, fake) as gw:
        for path, params in [
            ("/v2/evil.example/x/manifests/1", {}),
            ("/v2/x/manifests/1", {"ns": "10.0.0.1"}),
        ]:
            response = await gw.client.get(
                path, params=params, headers=await token(gw.client, "alice")
            )
            assert response.status_code == 404
    assert fake.requests == [] and fake.token_requests == []


async def test_private_blob_is_not_served_through_another_upstream(
    tmp_path: Path, fake: FakeRegistry, private: Image
) -> None:
    """A private blob cached for one upstream is not served when asked through another's name."""
    layer = sha256(b"secret layer")
    quay = FakeRegistry(host="quay.test", basic=("quaybot", "hunter2"))  # never saw this blob

    def by_host(hub: httpx.ASGITransport) -> httpx.AsyncBaseTransport:
        quay_transport = httpx.ASGITransport(app=quay.app)

        async def handler(request: httpx.Request) -> httpx.Response:
            target = quay_transport if request.url.host == "quay.test" else hub
            return await target.handle_async_request(request)

        return httpx.MockTransport(handler)

    async with gateway(tmp_path, fake, secured(tmp_path), wrap=by_host) as gw:
        alice = await token(gw.client, "alice")
        await gw.client.get("/v2/private/app/manifests/1", headers=alice)
        assert (
            await gw.client.get(f"/v2/private/app/blobs/{layer}", headers=alice)
        ).status_code == 200
        via_quay = await gw.client.get(f"/v2/private/app/blobs/{layer}", params={"ns": "quay.io"})
        via_quay_prefix = await gw.client.get(f"/v2/quay.io/private/app/blobs/{layer}")
    assert via_quay.status_code == 404 and via_quay_prefix.status_code == 404
    # Each was asked of quay.io itself (one after a Basic challenge), never of docker.io's cache.
    assert quay.count("GET", layer) >= 2


async def test_upstream_credentials_go_only_to_their_upstream(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """quay.io's credentials are sent to quay.test, never to docker.io's upstream."""
    fake.basic = ("quaybot", "hunter2")
    fake.add(make_image("coreos/etcd", [b"e"]), "v3")
    fake.add(make_image("library/alpine", [b"a"]), "1")
    async with secured_gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/coreos/etcd/manifests/v3", params={"ns": "quay.io"})
        await gw.client.get("/v2/library/alpine/manifests/1")
    quay_auth = "Basic " + base64.b64encode(b"quaybot:hunter2").decode()
    seen = {(host, auth) for host, auth in fake.seen_authorization}
    assert ("quay.test", quay_auth) in seen
    assert all(auth != quay_auth for host, auth in seen if host != "quay.test")


async def test_audit_log_has_one_line_per_pull_and_no_secrets(
    tmp_path: Path, fake: FakeRegistry, private: Image
) -> None:
    """Manifest and blob GETs each write a JSON line with who, what, where from; no secrets."""
    layer = sha256(b"secret layer")
    async with secured_gateway(tmp_path, fake) as gw:
        alice = await token(gw.client, "alice")
        await gw.client.get("/v2/private/app/manifests/1", headers=alice)
        await gw.client.get(f"/v2/private/app/blobs/{layer}", headers=alice)
        await gw.client.get("/v2/private/app/manifests/1", headers=basic("alice", "wonderland"))
        await gw.client.head("/v2/private/app/manifests/1", headers=alice)
    text = (tmp_path / "audit.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e["digest"], e["cache"], e["bytes"]) for e in lines] == [
        (private.digest, "MISS", len(private.manifest)),
        (layer, "MISS", len(b"secret layer")),
        (private.digest, "HIT", len(private.manifest)),
    ]
    assert {e["user"] for e in lines} == {"alice"}
    assert lines[0]["reference"] == "docker.io/private/app:1"
    assert lines[0]["upstream"] == "docker.io" and lines[0]["mirror"] == "upstream.test"
    assert set(lines[0]) == {
        "time",
        "client",
        "user",
        "reference",
        "digest",
        "upstream",
        "mirror",
        "cache",
        "bytes",
    }
    for secret in ("wonderland", alice["Authorization"].split()[1], "hunter2"):
        assert secret not in text


def test_rules_need_auth_and_defined_groups(tmp_path: Path) -> None:
    """Rules naming users need [auth]; a group must be defined."""
    base = '[upstreams."docker.io"]\n[[upstreams."docker.io".access]]\npull = ["alice"]\n'
    with pytest.raises(ConfigError, match=r"need an \[auth\] table"):
        parse_settings(base, env={})
    text = secured(tmp_path).replace(
        'pull = ["alice", "group:builders"]', 'pull = ["group:nobody"]'
    )
    with pytest.raises(ConfigError, match="group 'nobody' is not defined"):
        parse_settings(text, env={"HUB_PASSWORD": "x"})
    with pytest.raises(ConfigError, match=r"auth\.htpasswd: no readable file"):
        parse_settings('[auth]\nhtpasswd = "/nonexistent"\n[upstreams."docker.io"]', env={})


def bad_logins(client: httpx.AsyncClient, password: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The three ways to try a password: Basic on the API, the realm's GET and its POST."""
    form = {"grant_type": "password", "username": "alice", "password": password}
    return [
        ("GET", "/v2/", {"headers": basic("alice", password)}),
        ("GET", "/auth/token", {"headers": basic("alice", password)}),
        ("POST", "/auth/token", {"data": form}),
    ]


async def test_failed_logins_back_off_with_429_and_retry_after(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Five wrong passwords for alice from one address are 401s; then every way of trying
    one (Basic on /v2/, the realm's GET and POST) is refused at once with 429
    TOOMANYREQUESTS and Retry-After, until the wait is over; alice's proven password is
    never held back."""
    async with secured_gateway(tmp_path, fake) as gw:
        good = await gw.client.get("/v2/", headers=basic("alice", "wonderland"))
        assert good.status_code == 200
        for attempt in range(5):
            method, path, kwargs = bad_logins(gw.client, "guess")[attempt % 3]
            wrong = await gw.client.request(method, path, **kwargs)
            assert wrong.status_code == 401, (method, path)
        for method, path, kwargs in bad_logins(gw.client, "guess"):
            held = await gw.client.request(method, path, **kwargs)
            assert held.status_code == 429, (method, path, held.text)
            assert held.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert held.headers["retry-after"] == "1"
            assert "www-authenticate" not in held.headers
        for method, path, kwargs in bad_logins(gw.client, "wonderland"):
            assert (await gw.client.request(method, path, **kwargs)).status_code == 200
        gw.clock.now += 1
        wrong = await gw.client.get("/v2/", headers=basic("alice", "guess"))
        assert wrong.status_code == 401  # the wait is over: one more try, then 2 s
        held = await gw.client.get("/v2/", headers=basic("alice", "guess"))
        assert held.headers["retry-after"] == "2"


async def test_over_long_password_is_a_plain_401(tmp_path: Path, fake: FakeRegistry) -> None:
    """A password over bcrypt's 72 bytes is a wrong password everywhere, never a 500."""
    async with secured_gateway(tmp_path, fake) as gw:
        for method, path, kwargs in bad_logins(gw.client, "x" * 100):
            answer = await gw.client.request(method, path, **kwargs)
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.json()["errors"][0]["code"] == "UNAUTHORIZED"


async def test_fast_path_leaves_unproven_passwords_to_the_full_path(
    tmp_path: Path, fake: FakeRegistry, private: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached manifest asked with a Basic pair not proven yet is not answered by the
    in-memory fast path (it never runs bcrypt); the full path checks it and serves it,
    after which the fast path answers the same pair."""
    async with secured_gateway(tmp_path, fake) as gw:
        bearer = await token(gw.client, "alice")
        assert (await gw.client.get("/v2/private/app/manifests/1", headers=bearer)).is_success
        scope: dict[str, Any] = {
            "type": "http",
            "method": "GET",
            "path": "/v2/private/app/manifests/1",
            "query_string": b"",
            "headers": [
                (b"host", b"mirror"),
                (b"authorization", basic("bob", "builder")["Authorization"].encode()),
            ],
            "client": ("127.0.0.1", 1),
        }
        monkeypatch.setattr(bcrypt, "checkpw", lambda *a: pytest.fail("bcrypt on the loop"))
        assert gw.app.endpoints.fast_manifest(scope) is None
        monkeypatch.undo()
        full = await gw.client.get("/v2/private/app/manifests/1", headers=basic("bob", "builder"))
        assert full.status_code == 200 and full.content == private.manifest
        fast = gw.app.endpoints.fast_manifest(scope)
        assert fast is not None and fast.body == private.manifest


def watched(tmp_path: Path, monitoring: str | None = None) -> str:
    text = secured(tmp_path)
    if monitoring is not None:
        text = text.replace("[auth.groups]", f"monitoring = {monitoring}\n[auth.groups]")
    return text


async def test_monitoring_needs_a_login_once_auth_is_on(tmp_path: Path, fake: FakeRegistry) -> None:
    """With [auth] on, the status page and /metrics answer 401 with a Basic challenge to
    anonymous clients and 200 to users; /healthz and /readyz stay open."""
    async with gateway(tmp_path, fake, watched(tmp_path)) as gw:
        for path in ("/_/", "/metrics"):
            anonymous = await gw.client.get(path)
            assert anonymous.status_code == 401, path
            assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
            assert anonymous.headers["www-authenticate"] == 'Basic realm="mirrorrouter"'
            assert (await gw.client.get(path, headers=basic("eve", "listening"))).status_code == 200
            assert (await gw.client.get(path, headers=await token(gw.client, "eve"))).is_success
        for path in ("/healthz", "/readyz"):
            assert (await gw.client.get(path)).status_code == 200


async def test_monitoring_rule_names_who_may_watch(tmp_path: Path, fake: FakeRegistry) -> None:
    """``auth.monitoring = ["group:builders"]``: bob sees the page, alice gets 403 DENIED
    naming the rule; ``["anonymous"]`` makes both surfaces public again."""
    async with gateway(tmp_path, fake, watched(tmp_path, '["group:builders"]')) as gw:
        for path in ("/_/", "/metrics"):
            assert (await gw.client.get(path, headers=basic("bob", "builder"))).status_code == 200
            alice = await gw.client.get(path, headers=basic("alice", "wonderland"))
            assert alice.status_code == 403
            error = alice.json()["errors"][0]
            assert error["code"] == "DENIED" and "auth.monitoring" in error["message"]
    async with gateway(tmp_path, fake, watched(tmp_path, '["anonymous"]')) as gw:
        for path in ("/_/", "/metrics"):
            assert (await gw.client.get(path)).status_code == 200


async def test_status_page_shows_only_pulls_the_viewer_may_pull(
    tmp_path: Path, fake: FakeRegistry, image: Image, private: Image
) -> None:
    """alice's pull of private/app shows on alice's page and bob's (a builder), not on
    eve's; the public pull shows on every page."""
    async with gateway(tmp_path, fake, watched(tmp_path)) as gw:
        alice = basic("alice", "wonderland")
        assert (await gw.client.get("/v2/private/app/manifests/1", headers=alice)).is_success
        assert (await gw.client.get("/v2/library/alpine/manifests/3.19")).is_success
        pages = {
            user: (await gw.client.get("/_/", headers=basic(user, USERS[user]))).text
            for user in USERS
        }
    for user, page in pages.items():
        assert "library/alpine:3.19" in page.replace("<wbr>", ""), user
        shown = "private/app" in page.replace("<wbr>", "")
        assert shown == (user in ("alice", "bob")), user
        assert (private.digest[7:19] in page) == shown, user


def test_monitoring_rule_is_validated(tmp_path: Path) -> None:
    """``auth.monitoring`` takes a non-empty list of principals whose groups exist; errors
    name the key."""
    env = {"HUB_PASSWORD": "x"}
    auth = parse_settings(watched(tmp_path), env=env).auth
    assert auth is not None and auth.monitoring == {"authenticated"}
    for value, fragment in [
        ('"authenticated"', "auth.monitoring: expected a list"),
        ("[]", "auth.monitoring: expected a non-empty list"),
        ('["group:ops"]', "auth.monitoring: group 'ops' is not defined"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_settings(watched(tmp_path, value), env=env)
        assert fragment in str(caught.value), (value, str(caught.value))
