"""The fault proxy against a real distribution registry: every fault, proven with httpx."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.faultproxy import FaultProxy, HungServer, closed_port_url
from tests.support.images import MANIFEST_ACCEPT, ImageFactory, PushedImage, session_factory
from tests.support.registry import DistributionRegistry, wait_until

pytestmark = pytest.mark.real

MIB = 1024 * 1024
ACCEPT = {"Accept": ", ".join(MANIFEST_ACCEPT)}


@dataclass(frozen=True)
class Upstream:
    """A registry holding one image whose layer is big enough to arrive in several chunks."""

    registry: DistributionRegistry
    pushed: PushedImage
    layer_digest: str
    layer: bytes

    @property
    def manifest_path(self) -> str:
        return f"/v2/{self.pushed.repository}/manifests/{self.pushed.tag}"

    @property
    def blob_path(self) -> str:
        return f"/v2/{self.pushed.repository}/blobs/{self.layer_digest}"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    images: ImageFactory = session_factory(tmp_path_factory)
    image = images.large("faultproxy-medium", size=MIB, seed=11)
    with DistributionRegistry(tmp_path_factory.mktemp("faultproxy-registry")) as registry:
        pushed = images.push(image, registry, "fault/app", "v1")
        layer = image.images[0].layers[0]
        yield Upstream(registry, pushed, layer.digest, image.read_blob(layer.digest))


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.registry.url) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10) as http:
        yield http


def test_pass_through_keeps_bytes_status_and_headers(
    proxy: FaultProxy, upstream: Upstream, client: httpx.Client
) -> None:
    """Manifests, blobs, HEAD, ranges, 404s and upload Locations come through unchanged."""
    mark = upstream.registry.mark()
    manifest = client.get(proxy.url + upstream.manifest_path, headers=ACCEPT)
    assert manifest.status_code == 200
    assert manifest.headers["Docker-Content-Digest"] == upstream.pushed.digest
    assert manifest.content == upstream.pushed.image.manifest_bytes()

    blob = client.get(proxy.url + upstream.blob_path)
    assert blob.status_code == 200
    assert blob.headers["Content-Length"] == str(len(upstream.layer))
    assert blob.headers["Docker-Content-Digest"] == upstream.layer_digest
    assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == upstream.layer_digest

    head = client.head(proxy.url + upstream.blob_path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(upstream.layer))

    ranged = client.get(proxy.url + upstream.blob_path, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{len(upstream.layer)}"
    assert ranged.content == upstream.layer[10:20]

    missing = client.get(proxy.url + "/v2/fault/app/manifests/nope", headers=ACCEPT)
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    # distribution builds absolute upload URLs from X-Forwarded-Host: they point at the proxy.
    upload = client.post(proxy.url + "/v2/fault/push/blobs/uploads/")
    assert upload.status_code == 202
    assert upload.headers["Location"].startswith(proxy.url + "/v2/fault/push/blobs/uploads/")
    client.delete(upload.headers["Location"])

    seen = [(r.method, r.path, r.fault, r.range, r.status) for r in proxy.requests()][:4]
    assert seen == [
        ("GET", upstream.manifest_path, None, None, 200),
        ("GET", upstream.blob_path, None, None, 200),
        ("HEAD", upstream.blob_path, None, None, 200),
        ("GET", upstream.blob_path, None, "bytes=10-19", 206),
    ]
    assert proxy.count("GET", "/blobs/") == 2
    assert upstream.registry.count("GET", upstream.blob_path, since=mark) == 2


def test_status_rule_answers_without_forwarding_then_passes(
    proxy: FaultProxy, upstream: Upstream, client: httpx.Client
) -> None:
    """times=1 gives one OCI 503, then the real answer; extra headers like Retry-After go out."""
    rule = proxy.status(503, path_contains="/manifests/", times=1)
    mark = upstream.registry.mark()
    url = proxy.url + upstream.manifest_path

    first = client.get(url, headers=ACCEPT)
    assert first.status_code == 503
    assert first.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert upstream.registry.count("GET", "/manifests/", since=mark) == 0
    second = client.get(url, headers=ACCEPT)
    assert second.status_code == 200 and second.content == upstream.pushed.image.manifest_bytes()
    assert rule.applied == 1 and proxy.rules() == []
    assert [r.fault for r in proxy.requests()] == ["status", None]

    proxy.status(429, path_contains="/blobs/", headers={"Retry-After": "2"})
    limited = client.get(proxy.url + upstream.blob_path)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
    assert limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert client.get(url, headers=ACCEPT).status_code == 200  # other paths unaffected
    proxy.clear()
    assert client.get(proxy.url + upstream.blob_path).status_code == 200
    assert upstream.registry.count("GET", "/blobs/", since=mark) == 1


def test_cut_after_delivers_exactly_n_bytes_then_a_protocol_error(
    proxy: FaultProxy, upstream: Upstream, client: httpx.Client
) -> None:
    """The client gets the full Content-Length, n bytes, then EOF: httpx raises."""
    proxy.cut_after(100_000, path_contains="/blobs/", times=1)
    received = bytearray()
    short_body = f"received 100000 bytes, expected {len(upstream.layer)}"
    with (
        pytest.raises(httpx.RemoteProtocolError, match=short_body),
        client.stream("GET", proxy.url + upstream.blob_path) as response,
    ):
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(len(upstream.layer))
        for chunk in response.iter_raw():
            received += chunk
    assert bytes(received) == upstream.layer[:100_000]
    entry = proxy.requests()[-1]
    assert (entry.fault, entry.body_bytes) == ("cut_after", 100_000)

    # A HEAD does not use up a body fault; the next GET (rule spent) is whole.
    proxy.cut_after(0, path_contains="/blobs/", times=1)
    assert client.head(proxy.url + upstream.blob_path).status_code == 200
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(proxy.url + upstream.blob_path)
    assert client.get(proxy.url + upstream.blob_path).content == upstream.layer


def test_corrupt_flips_exactly_one_byte(
    proxy: FaultProxy, upstream: Upstream, client: httpx.Client
) -> None:
    """Same length and headers, one byte XOR 0xFF, so the digest no longer matches."""
    proxy.corrupt(path_contains="/blobs/", times=2, at=300_000)
    proxy.corrupt(path_contains="/blobs/", times=1)
    for _ in range(2):  # the older rule first, twice
        response = client.get(proxy.url + upstream.blob_path)
        assert response.headers["Docker-Content-Digest"] == upstream.layer_digest
        body = response.content
        assert len(body) == len(upstream.layer)
        diffs = [i for i, (a, b) in enumerate(zip(body, upstream.layer, strict=True)) if a != b]
        assert diffs == [300_000]
        assert body[300_000] == upstream.layer[300_000] ^ 0xFF
    body = client.get(proxy.url + upstream.blob_path).content
    assert body[0] == upstream.layer[0] ^ 0xFF and body[1:] == upstream.layer[1:]
    assert client.get(proxy.url + upstream.blob_path).content == upstream.layer


def test_delay_exceeds_a_client_timeout_and_is_never_forwarded(
    proxy: FaultProxy, upstream: Upstream, client: httpx.Client
) -> None:
    """A 5 s delay trips a 0.3 s read timeout; the abandoned request never reaches upstream."""
    proxy.delay(5, path_contains="/manifests/", times=1)
    mark = upstream.registry.mark()
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.get(proxy.url + upstream.manifest_path, headers=ACCEPT, timeout=0.3)
    assert time.monotonic() - started < 2
    wait_until(lambda: proxy.requests()[-1].error == "client disconnected", what="give-up seen")
    assert proxy.requests()[-1].status is None
    again = client.get(proxy.url + upstream.manifest_path, headers=ACCEPT, timeout=2)
    assert again.status_code == 200
    assert upstream.registry.count("GET", "/manifests/", since=mark) == 1
    assert proxy.count("GET", "/manifests/", fault="delay") == 1


def test_stall_after_trips_a_read_timeout_mid_body(
    proxy: FaultProxy, upstream: Upstream, client: httpx.Client
) -> None:
    """Headers and n bytes arrive, then nothing: a read timeout in the middle of the body."""
    proxy.stall_after(4096, 5, path_contains="/blobs/", times=1)
    received = bytearray()
    with (
        pytest.raises(httpx.ReadTimeout),
        client.stream("GET", proxy.url + upstream.blob_path, timeout=0.5) as response,
    ):
        for chunk in response.iter_raw():
            received += chunk
    assert bytes(received) == upstream.layer[:4096]


def test_ignore_range_makes_upstream_answer_200_in_full(
    proxy: FaultProxy, upstream: Upstream, client: httpx.Client
) -> None:
    """The Range header is logged but not forwarded."""
    proxy.ignore_range(path_contains="/blobs/")
    response = client.get(proxy.url + upstream.blob_path, headers={"Range": "bytes=100-"})
    assert response.status_code == 200 and "Content-Range" not in response.headers
    assert response.content == upstream.layer
    entry = proxy.requests()[-1]
    assert (entry.fault, entry.range, entry.status) == ("ignore_range", "bytes=100-", 200)


def test_stop_interrupts_a_delay_and_restart_keeps_the_port(
    upstream: Upstream, client: httpx.Client
) -> None:
    """stop() returns at once despite a 30 s delay in flight; start() serves the same port."""
    proxy = FaultProxy(upstream.registry.url).start()
    try:
        proxy.delay(30)
        answers: list[int | str] = []

        def pending() -> None:
            try:
                answers.append(client.get(proxy.url + "/v2/", timeout=10).status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)

        waiter = threading.Thread(target=pending)
        waiter.start()
        wait_until(lambda: proxy.count("GET", "/v2/") == 1, what="delayed request arrived")
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 3
        waiter.join(timeout=5)
        assert answers == [503]
        with pytest.raises(httpx.ConnectError):
            client.get(proxy.url + "/v2/")

        port = proxy.port
        proxy.start()
        assert proxy.port == port
        assert proxy.rules() != []  # rules survive a restart
        proxy.clear()
        assert client.get(proxy.url + "/v2/").status_code == 200
    finally:
        proxy.stop()


def test_unreachable_upstream_is_a_502_and_closed_port_refuses(client: httpx.Client) -> None:
    """A dead target gives 502 with an OCI error; closed_port_url() refuses connections."""
    dead = closed_port_url()
    with pytest.raises(httpx.ConnectError):
        client.get(dead + "/v2/")
    with FaultProxy(dead) as proxy:
        response = client.get(proxy.url + "/v2/")
        assert response.status_code == 502
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert "ConnectError" in (proxy.requests()[-1].error or "")


def test_hung_server_accepts_and_never_answers() -> None:
    """The hung server takes the connection and the request, and sends nothing back."""
    with HungServer() as hung:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{hung.url}/v2/", timeout=httpx.Timeout(5.0, read=0.3))
        assert hung.connections == 1
