"""Hosted repositories and groups, in-process: the push API, pulls, groups, deletes, GC.

The upstream is the fake registry (tests/support/fakeregistry.py); the hosted set lives in
the test's temporary directory. Real clients pushing to real storage are in
test_real_hosted.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirrorrouter.cache import StoredManifest, TagRecord
from mirrorrouter.cache.images import cache_areas
from mirrorrouter.cli.main import main
from mirrorrouter.config import ConfigError, parse_settings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.store import HostedStore
from mirrorrouter.reference import Digest
from tests.access.test_access import basic, secured, token
from tests.support.fakeregistry import FakeRegistry, Image, make_image, sha256
from tests.support.inprocess import gateway

pytestmark = pytest.mark.anyio

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def hosted_config(tmp_path: Path, extra: str = "", hosted: str = "") -> str:
    return f"""
[cache]
directory = "{tmp_path / "cache"}"
[routing]
default_registry = "dev"
[upstreams."docker.io"]
tag_ttl = "60s"
mirrors = [{{ url = "http://upstream.test" }}]
[upstreams."quay.io"]
mirrors = [{{ url = "http://quay.test" }}]
[hosted."team"]
aliases = ["localhost:5000"]
delete = true
{hosted}
[groups."dev"]
members = ["team", "docker.io", "quay.io"]
aliases = ["mirror.localhost"]
[[routes]]
prefix = "team"
hosted = "team"
[[routes]]
prefix = "hub"
upstream = "docker.io"
{extra}
"""


def secured_group(tmp_path: Path, rule: str, hosted: str = "") -> str:
    """test_access's ``secured`` config with the hosted set ``team`` (one access ``rule``,
    the keys ``hosted``) before docker.io in the group ``dev``, routed by the prefix
    ``dev``."""
    return secured(tmp_path).replace(
        '[upstreams."quay.io"]',
        f"""[hosted."team"]
{hosted}
[[hosted."team".access]]
{rule}
[groups."dev"]
members = ["team", "docker.io"]
[[routes]]
prefix = "dev"
group = "dev"
[upstreams."quay.io"]""",
    )


async def push_blob(client: httpx.AsyncClient, base: str, data: bytes) -> httpx.Response:
    return await client.post(
        f"{base}/blobs/uploads/", params={"digest": sha256(data)}, content=data
    )


async def push_image(
    client: httpx.AsyncClient, base: str, image: Image, tag: str | None = "v1"
) -> httpx.Response:
    for data in image.blobs.values():
        answer = await push_blob(client, base, data)
        assert answer.status_code == 201, answer.text
    reference = tag or image.digest
    return await client.put(
        f"{base}/manifests/{reference}",
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )


async def test_push_then_pull_by_tag_and_digest(tmp_path: Path, fake: FakeRegistry) -> None:
    """A monolithic push, then pulls through the hosted route and through the group."""
    image = make_image("app", [b"layer-one", b"layer-two"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        put = await push_image(gw.client, "/v2/team/app", image)
        assert put.status_code == 201, put.text
        assert put.headers["docker-content-digest"] == image.digest
        assert put.headers["location"] == f"/v2/team/app/manifests/{image.digest}"
        # The shadowing guard asked each upstream after team in the group once whether it
        # has the name (shadowing.py); the pulls below ask nobody.
        assert sorted(fake.requests) == [
            ("GET", "/v2/app/tags/list"),
            ("GET", "/v2/library/app/tags/list"),
            ("HEAD", "/v2/app/manifests/v1"),
            ("HEAD", "/v2/library/app/manifests/v1"),
        ]
        fake.requests.clear()
        for base in ("/v2/team/app", "/v2/app", "/v2/localhost:5000/app"):
            got = await gw.client.get(f"{base}/manifests/v1")
            assert got.status_code == 200, (base, got.text)
            assert got.content == image.manifest
            assert got.headers["docker-content-digest"] == image.digest
            by_digest = await gw.client.get(f"{base}/manifests/{image.digest}")
            assert by_digest.content == image.manifest
            for digest, data in image.blobs.items():
                blob = await gw.client.get(f"{base}/blobs/{digest}")
                assert blob.status_code == 200
                assert blob.content == data
        ranged = await gw.client.get(
            f"/v2/app/blobs/{sha256(b'layer-one')}", headers={"Range": "bytes=2-4"}
        )
        assert ranged.status_code == 206 and ranged.content == b"yer"
        # containerd's dialect: ?ns= names the hosted set's alias.
        ns = await gw.client.head("/v2/app/manifests/v1", params={"ns": "localhost:5000"})
        assert ns.status_code == 200
    assert fake.requests == []  # the group found it in the hosted member first


async def test_chunked_upload_resumes_after_interruption(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """PATCH chunks with Content-Range; a chunk at the wrong offset is refused with the
    current Range, GET says where to resume, and PUT verifies the whole."""
    data = bytes(range(256)) * 4000
    digest = sha256(data)
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        started = await gw.client.post("/team/v2/app/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["location"]
        assert location.startswith("/team/v2/app/blobs/uploads/")  # the client's own prefix
        assert started.headers["range"] == "0-0"
        first = await gw.client.patch(
            location, content=data[:300_000], headers={"Content-Range": "0-299999"}
        )
        assert first.status_code == 202 and first.headers["range"] == "0-299999"
        # The client lost track (a dropped connection): a chunk at the wrong offset.
        wrong = await gw.client.patch(
            location, content=data[100:200], headers={"Content-Range": "100-199"}
        )
        assert wrong.status_code == 416
        assert wrong.headers["range"] == "0-299999"
        assert wrong.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
        status = await gw.client.get(location)
        assert status.status_code == 204 and status.headers["range"] == "0-299999"
        offset = int(status.headers["range"].split("-")[1]) + 1
        rest = await gw.client.patch(
            location,
            content=data[offset:-1000],
            headers={"Content-Range": f"{offset}-{len(data) - 1001}"},
        )
        assert rest.status_code == 202
        done = await gw.client.put(location, params={"digest": digest}, content=data[-1000:])
        assert done.status_code == 201, done.text
        assert done.headers["location"] == f"/team/v2/app/blobs/{digest}"
        again = await gw.client.get(location)
        assert again.status_code == 404  # the session is over
        assert again.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        blob = await gw.client.get(f"/v2/team/app/blobs/{digest}")
        assert blob.content == data


async def test_wrong_digest_is_refused_and_nothing_stored(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        liar = sha256(b"something else")
        answer = await gw.client.post(
            "/v2/team/app/blobs/uploads/", params={"digest": liar}, content=b"content"
        )
        assert answer.status_code == 400
        assert answer.json()["errors"][0]["code"] == "DIGEST_INVALID"
        missing = await gw.client.head(f"/v2/team/app/blobs/{liar}")
        assert missing.status_code == 404
        started = await gw.client.post("/v2/team/app/blobs/uploads/")
        location = started.headers["location"]
        await gw.client.patch(location, content=b"abc")
        bad = await gw.client.put(location, params={"digest": liar})
        assert bad.status_code == 400
        assert (await gw.client.head(f"/v2/team/app/blobs/{sha256(b'abc')}")).status_code == 404


async def test_invalid_references_are_unknown_to_pulls_and_bad_requests_to_pushes(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """As the OCI conformance suite expects: pulling a reference that cannot exist is a 404,
    directly and through the group; pushing to one is a 400 with a spec error code."""
    image = make_image("app", [b"layer"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        assert (await push_image(gw.client, "/v2/team/app", image)).status_code == 201
        asked = len(fake.requests)  # the push's shadowing checks asked upstream; from here on
        for base in ("/v2/team/app", "/v2/app"):  # the hosted route, the group
            for method in ("GET", "HEAD"):
                for path, code in (
                    ("/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
                    ("/manifests/sha256:totallywrong", "MANIFEST_UNKNOWN"),
                    ("/blobs/sha256:totallywrong", "BLOB_UNKNOWN"),
                ):
                    answer = await gw.client.request(method, base + path)
                    assert answer.status_code == 404, (method, base + path)
                    if method == "GET":
                        assert answer.json()["errors"][0]["code"] == code
        for reference, code in (
            (".INVALID_MANIFEST_NAME", "MANIFEST_INVALID"),
            ("sha256:totallywrong", "DIGEST_INVALID"),
        ):
            answer = await gw.client.put(
                f"/v2/team/app/manifests/{reference}",
                content=image.manifest,
                headers={"Content-Type": image.media_type},
            )
            assert answer.status_code == 400
            assert answer.json()["errors"][0]["code"] == code
    assert fake.requests[asked:] == []  # nothing that cannot exist is asked upstream


async def test_manifest_with_missing_blob_is_refused(tmp_path: Path, fake: FakeRegistry) -> None:
    image = make_image("app", [b"present", b"absent"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        for data in image.blobs.values():
            if data != b"absent":
                assert (await push_blob(gw.client, "/v2/team/app", data)).status_code == 201
        answer = await gw.client.put(
            "/v2/team/app/manifests/v1",
            content=image.manifest,
            headers={"Content-Type": image.media_type},
        )
        assert answer.status_code == 400
        error = answer.json()["errors"][0]
        assert error["code"] == "MANIFEST_BLOB_UNKNOWN"
        assert error["detail"]["digest"] == sha256(b"absent")
        assert (await gw.client.get("/v2/team/app/manifests/v1")).status_code == 404


async def test_blob_of_another_repository_needs_a_mount(tmp_path: Path, fake: FakeRegistry) -> None:
    """A blob pushed to one repository is not visible in another until mounted there."""
    data = b"shared layer"
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        assert (await push_blob(gw.client, "/v2/team/one", data)).status_code == 201
        assert (await gw.client.head(f"/v2/team/two/blobs/{sha256(data)}")).status_code == 404
        unknown = await gw.client.post(
            "/v2/team/two/blobs/uploads/",
            params={"mount": sha256(b"nothing"), "from": "team/one"},
        )
        assert unknown.status_code == 202  # cannot mount: an upload session instead
        mounted = await gw.client.post(
            "/v2/team/two/blobs/uploads/", params={"mount": sha256(data), "from": "team/one"}
        )
        assert mounted.status_code == 201
        assert mounted.headers["location"] == f"/v2/team/two/blobs/{sha256(data)}"
        blob = await gw.client.get(f"/v2/team/two/blobs/{sha256(data)}")
        assert blob.content == data


async def test_group_pull_of_upstream_only_image_is_cached(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """A pull through the group of an image only docker.io has: fetched once, then cached."""
    image = fake.add(make_image("library/alpine", [b"alpine layer"]), "3.20")
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        for _ in range(2):
            got = await gw.client.get("/v2/alpine/manifests/3.20")
            assert got.status_code == 200, got.text
            assert got.content == image.manifest
            assert got.headers["x-upstream"] == "docker.io"
            blob = await gw.client.get(f"/v2/alpine/blobs/{sha256(b'alpine layer')}")
            assert blob.content == b"alpine layer"
    assert fake.count("GET", "/manifests/3.20") == 1
    assert fake.count("GET", "/blobs/") == 1


async def test_pushed_tag_is_never_shadowed_by_a_cached_copy(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """docker.io has library/app:v1 (cached through the group); pushing app:v1 to the hosted
    member where allow_shadow permits it makes the group serve the pushed one at once."""
    upstream_image = fake.add(make_image("library/app", [b"upstream"]), "v1")
    pushed = make_image("app", [b"pushed"])
    text = hosted_config(tmp_path, hosted='allow_shadow = ["app"]')
    async with gateway(tmp_path, fake, text) as gw:
        first = await gw.client.get("/v2/app/manifests/v1")
        assert first.content == upstream_image.manifest
        put = await push_image(gw.client, "/v2/app", pushed)  # a push to the group
        assert put.status_code == 201, put.text
        second = await gw.client.get("/v2/app/manifests/v1")
        assert second.content == pushed.manifest
        assert second.headers["x-upstream"] == "team"


async def test_group_tags_are_the_union_and_paginate(tmp_path: Path, fake: FakeRegistry) -> None:
    """Tags of a name both team (allowed to shadow it) and docker.io have: the union."""
    fake.add(make_image("library/app", [b"up"]), "1.0", "latest")
    text = hosted_config(tmp_path, hosted='allow_shadow = ["library/app"]')
    async with gateway(tmp_path, fake, text) as gw:
        for tag in ("dev", "latest"):
            assert (
                await push_image(gw.client, "/v2/app", make_image("app", [tag.encode()]), tag)
            ).status_code == 201
        listed = await gw.client.get("/v2/app/tags/list")
        assert listed.json() == {"name": "app", "tags": ["1.0", "dev", "latest"]}
        page = await gw.client.get("/v2/app/tags/list", params={"n": "2"})
        assert page.json()["tags"] == ["1.0", "dev"]
        assert page.headers["link"] == '</v2/app/tags/list?n=2&last=dev>; rel="next"'
        hosted = await gw.client.get("/v2/team/app/tags/list")
        assert hosted.json() == {"name": "team/app", "tags": ["dev", "latest"]}


async def test_index_push_and_platform_fallback(tmp_path: Path, fake: FakeRegistry) -> None:
    """An index is accepted only after its children; a client taking no index types gets
    the linux/amd64 child."""
    amd64, arm64 = make_image("app", [b"amd64"]), make_image("app", [b"arm64"])
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": image.media_type,
                    "digest": image.digest,
                    "size": len(image.manifest),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for image, arch in ((amd64, "amd64"), (arm64, "arm64"))
            ],
        }
    ).encode()
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        early = await gw.client.put(
            "/v2/team/app/manifests/multi", content=index, headers={"Content-Type": OCI_INDEX}
        )
        assert early.status_code == 400
        assert early.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
        for image in (amd64, arm64):
            assert (await push_image(gw.client, "/v2/team/app", image, None)).status_code == 201
        put = await gw.client.put(
            "/v2/team/app/manifests/multi", content=index, headers={"Content-Type": OCI_INDEX}
        )
        assert put.status_code == 201
        got = await gw.client.get("/v2/app/manifests/multi", headers={"Accept": OCI_INDEX})
        assert got.content == index
        single = await gw.client.get(
            "/v2/app/manifests/multi", headers={"Accept": amd64.media_type}
        )
        assert single.content == amd64.manifest


async def test_subject_and_referrers(tmp_path: Path, fake: FakeRegistry) -> None:
    image = make_image("app", [b"signed"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        assert (await push_image(gw.client, "/v2/team/app", image)).status_code == 201
        empty = b"{}"
        assert (await push_blob(gw.client, "/v2/team/app", empty)).status_code == 201
        signature = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.example.signature",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": sha256(empty),
                    "size": 2,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.empty.v1+json",
                        "digest": sha256(empty),
                        "size": 2,
                    }
                ],
                "subject": {
                    "mediaType": image.media_type,
                    "digest": image.digest,
                    "size": len(image.manifest),
                },
            }
        ).encode()
        put = await gw.client.put(
            f"/v2/team/app/manifests/{sha256(signature)}",
            content=signature,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert put.status_code == 201, put.text
        assert put.headers["oci-subject"] == image.digest
        for base in ("/v2/team/app", "/v2/app"):
            listed = await gw.client.get(f"{base}/referrers/{image.digest}")
            manifests = listed.json()["manifests"]
            assert [m["digest"] for m in manifests] == [sha256(signature)]
            assert manifests[0]["artifactType"] == "application/vnd.example.signature"
        filtered = await gw.client.get(
            f"/v2/team/app/referrers/{image.digest}", params={"artifactType": "other/type"}
        )
        assert filtered.json()["manifests"] == []
        assert filtered.headers["oci-filters-applied"] == "artifactType"


async def test_delete_tag_and_manifest(tmp_path: Path, fake: FakeRegistry) -> None:
    image = make_image("app", [b"to delete"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        await push_image(gw.client, "/v2/team/app", image, "v1")
        await push_image(gw.client, "/v2/team/app", image, "v2")
        assert (await gw.client.delete("/v2/team/app/manifests/v1")).status_code == 202
        assert (await gw.client.get("/v2/team/app/manifests/v1")).status_code == 404
        assert (await gw.client.get("/v2/team/app/manifests/v2")).status_code == 200
        assert (await gw.client.delete(f"/v2/team/app/manifests/{image.digest}")).status_code == 202
        assert (await gw.client.get("/v2/team/app/manifests/v2")).status_code == 404
        gone = await gw.client.get(f"/v2/team/app/manifests/{image.digest}")
        assert gone.status_code == 404
        again = await gw.client.delete(f"/v2/team/app/manifests/{image.digest}")
        assert again.status_code == 404


async def test_delete_is_refused_unless_enabled(tmp_path: Path, fake: FakeRegistry) -> None:
    text = hosted_config(tmp_path).replace("delete = true", "delete = false")
    image = make_image("app", [b"kept"])
    async with gateway(tmp_path, fake, text) as gw:
        await push_image(gw.client, "/v2/team/app", image)
        answer = await gw.client.delete("/v2/team/app/manifests/v1")
        assert answer.status_code == 405
        assert answer.json()["errors"][0]["code"] == "UNSUPPORTED"
        assert (await gw.client.get("/v2/team/app/manifests/v1")).status_code == 200


async def test_push_to_an_upstream_is_refused(tmp_path: Path, fake: FakeRegistry) -> None:
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        answer = await gw.client.post("/v2/hub/library/alpine/blobs/uploads/")
        assert answer.status_code == 405
        assert "pull-through cache" in answer.json()["errors"][0]["message"]
    assert fake.requests == []


async def test_bad_push_requests_get_json_errors(tmp_path: Path, fake: FakeRegistry) -> None:
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        cases = [
            gw.client.put("/v2/team/app/manifests/v1", content=b"not json"),
            gw.client.put(
                "/v2/team/app/manifests/v1",
                content=b'{"schemaVersion": 1}',
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            ),
            gw.client.patch("/v2/team/app/blobs/uploads/" + "0" * 32, content=b"x"),
            gw.client.patch("/v2/team/app/blobs/uploads/../../etc", content=b"x"),
            gw.client.post("/v2/team/app/blobs/uploads/", params={"digest": "sha256:nothex"}),
            gw.client.put("/v2/team/app/manifests/v1", content=b"x" * (4 * 1024 * 1024 + 1)),
        ]
        for request in cases:
            answer = await request
            assert 400 <= answer.status_code < 500, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert answer.json()["errors"][0]["code"]


async def test_garbage_collection_keeps_what_manifests_reference(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    kept = make_image("app", [b"kept layer", b"shared layer"])
    dropped = make_image("app", [b"dropped layer", b"shared layer"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        await push_image(gw.client, "/v2/team/app", kept, "keep")
        await push_image(gw.client, "/v2/team/app", dropped, "drop")
        assert (await push_blob(gw.client, "/v2/team/app", b"orphan")).status_code == 201
        started = await gw.client.post("/v2/team/app/blobs/uploads/")  # abandoned
        assert started.status_code == 202
        await gw.client.delete(f"/v2/team/app/manifests/{dropped.digest}")
        store = gw.app.services.hosted.stores["team"]
        young = await store.collect_garbage()
        assert (young.blobs, young.manifests, young.uploads) == (0, 0, 0)  # within gc_grace
        gw.clock.now += 2 * 3600
        dry = await store.collect_garbage(dry_run=True)
        assert (dry.blobs, dry.manifests) == (2, 1)
        report = await store.collect_garbage()
        assert (report.blobs, report.manifests, report.uploads) == (2, 1, 1)
        for digest, data in kept.blobs.items():
            blob = await gw.client.get(f"/v2/team/app/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data
        assert (await gw.client.get("/v2/team/app/manifests/keep")).content == kept.manifest
        for data in (b"dropped layer", b"orphan"):
            assert (await gw.client.head(f"/v2/team/app/blobs/{sha256(data)}")).status_code == 404
        assert await store.storage.get_manifest(Digest.parse(dropped.digest)) is None


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = f'[cache]\ndirectory = "{tmp_path}"\n[upstreams."docker.io"]\n'
    cases = {
        '[hosted."team.x"]\n': 'hosted."team.x"',
        '[hosted."docker.io"]\n': "no dots",
        '[upstreams."localhost"]\n[hosted."localhost"]\n': "is already an upstream",
        '[groups."g"]\nmembers = ["nope"]\n': "groups.g.members[0]",
        '[groups."g"]\n': "groups.g.members: is required",
        '[hosted."a"]\n[hosted."b"]\n[groups."g"]\nmembers = ["a", "b"]\n': "groups.g.writable",
        '[groups."g"]\nmembers = ["docker.io"]\nwritable = "docker.io"\n': "groups.g.writable",
        '[hosted."a"]\n[[routes]]\nprefix = "x"\nhosted = "b"\n': "routes[0].hosted",
        '[hosted."a"]\n[[routes]]\nprefix = "x"\nhosted = "a"\nupstream = "docker.io"\n': (
            "exactly one of upstream, hosted or group"
        ),
        '[hosted."a"]\n[[hosted."a".access]]\npush = ["alice"]\n': "need an [auth] table",
        '[routing]\ndefault_registry = "nothing"\n': "routing.default_registry",
        '[hosted."a"]\nallow_shadow = "library/*"\n': "hosted.a.allow_shadow: expected a list",
        '[hosted."a"]\nallow_shadow = ["docker.io/library/alpine"]\n': (
            "hosted.a.allow_shadow: expected a list of repository globs without a registry"
        ),
        '[hosted."a"]\nallow_shadow = [""]\n': "hosted.a.allow_shadow",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_settings(base + text)
        assert expected in str(caught.value), (text, str(caught.value))


async def test_store_survives_a_restart(tmp_path: Path, fake: FakeRegistry) -> None:
    """Pushed content is on disk, not in memory: a new gateway over the directory has it."""
    image = make_image("app", [b"durable"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        await push_image(gw.client, "/v2/team/app", image)
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        assert (await gw.client.get("/v2/app/manifests/v1")).content == image.manifest
    settings = parse_settings(hosted_config(tmp_path))
    store = HostedStore(settings.hosted["team"])
    await store.open()
    try:
        assert await store.tags("app") == ["v1"]
    finally:
        await store.close()


async def test_push_needs_the_push_permission(tmp_path: Path, fake: FakeRegistry) -> None:
    """Access rules of a hosted set: pull for everyone, push for alice and the builders;
    anonymous gets a login challenge asking for push, bob a refusal, alice gets through.
    Through the group the writable member's rules apply; where no rule matches nobody may
    push."""
    text = secured_group(tmp_path, 'repositories = ["app"]\npull = ["anonymous"]\npush = ["alice"]')
    image = make_image("app", [b"guarded"])
    async with gateway(tmp_path, fake, text) as gw:
        for base in ("/v2/dev/app", "/team/v2/app"):
            anonymous = await gw.client.post(f"{base}/blobs/uploads/")
            assert anonymous.status_code == 401
            assert 'scope="repository:' in anonymous.headers["www-authenticate"]
            assert ":pull,push" in anonymous.headers["www-authenticate"]
            bob = await gw.client.post(f"{base}/blobs/uploads/", headers=basic("bob", "builder"))
            assert bob.status_code == 403
            assert bob.json()["errors"][0]["code"] == "DENIED"
        gw.client.headers.update(basic("alice", "wonderland"))
        put = await push_image(gw.client, "/v2/dev/app", image)
        assert put.status_code == 201, put.text
        del gw.client.headers["authorization"]
        pulled = await gw.client.get("/v2/dev/app/manifests/v1")  # anyone may pull
        assert pulled.content == image.manifest
        other = await gw.client.post(
            "/v2/dev/other/blobs/uploads/", headers=basic("bob", "builder")
        )
        # No rule matches: with [auth] on, nobody may push (the default since issue 13).
        assert other.status_code == 403
        assert "no [[hosted" in other.json()["errors"][0]["message"]


async def test_group_unions_ask_a_client_without_credentials_to_log_in(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """A group's tags/list of a repository a login-only member has answers a request without
    credentials with that member's login challenge (not docker.io's part of the union with a
    200, after which a client never logs in); an anonymous token gets the public part, a
    user's token the whole union."""
    fake.add(make_image("library/app", [b"public"]), "1.0")
    text = secured_group(
        tmp_path,
        'repositories = ["*"]\npull = ["authenticated"]\npush = ["alice"]',
        hosted='allow_shadow = ["app"]',
    )
    async with gateway(tmp_path, fake, text) as gw:
        gw.client.headers.update(basic("alice", "wonderland"))
        pushed = await push_image(gw.client, "/v2/dev/app", make_image("app", [b"ours"]), "v1")
        assert pushed.status_code == 201, pushed.text
        del gw.client.headers["authorization"]
        prompt = await gw.client.get("/v2/dev/app/tags/list")
        assert prompt.status_code == 401
        assert 'scope="repository:dev/app:pull"' in prompt.headers["www-authenticate"]
        public = await gw.client.get("/v2/dev/app/tags/list", headers=await token(gw.client))
        assert public.json()["tags"] == ["1.0"]
        alice = await token(gw.client, "alice")
        union = await gw.client.get("/v2/dev/app/tags/list", headers=alice)
        assert union.json()["tags"] == ["1.0", "v1"]


