"""Smoke tests for the real-upstream harness: registries, token server, images, request log."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    BuiltImage,
    ImageFactory,
    client_environment,
    session_factory,
)
from tests.support.registry import (
    DistributionRegistry,
    LoggedRequest,
    parse_log_line,
    wait_until,
)
from tests.support.tokenserver import Scope, TokenServer

pytestmark = pytest.mark.real

USERS = {"alice": "secret"}
CREDS = ("alice", "secret")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
    """Images built once per session."""
    return session_factory(tmp_path_factory)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[DistributionRegistry]:
    """An anonymous distribution registry."""
    with DistributionRegistry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[TokenServer]:
    """A token server with one user."""
    with TokenServer(users=USERS, workdir=tmp_path / "tokens") as server:
        yield server


def skopeo_inspect_raw(
    reference: str, creds: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``skopeo inspect --raw`` on ``docker://reference`` over plain HTTP."""
    command = ["skopeo", "inspect", "--raw", "--tls-verify=false", "--no-tags"]
    if creds is not None:
        command += ["--creds", f"{creds[0]}:{creds[1]}"]
    return subprocess.run(
        [*command, f"docker://{reference}"],
        env=client_environment(),
        capture_output=True,
        timeout=60,
    )


def get_manifest(reg: DistributionRegistry, repository: str, reference: str) -> httpx.Response:
    """GET a manifest from an anonymous registry with the full Accept list."""
    with httpx.Client(trust_env=False) as client:
        return client.get(
            f"{reg.url}/v2/{repository}/manifests/{reference}",
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
        )


def test_anonymous_registry_stores_a_pushed_image_under_the_built_digest(
    registry: DistributionRegistry, images: ImageFactory
) -> None:
    """A skopeo push lands byte-exact: the registry's digest and bytes equal the built ones."""
    image = images.small()
    pushed = images.push(image, registry, "library/small", "v1")

    response = get_manifest(registry, "library/small", "v1")
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == image.digest == pushed.digest
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert response.content == image.manifest_bytes()
    raw = skopeo_inspect_raw(pushed.reference)
    assert raw.returncode == 0, raw.stderr
    assert "sha256:" + hashlib.sha256(raw.stdout).hexdigest() == image.digest
    assert registry.count("PUT", "/v2/library/small/manifests/v1", status=201) == 1


def test_every_builder_is_deterministic_and_pushes_verbatim(
    registry: DistributionRegistry, images: ImageFactory, tmp_path: Path
) -> None:
    """Indexes, Docker lists and mediaType-less manifests keep their digests on a 3-level name."""
    fresh = ImageFactory(tmp_path / "rebuild")
    cases: list[tuple[BuiltImage, BuiltImage, str]] = [
        (images.multiarch(), fresh.multiarch(), OCI_INDEX),
        (images.docker_list(), fresh.docker_list(), DOCKER_LIST),
        (images.docker_image(), fresh.docker_image(), DOCKER_MANIFEST),
        (images.no_media_type(), fresh.no_media_type(), OCI_MANIFEST),
    ]
    for image, rebuilt, media_type in cases:
        assert rebuilt.digest == image.digest
        assert [b.digest for b in rebuilt.blobs] == [b.digest for b in image.blobs]
        pushed = images.push(image, registry.host, f"team/sub/{image.name}", "1.0")
        response = get_manifest(registry, pushed.repository, pushed.tag)
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Type"] == media_type
        assert response.content == image.manifest_bytes()
        for platform, digest in pushed.platform_manifests.items():
            child = get_manifest(registry, pushed.repository, digest)
            assert child.status_code == 200, platform
            assert child.content == image.manifest_bytes(digest)

    assert "mediaType" not in json.loads(images.no_media_type().manifest_bytes())
    assert set(images.multiarch().platform_manifests) == {"linux/amd64", "linux/arm64"}


def test_api_push_matches_skopeo_push(registry: DistributionRegistry, images: ImageFactory) -> None:
    """The HTTP-API pusher stores the same digest as skopeo does, for a Docker list too."""
    image = images.docker_list()
    pushed = images.push(image, registry.host, "api/list", "v1", method="api")
    assert get_manifest(registry, "api/list", "v1").headers["Docker-Content-Digest"] == (
        pushed.digest
    )


def test_htpasswd_registry_refuses_anonymous_pulls_and_accepts_credentials(
    tmp_path: Path, images: ImageFactory
) -> None:
    """Basic auth: no credentials -> 401, alice's credentials -> the image."""
    with DistributionRegistry(tmp_path / "basic", users=USERS) as reg:
        pushed = images.push(images.small(), reg.host, "team/app", "v1", creds=("alice", "secret"))

        anonymous = skopeo_inspect_raw(pushed.reference)
        assert anonymous.returncode != 0
        assert b"authentication required" in anonymous.stderr
        wrong = skopeo_inspect_raw(pushed.reference, creds=("alice", "wrong"))
        assert wrong.returncode != 0
        allowed = skopeo_inspect_raw(pushed.reference, creds=("alice", "secret"))
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout == pushed.image.manifest_bytes()
        assert reg.count("GET", "/v2/team/app/manifests/v1", status=401) >= 2


