"""A Docker-Hub-style token server that a real distribution registry trusts.

How distribution 2.8 accepts a token (``registry/auth/token/token.go``): it reads the JWT
header and takes the signing key from, in this order, ``x5c`` (a certificate chain that must
verify against ``rootcertbundle``, any key usage), ``jwk``, or ``kid`` (the libtrust key ID of
a public key from a certificate in ``rootcertbundle``). It then checks ``iss`` against
``issuer``, ``aud`` against ``service``, ``exp``/``nbf`` with 60 s leeway, the signature
(``RS256`` here) and the ``access`` claim. Both header styles are offered; ``x5c`` is the
default (it needs nothing but the certificate), ``kid`` is what Docker Hub-like servers send.

Docker Hub semantics mimicked: a token request for a scope the caller may not have still gets
200 with a smaller ``access`` list (the registry then answers 401/"insufficient scope");
wrong credentials get 401 at the token endpoint.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import json
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.support.registry import TokenAuthSettings
from tests.support.service import Service

HeaderMode = Literal["x5c", "kid"]


@dataclass(frozen=True)
class Scope:
    """One requested or granted scope: ``repository:team/app:pull,push``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parse ``type:name:actions``; the name may itself contain ``:`` (a port)."""
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name:
            raise ValueError(f"malformed scope {text!r}")
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class TokenRequest:
    """One request that reached the token endpoint, as the server understood it."""

    method: str
    path: str
    service: str | None
    scopes: tuple[Scope, ...]
    offered_user: str | None  # the username the client sent, valid or not
    user: str | None  # the authenticated user (None: anonymous or rejected)
    grant_type: str | None  # OAuth2 POST grant type; None for GET
    status: int
    granted: tuple[Scope, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def scope_strings(self) -> tuple[str, ...]:
        """The requested scopes as strings."""
        return tuple(str(s) for s in self.scopes)


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """Return the libtrust key ID (what distribution matches against a JWT ``kid``).

    libtrust: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32 without
    padding, in 12 groups of 4 joined with ``:``.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@functools.cache
def _signing_key() -> rsa.RSAPrivateKey:
    # One key per test process: RSA generation costs up to a few hundred ms.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _self_signed_certificate(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_b64(obj: Any) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode())


