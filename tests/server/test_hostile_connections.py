"""The real gateway attacked over raw sockets: a thousand half-open connections, connections
past the limit, forged Host headers and malformed HTTP. Normal clients keep being served,
what should be closed is closed, and every refusal is an OCI JSON answer in the access log.
Descriptors and memory are read from /proc."""

from __future__ import annotations

import base64
import json
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from tests.hosted.test_real_hosted import access_lines
from tests.support.gateway import GatewayProcess
from tests.support.images import PushedImage, session_factory
from tests.support.registry import DistributionRegistry
from tests.test_headers import parse_challenge

pytestmark = pytest.mark.real

PASSWORD = "correct horse"
ATTACKERS = 1000
HALF_BODY = (
    b"POST /auth/token HTTP/1.1\r\nHost: mirror.test\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
    b"grant_type=pass"
)
# Nothing at all; half a request line; headers without the blank line; half a body.
HALF_REQUESTS = (b"", b"GET /v2/ HT", b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\n", HALF_BODY)
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DistributionRegistry, PushedImage]]:
    """A distribution registry standing in for docker.io with one small image."""
    factory = session_factory(tmp_path_factory)
    with DistributionRegistry(tmp_path_factory.mktemp("hub")) as registry:
        image = factory.small("hostile", seed=41)
        yield registry, factory.push(image, registry, "library/small", "1", method="api")


def gateway_for(workdir: Path, registry: DistributionRegistry, server: str) -> GatewayProcess:
    """A gateway with [auth] on (anonymous pulls allowed) and the given [server] keys."""
    workdir.mkdir(parents=True)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (workdir / "htpasswd").write_text(f"alice:{hashed}\n")
    config = f"""
[server]
access_log = true
{server}
[cache]
directory = "{workdir / "cache"}"
[auth]
htpasswd = "htpasswd"
[upstreams."docker.io"]
mirrors = [{{ url = "{registry.url}" }}]
"""
    return GatewayProcess(workdir, config)


@pytest.fixture(scope="module")
def gateway(
    upstream: tuple[DistributionRegistry, PushedImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Timeouts of two seconds, room for the thousand attackers and the normal clients."""
    server = 'header_timeout = "2s"\nbody_timeout = "2s"\nkeepalive_timeout = "2s"\n'
    workdir = tmp_path_factory.mktemp("gw") / "main"
    with gateway_for(workdir, upstream[0], server + "max_connections = 1500") as gw:
        yield gw


@pytest.fixture(scope="module")
def limited(
    upstream: tuple[DistributionRegistry, PushedImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Twenty connections at most, and silent clients may hold theirs for a minute."""
    server = 'max_connections = 20\nheader_timeout = "60s"\nkeepalive_timeout = "60s"'
    with gateway_for(tmp_path_factory.mktemp("gw") / "limited", upstream[0], server) as gw:
        yield gw


# ---------------------------------------------------------------------- helpers


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def eventually(check: Callable[[], bool], within: float) -> bool:
    """Poll ``check`` until it holds or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def need_descriptors(count: int) -> None:
    """This test process opens ``count`` sockets: raise its soft limit or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(count, hard), hard))
        except (ValueError, OSError):
            pytest.skip(f"needs {count} file descriptors; the limit is {soft}")


