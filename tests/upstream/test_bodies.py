"""Bounded reads from upstreams: error bodies, challenges, redirects and token answers within
64 KiB or 1 MiB, tag lists and referrers within max_list_bytes and only as JSON, nothing
compressed decoded; what an upstream streams is never read further than the cap."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from mirrorrouter.config import ConfigError, parse_settings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.timing import Timing
from mirrorrouter.upstream.bodies import ERROR_BODY_LIMIT
from mirrorrouter.upstream.client import UpstreamClient
from tests.support.fakeregistry import FakeRegistry
from tests.support.inprocess import config, gateway

pytestmark = pytest.mark.anyio

KIB = 1024
MIB = 1024 * KIB
PIECE = 64 * KIB


class Endless(httpx.AsyncByteStream):
    """``size`` bytes of ``fill`` made as they are read, 64 KiB at a time; ``pulled`` counts
    what was taken (the upstream's own account of what it sent)."""

    def __init__(self, size: int, fill: bytes = b" ", head: bytes = b"") -> None:
        self.size, self.fill, self.head = size, fill, head
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head:
            self.pulled += len(self.head)
            yield self.head
        while self.pulled < self.size:
            piece = (self.fill * PIECE)[: min(PIECE, self.size - self.pulled)]
            self.pulled += len(piece)
            yield piece


def client_for(
    handler: Callable[[httpx.Request], httpx.Response], extra: str = ""
) -> UpstreamClient:
    text = f"""
[upstreams."docker.io"]
mirrors = [{{ url = "http://registry.test" }}]
retry_attempts = 1
{extra}
"""

    async def no_sleep(_seconds: float) -> None:
        return None

    settings = parse_settings(text, env={"PW": "hunter2"})
    return UpstreamClient(
        settings.upstreams["docker.io"],
        transport=httpx.MockTransport(handler),
        timing=Timing(sleep=no_sleep),
    )


REF = ImageReference.parse("library/a:1")


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (400, {"Content-Type": "application/json"}),  # read for its error code
        (500, {}),
        (401, {"WWW-Authenticate": 'Bearer realm="http://registry.test/token"'}),  # a challenge
        (307, {"Location": "/v2/library/a/manifests/2"}),  # a redirect's body
    ],
)
async def test_a_600_mb_answer_is_read_no_further_than_the_cap(
    status: int, headers: dict[str, str]
) -> None:
    """An error, challenge or redirect with a 600 MB body (no Content-Length) is read to
    64 KiB and a piece at most, whatever the flow it arrives in."""
    streams: list[Endless] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "t"})
        streams.append(Endless(600 * MIB, head=b'{"errors":[{"code":"UNAVAILABLE"}]'))
        return httpx.Response(status, headers=headers, stream=streams[-1])

    client = client_for(handler)
    try:
        with pytest.raises(RegistryError):
            await client.fetch_manifest(REF)
    finally:
        await client.aclose()
    assert streams and all(s.pulled <= ERROR_BODY_LIMIT + PIECE for s in streams)


async def test_a_declared_huge_error_body_is_not_read_at_all() -> None:
    """An error whose Content-Length is over the cap is closed without reading a byte."""
    body = Endless(600 * MIB)

    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, headers={"Content-Length": str(600 * MIB)}, stream=body)

    client = client_for(handler)
    try:
        with pytest.raises(RegistryError):
            await client.fetch_manifest(REF)
    finally:
        await client.aclose()
    assert body.pulled == 0


async def test_a_huge_token_answer_gives_no_token() -> None:
    """A token realm streaming 600 MB is read to 1 MiB and a piece; no token comes of it."""
    token = Endless(600 * MIB, head=b'{"token":"')
    challenge = 'Bearer realm="http://auth.test/token",service="registry"'

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return httpx.Response(200, stream=token)
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    client = client_for(handler)
    try:
        with pytest.raises(RegistryError) as raised:
            await client.fetch_manifest(REF)
    finally:
        await client.aclose()
    assert raised.value.code is ErrorCode.MANIFEST_UNKNOWN  # the registry's own 401
    assert MIB <= token.pulled <= MIB + PIECE


