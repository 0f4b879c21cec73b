"""Hostile pushers against the real gateway process: stalled chunks to one upload session,
oversized blobs, a set pushed over its quota, a flood of upload sessions, abandoned sessions.

The gateway (``python -m mirrorrouter serve``) runs on loopback with hosted sets whose
limits the tests provoke, and a real distribution registry as docker.io, so a normal
client's pull goes through the cache while the attack runs. Attackers speak raw HTTP over
sockets (a client library would not stall a body on purpose); normal clients use httpx
with a deadline that only a stall misses.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.fakeregistry import Image, make_image, sha256
from tests.support.gateway import GatewayProcess
from tests.support.images import ImageFactory, PushedImage, session_factory
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real

DEADLINE = 5.0  # seconds: generous for a normal request, missed only by a stall
KIB = 1024
MIB = 1024 * KIB


@dataclass
class Answer:
    status: int
    headers: dict[str, str]


def raw_request(port: int, method: str, path: str, length: int, first: bytes) -> socket.socket:
    """Send a request's head declaring ``length`` body bytes, then only ``first``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + first)
    return sock


def read_answer(sock: socket.socket, timeout: float) -> Answer | None:
    """The status and headers the server answered on ``sock``; None when it said nothing
    within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    if b"\r\n\r\n" not in data:
        return None
    return _parse_head(data)


def stream_until_answered(
    port: int, method: str, path: str, total: int, *, declared: bool = False
) -> Answer | None:
    """Send ``total`` body bytes as fast as the server reads them (chunked, unless
    ``declared`` says the length up front) until it answers; its answer, or None."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    framing = f"Content-Length: {total}" if declared else "Transfer-Encoding: chunked"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n"
    )
    piece = b"o" * (64 * KIB)
    count = total // len(piece)
    body = piece * count if declared else (b"%x\r\n%s\r\n" % (len(piece), piece)) * count
    outgoing = head.encode() + body + (b"" if declared else b"0\r\n\r\n")
    sock.setblocking(False)
    sent, received = 0, b""
    deadline = time.monotonic() + 3 * DEADLINE
    try:
        while b"\r\n\r\n" not in received and time.monotonic() < deadline:
            writing = [sock] if sent < len(outgoing) else []
            readable, writable, _ = select.select([sock], writing, [], 0.2)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
            elif writable:
                sent += sock.send(outgoing[sent : sent + len(piece)])
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return _parse_head(received) if b"\r\n\r\n" in received else None


def _parse_head(data: bytes) -> Answer:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(head[0].split()[1]), headers)


def statuses(gateway: GatewayProcess) -> list[int]:
    """The status of every request in the gateway's access log."""
    found = []
    for line in gateway.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "mirrorrouter.access":
            found.append(int(entry["status"]))
    return found


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def resident_bytes(pid: int) -> int:
    """The process's resident memory (``VmRSS`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS")


def push_blob(client: httpx.Client, repository: str, data: bytes) -> httpx.Response:
    return client.post(
        f"/v2/{repository}/blobs/uploads/", params={"digest": sha256(data)}, content=data
    )


def push_chunked(client: httpx.Client, repository: str, data: bytes) -> httpx.Response:
    """A two-chunk session upload: POST, PATCH, PATCH, PUT."""
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    half = len(data) // 2
    for start, chunk in ((0, data[:half]), (half, data[half:])):
        answer = client.patch(
            location,
            content=chunk,
            headers={"Content-Range": f"{start}-{start + len(chunk) - 1}"},
        )
        assert answer.status_code == 202, answer.text
    return client.put(location, params={"digest": sha256(data)})


def push_image(client: httpx.Client, repository: str, image: Image, tag: str) -> None:
    """Push an image by the API: its blobs, then its manifest."""
    for data in image.blobs.values():
        answer = push_blob(client, repository, data)
        assert answer.status_code == 201, answer.text
    answer = client.put(
        f"/v2/{repository}/manifests/{tag}",
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )
    assert answer.status_code == 201, answer.text


def wait_for_status(client: httpx.Client, url: str, status: int, what: str) -> None:
    """Poll ``url`` until it answers ``status`` (the background sweep is due)."""
    deadline = time.monotonic() + 4 * DEADLINE
    while client.get(url).status_code != status:
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


HOSTED_SETS = {
    "team": "",
    "small": 'max_blob_size = "256KiB"',
    "tight": 'quota = "1MiB"',
    "few": "max_uploads = 3",
    "brief": 'upload_ttl = "2s"',
}


def gateway_config(cache: Path, upstream: str, hosted: dict[str, str] = HOSTED_SETS) -> str:
    """docker.io on the test's registry, and hosted sets (each routed by its name as a
    prefix) whose limits the tests provoke."""
    sets = "".join(
        f'[hosted."{name}"]\n{keys}\n[[routes]]\nprefix = "{name}"\nhosted = "{name}"\n'
        for name, keys in hosted.items()
    )
    return f"""
