"""The gateway in-process on the s3 cache backend (a real SeaweedFS on loopback): pulls
through it, and blob GETs answered with a redirect to a presigned URL when configured."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.fakeregistry import FakeRegistry, make_image, sha256
from tests.support.inprocess import gateway
from tests.support.seaweed import session_seaweed

pytestmark = pytest.mark.anyio


def s3_config(tmp_path: Path, *, redirect: bool, prefix: str | None = None) -> str:
    server = session_seaweed()
    prefix = prefix or f"tests/{uuid.uuid4().hex}"
    return f"""
[cache]
backend = "s3"
directory = "{tmp_path / "spool"}"
[cache.s3]
bucket = "{server.bucket}"
endpoint = "{server.endpoint}"
prefix = "{prefix}"
access_key_id_env = "S3_KEY"
secret_access_key_env = "S3_SECRET"
redirect = {str(redirect).lower()}
[upstreams."docker.io"]
tag_ttl = "60s"
mirrors = [{{ url = "http://upstream.test" }}]
"""


def credentials() -> dict[str, str]:
    server = session_seaweed()
    return {"S3_KEY": server.access_key, "S3_SECRET": server.secret_key}


async def test_pull_through_the_s3_backend(tmp_path: Path, fake: FakeRegistry) -> None:
    image = fake.add(make_image("library/alpine", [b"s3 layer" * 10_000]), "3")
    prefix = f"tests/{uuid.uuid4().hex}"
    text = s3_config(tmp_path, redirect=False, prefix=prefix)
    async with gateway(tmp_path, fake, text, env=credentials()) as gw:
        for expected in ("MISS", "HIT"):
            manifest = await gw.client.get("/v2/library/alpine/manifests/3")
            assert manifest.content == image.manifest
            for digest, data in image.blobs.items():
                blob = await gw.client.get(f"/v2/library/alpine/blobs/{digest}")
                assert blob.status_code == 200 and blob.content == data
                assert blob.headers["x-cache"] == expected
    # Another gateway, with an empty local disk, serves everything from the bucket.
    other = s3_config(tmp_path / "other", redirect=False, prefix=prefix)
    async with gateway(tmp_path / "other", fake, other, env=credentials()) as gw:
        for digest, data in image.blobs.items():
            blob = await gw.client.get(
                f"/v2/library/alpine/blobs/{digest}", headers={"Range": "bytes=10-19"}
            )
            assert blob.status_code == 206 and blob.content == data[10:20]
    assert fake.count("GET", "/blobs/") == len(image.blobs)


async def test_cached_blobs_redirect_to_a_presigned_url(tmp_path: Path, fake: FakeRegistry) -> None:
    layer = b"redirected layer" * 5_000
    fake.add(make_image("library/alpine", [layer]), "3")
    async with gateway(tmp_path, fake, s3_config(tmp_path, redirect=True), env=credentials()) as gw:
        first = await gw.client.get(f"/v2/library/alpine/blobs/{sha256(layer)}")
        assert first.status_code == 200 and first.content == layer  # a miss streams
        again = await gw.client.get(f"/v2/library/alpine/blobs/{sha256(layer)}")
        assert again.status_code == 307
        assert again.headers["docker-content-digest"] == sha256(layer)
        location = again.headers["location"]
        assert location.startswith(session_seaweed().endpoint)
        head = await gw.client.head(f"/v2/library/alpine/blobs/{sha256(layer)}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(layer))
    async with httpx.AsyncClient(trust_env=False) as direct:
        fetched = await direct.get(location)
        assert fetched.status_code == 200 and fetched.content == layer
        ranged = await direct.get(location, headers={"Range": "bytes=0-9"})
        assert ranged.content == layer[:10]


async def test_a_store_refusing_us_is_a_503_never_a_500(tmp_path: Path, fake: FakeRegistry) -> None:
    """Wrong credentials (or a store that is down): clients get UNAVAILABLE, which they
    retry, naming the bucket and never the secret; nothing is cached or corrupted."""
    fake.add(make_image("library/alpine", [b"layer"]), "3")
    env = {**credentials(), "S3_SECRET": "not-the-secret"}
    async with gateway(tmp_path, fake, s3_config(tmp_path, redirect=False), env=env) as gw:
        for path in (
            "/v2/library/alpine/manifests/3",
            f"/v2/library/alpine/blobs/{sha256(b'layer')}",
        ):
            answer = await gw.client.get(path)
            assert answer.status_code == 503, answer.text
            error = answer.json()["errors"][0]
            assert error["code"] == "UNAVAILABLE"
            assert f"s3://{session_seaweed().bucket}" in error["message"]
            assert "not-the-secret" not in answer.text


async def test_cache_bounds_evict_from_the_bucket(tmp_path: Path, fake: FakeRegistry) -> None:
    """Eviction opens the s3 caches with their bucket settings: past max_size the image
    goes from the bucket, and the next pull fetches it again."""
    image = fake.add(make_image("library/alpine", [b"evicted" * 10_000]), "3")
    async with gateway(
        tmp_path, fake, s3_config(tmp_path, redirect=False), env=credentials()
    ) as gw:
        for digest in image.blobs:
            assert (await gw.client.get(f"/v2/library/alpine/blobs/{digest}")).status_code == 200
        assert (await gw.client.get("/v2/library/alpine/manifests/3")).status_code == 200
        report = await gw.app.services.evictor.enforce(to=1)
        assert report.freed > 0 and not report.shortfalls
        again = await gw.client.get(f"/v2/library/alpine/blobs/{next(iter(image.blobs))}")
        assert again.headers["x-cache"] == "MISS"
