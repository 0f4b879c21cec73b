"""GatewayProtocol in-process: each deadline closes what it should and nothing a slow app or a
slow but steady client is doing; the connection limit and the descriptor budget."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

from mirrorrouter.config.model import ServerSettings
from mirrorrouter.server import running
from mirrorrouter.server.running import fit_descriptor_limit
from tests.support.inprocess import loopback_server_config, uvicorn_in_loop
from tests.support.registry import free_port

pytestmark = pytest.mark.anyio

FAST = {"header_timeout": 0.5, "body_timeout": 0.5, "keepalive_timeout": 0.5}
App = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Any]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """uvloop, as ``mirrorrouter serve`` runs: its transports are what the protocol drives."""
    return ("asyncio", {"use_uvloop": True})


@contextlib.asynccontextmanager
async def serving(app: App, **settings: Any) -> AsyncIterator[int]:
    """``app`` behind GatewayProtocol on a free loopback port, in this event loop."""
    port = free_port()
    config = loopback_server_config(app, ServerSettings(**{**FAST, **settings}), port)
    async with uvicorn_in_loop(config):
        yield port


@contextlib.asynccontextmanager
async def connect(
    port: int, limit: int = 65536
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection to the test server, closed at the end whatever happened."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def answer(send: ASGISendCallable, body: bytes, status: int = 200) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: ASGIReceiveCallable, pause: float = 0.0) -> int | None:
    """Bytes of the request body, or None when the client went away first."""
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        total += len(message.get("body", b""))
        if not message.get("more_body"):
            return total
        await asyncio.sleep(pause)


async def until_eof(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes; fails when it does not within ``within``."""
    data = b""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_a_slow_app_never_trips_the_body_timeout() -> None:
    """An app that waits 4 body timeouts before reading, then reads slowly, gets the whole
    1 MiB body: while reading is paused for it, no deadline runs."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await asyncio.sleep(2.0)
        size = await read_body(receive, pause=0.05)
        await answer(send, str(size).encode())

    async with serving(app) as port, connect(port) as (reader, writer):
        body = b"x" * (1024 * 1024)
        writer.write(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert status_of(head) == 200
        assert await reader.readexactly(7) == b"1048576"


async def test_a_slow_but_steady_body_is_served() -> None:
    """Chunks 0.2 s apart for 2 s (four times the body timeout in all) are received whole:
    the timeout is the gap between chunks, not the body's total time."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await answer(send, str(await read_body(receive)).encode())

    async with serving(app) as port, connect(port) as (reader, writer):
        writer.write(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):
            await asyncio.sleep(0.2)
            writer.write(b"x")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status_of(head) == 200
        assert await reader.readexactly(2) == b"10"


