"""Zero-copy sending (``http.response.zerocopysend`` served with ``sendfile``) by
GatewayProtocol: the bytes, framing and keep-alive of a real connection, under uvloop and
asyncio's own loop, and what happens when the client, the file or the clock misbehaves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

from mirrorrouter.cache.base import Removal
from mirrorrouter.config.model import ServerSettings
from mirrorrouter.reference import Digest
from mirrorrouter.server import zerocopy
from mirrorrouter.server.running import ServerConfig
from mirrorrouter.server.zerocopy import ZERO_COPY_SEND
from tests.support.fakeregistry import FakeRegistry, make_image
from tests.support.inprocess import (
    Gateway,
    config,
    gateway,
    loopback_server_config,
    until,
    uvicorn_in_loop,
)
from tests.support.registry import free_port
from tests.support.testca import issue

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
App = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Any]


@pytest.fixture(params=["uvloop", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """uvloop (what ``mirrorrouter serve`` runs) and asyncio's loop: their transports and
    writability watches differ."""
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


@dataclass(frozen=True)
class Blob:
    path: Path
    data: bytes


@pytest.fixture
def blob(tmp_path: Path) -> Blob:
    """A 24 MiB file of pseudo-random bytes: larger than any socket buffer."""
    path = tmp_path / "blob"
    data = os.urandom(256 * 1024) * 96
    path.write_bytes(data)
    return Blob(path, data)


@contextlib.asynccontextmanager
async def serving(app: App, **settings: Any) -> AsyncIterator[int]:
    """``app`` behind GatewayProtocol on a free loopback port, in this event loop."""
    port = free_port()
    extra = settings.pop("uvicorn", {})
    config = loopback_server_config(app, ServerSettings(**settings), port, **extra)
    async with uvicorn_in_loop(config):
        yield port


def file_app(blob: Blob, sent: list[str] | None = None) -> App:
    """Answers ``GET /<offset>/<count>`` with that part of the blob's file in one zero-copy
    message (``/all`` for the whole file), and notes in ``sent`` each send that returned."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        assert ZERO_COPY_SEND in scope.get("extensions", {})
        first, _, count = scope["path"].strip("/").partition("/")
        offset, length = (0, len(blob.data)) if first == "all" else (int(first), int(count))
        headers = [(b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        with io.FileIO(blob.path) as file:
            message = {"type": ZERO_COPY_SEND, "file": file, "offset": offset, "count": length}
            await send(message)  # type: ignore[arg-type]
        if sent is not None:
            sent.append(scope["path"])

    return app


async def response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response off a kept-alive connection: its head and its Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), 30)


@contextlib.asynccontextmanager
async def connect(
    port: int, **kwargs: Any
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, **kwargs)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_file_arrives_whole_and_the_connection_serves_the_next_request(
    blob: Blob,
) -> None:
    """The whole 24 MiB file, then parts of it (first byte, a middle stretch, last byte),
    all on one kept-alive connection: every byte as in the file."""
    data = blob.data
    async with serving(file_app(blob)) as port, connect(port) as (reader, writer):
        for path, expected in [
            ("/all", data),
            ("/0/1", data[:1]),
            (f"/{5 * MIB + 7}/{3 * MIB}", data[5 * MIB + 7 : 8 * MIB + 7]),
            (f"/{len(data) - 1}/1", data[-1:]),
            ("/all", data),
        ]:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head, body = await response(reader)
            assert head.startswith(b"HTTP/1.1 200")
            assert sha(body) == sha(expected), path


