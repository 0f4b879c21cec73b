"""The HTTP surface: /v2/ answers, and every other answer is the OCI JSON error envelope."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from mirrorrouter.app import create_app
from mirrorrouter.config import parse_settings

pytestmark = pytest.mark.anyio

CONFIG = """
[upstreams."docker.io"]
[upstreams."gcr.io"]
[[routes]]
prefix = "gcr"
upstream = "gcr.io"
"""


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(parse_settings(CONFIG, env={}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mirror") as client:
        yield client


def errors_of(response: httpx.Response) -> list[dict[str, object]]:
    assert response.headers["content-type"] == "application/json"
    body = json.loads(response.content)
    assert set(body) == {"errors"}
    items: list[dict[str, object]] = body["errors"]
    return items


async def test_base_endpoint_answers_with_api_version(client: httpx.AsyncClient) -> None:
    """GET and HEAD /v2/ answer 200 with Docker-Distribution-API-Version: registry/2.0."""
    for method in ("GET", "HEAD"):
        response = await client.request(method, "/v2/")
        assert response.status_code == 200
        assert response.headers["docker-distribution-api-version"] == "registry/2.0"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nothing", 404, "NAME_UNKNOWN"),
        ("GET", "/index.html", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/evil.example/x/manifests/1", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        # A reference that cannot exist is not there (404), as the OCI conformance suite
        # expects of pulls; pushes naming one are bad requests (400).
        ("GET", "/v2/a/blobs/sha256:nothex", 404, "BLOB_UNKNOWN"),
        ("HEAD", "/v2/a/blobs/md5:" + "0" * 32, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/referrers/sha256:nothex", 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/a/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("PUT", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 400, "MANIFEST_INVALID"),
        ("PUT", "/v2/library/alpine/manifests/latest", 405, "UNSUPPORTED"),
        ("POST", "/v2/library/alpine/blobs/uploads/", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/gcr/a/manifests/sha256:" + "0" * 64, 405, "UNSUPPORTED"),
        ("POST", "/v2/", 405, "UNSUPPORTED"),
    ],
)
async def test_bad_requests_get_the_json_envelope(
    client: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    """Bad or unsupported requests get the OCI envelope with the right status, never HTML."""
    response = await client.request(method, path)
    assert response.status_code == status
    if method == "HEAD":
        return  # no body; the status says it
    items = errors_of(response)
    assert items[0]["code"] == code
    assert isinstance(items[0]["message"], str) and items[0]["message"]


async def test_routing_error_names_the_configured_upstreams(client: httpx.AsyncClient) -> None:
    """A refused registry is named in the message together with what is configured."""
    response = await client.get("/v2/x/manifests/1", params={"ns": "evil.example"})
    message = str(errors_of(response)[0]["message"])
    assert "evil.example" in message and "docker.io, gcr.io" in message
