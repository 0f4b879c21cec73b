"""The HTTPS listener in-process: both listeners in one server, each with its scheme; client
certificates refused or taken during the handshake; the certificate reloaded in place (files
changed, SIGHUP) while open connections keep theirs; a bad new pair keeping the old; and what
check-config says about the files."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

from mirrorrouter.app import create_app
from mirrorrouter.config import ConfigError, ServerSettings, ServerTlsSettings, parse_settings
from mirrorrouter.server import tls
from mirrorrouter.server.running import GatewayServer, _bind
from tests.support.inprocess import loopback_server_config
from tests.support.registry import free_port
from tests.support.testca import Issued, issue

pytestmark = pytest.mark.anyio

MONTH = datetime.timedelta(days=30)  # no expiry warnings
FAST = {"header_timeout": 0.5, "body_timeout": 0.5, "keepalive_timeout": 5.0}
App = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Any]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """uvloop, as ``mirrorrouter serve`` runs: its SSL transports are the ones served."""
    return ("asyncio", {"use_uvloop": True})


@dataclass
class Pki:
    directory: Path
    ca: Issued
    server: Issued

    def settings(self, **changes: Any) -> ServerTlsSettings:
        base = ServerTlsSettings(free_port(), self.server.cert_path, self.server.key_path)
        return replace(base, **changes)

    def rotate(self, name: str = "next") -> Issued:
        """A new certificate from the same CA, written over the server's files."""
        new = issue(self.directory, name, self.ca, ("127.0.0.1", "localhost"), lifetime=MONTH)
        os.replace(new.key_path, self.server.key_path)
        os.replace(new.cert_path, self.server.cert_path)
        return new


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = issue(tmp_path, "ca")
    server = issue(tmp_path, "server", ca, ("127.0.0.1", "localhost"), lifetime=MONTH)
    return Pki(tmp_path, ca, server)


class Echo:
    """An app answering with the scheme the request came by; counts its requests."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        self.requests += 1
        body = json.dumps({"scheme": scope["scheme"]}).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Served:
    plain: int
    secure: int
    server: GatewayServer


@contextlib.asynccontextmanager
async def serving(app: App, settings: ServerTlsSettings) -> AsyncIterator[Served]:
    """``app`` on a plain and an HTTPS loopback port, in this event loop (the main thread,
    so SIGHUP reaches the server's handler)."""
    config = loopback_server_config(
        app,
        ServerSettings(**FAST, tls=settings),  # type: ignore[arg-type]
        free_port(),
    )
    sockets = [config.bind_socket(), _bind("127.0.0.1", settings.port, "https")]
    server = GatewayServer(config)
    task = asyncio.create_task(server.serve(sockets=sockets))
    await until(lambda: server.started or task.done())
    assert server.started, "the server did not start"
    try:
        yield Served(config.port, settings.port, server)
    finally:
        server.should_exit = True
        await task


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def trusting(pki: Pki, client: Issued | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against the test CA (and presents
    ``client``)."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    if client is not None:
        context.load_cert_chain(client.cert_path, client.key_path)
    return context


class Connection:
    """One kept-alive client connection; ``serial`` is what its server presented."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext | None = None) -> Connection:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
        )
        return cls(reader, writer)

    @property
    def serial(self) -> int:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number

    async def get(self, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def fetch(port: int, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One request on a new connection: status and body; its server's serial is checked by
    :func:`serial_of`."""
    connection = await Connection.open(port, context)
    try:
        status, _, body = await connection.get()
        return status, body
    finally:
        await connection.close()


async def serial_of(port: int, context: ssl.SSLContext) -> int:
    """The serial a new handshake gets."""
    connection = await Connection.open(port, context)
    try:
        return connection.serial
    finally:
        await connection.close()


async def test_both_listeners_serve_each_with_its_scheme(pki: Pki) -> None:
    """The plain and the HTTPS listener serve the one app; the scope says how it was reached."""
    app = Echo()
    async with serving(app, pki.settings()) as served:
        assert await fetch(served.plain) == (200, b'{"scheme": "http"}')
        assert await fetch(served.secure, trusting(pki)) == (200, b'{"scheme": "https"}')
        assert await serial_of(served.secure, trusting(pki)) == pki.server.cert.serial_number


async def test_token_realm_uses_https_for_a_client_that_came_over_tls(
    pki: Pki, tmp_path: Path
) -> None:
    """The challenge sends a client back the way it came: realm https:// over TLS."""
    password = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "htpasswd").write_text(f"alice:{password}\n")
    settings = parse_settings(
        f"""
[cache]
directory = "{tmp_path / "cache"}"
[auth]
htpasswd = "{tmp_path / "htpasswd"}"
secret_file = "{tmp_path / "secret"}"
[upstreams."docker.io"]
mirrors = [{{ url = "http://upstream.test" }}]
""",
        env={},
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app), serving(app, pki.settings()) as served:
        for port, context, scheme in [
            (served.secure, trusting(pki), "https"),
            (served.plain, None, "http"),
        ]:
            connection = await Connection.open(port, context)
            status, headers, _ = await connection.get("/v2/")
            await connection.close()
            assert status == 401
            realm = f'realm="{scheme}://127.0.0.1/auth/token"'
            assert realm in headers["www-authenticate"]


async def test_client_without_a_certificate_is_refused_in_the_handshake(
    pki: Pki, tmp_path: Path
) -> None:
    """With client_ca, a client presenting no certificate (or one from another CA) never
    reaches the app; one signed by client_ca is served."""
    clients = issue(tmp_path, "clients")
    node = issue(tmp_path, "node", clients, ("node-1",))
    stranger = issue(tmp_path, "stranger", issue(tmp_path, "other-ca"), ("node-2",))
    app = Echo()
    async with serving(app, pki.settings(client_ca=clients.cert_path)) as served:
        for context in (trusting(pki), trusting(pki, stranger)):
            # TLS 1.3: the client's side of the handshake ends first; the server's refusal
            # arrives as an alert instead of an answer.
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await fetch(served.secure, context)
        assert app.requests == 0
        assert await fetch(served.secure, trusting(pki, node)) == (200, b'{"scheme": "https"}')


async def test_a_handshake_must_finish_within_the_header_timeout(pki: Pki) -> None:
    """A connection that never starts its handshake is closed after header_timeout."""
    async with serving(Echo(), pki.settings()) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.secure)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()