class TokenServer(Service):
    """Token endpoint at ``http://127.0.0.1:PORT/token`` running in a background thread.

    Anonymous callers may pull every repository except those under ``private_prefixes``;
    authenticated users (``users``: name -> password) may pull and push everything.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        private_prefixes: Iterable[str] = ("private/",),
        service: str = "mirrorrouter-test-registry",
        issuer: str = "mirrorrouter-test-issuer",
        expires_in: int = 300,
        header_mode: HeaderMode = "x5c",
        workdir: Path | None = None,
    ) -> None:
        self.users = dict(users or {})
        self.private_prefixes = tuple(private_prefixes)
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.header_mode: HeaderMode = header_mode
        self.requests: list[TokenRequest] = []
        # Set to an HTTP status to answer every token request with it (an outage).
        self.outage_status: int | None = None
        self._lock = threading.Lock()
        self._refresh_tokens: dict[str, str] = {}
        self._key = _signing_key()
        self._cert = _self_signed_certificate(self._key, issuer)
        self._owned_tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._owned_tmp = tempfile.TemporaryDirectory(prefix="tokenserver-")
            workdir = Path(self._owned_tmp.name)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rootcertbundle = self.workdir / "token-rootcert.pem"
        self.rootcertbundle.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.key_id = libtrust_key_id(self._key.public_key())
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free 127.0.0.1 port and serve in a daemon thread."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (the certificate file stays)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        """Stop and remove the temporary directory this server created, if any."""
        self.stop()
        if self._owned_tmp is not None:
            self._owned_tmp.cleanup()
            self._owned_tmp = None

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("token server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint URL to configure as the registry's realm."""
        return f"{self.url}/token"

    def settings(self) -> TokenAuthSettings:
        """Return the ``auth: token`` settings for :class:`DistributionRegistry`."""
        return TokenAuthSettings(
            realm=self.realm,
            service=self.service,
            issuer=self.issuer,
            rootcertbundle=self.rootcertbundle,
        )

    # -- request log ---------------------------------------------------------------------

    def clear_requests(self) -> None:
        """Forget the logged token requests."""
        with self._lock:
            self.requests.clear()

    def requests_snapshot(self) -> list[TokenRequest]:
        """Return a copy of the request log, safe against concurrent appends."""
        with self._lock:
            return list(self.requests)

    def count(self, *, user: str | None = None, scope_contains: str = "") -> int:
        """Count token requests, optionally by authenticated user and scope substring."""
        return sum(
            1
            for r in self.requests_snapshot()
            if (user is None or r.user == user)
            and (not scope_contains or any(scope_contains in str(s) for s in r.scopes))
        )

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    # -- policy and signing --------------------------------------------------------------

    def is_private(self, repository: str) -> bool:
        """Whether a repository needs credentials to pull."""
        return any(repository.startswith(p) for p in self.private_prefixes)

    def grant(self, scope: Scope, user: str | None) -> Scope | None:
        """Return the part of ``scope`` this user may have (None: nothing)."""
        if scope.type != "repository":
            allowed: set[str] = set(scope.actions) if user is not None else set()
        else:
            allowed = set()
            if user is not None or not self.is_private(scope.name):
                allowed.add("pull")
            if user is not None:
                allowed.update({"push", "delete", "*"})
        actions = tuple(a for a in scope.actions if a in allowed)
        return Scope(scope.type, scope.name, actions) if actions else None

    def issue(
        self,
        scopes: Iterable[Scope],
        *,
        user: str | None = None,
        audience: str | None = None,
        expires_in: int | None = None,
    ) -> str:
        """Sign a JWT granting exactly ``scopes`` (no policy check)."""
        now = int(time.time())
        lifetime = self.expires_in if expires_in is None else expires_in
        header: dict[str, Any] = {"typ": "JWT", "alg": "RS256"}
        if self.header_mode == "x5c":
            der = self._cert.public_bytes(serialization.Encoding.DER)
            header["x5c"] = [base64.b64encode(der).decode()]
        else:
            header["kid"] = self.key_id
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": audience or self.service,
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [
                {"type": s.type, "name": s.name, "actions": list(s.actions)} for s in scopes
            ],
        }
        signing_input = f"{_json_b64(header)}.{_json_b64(claims)}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def check_password(self, user: str | None, password: str | None) -> bool:
        """Whether the credentials match a configured user."""
        if user is None or password is None or user not in self.users:
            return False
        return secrets.compare_digest(self.users[user], password)

    def new_refresh_token(self, user: str) -> str:
        """Create a refresh token bound to a user."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh_tokens[token] = user
        return token

    def refresh_token_user(self, token: str) -> str | None:
        """Return the user a refresh token belongs to (None if unknown)."""
        with self._lock:
            return self._refresh_tokens.get(token)


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_TokenHandler):
        token_server = server

    return Handler


class _TokenHandler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"
    server_version = "mirrorrouter-test-tokenserver/1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr log; requests are recorded in ``.requests``."""

    def do_GET(self) -> None:
        """Docker token protocol: scopes in the query, optional HTTP Basic credentials."""
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        if self._refused(url.path):
            return
        scopes = self._parse_scopes(s for value in query.get("scope", []) for s in value.split())
        service = _first(query.get("service"))
        basic = self._basic_credentials()
        offered_user = basic[0] if basic else None
        user: str | None = None
        if basic is not None:
            user = basic[0] if self.token_server.check_password(*basic) else None
            if user is None:
                self._reject(url.path, service, scopes, offered_user, None)
                return
        offline = _first(query.get("offline_token")) == "true"
        self._issue(url.path, service, scopes, offered_user, user, None, offline)

    def do_POST(self) -> None:
        """OAuth2 form: ``grant_type=password`` or ``refresh_token``."""
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        form = parse_qs(body, keep_blank_values=True)
        if self._refused(url.path):
            return
        grant_type = _first(form.get("grant_type"))
        service = _first(form.get("service"))
        scopes = self._parse_scopes(s for value in form.get("scope", []) for s in value.split())
        offered_user: str | None = None
        user: str | None = None
        if grant_type == "password":
            offered_user = _first(form.get("username"))
            password = _first(form.get("password"))
            basic = self._basic_credentials()
            if offered_user is None and basic is not None:
                offered_user, password = basic
            if not self.token_server.check_password(offered_user, password):
                self._reject(url.path, service, scopes, offered_user, grant_type)
                return
            user = offered_user
        elif grant_type == "refresh_token":
            user = self.token_server.refresh_token_user(_first(form.get("refresh_token")) or "")
            offered_user = user
            if user is None:
                self._reject(url.path, service, scopes, None, grant_type)
                return
        else:
            self._record(url.path, service, scopes, None, None, grant_type, 400)
            self._send_json(400, {"error": "unsupported_grant_type"})
            return
        offline = _first(form.get("access_type")) == "offline" or grant_type == "password"
        self._issue(url.path, service, scopes, offered_user, user, grant_type, offline)

    # -- helpers -------------------------------------------------------------------------

    def _refused(self, path: str) -> bool:
        """Answer unknown paths with 404 and everything during an outage with its status."""
        if path != "/token":
            self._send_json(404, {"errors": [{"code": "NOT_FOUND", "message": "no such path"}]})
            return True
        status = self.token_server.outage_status
        if status is None:
            return False
        self._record(path, None, (), None, None, None, status)
        self._send_json(status, {"error": "outage"})
        return True

    def _parse_scopes(self, raw: Iterable[str]) -> tuple[Scope, ...]:
        scopes: list[Scope] = []
        for text in raw:
            try:
                scopes.append(Scope.parse(text))
            except ValueError:
                continue
        return tuple(scopes)

    def _basic_credentials(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return (user, password) if sep else None

    def _issue(
        self,
        path: str,
        service: str | None,
        scopes: tuple[Scope, ...],
        offered_user: str | None,
        user: str | None,
        grant_type: str | None,
        offline: bool,
    ) -> None:
        ts = self.token_server
        granted = tuple(g for s in scopes if (g := ts.grant(s, user)) is not None)
        token = ts.issue(granted, user=user, audience=service)
        payload: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": ts.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        if offline and user is not None:
            payload["refresh_token"] = ts.new_refresh_token(user)
        self._record(path, service, scopes, offered_user, user, grant_type, 200, granted)
        self._send_json(200, payload)

    def _reject(
        self,
        path: str,
        service: str | None,
        scopes: tuple[Scope, ...],
        offered_user: str | None,
        grant_type: str | None,
    ) -> None:
        self._record(path, service, scopes, offered_user, None, grant_type, 401)
        self._send_json(
            401,
            {"details": "incorrect username or password"},
            extra_headers={"WWW-Authenticate": 'Basic realm="token"'},
        )

    def _record(
        self,
        path: str,
        service: str | None,
        scopes: tuple[Scope, ...],
        offered_user: str | None,
        user: str | None,
        grant_type: str | None,
        status: int,
        granted: tuple[Scope, ...] = (),
    ) -> None:
        self.token_server._record(
            TokenRequest(
                method=self.command,
                path=self.path,
                service=service,
                scopes=scopes,
                offered_user=offered_user,
                user=user,
                grant_type=grant_type,
                status=status,
                granted=granted,
                headers=dict(self.headers.items()),
            )
        )

    def _send_json(
        self, status: int, payload: Any, extra_headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None
