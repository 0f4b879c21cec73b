"""Egress: upstream TLS with a corporate CA and a client certificate, and outbound proxies."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mirrorrouter.config import parse_settings
from mirrorrouter.errors import RegistryError
from mirrorrouter.reference import ImageReference
from mirrorrouter.upstream import UpstreamClient
from tests.support.fakeregistry import make_image

pytestmark = pytest.mark.anyio

IMAGE = make_image("library/app", [b"layer"])


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue(
    tmp_path: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path, Path]:
    """A certificate (a CA when ``issuer`` is None) written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer[0].subject if issuer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), False
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key, cert_path, key_path


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
    ca_cert, ca_key, ca_path, _ = issue(tmp_path, "ca", None)
    _, _, server_cert, server_key = issue(tmp_path, "server", (ca_cert, ca_key))
    _, _, client_cert, client_key = issue(tmp_path, "client", (ca_cert, ca_key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_path)
    context.load_cert_chain(server_cert, server_key)
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
