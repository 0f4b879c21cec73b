"""Egress: upstream TLS with a corporate CA and a client certificate, and outbound proxies."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mirrorrouter.config import parse_settings
from mirrorrouter.errors import RegistryError
from mirrorrouter.reference import ImageReference
from mirrorrouter.upstream.client import UpstreamClient
from tests.support.fakeregistry import make_image
from tests.support.testca import issue

pytestmark = pytest.mark.anyio

IMAGE = make_image("library/app", [b"layer"])


@asynccontextmanager
async def server(context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[bytes]]]:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()
            return
        seen.append(request)
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {IMAGE.media_type}\r\n"
            f"Content-Length: {len(IMAGE.manifest)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + IMAGE.manifest)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    try:
        yield srv.sockets[0].getsockname()[1], seen
    finally:
        srv.close()
        await srv.wait_closed()


async def fetch(text: str) -> None:
    settings = parse_settings(text, env={})
    client = UpstreamClient(settings.upstreams["docker.io"])
    try:
        fetched = await client.fetch_manifest(ImageReference.parse("library/app:1"))
        assert fetched.data == IMAGE.manifest
    finally:
        await client.aclose()


def upstream(url: str, tls: str = "", extra: str = "") -> str:
    return f"""
[upstreams."docker.io"]
retry_attempts = 1
mirrors = [{{ url = "{url}" }}]
{extra}
[upstreams."docker.io".tls]
{tls}
"""


async def test_corporate_ca_and_client_certificate(tmp_path: Path) -> None:
    """An upstream signed by a private CA is trusted with ca_bundle; one that requires a client
    certificate gets it; without the bundle the TLS handshake fails."""
    ca = issue(tmp_path, "ca")
    ca_path = ca.cert_path
    leaf = issue(tmp_path, "server", ca)
    client = issue(tmp_path, "client", ca)
    client_cert, client_key = client.cert_path, client.key_path
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_path)
    context.load_cert_chain(leaf.cert_path, leaf.key_path)
    context.verify_mode = ssl.CERT_REQUIRED  # a client certificate is a must
    async with server(context) as (port, seen):
        url = f"https://localhost:{port}"
        tls = f'ca_bundle = "{ca_path}"\nclient_cert = "{client_cert}"\nclient_key = "{client_key}"'
        await fetch(upstream(url, tls))
        assert len(seen) == 1
        with pytest.raises(RegistryError) as untrusted:
            await fetch(upstream(url))
        assert "certificate" in str(untrusted.value.detail).lower()
        with pytest.raises(RegistryError):
            await fetch(upstream(url, f'ca_bundle = "{ca_path}"'))  # no client certificate
    assert len(seen) == 1


async def test_outbound_proxy_carries_upstream_traffic(tmp_path: Path) -> None:
    """With a proxy configured, requests go to the proxy in absolute form; the upstream's name
    is never looked up by the gateway itself."""
    async with server() as (port, seen):
        text = upstream("http://registry.invalid", extra=f'proxy = "http://127.0.0.1:{port}"')
        await fetch(text)
    request_line = seen[0].split(b"\r\n")[0]
    assert request_line == b"GET http://registry.invalid/v2/library/app/manifests/1 HTTP/1.1"
