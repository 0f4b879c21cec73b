"""Client authentication: who is asking, the way ``docker login`` expects a registry to work.

- Users and passwords come from an htpasswd file (bcrypt entries, as ``htpasswd -B`` writes
  them), verified with the ``bcrypt`` library off the event loop, with a back-off of failed
  logins (passwords.py); the file is re-read when it changes. A pair proven good is
  remembered for a minute, so Basic on every request costs a hash, never a bcrypt check.
- The gateway is its own token realm: ``GET /auth/token`` (HTTP Basic, or none for an
  anonymous token) and the OAuth2 ``POST`` form (password and refresh-token grants) answer
  ``{"token", "access_token", "expires_in", "issued_at"}``. Tokens are JWTs (PyJWT, HS256)
  signed with a secret shared by every worker through ``auth.secret_file``.
- API requests carry ``Authorization: Bearer <token>`` (or Basic, for curl). A request
  without credentials is anonymous; wrong credentials are refused (401), never downgraded.

What a user may pull is decided in policy.py. Passwords and tokens are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt
from cachetools import TTLCache

from mirrorrouter.access.passwords import LoginBackoff, PasswordChecker
from mirrorrouter.config import AuthSettings
from mirrorrouter.errors import ErrorCode, RegistryError

TOKEN_ALGORITHM = "HS256"
REFRESH_TTL = 30 * 86400.0
ANONYMOUS_SUBJECT = ""


@dataclass(frozen=True, slots=True)
class Identity:
    """The client behind a request; ``user`` None means anonymous."""

    user: str | None
    groups: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.user or "anonymous"


ANONYMOUS = Identity(None)


class Authenticator:
    """Verifies credentials and issues and checks tokens for one configuration."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._secret = _load_or_create_secret(settings.secret_file)
        self._users: dict[str, bytes] = {}
        self._users_mtime: float | None = None
        # bcrypt is slow on purpose; remember good pairs briefly (keyed by a hash, never the
        # password) so Basic on every API request stays cheap, and is never throttled.
        self._verified: TTLCache[str, bool] = TTLCache(maxsize=4096, ttl=60, timer=clock)
        self._checker = PasswordChecker()
        self._backoff = LoginBackoff(monotonic)

    def close(self) -> None:
        self._checker.close()

    # ------------------------------------------------------------------ credentials

    def cached_identity(self, authorization: str | None) -> Identity | None:
        """The identity behind an Authorization header without waiting for anything; None
        when the request has none.

        Raises ``NotCached`` for a Basic credential that only a bcrypt check can decide
        (``identify`` decides it), and ``UNAUTHORIZED`` for credentials that are wrong,
        expired or forged.
        """
        if not authorization:
            return None
        scheme, value = self._scheme(authorization)
        if scheme == "bearer":
            return self._token_identity(value)
        user, password = _basic(value)
        if _pair_key(user, password) not in self._verified:
            raise NotCached(user)
        return self._identity(user)

    async def identify(self, authorization: str | None, client: str = "") -> Identity | None:
        """The identity behind an Authorization header, checking a password when it must;
        ``client`` is the client's address, which failed logins back off by."""
        try:
            return self.cached_identity(authorization)
        except NotCached:
            pass
        assert authorization is not None
        user, password = _basic(self._scheme(authorization)[1])
        if not await self.check_password(user, password, client):
            raise self.unauthorized("wrong user name or password")
        return self._identity(user)

    async def check_password(self, user: str, password: str, client: str = "") -> bool:
        """Whether the pair is good: a pair proven good recently is answered at once; any
        other is checked off the event loop, within the back-off of (user, address), or of
        the address alone for a user who does not exist (429 during it)."""
        key = _pair_key(user, password)
        if key in self._verified:
            return True  # never delayed: failures of others cannot lock a real user out
        stored = self._load_users().get(user)
        if stored is None:
            return await self._backoff.guard(("address", client), _wrong)
        good = await self._backoff.guard(
            ("user", user, client), lambda: self._checker.check(password, stored)
        )
        if good and self._users.get(user) == stored:  # the file may have changed meanwhile
            self._verified[key] = True
        return good

    def _scheme(self, authorization: str) -> tuple[str, str]:
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme not in ("bearer", "basic"):
            raise self.unauthorized(f"unsupported authorization scheme {scheme!r}")
        return scheme, value.strip()

    def _identity(self, user: str | None) -> Identity:
        if user is None:
            return ANONYMOUS
        groups = frozenset(g for g, members in self.settings.groups.items() if user in members)
        return Identity(user, groups)

    def _claims(self, token: str) -> dict[str, object]:
        """A token's claims once its signature, audience and expiry check out."""
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                self._secret,
                algorithms=[TOKEN_ALGORITHM],
                audience=self.settings.service,
                # Expiry is checked below against the gateway's clock (tests inject one).
                options={"require": ["exp", "sub"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as exc:
            raise self.unauthorized("the token is not valid here") from exc
        expiry = claims["exp"]
        if not isinstance(expiry, int | float) or expiry <= self.clock():
            raise self.unauthorized("the token has expired; log in again")
        return claims

    def _token_identity(self, token: str) -> Identity:
        claims = self._claims(token)
        if claims.get("typ") == "refresh":
            raise self.unauthorized("a refresh token cannot authorize requests")
        subject = str(claims["sub"])
        if subject and subject not in self._load_users():
            raise self.unauthorized("the token's user no longer exists")
        return self._identity(subject or None)

    # ------------------------------------------------------------------ the token realm

    async def issue(
        self, *, authorization: str | None, form: Mapping[str, str] | None = None, client: str = ""
    ) -> dict[str, object]:
        """The token realm's answer: GET with optional Basic, or the OAuth2 POST form."""
        user: str | None = None
        refresh = False
        if form is not None:
            grant = form.get("grant_type", "")
            if grant == "password":
                user, refresh = form.get("username", ""), True
                if not await self.check_password(user, form.get("password", ""), client):
                    raise self.unauthorized("wrong user name or password")
            elif grant == "refresh_token":
                user, refresh = self._refresh_subject(form.get("refresh_token", "")), True
            else:
                raise RegistryError(
                    ErrorCode.UNSUPPORTED, f"grant_type {grant!r} is not supported", status=400
                )
        else:
            identity = await self.identify(authorization, client)
            user = identity.user if identity is not None else None
        now = self.clock()
        answer: dict[str, object] = {
            "token": self._sign(user, now, self.settings.token_ttl, "access"),
            "expires_in": int(self.settings.token_ttl),
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }
        answer["access_token"] = answer["token"]
        if refresh and user:
            answer["refresh_token"] = self._sign(user, now, REFRESH_TTL, "refresh")
        return answer

    def _refresh_subject(self, token: str) -> str:
        claims = self._claims(token)
        subject = claims.get("sub")
        if claims.get("typ") != "refresh" or not subject or subject not in self._load_users():
            raise self.unauthorized("the refresh token is not valid here")
        return str(subject)

    def _sign(self, user: str | None, now: float, ttl: float, kind: str) -> str:
        claims = {
            "sub": user or ANONYMOUS_SUBJECT,
            "aud": self.settings.service,
            "iat": int(now),
            "exp": int(now + ttl),
            "typ": kind,
            "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._secret, algorithm=TOKEN_ALGORITHM)

    # ------------------------------------------------------------------ challenges

    def challenge(self, realm: str, scope: str | None = None) -> str:
        """The ``WWW-Authenticate`` value that sends a client to the token realm, every
        parameter a quoted string (a value holding ``"`` cannot add a parameter)."""
        from mirrorrouter.headers import challenge

        return challenge("Bearer", realm=realm, service=self.settings.service, scope=scope or None)

    def unauthorized(self, message: str) -> RegistryError:
        # The realm URL depends on the request; endpoints add the WWW-Authenticate header.
        return RegistryError(ErrorCode.UNAUTHORIZED, message)

    # ------------------------------------------------------------------ users

    def _load_users(self) -> dict[str, bytes]:
        path = self.settings.htpasswd
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return self._users  # keep the last good copy while the file is being replaced
        if mtime != self._users_mtime:
            self._users = parse_htpasswd(path.read_text(encoding="utf-8"))
            self._users_mtime = mtime
            self._verified.clear()
        return self._users


class NotCached(Exception):
    """A Basic credential that is not among the pairs proven good recently."""


async def _wrong() -> bool:
    return False  # a user who does not exist: nothing to check


def _pair_key(user: str, password: str) -> str:
    return hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()


def parse_htpasswd(text: str) -> dict[str, bytes]:
    """bcrypt entries of an htpasswd file (``$2y$`` is read as ``$2b$``); others are ignored."""
    users = {}
    for line in text.splitlines():
        user, sep, stored = line.strip().partition(":")
        if not sep or not stored.startswith(("$2y$", "$2b$", "$2a$")):
            continue
        users[user] = ("$2b$" + stored[4:]).encode()
    return users


def _basic(value: str) -> tuple[str, str]:
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise RegistryError(ErrorCode.UNAUTHORIZED, "malformed Basic credentials") from exc
    if not sep:
        raise RegistryError(ErrorCode.UNAUTHORIZED, "malformed Basic credentials")
    return user, password


def _load_or_create_secret(path: Path) -> bytes:
    """The token signing key: read it, or create it once (atomically, mode 0600)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(secrets.token_bytes(32))
    try:
        os.link(temp, path)  # the first worker to get here wins; the others read its key
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return path.read_bytes()