async def test_certificate_replaced_on_disk_serves_new_handshakes_and_keeps_connections(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files replaced on disk: new handshakes get the new serial, an open connection keeps
    working with the certificate it was given."""
    monkeypatch.setattr(tls, "WATCH_INTERVAL", 0.05)
    async with serving(Echo(), pki.settings()) as served:
        kept = await Connection.open(served.secure, trusting(pki))
        assert (await kept.get())[0] == 200
        new = pki.rotate()
        await until_serial(served.secure, trusting(pki), new.cert.serial_number)
        assert (await kept.get())[0] == 200
        assert kept.serial == pki.server.cert.serial_number
        await kept.close()


async def until_serial(port: int, context: ssl.SSLContext, serial: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while await serial_of(port, context) != serial:
        assert asyncio.get_running_loop().time() < deadline, "the new certificate never came"
        await asyncio.sleep(0.02)


async def test_sighup_reloads_the_certificate_instead_of_ending_the_process(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP makes a single-process server read its files again at once (without it, the
    default action would end the process)."""
    monkeypatch.setattr(tls, "WATCH_INTERVAL", 3600.0)
    async with serving(Echo(), pki.settings()) as served:
        new = pki.rotate()
        assert await serial_of(served.secure, trusting(pki)) == pki.server.cert.serial_number
        os.kill(os.getpid(), signal.SIGHUP)
        await until_serial(served.secure, trusting(pki), new.cert.serial_number)


async def test_a_bad_new_pair_keeps_the_old_certificate(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key that does not match the new certificate: an error naming the key file, and the
    context keeps presenting the old certificate."""
    certificates = tls.Certificates(pki.settings())
    stray = issue(tmp_path, "stray", pki.ca, ("127.0.0.1",))
    pki.rotate()
    os.replace(stray.key_path, pki.server.key_path)
    with caplog.at_level(logging.ERROR, "mirrorrouter.tls"):
        assert not await certificates.reload("test")
    assert str(pki.server.key_path) in caplog.text
    assert "does not belong to the certificate" in caplog.text
    assert certificates.pair.leaf.serial_number == pki.server.cert.serial_number


# ------------------------------------------------------------------------ check-config


def findings(settings: ServerTlsSettings) -> list[str]:
    return [f"{'warning' if f.warning else 'problem'}: {f}" for f in tls.check_files(settings)]


def test_check_files_accepts_a_good_pair(pki: Pki) -> None:
    """A certificate, its key and a client CA that parse: nothing to say."""
    assert findings(pki.settings(client_ca=pki.ca.cert_path)) == []


def test_check_files_names_each_problem(pki: Pki, tmp_path: Path) -> None:
    """Unreadable, not PEM, a key of another certificate, a client CA that is no certificate:
    each names its key path and file."""
    other = issue(tmp_path, "other", pki.ca)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    assert findings(pki.settings(key=other.key_path)) == [
        f"problem: server.tls.key: {other.key_path}: does not belong to the certificate in "
        f"{pki.server.cert_path}"
    ]
    assert findings(pki.settings(certificate=garbage)) == [
        f"problem: server.tls.certificate: {garbage}: no PEM certificate in it"
    ]
    assert findings(pki.settings(key=garbage)) == [
        f"problem: server.tls.key: {garbage}: not a PEM private key"
    ]
    assert findings(pki.settings(key=missing)) == [
        f"problem: server.tls.key: {missing}: cannot read: No such file or directory"
    ]
    assert findings(pki.settings(client_ca=garbage)) == [
        f"problem: server.tls.client_ca: {garbage}: no PEM certificate in it"
    ]


def test_check_files_judges_the_validity_dates(pki: Pki, tmp_path: Path) -> None:
    """Expired or not yet valid is a problem; expiring within two weeks a warning."""
    day = datetime.timedelta(days=1)
    for name, lifetime, starts, expected in [
        ("expired", -day, -2 * day, "problem: server.tls.certificate: {}: expired on"),
        ("early", 3 * day, day, "problem: server.tls.certificate: {}: not valid before"),
        ("soon", 10 * day, -day, "warning: server.tls.certificate: {}: expires in 9 days"),
    ]:
        cert = issue(tmp_path, name, pki.ca, lifetime=lifetime, starts=starts)
        found = findings(pki.settings(certificate=cert.cert_path, key=cert.key_path))
        assert len(found) == 1 and found[0].startswith(expected.format(cert.cert_path)), found
    fine = issue(tmp_path, "fine", pki.ca, lifetime=30 * day)
    assert findings(pki.settings(certificate=fine.cert_path, key=fine.key_path)) == []


def test_chain_root_is_the_self_signed_end_of_the_chain(pki: Pki, tmp_path: Path) -> None:
    """A chain ending in its root, or a self-signed certificate, gives that root; a chain
    stopping below its root gives None."""
    chained = tmp_path / "chained.crt"
    chained.write_bytes(pki.server.cert_path.read_bytes() + pki.ca.cert_path.read_bytes())
    assert tls.chain_root(chained) == pki.ca.cert
    assert tls.chain_root(pki.ca.cert_path) == pki.ca.cert
    assert tls.chain_root(pki.server.cert_path) is None


# ------------------------------------------------------------------------ configuration


def server_config(tmp_path: Path, text: str) -> ServerSettings:
    base = f'[cache]\ndirectory = "{tmp_path}"\n[upstreams."docker.io"]\n'
    return parse_settings(text + base, source=tmp_path / "mirrors.toml", env={}).server


def test_server_tls_keys_and_their_defaults(pki: Pki, tmp_path: Path) -> None:
    """[server.tls] reads port, certificate and key (relative to the config file),
    client_ca (none) and min_version ("1.2"); it is absent by default."""
    assert server_config(tmp_path, "").tls is None
    server = server_config(
        tmp_path,
        '[server]\nport = 0\n[server.tls]\nport = 8443\ncertificate = "server.crt"\n'
        'key = "server.key"\n',
    )
    assert server.port == 0
    assert server.tls == ServerTlsSettings(
        8443, pki.server.cert_path, pki.server.key_path, None, "1.2"
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\nport = 0\n", "server.port: 0 turns the plain-HTTP listener off, which needs"),
        (
            '[server.tls]\nport = 5000\ncertificate = "server.crt"\nkey = "server.key"\n',
            "server.tls.port: the plain-HTTP listener already uses port 5000",
        ),
        ('[server.tls]\nport = 8443\nkey = "server.key"\n', "server.tls.certificate: is required"),
        (
            '[server.tls]\nport = 8443\ncertificate = "nope.crt"\nkey = "server.key"\n',
            "server.tls.certificate: no readable file at",
        ),
        (
            '[server.tls]\nport = 8443\ncertificate = "server.crt"\nkey = "server.key"\n'
            'min_version = "1.1"\n',
            "server.tls.min_version: expected one of '1.2', '1.3'",
        ),
        (
            '[server.tls]\nport = 8443\ncertificate = "server.crt"\nkey = "server.key"\n'
            "verify = true\n",
            "server.tls.verify: unknown key",
        ),
    ],
)
def test_server_tls_refusals_name_the_key(
    pki: Pki, tmp_path: Path, text: str, fragment: str
) -> None:
    """Each bad [server.tls] is refused with its key path."""
    with pytest.raises(ConfigError) as caught:
        server_config(tmp_path, text)
    assert any(fragment in p for p in caught.value.problems), caught.value.problems