[server]
access_log = true
[cache]
directory = "{cache}"
[upstreams."docker.io"]
mirrors = [{{ url = "{upstream}" }}]
{sets}"""


@dataclass
class World:
    hub: DistributionRegistry
    upstream: PushedImage
    factory: ImageFactory
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile")
    factory = session_factory(tmp_path_factory)
    with DistributionRegistry(root / "hub") as hub:
        upstream = factory.push(factory.small("hostile", seed=61), hub, "library/hostile", "1")
        yield World(hub, upstream, factory, root)


@pytest.fixture(scope="module")
def gateway(world: World) -> Iterator[GatewayProcess]:
    with GatewayProcess(
        world.root / "gw", gateway_config(world.root / "cache", world.hub.url)
    ) as process:
        yield process


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """A normal client of the module's gateway."""
    with httpx.Client(base_url=gateway.url, timeout=DEADLINE) as normal:
        yield normal


def test_stalled_chunks_to_one_session_stall_nobody(world: World, tmp_path: Path) -> None:
    """Eight PATCHes with stalled bodies to one upload session: one holds the session, the
    others are refused at once with its Range, every other client keeps being served, the
    session works again once the attackers leave, and SIGTERM ends the gateway."""
    with GatewayProcess(
        tmp_path / "gw", gateway_config(tmp_path / "cache", world.hub.url, {"team": ""})
    ) as gateway:
        assert gateway.process is not None
        pid = gateway.process.pid
        client = httpx.Client(base_url=gateway.url, timeout=DEADLINE)
        layer = os.urandom(300 * KIB)
        image = make_image("team/app", [layer])
        push_image(client, "team/app", image, "v1")
        upstream_blob = next(b for b in world.upstream.image.blobs if b.size > 1000)
        started = client.post("/v2/team/app/blobs/uploads/")
        location = started.headers["location"]
        fds_before, memory_before = open_fds(pid), resident_bytes(pid)

        attackers = [
            raw_request(gateway.port, "PATCH", location, 100 * MIB, b"x" * 10) for _ in range(8)
        ]
        try:
            answers = [read_answer(sock, 2.0) for sock in attackers]
            refused = [a for a in answers if a is not None]
            assert len(refused) == 7, answers  # one holds the session; nobody waits for it
            for answer in refused:
                assert answer.status == 416, answer
                assert answer.headers["range"].startswith("0-"), answer

            def served(request: httpx.Request) -> httpx.Response:
                begun = time.monotonic()
                answer = client.send(request)
                assert time.monotonic() - begun < DEADLINE, request.url
                return answer

            assert served(client.build_request("GET", "/v2/")).status_code == 200
            manifest = served(client.build_request("GET", "/v2/team/app/manifests/v1"))
            assert manifest.status_code == 200
            assert manifest.headers["docker-content-digest"] == image.digest
            blob = served(client.build_request("GET", f"/v2/team/app/blobs/{sha256(layer)}"))
            assert blob.status_code == 200 and blob.content == layer
            pulled = served(
                client.build_request("GET", f"/v2/library/hostile/blobs/{upstream_blob.digest}")
            )
            assert pulled.status_code == 200
            assert sha256(pulled.content) == upstream_blob.digest
            other = os.urandom(200 * KIB)
            assert push_blob(client, "team/other", other).status_code == 201
            assert push_chunked(client, "team/other", os.urandom(100 * KIB)).status_code == 201
            assert client.get(f"/v2/team/other/blobs/{sha256(other)}").content == other
        finally:
            for sock in attackers:
                sock.close()

        # The holder's connection is gone: the session answers again, with what arrived.
        deadline = time.monotonic() + DEADLINE
        while True:
            status = client.get(location)
            assert status.status_code == 204
            size = int(status.headers["range"].split("-")[1]) + 1
            rest = b"y" * 1000
            chunk = client.patch(
                location,
                content=rest,
                headers={"Content-Range": f"{size}-{size + len(rest) - 1}"},
            )
            if chunk.status_code == 202 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert chunk.status_code == 202, chunk.text
        whole = b"x" * size + rest
        assert client.put(location, params={"digest": sha256(whole)}).status_code == 201
        client.close()
        assert open_fds(pid) <= fds_before + 5  # the attackers' descriptors were released
        assert resident_bytes(pid) < memory_before + 64 * MIB  # declared 800 MiB: not buffered
        assert 500 not in statuses(gateway)

        gateway.process.send_signal(signal.SIGTERM)
        begun = time.monotonic()
        gateway.process.wait(15)
        assert time.monotonic() - begun < 15