def connect(gw: GatewayProcess, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def client_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def read_to_eof(sock: socket.socket, within: float = 10) -> bytes:
    """Everything until the server closes (a reset counts as closing)."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def exchange(gw: GatewayProcess, request: bytes) -> tuple[int, dict[str, str], bytes, str]:
    """One raw request on its own connection: status, headers, body, and our address."""
    with connect(gw, request) as sock:
        client = client_of(sock)
        raw = read_to_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body, client


def oci_code(headers: dict[str, str], body: bytes) -> str:
    """The code of an OCI error envelope (and nothing else in the body)."""
    assert headers["content-type"] == "application/json"
    envelope = json.loads(body)
    assert set(envelope) == {"errors"} and envelope["errors"][0]["message"]
    code: str = envelope["errors"][0]["code"]
    return code


def closed_times(socks: list[socket.socket], within: float) -> dict[socket.socket, float]:
    """When the server closed each socket (EOF or reset), waiting ``within`` seconds."""
    closed: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                sock: Any = key.fileobj
                try:
                    if sock.recv(65536):
                        continue  # an answer: not expected, but the close follows
                except (ConnectionResetError, BlockingIOError):
                    pass
                closed[sock] = time.monotonic()
                selector.unregister(sock)
    return closed


# ---------------------------------------------------------------------- the attacks


def test_half_open_connections_are_closed_while_normal_clients_are_served(
    gateway: GatewayProcess, upstream: tuple[DistributionRegistry, PushedImage]
) -> None:
    """A thousand connections stopping mid-request (nothing sent, half a request line,
    headers without the blank line, half a body) do not keep /v2/ or a pull from being
    answered within 5 s; each is closed about one timeout after it stopped, and the
    gateway's descriptors and memory come back."""
    _, image = upstream
    need_descriptors(ATTACKERS + 256)
    assert gateway.process is not None
    pid = gateway.process.pid
    pull = {"Accept": MANIFEST_ACCEPT}
    blob = image.blobs[0]
    with httpx.Client(base_url=gateway.url, timeout=5) as client:  # cached before the count
        assert client.get("/v2/library/small/manifests/1", headers=pull).status_code == 200
        assert client.get(f"/v2/library/small/blobs/{blob.digest}").status_code == 200
    fds_before, rss_before = open_fds(pid), rss_bytes(pid)

    attackers, opened = [], {}
    try:
        for i in range(ATTACKERS):
            sock = connect(gateway, HALF_REQUESTS[i % len(HALF_REQUESTS)])
            attackers.append(sock)
            opened[sock] = time.monotonic()
        held = fds_before + ATTACKERS * 0.9
        assert eventually(lambda: open_fds(pid) >= held, 1.5), "the attack is not held"

        with httpx.Client(base_url=gateway.url, timeout=5) as client:
            started = time.monotonic()
            assert client.get("/v2/").status_code == 401
            manifest = client.get("/v2/library/small/manifests/1", headers=pull)
            assert manifest.status_code == 200
            assert manifest.headers["docker-content-digest"] == image.digest
            layer = client.get(f"/v2/library/small/blobs/{blob.digest}")
            assert layer.status_code == 200 and len(layer.content) == blob.size
            assert time.monotonic() - started < 5
        answered = time.monotonic()

        closed = closed_times(attackers, within=20)
        assert len(closed) == ATTACKERS, f"{ATTACKERS - len(closed)} never closed"
        still_open = sum(1 for s in attackers if closed[s] > answered)
        assert still_open >= ATTACKERS * 0.9, "the clients were served after the attack"
        lifetimes = sorted(closed[s] - opened[s] for s in attackers)
        assert lifetimes[0] >= 1.5, "closed before the two-second timeouts"
        assert lifetimes[-1] < 10, f"the slowest close took {lifetimes[-1]:.1f}s"
    finally:
        for sock in attackers:
            sock.close()
    assert eventually(lambda: open_fds(pid) <= fds_before + 2, 10), open_fds(pid)
    assert rss_bytes(pid) - rss_before < 100 * 1024 * 1024
    # The abandoned bodies are 499s in the access log, never a 500 or a traceback.
    assert not [line for line in gateway.log().splitlines() if '"level":"error"' in line]
    tokens = [e for e in access_lines(gateway) if e["message"].startswith("POST /auth/token")]
    assert len(tokens) == ATTACKERS // len(HALF_REQUESTS)
    assert {(e["status"], e["user"]) for e in tokens} == {(499, "anonymous")}


def test_connections_past_the_limit_get_503_and_service_resumes(limited: GatewayProcess) -> None:
    """With max_connections held by silent clients the next connection gets 503 UNAVAILABLE
    in the OCI envelope, with Retry-After, and is closed; its access line names the client;
    once the holders leave, clients are served again."""
    held = [connect(limited) for _ in range(20)]
    try:
        status, headers, body, client = exchange(
            limited, b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\n\r\n"
        )
        assert status == 503 and headers["retry-after"] == "1"
        assert oci_code(headers, body) == "UNAVAILABLE"
    finally:
        for sock in held:
            sock.close()

    def served() -> bool:
        try:
            return httpx.get(f"{limited.url}/v2/", timeout=2).status_code == 401
        except httpx.HTTPError:
            return False

    assert eventually(served, 10)
    assert eventually(lambda: any(e["client"] == client for e in access_lines(limited)), 5)
    line = next(e for e in access_lines(limited) if e["client"] == client)
    assert (line["status"], line["user"]) == (503, "anonymous")


@pytest.mark.parametrize(
    ("host", "code"),
    [
        (b'x",service="y', "NAME_INVALID"),
        (b'mirror.test/auth/token",realm="http://evil', "NAME_INVALID"),
        (b"mirror test", "NAME_INVALID"),
        (b"mirror.test:99999", "NAME_INVALID"),
        (b"[::1", "NAME_INVALID"),
        (b"a" * 300, "NAME_INVALID"),
        # CR, LF and NUL tricks: the parser refuses them (UNSUPPORTED) or the Host check does
        (b"mirror.test\rX-Injected: 1", None),
        (b"mirror.test\r\n  folded", None),
        (b"mirror.test\x00", None),
    ],
)
def test_forged_host_headers_are_refused_with_400(
    gateway: GatewayProcess, host: bytes, code: str | None
) -> None:
    """A Host that is not host[:port] (quotes, spaces, a bad port, overlong, CR/LF or NUL
    tricks) gets 400 as JSON, never a challenge carrying it."""
    status, headers, body, _ = exchange(
        gateway, b"GET /v2/ HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    )
    assert status == 400
    assert oci_code(headers, body) in ((code,) if code else ("NAME_INVALID", "UNSUPPORTED"))
    assert "www-authenticate" not in headers


def test_two_host_headers_are_refused(gateway: GatewayProcess) -> None:
    """A request with two Host headers (the second smuggling a parameter) gets 400 JSON."""
    status, headers, body, _ = exchange(
        gateway,
        b'GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\nHost: x",service="y\r\n'
        b"Connection: close\r\n\r\n",
    )
    assert (status, oci_code(headers, body)) == (400, "NAME_INVALID")


@pytest.mark.parametrize("host", ["mirror.test:5000", "127.0.0.1:5000", "[::1]:5000"])
def test_a_valid_host_gets_a_well_formed_challenge(gateway: GatewayProcess, host: str) -> None:
    """With [auth] on, /v2/ answers 401 with one Bearer challenge whose parameters parse as
    quoted strings: the realm on the Host the client used, and the service."""
    response = httpx.get(f"{gateway.url}/v2/", headers={"Host": host}, timeout=5)
    assert response.status_code == 401
    scheme, params = parse_challenge(response.headers["www-authenticate"])
    assert scheme == "Bearer"
    assert params == {"realm": f"http://{host}/auth/token", "service": "mirrorrouter"}


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v2/ HTTP/1.1\r\nHost mirror.test\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),  # TLS hello
        (b"GET /v2/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_http_gets_the_json_envelope(
    gateway: GatewayProcess, request_bytes: bytes, status: int
) -> None:
    """What the parser refuses (bad syntax, TLS on the plain port, conflicting lengths, a
    head over 64 KiB) is answered as the OCI envelope, not text/plain, and closed."""
    got, headers, body, _ = exchange(gateway, request_bytes)
    assert got == status
    assert oci_code(headers, body) == "UNSUPPORTED"
    assert headers["connection"] == "close"


def test_refusals_are_logged_with_client_and_user(gateway: GatewayProcess) -> None:
    """With access_log on, a 400 (forged Host), a 401, a malformed request and a logged-in
    request each get a line naming the client address and the user."""
    forged = exchange(gateway, b"GET /v2/ HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n")
    challenged = exchange(gateway, b"GET /v2/ HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
    malformed = exchange(gateway, b"BREW /v2/ HTCPCP/1.0\r\n\r\n")
    credentials = base64.b64encode(f"alice:{PASSWORD}".encode())
    with connect(gateway) as sock:
        sock.sendall(
            b"GET /v2/ HTTP/1.1\r\nHost: m\r\nConnection: close\r\n"
            b"Authorization: Basic " + credentials + b"\r\n\r\n"
        )
        alice = client_of(sock)
        assert read_to_eof(sock).startswith(b"HTTP/1.1 200")
    expected = {
        forged[3]: (400, "anonymous"),
        challenged[3]: (401, "anonymous"),
        malformed[3]: (400, "anonymous"),
        alice: (200, "alice"),
    }

    def logged() -> dict[str, tuple[int, str]]:
        return {
            e["client"]: (e["status"], e["user"])
            for e in access_lines(gateway)
            if e["client"] in expected
        }

    assert eventually(lambda: logged() == expected, 5), logged()


def test_worker_processes_run_the_same_protocol(
    upstream: tuple[DistributionRegistry, PushedImage], tmp_path: Path
) -> None:
    """With workers = 2 (uvicorn spawns the workers and pickles the config to them), silent
    connections are still closed at the header timeout and malformed HTTP gets JSON."""
    server = 'workers = 2\nheader_timeout = "1s"'
    with gateway_for(tmp_path / "workers", upstream[0], server) as gw:
        silent = [connect(gw) for _ in range(8)]
        try:
            closed = closed_times(silent, within=10)
            assert len(closed) == len(silent)
        finally:
            for sock in silent:
                sock.close()
        status, headers, body, _ = exchange(gw, b"GET /v2/ HTTP/1.1\r\nHost x\r\n\r\n")
        assert (status, oci_code(headers, body)) == (400, "UNSUPPORTED")
        assert gw.log().count("Started server process") == 2
