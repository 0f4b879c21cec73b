"""The aiohttp transport: bodies arrive whole, and failures surface as httpx's errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from mirrorrouter.config import parse_settings
from mirrorrouter.upstream.proxies import ProxyRules
from mirrorrouter.upstream.transport import AiohttpTransport, upstream_network

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


class Recorder:
    """A loopback server that records each request head and answers 200 (or ``status``)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.heads: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        body = b"proxied" if self.status == 200 else b""
        writer.write(
            f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    def lines(self) -> list[bytes]:
        return [head.split(b"\r\n", 1)[0] for head in self.heads]


async def test_http_proxy_carries_plain_requests_with_credentials() -> None:
    """Through an http:// proxy a plain request goes in absolute form, the URL's credentials
    as Proxy-Authorization; the registry's name is never looked up by the gateway."""
    proxy = Recorder()
    async for base in serve(proxy):
        rules = ProxyRules(http=base.replace("http://", "http://alice:s3cret@"))
        async with httpx.AsyncClient(transport=AiohttpTransport(proxies=rules)) as client:
            response = await client.get("http://registry.invalid/v2/")
    assert response.status_code == 200 and response.content == b"proxied"
    assert proxy.lines() == [b"GET http://registry.invalid/v2/ HTTP/1.1"]
    assert b"\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n" in proxy.heads[0]


async def test_https_goes_through_connect_and_a_refusal_is_a_proxy_error() -> None:
    """An https:// URL is tunnelled with CONNECT (credentials on the CONNECT); the proxy's 407
    becomes httpx.ProxyError, its message free of the credentials."""
    proxy = Recorder(status=407)
    async for base in serve(proxy):
        rules = ProxyRules(https=base.replace("http://", "http://alice:s3cret@"))
        async with httpx.AsyncClient(transport=AiohttpTransport(proxies=rules)) as client:
            with pytest.raises(httpx.ProxyError) as refused:
                await client.get("https://registry.invalid/v2/")
    assert proxy.lines() == [b"CONNECT registry.invalid:443 HTTP/1.1"]
    assert b"\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n" in proxy.heads[0]
    assert "s3cret" not in str(refused.value) and "alice" not in str(refused.value)


async def test_no_proxy_is_decided_per_request_url() -> None:
    """One transport sends a NO_PROXY'd host directly and every other host via the proxy."""
    proxy, origin = Recorder(), Recorder()
    async for proxy_base in serve(proxy):
        async for origin_base in serve(origin):
            port = origin_base.rsplit(":", 1)[1]
            # 0.0.0.0 is not loopback to the rules (loopback is never proxied), yet on Linux
            # it reaches the listener on 127.0.0.1.
            rules = ProxyRules(http=proxy_base, no_proxy=f"cdn.invalid,0.0.0.0:{port}")
            async with httpx.AsyncClient(transport=AiohttpTransport(proxies=rules)) as client:
                direct = await client.get(f"http://0.0.0.0:{port}/blob")
                via = await client.get("http://registry.invalid/v2/")
    assert direct.status_code == via.status_code == 200
    assert origin.lines() == [b"GET /blob HTTP/1.1"]
    assert proxy.lines() == [b"GET http://registry.invalid/v2/ HTTP/1.1"]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Socks5:
    """A minimal SOCKS5 proxy (no authentication, CONNECT to an IPv4 address or a name)."""

    def __init__(self) -> None:
        self.targets: list[tuple[str, int]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, methods = await reader.readexactly(2)
        await reader.readexactly(methods)
        writer.write(bytes([version, 0]))
        _, _, _, kind = await reader.readexactly(4)
        if kind == 1:
            host = socket.inet_ntoa(await reader.readexactly(4))
        else:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        port = int.from_bytes(await reader.readexactly(2), "big")
        self.targets.append((host, port))
        origin_reader, origin_writer = await asyncio.open_connection(host, port)
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await asyncio.gather(_pipe(reader, origin_writer), _pipe(origin_reader, writer))


async def test_socks5_proxy_stays_on_httpx_transport() -> None:
    """A socks5:// proxy carries the request through httpx's own transport (aiohttp has no
    SOCKS), with the same per-URL rules."""
    socks, origin = Socks5(), Recorder()
    async for socks_base in serve(socks):
        async for origin_base in serve(origin):
            port = int(origin_base.rsplit(":", 1)[1])
            rules = ProxyRules(http=socks_base.replace("http://", "socks5://"))
            async with httpx.AsyncClient(transport=AiohttpTransport(proxies=rules)) as client:
                response = await client.get(f"http://0.0.0.0:{port}/v2/")
    assert response.status_code == 200 and response.content == b"proxied"
    assert socks.targets == [("0.0.0.0", port)]
    assert origin.lines() == [b"GET /v2/ HTTP/1.1"]


def test_upstream_network_keeps_the_fast_transport_behind_proxies() -> None:
    """Proxy variables (NO_PROXY alone included) and a configured proxy keep aiohttp."""
    plain = parse_settings('[upstreams."docker.io"]\n', env={}).upstreams["docker.io"]
    environments: list[dict[str, str]] = [
        {},
        {"NO_PROXY": "corp.example"},
        {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "*"},
    ]
    for environ in environments:
        network, _ = upstream_network(plain, environ)
        assert isinstance(network, AiohttpTransport)
    text = '[upstreams."docker.io"]\nproxy = "http://proxy.corp:3128"\n'
    configured = parse_settings(text, env={}).upstreams["docker.io"]
    network, _ = upstream_network(configured, {})
    assert isinstance(network, AiohttpTransport)
