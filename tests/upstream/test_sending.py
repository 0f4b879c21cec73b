"""Sending to a mirror: credentials only for its origin, redirects followed outside the auth
flow (relative, bounded, nothing carried across origins), redirect targets' failures asked
of the registry again, and where redirects of each kind of answer may lead."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from mirrorrouter.config import parse_settings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.reference import Digest
from mirrorrouter.timing import Timing
from mirrorrouter.upstream.client import UpstreamClient
from mirrorrouter.upstream.results import ListAnswer
from mirrorrouter.upstream.sending import MAX_HOPS

pytestmark = pytest.mark.anyio

PASSWORD = "hunter2"
BASIC = "Basic " + base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
BLOB = b"layer bytes " * 1000
DIGEST = Digest("sha256", hashlib.sha256(BLOB).hexdigest())
BLOB_PATH = f"/v2/library/a/blobs/{DIGEST}"
TAGS_PATH = "/v2/library/a/tags/list"

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Network:
    """Hosts answering by handler; every request is kept (the hosts' own log)."""

    hosts: dict[str, Handler] = field(default_factory=dict)
    seen: list[httpx.Request] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        # A copy: the auth flow sets Authorization on the request object it sends again.
        self.seen.append(httpx.Request(request.method, request.url, headers=request.headers))
        return self.hosts[request.url.netloc.decode()](request)

    def at(self, host: str) -> list[httpx.Request]:
        return [r for r in self.seen if r.url.netloc.decode() == host]

    def client(self, extra: str = "", credentials: bool = True) -> UpstreamClient:
        text = f"""
[upstreams."docker.io"]
mirrors = [{{ url = "http://registry.test" }}]
retry_attempts = 3
breaker_failures = 100
{extra}
"""
        if credentials:
            text += '[upstreams."docker.io".credentials]\nusername = "bob"\npassword_env = "PW"\n'

        async def no_sleep(_seconds: float) -> None:
            return None

        return UpstreamClient(
            parse_settings(text, env={"PW": PASSWORD}).upstreams["docker.io"],
            transport=httpx.MockTransport(self.handle),
            timing=Timing(sleep=no_sleep),
        )


def registry(cdn: str | None = "cdn.test") -> Handler:
    """A registry wanting Basic credentials; blob GETs go to ``cdn`` (None: served here)."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != BASIC:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        if request.url.path == BLOB_PATH:
            if cdn is None:
                return httpx.Response(200, content=BLOB)
            return httpx.Response(307, headers={"Location": f"http://{cdn}/o/{DIGEST.hex}?sig=1"})
        return httpx.Response(404)

    return answer


def cdn_serving(request: httpx.Request) -> httpx.Response:
    if "authorization" in request.headers:  # S3: InvalidArgument
        return httpx.Response(400, content=b"<Error><Code>InvalidArgument</Code></Error>")
    return httpx.Response(200, content=BLOB)


async def read(client: UpstreamClient, offset: int = 0) -> bytes:
    async with client.open_blob("library/a", DIGEST, offset) as stream:
        return b"".join([chunk async for chunk in stream.chunks()])


def authorizations(requests: list[httpx.Request]) -> list[str | None]:
    return [r.headers.get("authorization") for r in requests]


async def test_cross_origin_hop_carries_no_credentials() -> None:
    """A blob redirect to a CDN is followed with Range but without Authorization or cookies."""
    net = Network({"registry.test": registry(), "cdn.test": cdn_serving})
    client = net.client()
    try:
        assert await read(client, offset=5) == BLOB[5:]  # the CDN ignored Range: overlap dropped
    finally:
        await client.aclose()
    (hop,) = net.at("cdn.test")
    assert hop.url.query == b"sig=1" and hop.headers["range"] == "bytes=5-"
    assert "authorization" not in hop.headers and "cookie" not in hop.headers
    assert authorizations(net.at("registry.test")) == [None, BASIC]


@pytest.mark.parametrize(
    "challenge", ['Bearer realm="http://cdn.test/token",service="cdn"', 'Basic realm="cdn"']
)
async def test_a_redirect_targets_challenge_is_its_failure_never_answered(challenge: str) -> None:
    """A CDN answering 401 with its own Bearer realm or Basic challenge gets no credentials
    and no token request; each retry asks the registry again; the client sees 503."""

    def cdn(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "stolen"})
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    net = Network({"registry.test": registry(), "cdn.test": cdn})
    client = net.client()
    try:
        with pytest.raises(RegistryError) as raised:
            await read(client)
    finally:
        await client.aclose()
    assert raised.value.code is ErrorCode.UNAVAILABLE  # not BLOB_UNKNOWN: the registry has it
    assert "redirect target http://cdn.test answered HTTP 401" in str(raised.value.detail)
    assert [r.url.path for r in net.at("cdn.test")] == [f"/o/{DIGEST.hex}"] * 3
    assert authorizations(net.at("cdn.test")) == [None] * 3
    assert PASSWORD not in repr([(r.url, r.headers.raw) for r in net.at("cdn.test")])
    assert client.breakers["http://registry.test"].failures == 1  # one failed request


@pytest.mark.parametrize("status", [403, 400, 404, 500, 503])
async def test_a_failed_redirect_target_means_asking_the_registry_again(status: int) -> None:
    """An expired signed URL (403), S3's 400, a CDN 404 or 5xx: the registry is asked again
    for a fresh URL and the blob arrives; the mirror is not counted as failed."""
    answers = [status]

    def cdn(request: httpx.Request) -> httpx.Response:
        return httpx.Response(answers.pop()) if answers else cdn_serving(request)

    net = Network({"registry.test": registry(), "cdn.test": cdn})
    client = net.client()
    try:
        assert await read(client) == BLOB
    finally:
        await client.aclose()
    registry_gets = [r for r in net.at("registry.test") if r.headers.get("authorization")]
    assert len(registry_gets) == 2 and len(net.at("cdn.test")) == 2
    assert client.breakers["http://registry.test"].failures == 0


async def test_only_the_registrys_own_404_is_blob_unknown() -> None:
    """A 404 from the registry itself is BLOB_UNKNOWN at once, without retries."""
    net = Network({"registry.test": registry(cdn=None)})
    client = net.client()
    try:
        with pytest.raises(RegistryError) as raised:
            async with client.open_blob("library/a", Digest("sha256", "0" * 64)):
                pass
    finally:
        await client.aclose()
    assert raised.value.code is ErrorCode.BLOB_UNKNOWN
    assert len(net.at("registry.test")) == 2  # the challenge, then the one 404


async def test_relative_location_is_followed_on_the_mirrors_origin_with_its_credentials() -> None:
    """A relative Location is resolved against the URL that answered; a hop on the
    mirror's own origin goes through the auth flow like the first request."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != BASIC:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        if request.url.path == BLOB_PATH:
            return httpx.Response(307, headers={"Location": "../../b/blobs/moved?x=1"})
        return httpx.Response(200, content=BLOB)

    net = Network({"registry.test": answer})
    client = net.client()
    try:
        assert await read(client) == BLOB
    finally:
        await client.aclose()
    paths = [r.url.raw_path for r in net.at("registry.test")]
    assert paths[-1] == b"/v2/library/b/blobs/moved?x=1"
    assert authorizations(net.at("registry.test"))[-1] == BASIC


async def test_redirect_hops_are_bounded() -> None:
    """A redirect loop stops after MAX_HOPS hops: a final failure, not retried."""

    def loop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": f"http://cdn.test/{len(net.seen)}"})

    net = Network({"registry.test": loop, "cdn.test": loop})
    client = net.client(credentials=False)
    try:
        with pytest.raises(RegistryError) as raised:
            await read(client)
    finally:
        await client.aclose()
    assert f"more than {MAX_HOPS} redirects" in str(raised.value.detail)
    assert len(net.seen) == MAX_HOPS + 1


@pytest.mark.parametrize(
    ("path", "get"),
    [
        (TAGS_PATH, lambda c: c.get_tags("library/a", {})),
        ("/v2/library/a/referrers/", lambda c: c.get_referrers("library/a", DIGEST, None)),
    ],
)
async def test_tag_lists_and_referrers_follow_redirects_only_on_the_mirrors_origin(
    path: str, get: Callable[[UpstreamClient], Awaitable[ListAnswer | None]]
) -> None:
    """A tag list or referrers redirect to another origin is refused before it is asked;
    one on the mirror's own origin is followed."""
    moved = {"to": "http://elsewhere.test/loot"}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith(path):
            return httpx.Response(307, headers={"Location": moved["to"]})
        return httpx.Response(200, json={"name": "library/a", "tags": ["1"], "manifests": []})

    net = Network({"registry.test": answer, "elsewhere.test": answer})
    client = net.client(credentials=False)
    try:
        with pytest.raises(RegistryError) as raised:
            await get(client)
        moved["to"] = "/v2/library/a/here"
        followed = await get(client)
    finally:
        await client.aclose()
    assert "redirect to http://elsewhere.test refused" in str(raised.value.detail)
    assert net.at("elsewhere.test") == []
    assert followed is not None and b'"tags"' in followed.data


async def test_blob_probe_falls_back_to_a_one_byte_get_when_the_target_refuses_head() -> None:
    """A URL signed for GET refuses HEAD (403): the probe asks again with a one-byte GET."""

    def cdn(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(403)
        assert request.headers["range"] == "bytes=0-0"
        return httpx.Response(206, content=BLOB[:1])

    net = Network({"registry.test": registry(), "cdn.test": cdn})
    client = net.client()
    try:
        assert await client.blob_exists("library/a", DIGEST)
    finally:
        await client.aclose()
    assert [r.method for r in net.at("cdn.test")] == ["HEAD", "GET"]