def test_token_registry_serves_public_repositories_anonymously_and_private_ones_to_users(
    tmp_path: Path, images: ImageFactory, token_server: TokenServer
) -> None:
    """Docker-Hub-style tokens: anonymous pulls public, private/ needs credentials."""
    with DistributionRegistry(tmp_path / "token", token=token_server.settings()) as reg:
        creds = ("alice", "secret")
        public = images.push(images.small(), reg.host, "library/app", "v1", creds=creds)
        private = images.push(images.small(), reg.host, "private/app", "v1", creds=creds)
        token_server.clear_requests()

        anonymous_public = skopeo_inspect_raw(public.reference)
        assert anonymous_public.returncode == 0, anonymous_public.stderr
        assert anonymous_public.stdout == public.image.manifest_bytes()
        anonymous_private = skopeo_inspect_raw(private.reference)
        assert anonymous_private.returncode != 0
        with_creds = skopeo_inspect_raw(private.reference, creds=creds)
        assert with_creds.returncode == 0, with_creds.stderr

        requests = token_server.requests_snapshot()
        assert {r.user for r in requests} == {None, "alice"}
        denied = [r for r in requests if r.user is None and "private/app" in str(r.scopes)]
        assert denied and all(r.granted == () for r in denied)
        assert token_server.count(user="alice", scope_contains="private/app") >= 1


def test_token_server_speaks_the_oauth2_form_and_rejects_bad_credentials(
    tmp_path: Path, token_server: TokenServer, images: ImageFactory
) -> None:
    """POST password and refresh_token grants work, bad passwords get 401, tokens verify."""
    with (
        DistributionRegistry(tmp_path / "token", token=token_server.settings()) as reg,
        httpx.Client(trust_env=False) as client,
    ):
        images.push(images.small(), reg.host, "private/app", "v1", creds=("alice", "secret"))
        form = {
            "grant_type": "password",
            "username": "alice",
            "password": "secret",
            "service": token_server.service,
            "scope": "repository:private/app:pull",
            "client_id": "harness",
        }
        granted = client.post(token_server.realm, data=form)
        assert granted.status_code == 200
        body = granted.json()
        assert body["token"] == body["access_token"] and body["expires_in"] > 0
        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "service": token_server.service,
            "scope": "repository:private/app:pull",
        }
        refreshed = client.post(token_server.realm, data=refresh)
        assert refreshed.status_code == 200
        bad = client.post(token_server.realm, data={**form, "password": "nope"})
        assert bad.status_code == 401
        bad_get = client.get(token_server.realm, auth=("alice", "nope"))
        assert bad_get.status_code == 401

        manifest = client.get(
            f"{reg.url}/v2/private/app/manifests/v1",
            headers={
                "Authorization": f"Bearer {refreshed.json()['token']}",
                "Accept": OCI_MANIFEST,
            },
        )
        assert manifest.status_code == 200
        forged = token_server.issue([Scope("repository", "private/app", ("pull",))])
        assert forged.count(".") == 2
        wrong_audience = token_server.issue(
            [Scope("repository", "private/app", ("pull",))], audience="someone-else"
        )
        refused = client.get(
            f"{reg.url}/v2/private/app/manifests/v1",
            headers={"Authorization": f"Bearer {wrong_audience}"},
        )
        assert refused.status_code == 401
        grants = [r.grant_type for r in token_server.requests_snapshot()]
        assert "password" in grants and "refresh_token" in grants


def test_kid_header_tokens_are_accepted_too(tmp_path: Path, images: ImageFactory) -> None:
    """distribution also accepts a JWT whose kid is the libtrust ID of the trusted key."""
    with (
        TokenServer(users=USERS, header_mode="kid", workdir=tmp_path / "kid") as server,
        DistributionRegistry(tmp_path / "reg", token=server.settings()) as reg,
    ):
        pushed = images.push(images.small(), reg.host, "library/kid", "v1", creds=CREDS)
        raw = skopeo_inspect_raw(pushed.reference)
        assert raw.returncode == 0, raw.stderr
        assert len(server.key_id) == 59 and server.key_id.count(":") == 11