def test_gc_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mirrors.toml"
    config.write_text(hosted_config(tmp_path, hosted='gc_grace = "0s"'))
    assert main(["gc", "--config", str(config), "--dry-run"]) == 0
    assert "hosted team: would remove 0 blobs and 0 manifests" in capsys.readouterr().out
    assert main(["gc", "--config", str(config), "--hosted", "nope"]) == 2
    assert "no hosted set named 'nope'" in capsys.readouterr().err


def test_documented_setups_load_and_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Nexus and Kind configurations of docs/hosted-and-groups.md are valid, and route
    as the page says."""
    page = (Path(__file__).parents[2] / "docs" / "hosted-and-groups.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```toml\n")[1:]]
    setups = [b for b in blocks if "[routing]" in b]
    assert len(setups) == 2
    (tmp_path / "htpasswd").write_text("")
    for index, text in enumerate(setups):
        config = tmp_path / f"setup{index}.toml"
        config.write_text(text)
        settings = parse_settings(text, source=config)
        assert settings.groups
    kind = tmp_path / "setup1.toml"
    assert main(["resolve", "--config", str(kind), "localhost:5000/my-image"]) == 0
    out = capsys.readouterr().out
    assert (
        "group kind: hosted local (local/my-image) [push] > upstream docker.io "
        "(docker.io/library/my-image)"
    ) in out


async def test_hosted_content_is_never_an_eviction_area(tmp_path: Path, fake: FakeRegistry) -> None:
    """Cache bounds never count or evict pushed content, wherever its directory is."""
    text = hosted_config(tmp_path, hosted=f'directory = "{tmp_path / "cache" / "inside"}"')
    text = text.replace(
        f'directory = "{tmp_path / "cache"}"\n',
        f'directory = "{tmp_path / "cache"}"\nmax_size = 1\n',
        1,
    )
    image = make_image("app", [b"pushed, never evicted"])
    async with gateway(tmp_path, fake, text) as gw:
        assert (await push_image(gw.client, "/v2/team/app", image)).status_code == 201
        areas = cache_areas(gw.app.services.settings)
        assert {a.name for a in areas} == {"docker.io", "quay.io"}
        await gw.app.services.evictor.enforce()
        assert (await gw.client.get("/v2/team/app/manifests/v1")).content == image.manifest


async def test_client_gone_mid_chunk_keeps_what_arrived(tmp_path: Path, fake: FakeRegistry) -> None:
    """A PATCH whose client disconnects mid-body: the bytes that arrived stay in the upload
    (the next GET says so), and the answer is a 499, not a 500."""
    settings = parse_settings(hosted_config(tmp_path))
    store = HostedStore(settings.hosted["team"])
    await store.open()
    try:
        upload = await store.start_upload("app")

        async def interrupted() -> AsyncIterator[bytes]:
            yield b"a" * 1000
            yield b"b" * 500
            raise RegistryError(ErrorCode.BLOB_UPLOAD_INVALID, "client gone", status=499)

        with pytest.raises(RegistryError) as caught:
            await store.append(upload, interrupted())
        assert caught.value.status == 499
        assert (await store.upload("app", upload.id)).size == 1500
    finally:
        await store.close()


def _without(document: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != key}


async def test_hostile_manifests_are_refused_naming_the_field(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Pushed manifests off their media type's schema are 400 MANIFEST_INVALID naming the
    field (never a 500), and nothing of them is stored or tagged."""
    image = make_image("app", [b"base"])
    good = json.loads(image.manifest)
    layer = good["layers"][0]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**good["config"], "platform": "linux/amd64"}],
    }
    cases: list[tuple[bytes, str, str | None]] = [
        (json.dumps({**good, "layers": None}).encode(), OCI_MANIFEST, "layers"),
        (json.dumps(_without(good, "layers")).encode(), OCI_MANIFEST, "layers"),
        (json.dumps(index).encode(), OCI_INDEX, "manifests[0].platform"),
        (json.dumps({**good, "layers": [layer, 7]}).encode(), OCI_MANIFEST, "layers[1]"),
        (
            json.dumps({**good, "layers": [{**layer, "size": -1}]}).encode(),
            OCI_MANIFEST,
            "layers[0].size",
        ),
        (json.dumps({**good, "config": "sha256:x"}).encode(), OCI_MANIFEST, "config"),
        (json.dumps({**good, "subject": {"digest": 5}}).encode(), OCI_MANIFEST, "subject.digest"),
        (b"[" * 100_000 + b"]" * 100_000, OCI_MANIFEST, None),
        (b"{not json", OCI_MANIFEST, None),
        (b"[]", OCI_MANIFEST, None),
    ]
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        for data in image.blobs.values():
            assert (await push_blob(gw.client, "/v2/team/app", data)).status_code == 201
        for data, content_type, field in cases:
            answer = await gw.client.put(
                "/v2/team/app/manifests/v1", content=data, headers={"Content-Type": content_type}
            )
            assert answer.status_code == 400, (field, answer.text)
            assert answer.headers["content-type"] == "application/json"
            [error] = answer.json()["errors"]
            assert error["code"] == "MANIFEST_INVALID", error
            if field is not None:
                assert error["detail"]["field"] == field
                assert error["message"].startswith(f"{field}: ")
        assert (await gw.client.get("/v2/team/app/manifests/v1")).status_code == 404
        store = gw.app.services.hosted.stores["team"]
        assert (await store.storage.inventory()).manifests == {}
        put = await push_image(gw.client, "/v2/team/app", image)  # the good one still goes in
        assert put.status_code == 201, put.text


