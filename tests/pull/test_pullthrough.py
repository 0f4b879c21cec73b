"""Pull-through against an in-process fake registry: caching, auth, errors, negotiation."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from mirrorrouter.app import create_app
from mirrorrouter.config import parse_settings
from tests.support.fakeregistry import FakeRegistry, Image, make_image, sha256
from tests.support.inprocess import config, gateway

pytestmark = pytest.mark.anyio

ACCEPT_ALL = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


async def test_manifest_by_tag_is_byte_exact_and_cached_within_ttl(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A tag is fetched once, served byte-exact with its digest, then from cache within TTL."""
    async with gateway(tmp_path, fake) as gw:
        first = await gw.client.get(
            "/v2/library/alpine/manifests/3.19", headers={"Accept": ACCEPT_ALL}
        )
        assert first.status_code == 200
        assert first.content == image.manifest
        assert first.headers["docker-content-digest"] == image.digest
        assert first.headers["content-type"] == image.media_type
        assert first.headers["x-cache"] == "MISS" and first.headers["x-upstream"] == "docker.io"
        gw.clock.now += 59
        second = await gw.client.get("/v2/alpine/manifests/3.19")
        assert second.content == image.manifest and second.headers["x-cache"] == "HIT"
    assert fake.count("GET", "/manifests/") == 1
    assert fake.count("HEAD", "/manifests/") == 0


