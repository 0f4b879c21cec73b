"""The aiohttp transport: bodies arrive whole, and failures surface as httpx's errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from mirrorrouter.transport import AiohttpTransport

pytestmark = pytest.mark.anyio

BODY = bytes(range(256)) * 8192  # 2 MiB

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, cut: int | None = None
) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    seen = request.count(b"Authorization")
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nX-Seen: {seen}\r\n\r\n"
    writer.write(head.encode() + body[:cut])
    await writer.drain()
    writer.close()


async def test_body_and_headers_arrive_whole() -> None:
    """A 2 MiB body arrives byte-exact through httpx over the aiohttp transport."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(reader, writer, BODY)

    async for base in serve(handler):
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            response = await client.get(base + "/blob", headers={"Authorization": "Bearer x"})
    assert response.status_code == 200 and response.content == BODY
    assert response.headers["x-seen"] == "1"


async def test_body_cut_short_is_a_protocol_error() -> None:
    """A connection closed before Content-Length is reached raises httpx.RemoteProtocolError."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(reader, writer, BODY, cut=1000)

    async for base in serve(handler):
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("GET", base + "/blob") as response:
                    async for _ in response.aiter_bytes():
                        pass


async def test_refused_connection_is_a_connect_error() -> None:
    """A closed port raises httpx.ConnectError, which the retry policy calls temporary."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/v2/")


async def test_silent_server_is_a_read_timeout() -> None:
    """A server that never answers raises httpx.ReadTimeout after the read timeout."""

    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await done.wait()  # never answers while the client waits
        finally:
            writer.close()

    async for base in serve(handler):
        async with httpx.AsyncClient(
            transport=AiohttpTransport(), timeout=httpx.Timeout(5, read=0.2)
        ) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(base + "/slow")
        done.set()