async def _store_raw(
    store: HostedStore, repository: str, data: bytes, media_type: str, tag: str | None = None
) -> Digest:
    """Put manifest bytes straight into storage, linked (and tagged), bypassing the checks
    of a push: what older versions accepted."""
    digest = Digest.of(data)
    await store.storage.put_manifest(StoredManifest(digest, media_type, data))
    await store.storage.link(repository, [digest])
    if tag is not None:
        record = TagRecord(digest, media_type, len(data), store.clock())
        await store.storage.put_tag(repository, tag, record)
    return digest


async def test_malformed_manifests_already_stored_are_tolerated(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Malformed manifests written by older versions: pulls answer (a 404 where no child
    fits, never a 500), referrers list what has a subject, and gc runs and keeps what the
    well-formed parts reference."""
    image = make_image("app", [b"kept layer"])
    dropped = make_image("app", [b"only in a dropped manifest"])
    good = json.loads(image.manifest)
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        assert (await push_image(gw.client, "/v2/team/app", image)).status_code == 201
        for data in dropped.blobs.values():
            assert (await push_blob(gw.client, "/v2/team/app", data)).status_code == 201
        store = gw.app.services.hosted.stores["team"]
        null_layers = json.dumps({**good, "layers": None}).encode()
        await _store_raw(store, "app", null_layers, OCI_MANIFEST, "null-layers")
        string_platform = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": image.digest,
                        "size": len(image.manifest),
                        "platform": "linux/amd64",
                    },
                    "junk",
                ],
            }
        ).encode()
        await _store_raw(store, "app", string_platform, OCI_INDEX, "string-platform")
        referrer = json.dumps(
            {
                **good,
                "layers": {"not": "a list"},
                "artifactType": "application/vnd.example.sig",
                "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": -1},
            }
        ).encode()
        referrer_digest = await _store_raw(store, "app", referrer, OCI_MANIFEST)
        await _store_raw(store, "app", b"\x00 not json", OCI_MANIFEST, "binary")
        await _store_raw(store, "app", b"[" * 100_000, OCI_MANIFEST, "deep")

        pulled = await gw.client.get("/v2/team/app/manifests/null-layers")
        assert pulled.status_code == 200 and pulled.content == null_layers
        as_index = await gw.client.get(
            "/v2/app/manifests/string-platform", headers={"Accept": OCI_INDEX}
        )
        assert as_index.status_code == 200 and as_index.content == string_platform
        no_child = await gw.client.get(
            "/v2/app/manifests/string-platform", headers={"Accept": OCI_MANIFEST}
        )
        assert no_child.status_code == 404
        assert no_child.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        for base in ("/v2/team/app", "/v2/app"):  # the hosted set, and the group's union
            listed = await gw.client.get(f"{base}/referrers/{image.digest}")
            assert listed.status_code == 200, listed.text
            [entry] = listed.json()["manifests"]
            assert entry["digest"] == str(referrer_digest)
            assert entry["artifactType"] == "application/vnd.example.sig"
        for tag in ("binary", "deep"):
            raw = await gw.client.get(f"/v2/team/app/manifests/{tag}")
            assert raw.status_code == 200

        gw.clock.now += 2 * 3600
        report = await store.collect_garbage()
        assert (report.blobs, report.manifests) == (1, 0)  # the dropped image's one layer
        for digest, data in image.blobs.items():
            blob = await gw.client.get(f"/v2/team/app/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data
        assert (await gw.client.get("/v2/team/app/manifests/null-layers")).status_code == 200


def test_check_config_warns_of_a_hosted_set_nobody_may_push_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With [auth] on and no rule granting push, check-config warns naming the set; a rule
    with push, or [auth] off, leaves nothing to warn about."""
    monkeypatch.setenv("HUB_PASSWORD", "x")
    config = tmp_path / "mirrors.toml"
    pull_only = '[hosted."team"]\n[[hosted."team".access]]\npull = ["authenticated"]\n'
    for text, warned in [
        (secured(tmp_path, '[hosted."team"]\n'), True),
        (secured(tmp_path, pull_only), True),
        (secured(tmp_path, pull_only + 'push = ["alice"]\n'), False),
        (hosted_config(tmp_path), False),
    ]:
        config.write_text(text)
        assert main(["check-config", str(config)]) == 0
        err = capsys.readouterr().err
        assert ("warning: nobody may push to hosted team" in err) == warned, (text, err)


# -- group pulls from memory -----------------------------------------------------------


def manifest_scope(path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """An ASGI scope of a manifest GET, as the fast path of app.py sees it."""
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": b"",
        "headers": [(b"host", b"mirror")]
        + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1),
    }