async def test_pipelined_requests_after_a_zero_copy_answer_come_in_order(blob: Blob) -> None:
    """Three requests in one write, the first two answered with sendfile: three answers,
    in order, each with its own bytes."""
    data = blob.data
    async with serving(file_app(blob)) as port, connect(port) as (reader, writer):
        writer.write(
            b"GET /all HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /3/5 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /0/2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        assert (await response(reader))[1] == data
        assert (await response(reader))[1] == data[3:8]
        assert (await response(reader))[1] == data[:2]
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_zero_copy_mixes_with_body_messages_and_chunked_framing(blob: Blob) -> None:
    """Without Content-Length the bytes are chunk-framed; body messages before and after a
    zero-copy one, and a message without offset that reads from the file's position."""
    data = blob.data

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"<", "more_body": True})
        with io.FileIO(blob.path) as file:
            file.seek(10)
            await send(  # type: ignore[arg-type]
                {"type": ZERO_COPY_SEND, "file": file, "count": 1000, "more_body": True}
            )
            assert file.tell() == 1010  # the position moved on, as a read would
            await send(  # type: ignore[arg-type]
                {"type": ZERO_COPY_SEND, "file": file, "offset": 0, "count": 5, "more_body": True}
            )
        await send({"type": "http.response.body", "body": b">"})

    async with serving(app) as port, connect(port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
    head, _, framed = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    body, rest = b"", framed
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    assert body == b"<" + data[10:1010] + data[:5] + b">"


async def test_a_client_that_hangs_up_mid_file_costs_no_descriptor_and_no_error(
    blob: Blob, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that read a little of the file and close: each send returns, every
    descriptor (socket, its duplicate, the file) is closed, nothing is logged as an error."""
    sent: list[str] = []
    async with serving(file_app(blob, sent)) as port:
        before = open_descriptors()
        with caplog.at_level(logging.INFO):
            for attempt in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /all HTTP/1.1\r\nHost: t\r\n\r\n")
                await reader.readexactly(1024 * 1024)
                writer.transport.abort()  # a reset, not a polite close
                await until(lambda n=attempt: len(sent) == n + 1)
            await until(lambda: open_descriptors() <= before)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_client_that_stops_reading_is_cut_at_the_send_timeout(blob: Blob) -> None:
    """A client that reads nothing of a 24 MiB answer: about one send timeout later the
    connection is aborted, the app's send returns and every descriptor is closed."""
    sent: list[str] = []
    async with serving(file_app(blob, sent), send_timeout=0.5) as port:
        before = open_descriptors()
        async with connect(port, limit=1024) as (reader, writer):
            writer.transport.pause_reading()
            writer.write(b"GET /all HTTP/1.1\r\nHost: t\r\n\r\n")
            started = asyncio.get_running_loop().time()
            await until(lambda: sent == ["/all"], within=10)
            assert asyncio.get_running_loop().time() - started >= 0.4
            writer.transport.resume_reading()
            got = 0
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(MIB), 5):
                    got += len(chunk)
            assert got < len(blob.data)  # cut, not finished
        await until(lambda: open_descriptors() <= before)


async def test_a_slow_but_steady_reader_gets_every_byte(blob: Blob) -> None:
    """A client reading 1 MiB every 50 ms (a 24 MiB answer over more than a second, four
    send timeouts) is never cut: each read is progress."""
    data = blob.data
    async with (
        serving(file_app(blob), send_timeout=0.3) as port,
        connect(port, limit=MIB) as (reader, writer),
    ):
        writer.write(b"GET /all HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = b""
        while len(body) < len(data):
            body += await asyncio.wait_for(reader.read(MIB), 5)
            await asyncio.sleep(0.05)
    assert sha(body) == sha(data)


async def test_a_file_unlinked_while_being_sent_still_arrives_whole(blob: Blob) -> None:
    """Eviction unlinks a blob file that is being sent: the open descriptor keeps the
    inode, so the client still gets every byte."""
    data = blob.data
    async with serving(file_app(blob)) as port, connect(port, limit=MIB) as (reader, writer):
        writer.write(b"GET /all HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.readexactly(MIB), 5)
        os.unlink(blob.path)
        body += await asyncio.wait_for(reader.readexactly(len(data) - MIB), 30)
    assert sha(body) == sha(data)


async def test_a_file_truncated_while_being_sent_is_a_clean_cut(
    blob: Blob, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that shrinks under a send (never a committed blob: those are replaced, not
    rewritten) ends the connection short of Content-Length, with one warning: the client
    sees an incomplete answer, never a wrong one nor a hang."""
    data = blob.data
    async with serving(file_app(blob)) as port, connect(port, limit=MIB) as (reader, writer):
        writer.write(b"GET /all HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.readexactly(MIB), 5)
        os.truncate(blob.path, 4 * MIB)
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(MIB), 10):
                body += chunk
    assert len(body) < len(data)
    assert body == data[: len(body)]
    assert "response cut" in caplog.text


async def test_over_tls_the_extension_is_not_offered_and_bodies_stream(
    tmp_path: Path, blob: Blob
) -> None:
    """On a TLS connection the scope offers no zero-copy send (the kernel cannot encrypt
    what sendfile moves), so the app streams body messages, and they arrive."""
    ca = issue(tmp_path, "ca")
    cert = issue(tmp_path, "server", ca, hosts=("127.0.0.1",))
    offered: list[bool] = []

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        offered.append(ZERO_COPY_SEND in scope.get("extensions", {}))
        body = blob.data
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    context = ssl.create_default_context(cafile=str(ca.cert_path))
    tls = {"ssl_certfile": str(cert.cert_path), "ssl_keyfile": str(cert.key_path)}
    async with (
        serving(app, uvicorn=tls) as port,
        connect(port, ssl=context, server_hostname="127.0.0.1") as (reader, writer),
    ):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        _, body = await response(reader)
    assert offered == [False]
    assert sha(body) == sha(blob.data)


class _Transport(asyncio.Transport):
    def __init__(self, extra: dict[str, Any]) -> None:
        super().__init__(extra)


@pytest.mark.parametrize(
    ("extra", "usable"),
    [
        ({}, False),  # no socket at all (a test transport, a pipe)
        ({"socket": None}, False),
        ({"sslcontext": ssl.create_default_context(), "socket": "tls"}, False),
        ({"ssl_object": object(), "socket": "tls"}, False),
        ({"socket": "plain"}, True),
    ],
)
def test_only_plain_sockets_are_used_for_sendfile(extra: dict[str, Any], usable: bool) -> None:
    """``socket_fd`` finds a descriptor only for plain TCP: a transport without a socket
    or with TLS falls back to body messages."""
    with contextlib.ExitStack() as stack:
        if extra.get("socket") in ("tls", "plain"):
            import socket

            extra["socket"] = stack.enter_context(socket.socket())
        found = zerocopy.socket_fd(_Transport(extra))
    assert (found is not None) is usable


# ---------------------------------------------------------------------- the gateway


@contextlib.asynccontextmanager
async def gateway_server(tmp_path: Path, fake: FakeRegistry) -> AsyncIterator[tuple[Gateway, int]]:
    """The gateway app (a fake upstream, the filesystem cache, access lines on) served by
    GatewayProtocol on a free loopback port, in this event loop."""
    text = "[server]\naccess_log = true\n" + config(tmp_path)
    async with gateway(tmp_path, fake, text) as gw:
        port = free_port()
        server = ServerConfig(
            gw.app,
            ServerSettings(),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
        async with uvicorn_in_loop(server):
            yield gw, port


def counting_sendfile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes moved by each ``os.sendfile`` call from now on."""
    moved: list[int] = []
    real = os.sendfile

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        moved.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", sendfile)
    return moved


@pytest.fixture
def layer(fake: FakeRegistry) -> bytes:
    """library/big:1 on the fake registry, with one 12 MiB layer."""
    data = os.urandom(MIB) * 12
    fake.add(make_image("library/big", [data]), "1")
    return data


async def test_cached_blobs_go_out_with_sendfile_byte_exact_with_ranges_and_head(
    tmp_path: Path,
    fake: FakeRegistry,
    layer: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cached blob: whole, in ranges (first byte, a middle stretch, last byte, a suffix)
    and HEAD, on one kept-alive connection; the bytes are the layer's, sendfile moved them,
    and the access lines and the bytes-from-cache tally count what each answer carried."""
    digest = f"sha256:{sha(layer)}"
    path = f"/v2/library/big/blobs/{digest}"
    size = len(layer)
    async with gateway_server(tmp_path, fake) as (gw, port):
        assert (await gw.client.get(path)).content == layer  # cached (streamed: no server)
        caplog.clear()  # its access line, where another test left the access logger on
        tally_before = gw.app.services.metrics.tallies.of("docker.io").bytes_from_cache
        moved = counting_sendfile(monkeypatch)
        cases: list[tuple[str, int, bytes]] = [
            ("", 200, layer),
            ("bytes=0-0", 206, layer[:1]),
            (f"bytes={3 * MIB}-{7 * MIB - 1}", 206, layer[3 * MIB : 7 * MIB]),
            (f"bytes={size - 1}-", 206, layer[-1:]),
            ("bytes=-1000", 206, layer[-1000:]),
        ]
        with caplog.at_level(logging.INFO, logger="mirrorrouter.access"):
            async with connect(port) as (reader, writer):
                for header, status, expected in cases:
                    extra = f"Range: {header}\r\n" if header else ""
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
                    head, body = await response(reader)
                    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
                    assert b"x-cache: HIT" in head
                    assert sha(body) == sha(expected), header
                writer.write(f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert f"content-length: {size}".encode() in head
        served = sum(len(expected) for _, _, expected in cases)
        assert sum(moved) == served
        lines = [r for r in caplog.records if r.name == "mirrorrouter.access"]
        counted = [getattr(r, "fields")["bytes"] for r in lines]  # noqa: B009
        assert counted == [len(expected) for _, _, expected in cases] + [0]
        tally = gw.app.services.metrics.tallies.of("docker.io").bytes_from_cache
        assert tally - tally_before == served


async def test_a_blob_being_sent_is_in_use_and_cannot_be_evicted(
    tmp_path: Path, fake: FakeRegistry, layer: bytes
) -> None:
    """While sendfile moves a cached blob to a client that reads slowly, the cache counts
    it in use (eviction skips it); once the answer is over it is free again."""
    digest_text = f"sha256:{sha(layer)}"
    async with gateway_server(tmp_path, fake) as (gw, port):
        await gw.client.get(f"/v2/library/big/blobs/{digest_text}")
        site = await gw.app.services.pull.site(gw.app.state.settings.upstreams["docker.io"])
        digest = Digest.parse(digest_text)
        assert not site.cache.in_use(digest)
        async with connect(port, limit=MIB) as (reader, writer):
            writer.write(f"GET /v2/library/big/blobs/{digest} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = await asyncio.wait_for(reader.readexactly(MIB), 5)
            assert site.cache.in_use(digest)
            removed = await site.cache.remove(Removal(frozenset({digest})))
            assert removed.in_use == {digest} and not removed.removed
            body += await asyncio.wait_for(reader.readexactly(len(layer) - MIB), 30)
        assert sha(body) == sha(layer)
        await until(lambda: not site.cache.in_use(digest))