def hosted_files(world: World, name: str, part: str) -> list[Path]:
    """The files under a hosted set's ``blobs``, ``uploads`` or ``tmp`` directory."""
    top = world.root / "cache" / "_hosted" / name / part
    return sorted(p for p in top.rglob("*") if p.is_file() and p.name != ".lock")


def test_oversized_blobs_are_refused_while_they_stream(
    world: World, gateway: GatewayProcess, client: httpx.Client
) -> None:
    """Bodies over max_blob_size (256 KiB), monolithic and as a session's chunk, get 413
    SIZE_INVALID before the client has sent them all, and nothing of them stays on disk."""
    total = 4 * MIB
    digest = sha256(b"o" * total)
    monolithic = f"/v2/small/app/blobs/uploads/?digest={digest}"
    for declared in (False, True):
        answer = stream_until_answered(gateway.port, "POST", monolithic, total, declared=declared)
        assert answer is not None and answer.status == 413, answer
    started = client.post("/v2/small/app/blobs/uploads/")
    location = started.headers["location"]
    assert client.patch(location, content=b"k" * 1000).status_code == 202
    answer = stream_until_answered(gateway.port, "PATCH", location, total)
    assert answer is not None and answer.status == 413, answer
    status = client.get(location)
    assert status.status_code == 204 and status.headers["range"] == "0-999"
    assert hosted_files(world, "small", "blobs") == []
    assert hosted_files(world, "small", "tmp") == []
    sessions = hosted_files(world, "small", "uploads")
    assert [p.stat().st_size for p in sessions if not p.name.endswith(".json")] == [1000]
    assert client.get("/v2/").status_code == 200
    assert 500 not in statuses(gateway)


def test_pushes_over_the_quota_are_denied_naming_the_set(
    world: World, gateway: GatewayProcess, client: httpx.Client
) -> None:
    """A set at its quota (1 MiB) refuses the next blob, monolithic or chunked, with 403
    DENIED naming the set, while what fits was stored."""
    first = os.urandom(700 * KIB)
    assert push_blob(client, "tight/app", first).status_code == 201
    second = os.urandom(400 * KIB)
    denied = push_blob(client, "tight/app", second)
    assert denied.status_code == 403, denied.text
    error = denied.json()["errors"][0]
    assert error["code"] == "DENIED" and "'tight'" in error["message"]
    started = client.post("/v2/tight/app/blobs/uploads/")
    location = started.headers["location"]
    assert client.patch(location, content=second).status_code == 403
    assert client.get(location).headers["range"] == "0-0"
    assert client.get(f"/v2/tight/app/blobs/{sha256(first)}").content == first
    assert client.head(f"/v2/tight/app/blobs/{sha256(second)}").status_code == 404
    assert 500 not in statuses(gateway)


def test_one_upload_session_too_many_is_refused(
    world: World, gateway: GatewayProcess, client: httpx.Client
) -> None:
    """With max_uploads (3) sessions open, one more gets 429 TOOMANYREQUESTS with a
    Retry-After, while pulls go on."""
    opened = [client.post("/v2/few/app/blobs/uploads/") for _ in range(3)]
    assert [answer.status_code for answer in opened] == [202, 202, 202]
    refused = client.post("/v2/few/app/blobs/uploads/")
    assert refused.status_code == 429
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert int(refused.headers["retry-after"]) > 0
    assert client.get(f"/v2/library/hostile/manifests/{world.upstream.digest}").status_code == 200
    assert client.delete(opened[0].headers["location"]).status_code == 204
    assert client.post("/v2/few/app/blobs/uploads/").status_code == 202
    assert 500 not in statuses(gateway)


def test_the_server_sweeps_abandoned_sessions_but_not_held_ones(
    world: World, gateway: GatewayProcess, client: httpx.Client
) -> None:
    """The server itself removes a session idle longer than upload_ttl (2 s), while one that
    a request still holds stays, however old, until that request ends."""
    abandoned = client.post("/v2/brief/app/blobs/uploads/").headers["location"]
    assert client.patch(abandoned, content=b"a" * 5000).status_code == 202
    held = client.post("/v2/brief/app/blobs/uploads/").headers["location"]
    stalled = raw_request(gateway.port, "PATCH", held, 10 * MIB, b"h" * 10)
    try:
        wait_for_status(client, abandoned, 404, "the abandoned session was never swept")
        time.sleep(3)  # several more sweeps, each past the held session's upload_ttl
        assert client.get(held).status_code == 204
    finally:
        stalled.close()
    wait_for_status(client, held, 404, "the session was not swept once let go")
    assert hosted_files(world, "brief", "uploads") == []
    assert 500 not in statuses(gateway)