def header(response: Any, name: str) -> str:
    """A header of a fast-path ``RawResponse``."""
    return next(v.decode() for k, v in response.headers if k == name.encode())


async def test_group_manifests_are_answered_from_memory_like_the_full_path(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Once read, a group's manifest is answered from memory with the full path's bytes and
    headers: from the hosted member, and from docker.io after the hosted member's miss."""
    pushed = make_image("app", [b"pushed"])
    upstream = fake.add(make_image("library/alpine", [b"alpine"]), "3.20")
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        assert (await push_image(gw.client, "/v2/app", pushed)).status_code == 201
        cases = {
            "/v2/app/manifests/v1": (pushed, "team"),
            f"/v2/app/manifests/{pushed.digest}": (pushed, "team"),
            "/v2/team/app/manifests/v1": (pushed, "team"),
            "/v2/alpine/manifests/3.20": (upstream, "docker.io"),
            f"/v2/alpine/manifests/{upstream.digest}": (upstream, "docker.io"),
        }
        for path, (image, member) in cases.items():
            full = await gw.client.get(path)  # the first read takes the full path
            assert full.status_code == 200, (path, full.text)
            assert (full.content, full.headers["x-upstream"]) == (image.manifest, member)
            fast = gw.app.endpoints.fast_manifest(manifest_scope(path))
            assert fast is not None, path
            assert fast.body == image.manifest
            for name in ("x-upstream", "docker-content-digest", "content-type"):
                assert header(fast, name) == full.headers[name], (path, name)
            assert header(fast, "x-cache") == ("HOSTED" if member == "team" else "HIT")
        asked = len(fake.requests)
        for path, (image, _) in cases.items():
            assert (await gw.client.get(path)).content == image.manifest
        assert len(fake.requests) == asked


async def test_push_through_one_worker_is_seen_at_once_by_another(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Two gateways over one directory (two workers): after a tag moved, was deleted or was
    pushed through one, the other never answers what its memory held before."""
    first, second = make_image("app", [b"first"]), make_image("app", [b"second"])
    text = hosted_config(tmp_path)
    async with gateway(tmp_path, fake, text) as a, gateway(tmp_path, fake, text) as b:
        assert (await push_image(a.client, "/v2/app", first)).status_code == 201
        for _ in range(2):  # b remembers v1 (and that team has no v2)
            assert (await b.client.get("/v2/app/manifests/v1")).content == first.manifest
            assert (await b.client.get("/v2/app/manifests/v2")).status_code == 404
        assert b.app.endpoints.fast_manifest(manifest_scope("/v2/app/manifests/v1")) is not None
        assert (await push_image(a.client, "/v2/app", second)).status_code == 201
        moved = await b.client.get("/v2/app/manifests/v1")
        assert moved.headers["docker-content-digest"] == second.digest
        assert (await push_image(a.client, "/v2/app", first, "v2")).status_code == 201
        assert (await b.client.get("/v2/app/manifests/v2")).content == first.manifest
        assert (await a.client.delete("/v2/app/manifests/v1")).status_code == 202
        gone = await b.client.get("/v2/app/manifests/v1")
        assert gone.status_code == 404, gone.text
        assert (await a.client.delete(f"/v2/team/app/manifests/{first.digest}")).status_code == 202
        assert (await b.client.get(f"/v2/app/manifests/{first.digest}")).status_code == 404


async def test_group_memory_keeps_each_members_access_rules(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """A manifest of a hosted member only logged-in users may pull, remembered for alice,
    is never answered from memory to an anonymous client: it gets the full path's 401."""
    text = secured_group(
        tmp_path, 'repositories = ["*"]\npull = ["authenticated"]\npush = ["alice"]'
    )
    image = make_image("app", [b"members only"])
    alice = basic("alice", "wonderland")
    async with gateway(tmp_path, fake, text) as gw:
        gw.client.headers.update(alice)
        assert (await push_image(gw.client, "/v2/dev/app", image)).status_code == 201
        for _ in range(2):
            assert (await gw.client.get("/v2/dev/app/manifests/v1")).content == image.manifest
        path = "/v2/dev/app/manifests/v1"
        assert gw.app.endpoints.fast_manifest(manifest_scope(path, alice)) is not None
        del gw.client.headers["authorization"]
        assert gw.app.endpoints.fast_manifest(manifest_scope(path)) is None
        anonymous = await gw.client.get(path)
        assert anonymous.status_code == 401, anonymous.text
        bob = await gw.client.get(path, headers=basic("bob", "builder"))
        assert bob.content == image.manifest  # any logged-in user


async def test_a_stores_memory_of_absence_ends_with_a_push_elsewhere(tmp_path: Path) -> None:
    """Two stores over one directory: what one remembers (a manifest, or that a tag is not
    there) stops counting the moment the other stores anything, and garbage collection."""
    settings = parse_settings(hosted_config(tmp_path, hosted='gc_grace = "0s"'))
    a, b = (HostedStore(settings.hosted["team"]) for _ in range(2))
    image = make_image("app", [b"layer"])
    await a.open()
    await b.open()
    try:
        with pytest.raises(RegistryError):
            await b.manifest("app", "v1", None)
        known = b.known_manifest("app", "v1")
        assert known is not None and known.manifest is None  # certain: not there
        for digest, data in image.blobs.items():
            await a.put_blob("app", Digest.parse(digest), _chunks(data))
        assert b.known_manifest("app", "v1") is None  # something changed: ask the storage
        await a.put_manifest("app", "v1", None, image.media_type, image.manifest)
        stored = await b.manifest("app", "v1", None)
        known = b.known_manifest("app", "v1")
        assert known is not None and known.manifest == stored
        report = await a.collect_garbage()
        assert report.blobs + report.manifests == 0  # everything is referenced: no change
        assert b.known_manifest("app", "v1") is not None
        await a.delete("app", "v1", None)
        assert b.known_manifest("app", "v1") is None
        await a.delete("app", None, stored.digest)
        with pytest.raises(RegistryError):
            await b.manifest("app", None, stored.digest)
        assert b.known_manifest("app", stored.digest) is not None
        report = await a.collect_garbage()
        assert report.manifests == 1  # the unlinked manifest goes
        assert b.known_manifest("app", stored.digest) is None
    finally:
        await a.close()
        await b.close()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data