async def test_expired_tag_is_revalidated_with_head(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """After the TTL, a HEAD revalidates; a GET follows only when the digest changed."""
    async with gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        gw.clock.now += 61
        same = await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert same.headers["docker-content-digest"] == image.digest
        assert (fake.count("HEAD", "/manifests/3.19"), fake.count("GET", "/manifests/")) == (1, 1)
        moved = fake.add(make_image("library/alpine", [b"new layer"]), "3.19")
        gw.clock.now += 61
        changed = await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert changed.headers["docker-content-digest"] == moved.digest
        assert changed.content == moved.manifest
    assert fake.count("GET", "/manifests/3.19") == 2


async def test_head_manifest_has_digest_and_length_without_body(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """HEAD carries Docker-Content-Digest and Content-Length (containerd needs both), no body."""
    async with gateway(tmp_path, fake) as gw:
        response = await gw.client.head("/v2/library/alpine/manifests/3.19?ns=docker.io")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["docker-content-digest"] == image.digest
    assert response.headers["content-length"] == str(len(image.manifest))
    assert response.headers["oci-namespace"] == "docker.io"


async def test_blob_served_then_cached_with_ranges(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A blob is fetched once, verified, then served from cache, with Range and 416."""
    layer = image.blobs[sha256(b"layer-one" * 1000)]
    digest = sha256(layer)
    async with gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        cold = await gw.client.get(f"/v2/library/alpine/blobs/{digest}")
        assert cold.status_code == 200 and cold.content == layer
        assert cold.headers["x-cache"] == "MISS"
        warm = await gw.client.get(f"/v2/hub/alpine/blobs/{digest}")
        assert warm.content == layer and warm.headers["x-cache"] == "HIT"
        assert warm.headers["docker-content-digest"] == digest
        part = await gw.client.get(
            f"/v2/library/alpine/blobs/{digest}", headers={"Range": "bytes=10-19"}
        )
        assert part.status_code == 206 and part.content == layer[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(layer)}"
        suffix = await gw.client.get(
            f"/v2/library/alpine/blobs/{digest}", headers={"Range": "bytes=-5"}
        )
        assert suffix.content == layer[-5:]
        bad = await gw.client.get(
            f"/v2/library/alpine/blobs/{digest}", headers={"Range": "bytes=99999-"}
        )
        assert bad.status_code == 416
        assert bad.headers["content-range"] == f"bytes */{len(layer)}"
        assert json.loads(bad.content)["errors"][0]["message"]
        head = await gw.client.head(f"/v2/library/alpine/blobs/{digest}")
        assert head.headers["content-length"] == str(len(layer)) and head.content == b""
    assert fake.count("GET", f"/blobs/{digest}") == 1
    stored = gw.cache_dir / "docker.io" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert stored.read_bytes() == layer


async def test_corrupt_blob_is_never_cached(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """Bytes that do not match their digest cut the response short and are not committed."""
    digest = sha256(b"layer-two")
    fake.corrupt.add(digest)
    async with gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        with pytest.raises(Exception):  # noqa: B017 - the stream is cut, how depends on transport
            response = await gw.client.get(f"/v2/library/alpine/blobs/{digest}")
            assert response.content != b"layer-two"
            raise AssertionError("a corrupt blob was served whole")
        fake.corrupt.clear()
        healed = await gw.client.get(f"/v2/library/alpine/blobs/{digest}")
        assert healed.content == b"layer-two" and healed.headers["x-cache"] == "MISS"
    assert fake.count("GET", f"/blobs/{digest}") == 2
    assert spool_files(gw.cache_dir / "docker.io") == []


async def test_blob_of_another_repository_needs_upstream_confirmation(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A cached blob is not served under a repository that neither linked nor confirmed it."""
    digest = sha256(b"layer-two")
    async with gateway(tmp_path, fake) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert (await gw.client.get(f"/v2/library/alpine/blobs/{digest}")).status_code == 200
        other = await gw.client.get(f"/v2/someone/else/blobs/{digest}")
        assert other.status_code == 404
        assert json.loads(other.content)["errors"][0]["code"] == "BLOB_UNKNOWN"
        fake.blobs[("someone/else", digest)] = b"layer-two"
        confirmed = await gw.client.get(f"/v2/someone/else/blobs/{digest}")
        assert confirmed.status_code == 200 and confirmed.headers["x-cache"] == "HIT"


async def test_bearer_tokens_are_fetched_once_and_scoped(tmp_path: Path) -> None:
    """The Bearer flow fetches one token per repository scope and reuses it."""
    fake = FakeRegistry(bearer=True)
    image = fake.add(make_image("library/alpine", [b"x"]), "1")
    async with gateway(tmp_path, fake) as gw:
        for _ in range(3):
            response = await gw.client.get("/v2/library/alpine/manifests/1")
            assert response.status_code == 200
        blob = await gw.client.get(f"/v2/library/alpine/blobs/{sha256(b'x')}")
        assert blob.content == b"x"
        gw.clock.now += 3600
        await gw.client.get(f"/v2/library/alpine/manifests/{image.digest}")
    assert len(fake.token_requests) == 1
    assert fake.token_requests[0]["scope"] == "repository:library/alpine:pull"
    assert fake.token_requests[0]["user"] == ""


async def test_private_repository_uses_the_upstreams_credentials(tmp_path: Path) -> None:
    """Credentials go to the token realm for a private repository; without them it is 404."""
    fake = FakeRegistry(bearer=True, users={"bob": "hunter2"})
    fake.add(make_image("private/app", [b"secret"]), "1")
    async with gateway(tmp_path, fake) as anonymous:
        refused = await anonymous.client.get("/v2/private/app/manifests/1")
        assert refused.status_code == 404
        assert "www-authenticate" not in refused.headers
        body = json.loads(refused.content)["errors"][0]
        assert body["code"] == "MANIFEST_UNKNOWN"
        assert body["detail"]["tried"][0]["result"].startswith("HTTP 401")
    creds = '[upstreams."docker.io".credentials]\nusername = "bob"\npassword_env = "HUB_PASSWORD"'
    async with gateway(tmp_path / "b", fake, config(tmp_path / "b", creds)) as gw:
        allowed = await gw.client.get("/v2/private/app/manifests/1")
        assert allowed.status_code == 200
    assert fake.token_requests[-1]["user"] == "bob"


async def test_basic_auth_upstream(tmp_path: Path) -> None:
    """An upstream that wants Basic gets the configured credentials."""
    fake = FakeRegistry(basic=("bob", "hunter2"))
    fake.add(make_image("library/alpine", [b"x"]), "1")
    creds = '[upstreams."docker.io".credentials]\nusername = "bob"\npassword_env = "HUB_PASSWORD"'
    async with gateway(tmp_path, fake, config(tmp_path, creds)) as gw:
        assert (await gw.client.get("/v2/library/alpine/manifests/1")).status_code == 200
        assert (await gw.client.get(f"/v2/library/alpine/blobs/{sha256(b'x')}")).content == b"x"


async def test_redirect_to_another_host_drops_credentials(tmp_path: Path) -> None:
    """A blob redirect to a CDN host is followed without the upstream's Authorization."""
    fake = FakeRegistry(basic=("bob", "hunter2"), redirect_blobs_to="http://cdn.test")
    fake.add(make_image("library/alpine", [b"payload"]), "1")
    creds = '[upstreams."docker.io".credentials]\nusername = "bob"\npassword_env = "HUB_PASSWORD"'
    async with gateway(tmp_path, fake, config(tmp_path, creds)) as gw:
        await gw.client.get("/v2/library/alpine/manifests/1")
        # The CDN host is the same fake app; it demands Basic too, so a leak would pass it.
        fake.basic = None
        blob = await gw.client.get(f"/v2/library/alpine/blobs/{sha256(b'payload')}")
        assert blob.content == b"payload"
    cdn_headers = [auth for host, auth in fake.seen_authorization if host == "cdn.test"]
    assert cdn_headers == [""]


async def test_rate_limit_becomes_toomanyrequests(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """An upstream 429 with no cached copy becomes TOOMANYREQUESTS with Retry-After."""
    fake.faults["/manifests/3.19"] = [429, 429, 429]  # every retry of the one mirror
    async with gateway(tmp_path, fake) as gw:
        response = await gw.client.get("/v2/library/alpine/manifests/3.19")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert json.loads(response.content)["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_failover_to_the_next_mirror_and_error_detail(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A failing first mirror is skipped; when all fail the detail lists route and mirrors."""
    mirrors = '[{ url = "http://upstream.test/broken" }, { url = "http://upstream.test" }]'
    async with gateway(tmp_path, fake, config(tmp_path, mirrors=mirrors)) as gw:
        ok = await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert ok.status_code == 200
        missing = await gw.client.get("/v2/hub/library/nothing/manifests/1")
    error = json.loads(missing.content)["errors"][0]
    assert missing.status_code == 404 and error["code"] == "MANIFEST_UNKNOWN"
    assert error["detail"]["route"] == "prefix hub -> upstream docker.io"
    assert [t["mirror"] for t in error["detail"]["tried"]] == [
        "upstream.test/broken",
        "upstream.test",
    ]


async def test_unavailable_upstream_is_503_with_detail(tmp_path: Path, fake: FakeRegistry) -> None:
    """Server errors on every mirror give 503 UNAVAILABLE naming what each mirror said."""
    fake.faults["/manifests/"] = [500, 500, 500, 502, 502, 502]  # three tries per mirror
    mirrors = '[{ url = "http://upstream.test" }, { url = "http://upstream.test" }]'
    async with gateway(tmp_path, fake, config(tmp_path, mirrors=mirrors)) as gw:
        response = await gw.client.get("/v2/library/alpine/manifests/1")
    error = json.loads(response.content)["errors"][0]
    assert response.status_code == 503
    assert [t["result"] for t in error["detail"]["tried"]] == ["HTTP 500", "HTTP 502"]


async def test_pull_only_mirror_never_resolves_tags(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A mirror with only 'pull' is never asked a tag, but serves content by digest."""
    mirrors = (
        '[{ url = "http://upstream.test/pull-only", capabilities = ["pull"] },'
        ' { url = "http://upstream.test" }]'
    )
    async with gateway(tmp_path, fake, config(tmp_path, mirrors=mirrors)) as gw:
        await gw.client.get("/v2/library/alpine/manifests/3.19")
        await gw.client.get(f"/v2/library/alpine/blobs/{sha256(b'layer-two')}")
    assert fake.count("GET", "/pull-only/v2/library/alpine/manifests/3.19") == 0
    assert fake.count("GET", "/pull-only/v2/library/alpine/blobs/") == 1


async def test_index_negotiation_for_clients_without_list_support(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """A client that accepts only single manifests gets the linux/amd64 entry of an index."""
    amd64 = make_image("library/multi", [b"amd64"])
    arm64 = make_image("library/multi", [b"arm64"])
    index_digest = fake.add_index("library/multi", [amd64, arm64], "1")
    async with gateway(tmp_path, fake) as gw:
        full = await gw.client.get("/v2/library/multi/manifests/1", headers={"Accept": ACCEPT_ALL})
        assert full.headers["docker-content-digest"] == index_digest
        single = await gw.client.get(
            "/v2/library/multi/manifests/1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert single.headers["docker-content-digest"] == amd64.digest
        assert single.content == amd64.manifest


async def test_manifest_without_media_type_field_keeps_its_content_type(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """A manifest with no mediaType field is served with the Content-Type it was stored with."""
    image = fake.add(make_image("team/sub/app", [b"z"], with_media_type=False), "v1")
    async with gateway(tmp_path, fake) as gw:
        response = await gw.client.get("/v2/team/sub/app/manifests/v1")
        again = await gw.client.get(f"/v2/team/sub/app/manifests/{image.digest}")
    assert response.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    assert again.headers["x-cache"] == "HIT" and again.content == image.manifest


async def test_tags_list_paginates_with_client_facing_link(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """tags/list passes n/last upstream and rewrites Link to the client's prefix and name."""
    for tag in ("a", "b", "c"):
        fake.add(make_image("library/alpine", [tag.encode()]), tag)
    async with gateway(tmp_path, fake) as gw:
        page = await gw.client.get("/v2/hub/alpine/tags/list?n=2")
        assert json.loads(page.content)["tags"] == ["a", "b"]
        assert page.headers["link"] == '</v2/hub/alpine/tags/list?n=2&last=b>; rel="next"'
        rest = await gw.client.get("/v2/hub/alpine/tags/list?n=2&last=b")
        assert json.loads(rest.content)["tags"] == ["c"]
        ns = await gw.client.get("/v2/library/alpine/tags/list?n=1&ns=docker.io")
        assert (
            ns.headers["link"]
            == '</v2/library/alpine/tags/list?n=1&last=a&ns=docker.io>; rel="next"'
        )


async def test_referrers_api_and_tag_schema_fallback(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """Referrers come from the upstream API, else from the sha256-<hex> tag, else empty."""
    hex_part = image.digest.split(":")[1]
    sbom = make_image("library/alpine", [b"sbom"])
    async with gateway(tmp_path, fake) as gw:
        empty = await gw.client.get(f"/v2/library/alpine/referrers/{image.digest}")
        assert empty.status_code == 200 and json.loads(empty.content)["manifests"] == []
        fake.add(sbom)
        fallback_index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": sbom.media_type,
                    "digest": sbom.digest,
                    "size": 1,
                    "artifactType": "sbom",
                },
                {
                    "mediaType": sbom.media_type,
                    "digest": sbom.digest,
                    "size": 1,
                    "artifactType": "sig",
                },
            ],
        }
        data = json.dumps(fallback_index).encode()
        fake.manifests[("library/alpine", f"sha256-{hex_part}")] = (
            data,
            "application/vnd.oci.image.index.v1+json",
        )
        other = make_image("library/alpine", [b"other"])
        fake.add(other)
        other_hex = other.digest.split(":")[1]
        fake.manifests[("library/alpine", f"sha256-{other_hex}")] = (
            data,
            "application/vnd.oci.image.index.v1+json",
        )
        found = await gw.client.get(
            f"/v2/library/alpine/referrers/{other.digest}?artifactType=sbom"
        )
        assert found.headers["oci-filters-applied"] == "artifactType"
        assert [m["artifactType"] for m in json.loads(found.content)["manifests"]] == ["sbom"]
        fake.supports_referrers = True
        fake.referrers[image.digest] = [{"digest": sbom.digest, "artifactType": "x"}]
        api = await gw.client.get(f"/v2/library/alpine/referrers/{image.digest}")
        assert json.loads(api.content)["manifests"] == [
            {"digest": sbom.digest, "artifactType": "x"}
        ]


async def test_unsupported_writes_answer_unsupported(tmp_path: Path, fake: FakeRegistry) -> None:
    """Push and delete answer UNSUPPORTED (405) with the route, and reach no upstream."""
    async with gateway(tmp_path, fake) as gw:
        for method, path in [
            ("PUT", "/v2/x/manifests/1"),
            ("DELETE", "/v2/x/blobs/sha256:" + "0" * 64),
            ("POST", "/v2/x/blobs/uploads/"),
        ]:
            response = await gw.client.request(method, path)
            assert response.status_code == 405
            assert json.loads(response.content)["errors"][0]["code"] == "UNSUPPORTED"
    assert fake.requests == []


async def test_oauth2_post_form_when_the_realm_refuses_get(tmp_path: Path) -> None:
    """A token realm that refuses GET gets the OAuth2 password grant as a POST form."""
    fake = FakeRegistry(bearer=True, users={"bob": "hunter2"}, token_get_allowed=False)
    fake.add(make_image("private/app", [b"s"]), "1")
    creds = '[upstreams."docker.io".credentials]\nusername = "bob"\npassword_env = "HUB_PASSWORD"'
    async with gateway(tmp_path, fake, config(tmp_path, creds)) as gw:
        assert (await gw.client.get("/v2/private/app/manifests/1")).status_code == 200
    methods = [r["method"] for r in fake.token_requests]
    assert methods == ["GET", "POST"]
    assert fake.token_requests[1]["grant_type"] == "password"
    assert fake.token_requests[1]["scope"] == "repository:private/app:pull"


async def test_manifest_over_4_mib_is_refused(tmp_path: Path, fake: FakeRegistry) -> None:
    """A manifest larger than 4 MiB is never stored or served."""
    huge = b'{"schemaVersion":2,"layers":[],"pad":"' + b"x" * (4 * 1024 * 1024) + b'"}'
    fake.manifests[("library/huge", "1")] = (huge, "application/vnd.oci.image.manifest.v1+json")
    async with gateway(tmp_path, fake) as gw:
        response = await gw.client.get("/v2/library/huge/manifests/1")
    error = json.loads(response.content)["errors"][0]
    assert response.status_code == 503
    assert "4 MiB" in error["detail"]["tried"][0]["result"]


async def test_host_name_route_pulls_content(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A request whose Host is a routed name goes to that route's upstream."""
    quay = FakeRegistry(host="quay.test")
    quay_image = quay.add(make_image("coreos/etcd", [b"etcd"]), "v3")
    route = '[[routes]]\nhost = "quay.mirror.corp"\nupstream = "quay.io"'
    text = config(tmp_path) + route

    async def both(scope, receive, send):  # type: ignore[no-untyped-def]
        host = dict(scope["headers"]).get(b"host", b"").decode()
        target = quay.app if host.startswith("quay.test") else fake.app
        await target(scope, receive, send)

    settings = parse_settings(text, env={})
    app = create_app(settings, transport=httpx.ASGITransport(app=both))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://quay.mirror.corp"
        ) as client:
            response = await client.get("/v2/coreos/etcd/manifests/v3")
    assert response.headers["docker-content-digest"] == quay_image.digest
    assert response.headers["x-upstream"] == "quay.io"


async def test_tag_index_survives_a_restart(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A tag pulled before a restart is served from the persisted index within its TTL."""
    async with gateway(tmp_path, fake) as first:
        await first.client.get("/v2/library/alpine/manifests/3.19")
    async with gateway(tmp_path, fake) as second:
        second.clock.now = first.clock.now + 30
        again = await second.client.get("/v2/library/alpine/manifests/3.19")
    assert again.headers["x-cache"] == "HIT" and again.content == image.manifest
    assert fake.count("GET", "/manifests/") == 1


def spool_files(cache: Path) -> list[Path]:
    """Files under a cache's temp area other than the owner locks: interrupted writes."""
    return [p for p in (cache / "tmp").rglob("*") if p.is_file() and p.name != ".lock"]


async def test_upstream_index_with_malformed_entries_answers_normally(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """An upstream index whose linux/amd64 entry has a string platform: a client without
    index types gets 404 MANIFEST_UNKNOWN (never a 500) when no other entry fits, and the
    well-formed linux/amd64 entry when one does."""
    amd64 = fake.add(make_image("library/odd", [b"amd64"]))
    entry = {"mediaType": amd64.media_type, "digest": amd64.digest, "size": len(amd64.manifest)}
    index_type = "application/vnd.oci.image.index.v1+json"
    only_bad = {"schemaVersion": 2, "manifests": [{**entry, "platform": "linux/amd64"}, "junk"]}
    one_good = {
        "schemaVersion": 2,
        "manifests": [
            {**entry, "platform": "linux/amd64", "digest": "sha256:short"},
            {**entry, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    for tag, document in (("bad", only_bad), ("good", one_good)):
        fake.manifests[("library/odd", tag)] = (json.dumps(document).encode(), index_type)
    single = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with gateway(tmp_path, fake) as gw:
        whole = await gw.client.get("/v2/library/odd/manifests/bad", headers={"Accept": ACCEPT_ALL})
        assert whole.status_code == 200 and whole.content == json.dumps(only_bad).encode()
        for _ in range(2):  # from upstream, then from the cache
            refused = await gw.client.get("/v2/library/odd/manifests/bad", headers=single)
            assert refused.status_code == 404
            assert refused.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        served = await gw.client.get("/v2/library/odd/manifests/good", headers=single)
        assert served.status_code == 200 and served.content == amd64.manifest


async def test_malformed_upstream_referrers_are_filtered_without_error(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """An upstream that ignores artifactType and lists malformed entries: the filtered
    answer keeps only well-formed entries of that type, as the upstream wrote them."""
    sbom = {"mediaType": image.media_type, "digest": sha256(b"sbom"), "artifactType": "sbom"}
    fake.supports_referrers = True
    fake.referrers[image.digest] = ["junk", {"artifactType": "sbom"}, sbom, {**sbom, "digest": 1}]
    async with gateway(tmp_path, fake) as gw:
        found = await gw.client.get(
            f"/v2/library/alpine/referrers/{image.digest}?artifactType=sbom"
        )
        assert found.status_code == 200, found.text
        assert found.headers["oci-filters-applied"] == "artifactType"
        assert found.json()["manifests"] == [sbom]
