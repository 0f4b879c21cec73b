"""Secure defaults of the real gateway once ``[auth]`` is on: no push without a rule that
grants it (pushes stay open without ``[auth]``), and the status page and ``/metrics`` behind
a login, showing each viewer only the pulls of references they may pull."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.images import ImageFactory, PushedImage, PushError, session_factory
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real

PASSWORD = "correct horse battery staple"
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ImageFactory, DistributionRegistry, PushedImage, PushedImage]]:
    """A registry standing in for docker.io with a public and a private image."""
    factory = session_factory(tmp_path_factory)
    with DistributionRegistry(tmp_path_factory.mktemp("hub")) as registry:
        public = factory.push(factory.small("pub", seed=71), registry, "library/pub", "1")
        private = factory.push(factory.small("priv", seed=72), registry, "team/app", "1")
        yield factory, registry, public, private


def config(tmp_path: Path, registry: DistributionRegistry, *, auth: bool) -> str:
    """docker.io and a hosted set ``local`` with no access rules; with ``auth``, logins
    from ``htpasswd`` and docker.io's team/* for alice only."""
    logins = '[auth]\nhtpasswd = "htpasswd"' if auth else ""
    rules = '[[upstreams."docker.io".access]]\nrepositories = ["team/*"]\npull = ["alice"]'
    return f"""
[cache]
directory = "{tmp_path / "cache"}"
{logins}
[upstreams."docker.io"]
mirrors = [{{ url = "{registry.url}" }}]
{rules if auth else ""}
[hosted."local"]
[[routes]]
prefix = "local"
hosted = "local"
"""


@pytest.fixture
def secured(
    world: tuple[ImageFactory, DistributionRegistry, PushedImage, PushedImage], tmp_path: Path
) -> Iterator[GatewayProcess]:
    """The gateway with [auth]: users alice and bob."""
    _, registry, _, _ = world
    workdir = tmp_path / "gw"
    workdir.mkdir()
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (workdir / "htpasswd").write_text(f"alice:{hashed}\nbob:{hashed}\n")
    with GatewayProcess(workdir, config(tmp_path, registry, auth=True)) as gw:
        yield gw


def test_no_push_without_a_rule_once_auth_is_on(
    world: tuple[ImageFactory, DistributionRegistry, PushedImage, PushedImage],
    secured: GatewayProcess,
) -> None:
    """A hosted set with no push rule: a logged-in user gets 403 DENIED naming the missing
    rule, an anonymous client 401 with a push challenge; nothing is stored."""
    factory, _, public, _ = world
    with httpx.Client(base_url=secured.url, timeout=30, trust_env=False) as client:
        denied = client.post("/v2/local/app/blobs/uploads/", auth=("bob", PASSWORD))
        assert denied.status_code == 403
        error = denied.json()["errors"][0]
        assert error["code"] == "DENIED"
        assert 'no [[hosted."local".access]] rule grants push' in error["message"]
        anonymous = client.post("/v2/local/app/blobs/uploads/")
        assert anonymous.status_code == 401
        assert ":pull,push" in anonymous.headers["www-authenticate"]
    with pytest.raises(PushError):
        factory.push(
            public.image, secured, "local/app", "1", creds=("alice", PASSWORD), method="api"
        )
    with httpx.Client(base_url=secured.url, timeout=30, trust_env=False) as client:
        assert client.get("/v2/local/app/tags/list").status_code == 404


def test_pushes_stay_open_without_auth(
    world: tuple[ImageFactory, DistributionRegistry, PushedImage, PushedImage], tmp_path: Path
) -> None:
    """Without [auth] (a laptop, a Kind cluster), anyone may push to a hosted set."""
    factory, registry, public, _ = world
    with GatewayProcess(tmp_path / "gw", config(tmp_path, registry, auth=False)) as gateway:
        pushed = factory.push(public.image, gateway, "local/app", "1", method="api")
        with httpx.Client(base_url=gateway.url, timeout=30, trust_env=False) as client:
            pulled = client.get("/v2/local/app/manifests/1", headers=ACCEPT)
    assert pulled.status_code == 200
    assert pulled.headers["docker-content-digest"] == pushed.digest


def test_monitoring_is_behind_a_login_and_filtered_per_viewer(
    world: tuple[ImageFactory, DistributionRegistry, PushedImage, PushedImage],
    secured: GatewayProcess,
) -> None:
    """Anonymous: 401 with a Basic challenge on /_/ and /metrics, while /healthz and /readyz
    stay open. Logged in: 200; bob's page omits alice's pull of private team/app, which
    alice's own page shows; the public pull shows on both."""
    _, _, public, private = world
    with httpx.Client(base_url=secured.url, timeout=30, trust_env=False) as client:
        for path in ("/_/", "/metrics"):
            anonymous = client.get(path)
            assert anonymous.status_code == 401, path
            assert anonymous.headers["www-authenticate"].startswith("Basic realm=")
            assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
        for path in ("/healthz", "/readyz"):
            assert client.get(path).status_code == 200, path
        alice = ("alice", PASSWORD)
        assert client.get("/v2/team/app/manifests/1", auth=alice, headers=ACCEPT).is_success
        assert client.get("/v2/library/pub/manifests/1", headers=ACCEPT).is_success
        pages = {user: client.get("/_/", auth=(user, PASSWORD)) for user in ("alice", "bob")}
        metrics = client.get("/metrics", auth=("bob", PASSWORD))
    assert metrics.status_code == 200 and "mirrorrouter_requests" in metrics.text
    for user, page in pages.items():
        assert page.status_code == 200
        text = page.text.replace("<wbr>", "")
        assert "library/pub:1" in text and public.digest[7:19] in text
        shown = user == "alice"
        assert ("team/app:1" in text) == shown, user
        assert (private.digest[7:19] in text) == shown, user
