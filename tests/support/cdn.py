"""An upstream that behaves like the public registries: TLS, a token realm on its own origin,
blob GETs answered with a 307 to a CDN carrying a signed, expiring URL.

    gateway --> RegistryFront (https, 127.0.0.1)   the registry's API origin, like
                |                                   registry-1.docker.io: wants Bearer tokens,
                |                                   proxies manifests and tags to a real
                |                                   distribution registry, answers blob
                |                                   GET/HEAD with 307 to a signed CDN URL
                +-> TokenRealm (https, 127.0.0.1)  its own origin, like auth.docker.io:
                |                                   checks Basic credentials, issues tokens
                +-> Cdn (https, localhost)         serves blob bytes from the registry's
                                                    storage; like S3 it refuses a request
                                                    carrying Authorization (400
                                                    InvalidArgument) and answers a bad or
                                                    expired signature with 403

The CDN can be told to answer 401 with its own ``Bearer realm=`` (a realm on the CDN that
logs whatever it receives) or ``Basic`` challenge, to answer 5xx, or to cut a body. Every
server keeps a log of what it received, headers included, so tests prove what never
arrived. Signatures are an HMAC over path and expiry, with an injectable clock.

``TestCA`` mints the CA (which the gateway trusts through ``[upstreams."x".tls]
ca_bundle``) and one certificate for 127.0.0.1 and localhost that every server uses.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import parse_qsl, urlencode

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.appserver import AppServer, Message, Receive, Scope, Send, respond
from tests.support.faultproxy import _ABORTING, _install_log_filter
from tests.support.service import Service

PIECE = 1024 * 1024


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class TestCA:
    """A CA made for one test and a server certificate for 127.0.0.1 and localhost."""

    ca_path: Path
    cert: tuple[Path, Path]  # the server's certificate and key files

    @classmethod
    def create(cls, directory: Path) -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirrorrouter test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "tls.crt", "tls.key"))
        ca_path.write_bytes(ca.public_bytes(pem))
        cert_path.write_bytes(leaf.public_bytes(pem))
        key_path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return cls(ca_path, (cert_path, key_path))


# --------------------------------------------------------------------------- request logs


@dataclass
class Seen:
    """One request as a test server received it, and what it answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    status: int = 0

    @property
    def raw(self) -> str:
        """Everything received, as text: to search for credentials that must not be there."""
        lines = [f"{self.method} {self.path}?{self.query}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return "\n".join([*lines, self.body.decode("latin-1")])


async def received(scope: Scope, receive: Receive) -> Seen:
    body = b""
    while True:
        message: Message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        headers[key] = ", ".join(filter(None, [headers.get(key), value.decode("latin-1")]))
    return Seen(scope["method"], scope["path"], scope["query_string"].decode(), headers, body)


class RequestLog:
    """Requests in arrival order, shared between the server thread and the test."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def add(self, seen: Seen) -> Seen:
        with self._lock:
            self._seen.append(seen)
        return seen

    def all(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def text(self) -> str:
        return "\n\n".join(s.raw for s in self.all())


# --------------------------------------------------------------------------- signed URLs


@dataclass
class UrlSigner:
    """HMAC over path and expiry, as S3 or CloudFront sign a URL; ``clock`` is injectable."""

    clock: Callable[[], float] = time.time
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def _mac(self, path: str, expires: str) -> str:
        return hmac.new(self.key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, ttl: float) -> str:
        """The query that makes ``path`` valid for ``ttl`` seconds (negative: expired)."""
        expires = str(int(self.clock() + ttl))
        return urlencode({"X-Expires": expires, "X-Signature": self._mac(path, expires)})

    def refusal(self, path: str, query: str) -> str | None:
        """Why the signed URL is refused, or None when it is good."""
        params = dict(parse_qsl(query))
        expires = params.get("X-Expires", "")
        if not expires.isdigit() or not hmac.compare_digest(
            self._mac(path, expires), params.get("X-Signature", "")
        ):
            return "SignatureDoesNotMatch"
        if int(expires) < self.clock():
            return "Request has expired"
        return None


# --------------------------------------------------------------------------- the CDN


@dataclass
class _Fault:
    kind: str  # "status" or "cut"
    value: int
    times: int


class Cdn:
    """Blob bytes by digest on their own origin (``https://localhost:PORT``)."""

    def __init__(self, blobs: Callable[[str], Path], signer: UrlSigner, ca: TestCA) -> None:
        self.blobs = blobs
        self.signer = signer
        self.log = RequestLog()  # blob requests
        self.realm_log = RequestLog()  # the CDN's own token realm
        self.challenge: str | None = None  # "bearer" or "basic": answer 401 with it
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self.server = AppServer(self._app, cert=ca.cert, name="localhost")
        _install_log_filter()

    @property
    def url(self) -> str:
        return self.server.url

    def signed_url(self, digest: str, ttl: float) -> str:
        path = f"/blobs/{digest}"
        return f"{self.url}{path}?{self.signer.sign(path, ttl)}"

    def fail(self, status: int, times: int = 1) -> None:
        """The next ``times`` good blob requests answer ``status``."""
        with self._lock:
            self._faults.append(_Fault("status", status, times))

    def cut_after(self, nbytes: int, times: int = 1) -> None:
        """The next ``times`` good blob GETs send ``nbytes`` of the body, then hang up."""
        with self._lock:
            self._faults.append(_Fault("cut", nbytes, times))

    def _fault(self) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/token":
            seen = self.realm_log.add(await received(scope, receive))
            seen.status = 200
            await respond(send, 200, b'{"token":"cdn-token"}', {"Content-Type": "application/json"})
            return
        seen = self.log.add(await received(scope, receive))
        status, body, headers = self._refusal(seen)
        if status:
            seen.status = status
            await respond(send, status, body, headers)
            return
        fault = self._fault()
        if fault is not None and fault.kind == "status":
            seen.status = fault.value
            await respond(send, fault.value, b"<Error><Code>ServiceUnavailable</Code></Error>")
            return
        await self._serve(seen, send, fault.value if fault is not None else None)

    def _refusal(self, seen: Seen) -> tuple[int, bytes, dict[str, str]]:
        if "authorization" in seen.headers:
            # S3: "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter,
            # Signature query string parameter or the Authorization header should be specified"
            return 400, b"<Error><Code>InvalidArgument</Code></Error>", {}
        if self.challenge == "bearer":
            realm = f'Bearer realm="{self.url}/token",service="cdn",scope="blob:read"'
            return 401, b"", {"WWW-Authenticate": realm}
        if self.challenge == "basic":
            return 401, b"", {"WWW-Authenticate": 'Basic realm="cdn"'}
        refusal = self.signer.refusal(seen.path, seen.query)
        if refusal is not None:
            body = f"<Error><Code>AccessDenied</Code><Message>{refusal}</Message></Error>"
            return 403, body.encode(), {}
        return 0, b"", {}

    async def _serve(self, seen: Seen, send: Send, cut: int | None) -> None:
        path = self.blobs(seen.path.removeprefix("/blobs/"))
        if not path.is_file():
            seen.status = 404
            await respond(send, 404, b"<Error><Code>NoSuchKey</Code></Error>")
            return
        size = path.stat().st_size
        start, status = 0, 200
        headers = [(b"accept-ranges", b"bytes")]
        wanted = seen.headers.get("range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            start, status = int(wanted[6:-1]), 206
            headers.append((b"content-range", f"bytes {start}-{size - 1}/{size}".encode()))
        headers.append((b"content-length", str(size - start).encode()))
        seen.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if seen.method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        left = cut if cut is not None else size - start
        with path.open("rb") as file:
            file.seek(start)
            while left > 0:
                piece = file.read(min(PIECE, left))
                if not piece:
                    break
                left -= len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        if cut is not None:
            _ABORTING.set(True)  # return unfinished: uvicorn flushes, then closes the socket
            return
        await send({"type": "http.response.body", "body": b""})


# --------------------------------------------------------------------------- the token realm


class TokenRealm:
    """The registry's token realm on its own origin: Basic credentials checked (when sent),
    a fresh token per answer, every token remembered for the front to accept."""

    def __init__(self, users: dict[str, str], ca: TestCA) -> None:
        self.users = users
        self.tokens: set[str] = set()
        self.log = RequestLog()
        self.server = AppServer(self._app, cert=ca.cert)

    @property
    def url(self) -> str:
        return f"{self.server.url}/token"

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = self.log.add(await received(scope, receive))
        credentials = seen.headers.get("authorization", "")
        if credentials.startswith("Basic "):
            user, _, password = base64.b64decode(credentials[6:]).decode().partition(":")
            if self.users.get(user) != password:
                seen.status = 401
                await respond(send, 401, b'{"details":"incorrect username or password"}')
                return
        token = secrets.token_hex(16)
        self.tokens.add(token)
        seen.status = 200
        body = f'{{"token":"{token}","expires_in":300}}'.encode()
        await respond(send, 200, body, {"Content-Type": "application/json"})


# --------------------------------------------------------------------------- the registry


class RegistryFront:
    """The registry's API origin in front of a real distribution registry (``backend``).

    Wants a token from ``realm`` on every API request; blob GET/HEAD of a blob the backend
    has answers 307 to a CDN URL valid for ``url_ttl`` seconds (``expire_next`` URLs are
    issued already expired, as if the client had been slow); the rest is proxied.
    """

    def __init__(
        self, backend: str, cdn: Cdn, realm: TokenRealm, ca: TestCA, url_ttl: float = 600
    ) -> None:
        self.backend = backend
        self.cdn = cdn
        self.realm = realm
        self.url_ttl = url_ttl
        self.expire_next = 0
        self.log = RequestLog()
        self.server = AppServer(self._app, cert=ca.cert)

    @property
    def url(self) -> str:
        return self.server.url

    def blob_gets(self) -> list[Seen]:
        """Authorized blob GETs (a 401 challenge is not a request for the blob)."""
        return [
            s
            for s in self.log.all()
            if s.method == "GET" and "/blobs/" in s.path and s.status != 401
        ]

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = self.log.add(await received(scope, receive))
        token = seen.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.realm.tokens:
            repository = seen.path[4:].rpartition("/")[0].rpartition("/")[0]
            challenge = f'Bearer realm="{self.realm.url}",service="front"'
            if repository:
                challenge += f',scope="repository:{repository}:pull"'
            seen.status = 401
            await respond(
                send,
                401,
                b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                {
                    "WWW-Authenticate": challenge,
                    "Content-Type": "application/json",
                },
            )
            return
        async with httpx.AsyncClient(base_url=self.backend, timeout=30) as backend:
            if "/blobs/" in seen.path and seen.method in ("GET", "HEAD"):
                found = await backend.head(seen.path)
                if found.status_code == 200:
                    digest = seen.path.rpartition("/")[2]
                    ttl = self.url_ttl
                    if self.expire_next > 0:
                        self.expire_next -= 1
                        ttl = -60
                    seen.status = 307
                    await respond(send, 307, b"", {"Location": self.cdn.signed_url(digest, ttl)})
                    return
            url = seen.path + (f"?{seen.query}" if seen.query else "")
            headers = {k: v for k, v in seen.headers.items() if k in ("accept", "range")}
            answer = await backend.request(seen.method, url, headers=headers)
        keep = ("content-type", "docker-content-digest", "link")
        headers = {k: v for k, v in answer.headers.items() if k in keep}
        seen.status = answer.status_code
        await respond(send, answer.status_code, answer.content, headers)


class RedirectingUpstream(Service):
    """Realm, CDN and front together over a distribution registry's URL and storage."""

    def __init__(
        self,
        directory: Path,
        backend: str,
        storage: Path,
        *,
        users: dict[str, str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = TestCA.create(directory / "tls")
        blobs = storage / "docker" / "registry" / "v2" / "blobs"

        def blob_path(digest: str) -> Path:
            algorithm, _, hexdigest = digest.partition(":")
            return blobs / algorithm / hexdigest[:2] / hexdigest / "data"

        self.signer = UrlSigner(clock)
        self.cdn = Cdn(blob_path, self.signer, self.ca)
        self.realm = TokenRealm(users, self.ca)
        self.front = RegistryFront(backend, self.cdn, self.realm, self.ca)

    @property
    def port(self) -> int:  # type: ignore[override]
        return self.front.server.port

    @property
    def url(self) -> str:
        return self.front.url

    def start(self) -> Self:
        for server in (self.realm.server, self.cdn.server, self.front.server):
            server.start()
        return self

    def stop(self) -> None:
        for server in (self.front.server, self.cdn.server, self.realm.server):
            server.stop()