async def test_a_stalled_body_is_abandoned_after_the_body_timeout() -> None:
    """Half a body, then silence: the app waiting for the rest is told the client is gone,
    and the connection is closed, about one body timeout later."""
    outcome: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        outcome.set_result(await read_body(receive))

    async with serving(app) as port, connect(port) as (reader, writer):
        writer.write(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nhalf")
        started = time.monotonic()
        assert await asyncio.wait_for(outcome, 10) is None
        assert await until_eof(reader, 10) == b""
        assert 0.4 <= time.monotonic() - started < 5


async def test_idle_kept_alive_connection_is_closed() -> None:
    """After its answer a kept-alive connection that sends nothing is closed at the
    keep-alive timeout, and one that never sent a byte at the header timeout."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await answer(send, b"ok")

    async with (
        serving(app, keepalive_timeout=0.3, header_timeout=1.0) as port,
        connect(port) as (reader, writer),
    ):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        started = time.monotonic()
        assert (await until_eof(reader, 5)).endswith(b"ok")
        assert 0.25 <= time.monotonic() - started < 1.0
    async with serving(app, header_timeout=1.0) as port, connect(port) as (silent, _):
        started = time.monotonic()
        assert await until_eof(silent, 5) == b""
        assert 0.9 <= time.monotonic() - started < 3


async def test_headers_must_complete_within_the_header_timeout_of_their_first_byte() -> None:
    """A request line sent byte by byte, 0.2 s apart, is cut at the header timeout even
    though bytes keep coming; a request whose head arrives in time is served."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await answer(send, b"ok")

    async with serving(app, header_timeout=1.0) as port, connect(port) as (reader, writer):
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /a-long-path-sent-slowly HTTP/1.1\r\n":
                writer.write(bytes([byte]))
                await asyncio.sleep(0.2)
                if reader.at_eof() or time.monotonic() - started > 5:
                    break
        assert await until_eof(reader, 5) == b""
        assert time.monotonic() - started < 3
        async with connect(port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert status_of(await until_eof(reader, 5)) == 200


async def test_a_response_the_client_does_not_read_is_abandoned() -> None:
    """A client that requests 256 MiB and reads nothing is cut off at the send timeout,
    and the app's sends return instead of waiting forever."""
    finished = asyncio.Event()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        chunk = b"x" * (1024 * 1024)
        headers = [(b"content-length", str(256 * len(chunk)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(256):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finished.set()

    async with serving(app, send_timeout=0.5) as port, connect(port, limit=1024) as (_, writer):
        writer.transport.pause_reading()
        writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(finished.wait(), 10)


async def test_an_idle_connection_makes_room_at_the_limit() -> None:
    """At max_connections a new client is served by closing the longest-idle kept-alive
    connection; with none idle, the new one gets a 503 in the OCI envelope."""
    held = asyncio.Semaphore(0)
    release = asyncio.Event()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["path"] == "/hold":
            held.release()
            await release.wait()
        await answer(send, b"ok")

    limits = {"max_connections": 2, "keepalive_timeout": 30, "header_timeout": 30}
    async with serving(app, **limits) as port, contextlib.AsyncExitStack() as stack:
        connections = []
        for _ in range(2):
            reader, writer = await stack.enter_async_context(connect(port))
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            connections.append((reader, writer))
        reader, writer = await stack.enter_async_context(connect(port))
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
        assert await until_eof(connections[0][0], 5) == b""  # the oldest made room
        for _, busy in (connections[1], (reader, writer)):
            busy.write(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(2):
            await asyncio.wait_for(held.acquire(), 5)
        refused, ask = await stack.enter_async_context(connect(port))
        ask.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await until_eof(refused, 5)
        release.set()
        assert status_of(response) == 503
        head, _, body = response.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower()
        assert b"retry-after: 1" in head.lower()
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_pipelined_requests_are_answered_in_order() -> None:
    """Two requests in one write get two answers, in order (uvicorn's pipelining kept)."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await answer(send, scope["path"].encode())

    async with serving(app) as port, connect(port) as (reader, writer):
        writer.write(
            b"GET /one HTTP/1.1\r\nHost: t\r\n\r\nGET /two HTTP/1.1\r\nHost: t\r\n"
            b"Connection: close\r\n\r\n"
        )
        data = await until_eof(reader, 5)
        assert data.count(b"HTTP/1.1 200") == 2
        assert data.index(b"/one") < data.index(b"/two")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost t\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
        (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 9000 + b"\r\n", 431),
    ],
)
async def test_requests_that_cannot_be_parsed_get_the_oci_envelope(
    request_bytes: bytes, status: int
) -> None:
    """Malformed HTTP is a 400 and an oversized head a 431, as JSON, and the connection
    closes."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await read_body(receive)
        await answer(send, b"ok")

    async with serving(app) as port, connect(port) as (reader, writer):
        writer.write(request_bytes)
        response = await until_eof(reader, 5)
        assert status_of(response) == status
        head, _, body = response.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head
        assert json.loads(body)["errors"][0]["message"]


def fake_limits(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, settable: bool = True
) -> list[tuple[int, int]]:
    """Replace RLIMIT_NOFILE with (soft, hard); returns the setrlimit calls."""
    calls: list[tuple[int, int]] = []
    state = {"limits": (soft, hard)}

    def getrlimit(which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return state["limits"]

    def setrlimit(which: int, limits: tuple[int, int]) -> None:
        if not settable or limits[0] > state["limits"][1]:
            raise ValueError("not allowed")
        calls.append(limits)
        state["limits"] = limits

    monkeypatch.setattr(running.resource, "getrlimit", getrlimit)
    monkeypatch.setattr(running.resource, "setrlimit", setrlimit)
    return calls


def test_the_soft_descriptor_limit_is_raised_for_the_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With room under the hard limit, the soft one is raised to 3 per connection + spare."""
    calls = fake_limits(monkeypatch, soft=1024, hard=1_048_576)
    assert fit_descriptor_limit(4096) == 4096
    assert calls == [(3 * 4096 + 1024, 1_048_576)]
    calls = fake_limits(monkeypatch, soft=1_048_576, hard=1_048_576)
    assert fit_descriptor_limit(4096) == 4096
    assert calls == []


def test_a_limit_that_does_not_fit_is_clamped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a hard limit of 4096 the soft one goes up to 4096 and max_connections down to
    what fits, with a warning that names the setting and the way out."""
    calls = fake_limits(monkeypatch, soft=1024, hard=4096)
    with caplog.at_level(logging.WARNING, logger="mirrorrouter.server"):
        fitted = fit_descriptor_limit(4096)
    assert calls == [(4096, 4096)]
    assert fitted == (4096 - 1024) // 3
    assert "server.max_connections" in caplog.text and "ulimit" in caplog.text
    fake_limits(monkeypatch, soft=256, hard=256, settable=False)
    assert 1 <= fit_descriptor_limit(4096) == (256 - 64) // 3