def test_request_log_counts_blob_gets_since_a_mark(
    registry: DistributionRegistry, images: ImageFactory
) -> None:
    """The access log sees each blob GET, and mark()/clear_log() scope the count."""
    image = images.small()
    pushed = images.push(image, registry.host, "log/app", "v1")
    layer = image.images[0].layers[0]
    assert registry.has_blob(pushed.repository, layer.digest)
    assert registry.has_manifest(pushed.repository, pushed.digest)
    assert not registry.has_blob("other/app", layer.digest)
    mark = registry.mark()
    assert registry.blob_gets(since=mark) == []

    with httpx.Client(trust_env=False) as client:
        response = client.get(f"{registry.url}/v2/log/app/blobs/{layer.digest}?ns=example.org")
    assert response.status_code == 200 and len(response.content) == layer.size

    gets = registry.blob_gets(since=mark)
    assert [(r.method, r.path_only, r.status, r.query) for r in gets] == [
        ("GET", f"/v2/log/app/blobs/{layer.digest}", 200, "ns=example.org")
    ]
    assert registry.count("GET", layer.digest, since=mark) == 1
    registry.clear_log()
    assert registry.count("GET", "/blobs/") == 0
    assert registry.requests() == []


def test_log_lines_parse_in_both_formats() -> None:
    """Combined access-log lines and JSON 'response completed' entries parse alike."""
    combined = (
        '127.0.0.1 - - [28/Nov/2026:20:03:58 +0000] "HEAD /v2/a/b/blobs/sha256:ab?ns=x '
        'HTTP/1.1" 404 157 "" "skopeo/1.9.3"'
    )
    json_line = (
        '{"http.request.method":"GET","http.request.uri":"/v2/a/manifests/v1",'
        '"http.response.status":200,"msg":"response completed","level":"info"}'
    )
    assert parse_log_line(combined) == LoggedRequest(
        "HEAD", "/v2/a/b/blobs/sha256:ab?ns=x", 404, 157, "skopeo/1.9.3", "127.0.0.1"
    )
    parsed = parse_log_line(json_line)
    assert parsed is not None and (parsed.method, parsed.status) == ("GET", 200)
    assert parse_log_line('{"msg":"listening on 127.0.0.1:5000"}') is None
    assert parse_log_line("garbage") is None


def test_proxy_mode_registry_pulls_through_from_its_upstream(
    registry: DistributionRegistry, images: ImageFactory, tmp_path: Path
) -> None:
    """proxy_remoteurl makes a pull-through cache: after the first blob GET, none go upstream.

    distribution 2.8 fetches an uncached blob twice from its upstream on the first request
    (one stream to the client, one background copy into storage), then never again.
    """
    image = images.small()
    images.push(image, registry.host, "library/cached", "v1")
    layer = image.images[0].layers[0]
    with (
        DistributionRegistry(tmp_path / "proxy", proxy_remoteurl=registry.url) as proxy,
        httpx.Client(trust_env=False) as client,
    ):
        assert get_manifest(proxy, "library/cached", "v1").status_code == 200
        mark = registry.mark()
        blob_url = f"{proxy.url}/v2/library/cached/blobs/{layer.digest}"
        first = client.get(blob_url)
        assert first.status_code == 200 and len(first.content) == layer.size
        wait_until(lambda: proxy.has_blob("library/cached", layer.digest), what="proxy commit")
        wait_until(lambda: len(registry.blob_gets(since=mark)) == 2, what="two upstream GETs")
        second_mark = registry.mark()
        second = client.get(blob_url)
        assert second.content == first.content
        assert registry.blob_gets(since=second_mark) == []


def test_large_image_builds_streamed_and_pushes(
    registry: DistributionRegistry, images: ImageFactory
) -> None:
    """The 110 MiB single-layer image builds and pushes with its digest intact."""
    image = images.large()
    (config, layer) = image.images[0].blobs
    assert layer.size > 110 * 1024 * 1024 and config.size < 4096
    pushed = images.push(image, registry.host, "big/app", "v1")
    response = get_manifest(registry, "big/app", "v1")
    assert response.headers["Docker-Content-Digest"] == pushed.digest


def test_registry_restarts_on_its_port_and_keeps_log_offsets(
    registry: DistributionRegistry, images: ImageFactory
) -> None:
    """stop()/start() keeps the port, the storage and earlier marks; freeze() stalls answers."""
    pushed = images.push(images.small(), registry.host, "restart/app", "v1")
    host = registry.host
    mark = registry.mark()
    registry.stop()
    registry.start()
    assert registry.host == host
    assert get_manifest(registry, "restart/app", "v1").content == pushed.image.manifest_bytes()
    assert registry.count("GET", "/v2/restart/app/manifests/v1", since=mark) == 1

    registry.freeze()
    try:
        with pytest.raises(httpx.TimeoutException), httpx.Client(trust_env=False) as client:
            client.get(f"{registry.url}/v2/", timeout=0.3)
    finally:
        registry.thaw()
    assert get_manifest(registry, "restart/app", "v1").status_code == 200