def tags_answer(
    body: bytes | httpx.AsyncByteStream, content_type: str = "application/json"
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(_request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if isinstance(body, bytes):
            return httpx.Response(200, headers=headers, content=body)
        return httpx.Response(200, headers=headers, stream=body)

    return handler


async def test_a_tag_list_over_max_list_bytes_is_the_mirrors_failure() -> None:
    """A 50 MB tag list is read to max_list_bytes (1 MiB here) and a piece, then refused
    as that mirror's failure: the client gets 503, not a 500 and not the list."""
    endless = Endless(50 * MIB, fill=b'"t",', head=b'{"name":"library/a","tags":[')
    client = client_for(tags_answer(endless), 'max_list_bytes = "1MiB"')
    try:
        with pytest.raises(RegistryError) as raised:
            await client.get_tags("library/a", {})
    finally:
        await client.aclose()
    assert raised.value.status == 503
    assert "tag list (max_list_bytes) is over the 1 MiB limit" in str(raised.value.detail)
    assert endless.pulled <= MIB + PIECE


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (b"<html>login</html>", "text/html", "answered as text/html, not JSON"),
        (b'{"name":"a","tags":', "application/json", "not a JSON object with a 'tags' list"),
        (b'["1","2"]', "application/json", "not a JSON object with a 'tags' list"),
        (b'{"name":"a","tags":"1"}', "application/json", "not a JSON object with a 'tags' list"),
    ],
)
async def test_a_tag_list_is_taken_only_as_json(body: bytes, content_type: str, why: str) -> None:
    """A tag list that is not JSON, or not an object with a tags list, is refused."""
    client = client_for(tags_answer(body, content_type))
    try:
        with pytest.raises(RegistryError) as raised:
            await client.get_tags("library/a", {})
    finally:
        await client.aclose()
    assert why in str(raised.value.detail)


async def test_a_valid_tag_list_reaches_the_client_byte_exact() -> None:
    """A valid tag list (tags null for an empty repository too) is served as it came."""
    body = b'{"name":"library/a","tags":null}'
    client = client_for(tags_answer(body, "application/json; charset=utf-8"))
    try:
        assert (await client.get_tags("library/a", {})).data == body
    finally:
        await client.aclose()


async def test_a_huge_tag_list_through_the_gateway_is_a_503(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Through the gateway, a tag list over max_list_bytes answers 503 UNAVAILABLE."""
    endless = Endless(20 * MIB, fill=b'"t",', head=b'{"name":"library/a","tags":[')

    def wrap(_app: httpx.ASGITransport) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(tags_answer(endless))

    text = config(tmp_path, 'max_list_bytes = "256KiB"')
    async with gateway(tmp_path, fake, text, wrap=wrap) as gw:
        response = await gw.client.get("/v2/library/a/tags/list")
    assert response.status_code == 503
    assert json.loads(response.content)["errors"][0]["code"] == "UNAVAILABLE"
    assert endless.pulled <= 256 * KIB + PIECE


async def test_compressed_answers_are_refused_or_taken_as_sent() -> None:
    """Requests ask for identity; a gzip manifest is refused (never inflated), a blob is
    taken as sent, so its digest is over the bytes the registry stored."""
    manifest = b'{"schemaVersion":2,"config":{},"layers":[]}'
    stored = gzip.compress(b"tar bytes" * 1000)
    digest = Digest("sha256", hashlib.sha256(stored).hexdigest())
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("accept-encoding"))
        body = stored if "/blobs/" in request.url.path else gzip.compress(manifest)
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Once(body))

    client = client_for(handler)
    try:
        with pytest.raises(RegistryError) as raised:
            await client.fetch_manifest(REF)
        async with client.open_blob("library/a", digest) as stream:
            data = b"".join([chunk async for chunk in stream.chunks()])
    finally:
        await client.aclose()
    assert "manifest is compressed (gzip), which was not asked for" in str(raised.value.detail)
    assert data == stored and asked == ["identity", "identity"]


class Once(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


def test_max_list_bytes_is_a_size_in_defaults_and_per_upstream() -> None:
    """max_list_bytes takes a size in [defaults] and per upstream; 8 MiB by default."""
    text = '[defaults]\nmax_list_bytes = "2MiB"\n[upstreams."docker.io"]\n[upstreams."quay.io"]\n'
    text += 'max_list_bytes = "512KiB"\n'
    settings = parse_settings(text, env={})
    assert settings.upstreams["docker.io"].policy.max_list_bytes == 2 * MIB
    assert settings.upstreams["quay.io"].policy.max_list_bytes == 512 * KIB
    assert parse_settings('[upstreams."docker.io"]', env={}).defaults.max_list_bytes == 8 * MIB
    with pytest.raises(ConfigError) as bad:
        parse_settings('[upstreams."docker.io"]\nmax_list_bytes = "lots"', env={})
    assert 'upstreams."docker.io".max_list_bytes: expected a size' in str(bad.value)
