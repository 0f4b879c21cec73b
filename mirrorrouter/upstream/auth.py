"""Upstream authentication: Basic and the registry Bearer token flow, as an ``httpx.Auth``.

The flow reads like the spec::

    send the request (with a cached token for its scope, if one is known)
    401 + WWW-Authenticate: Bearer realm=..,service=..,scope=..
      -> GET <realm>?service=..&scope=..   (Basic with the upstream's credentials, if any)
         (a realm that refuses GET gets the OAuth2 POST form)
      -> {"token" | "access_token", "expires_in" (60 when absent), "issued_at"}
      -> send the request again with "Authorization: Bearer <token>"
    401 + WWW-Authenticate: Basic -> send again with the credentials

One ``RegistryAuth`` belongs to one upstream: its credentials go only to that upstream's
mirrors and to the token realm they name. ``sending.Sender`` drives this flow only for
requests to the mirror's own origin; redirects are followed outside it, so a CDN's 401
never reaches it. Token answers are read within ``MAX_TOKEN_BYTES``.
Tokens are cached per (realm, service, scope) until shortly before they expire.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import httpx
from cachetools import TLRUCache

from mirrorrouter.config import Credentials
from mirrorrouter.upstream.bodies import BodyRefused, read_capped

DEFAULT_TOKEN_LIFETIME = 60.0
MAX_TOKEN_BYTES = 1024 * 1024  # a JWT is a few KiB; a realm sending more is refused
CLIENT_ID = "mirrorrouter"


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge of a WWW-Authenticate header."""

    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?=\s|$|,)")
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*')


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Parse WWW-Authenticate values; several challenges, quoted commas and escapes are fine."""
    challenges: list[Challenge] = []
    for header in headers:
        pos = 0
        while pos < len(header):
            if header[pos] in " ,":
                pos += 1
                continue
            scheme = _SCHEME_RE.match(header, pos)
            if scheme is None:
                break  # garbage: keep what was parsed
            pos = scheme.end()
            params: dict[str, str] = {}
            while True:
                param = _PARAM_RE.match(header, pos)
                if param is None:
                    break
                value = param.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[param.group(1).lower()] = value
                pos = param.end()
                if pos < len(header) and header[pos] == ",":
                    pos += 1
            challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


_SCOPE_PATH_RE = re.compile(r"/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")


def pull_scope(path: str) -> str | None:
    """The pull scope of a distribution API path: ``repository:<name>:pull``."""
    match = _SCOPE_PATH_RE.search(path)
    return f"repository:{match.group(1)}:pull" if match else None


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    lifetime: float


class RegistryAuth(httpx.Auth):
    """Basic and Bearer authentication for one upstream, with a token cache."""

    def __init__(
        self,
        credentials: Credentials | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tokens: int = 4096,
    ) -> None:
        self._credentials = credentials
        # Expire each token a little before the registry does (10%, at least 5 s).
        self._tokens: TLRUCache[tuple[str, str, str], _Token] = TLRUCache(
            maxsize=max_tokens,
            ttu=lambda _key, token, now: now + token.lifetime - max(5.0, token.lifetime / 10),
            timer=clock,
        )
        # The last challenge seen per host, so later requests carry a token at once
        # instead of paying a 401 round trip each.
        self._challenges: dict[str, Challenge] = {}
        self.token_requests = 0

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        host = request.url.netloc.decode()
        scope = pull_scope(request.url.path)
        known = self._challenges.get(host)
        if known is not None:
            self._authorize(request, known, scope)
        response = yield request
        if response.status_code != 401:
            return
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            self._challenges[host] = bearer
            scope = bearer.params.get("scope") or scope
            key = (bearer.realm, bearer.params.get("service", ""), scope or "")
            self._tokens.pop(key, None)  # it was refused (expired, or insufficient_scope)
            token: _Token | None = None
            token_request = self._token_request(bearer, scope, request.url.scheme)
            if token_request is not None:
                self.token_requests += 1
                token_response = yield token_request
                if token_response.status_code in (404, 405) and self._credentials is not None:
                    # Some realms only speak the OAuth2 form (RFC 6749 password grant).
                    self.token_requests += 1
                    token_response = yield self._oauth_request(bearer, scope)
                token = await _read_token(token_response)
            if token is not None:
                self._tokens[key] = token
                request.headers["Authorization"] = f"Bearer {token.value}"
            # Without a token the request is sent once more as it was, so that the caller
            # sees the registry's own 401 rather than the token realm's answer.
            yield request
        elif basic is not None and self._credentials is not None:
            if "authorization" in request.headers:
                return  # these credentials were refused already
            self._challenges[host] = basic
            request.headers["Authorization"] = self._basic_header()
            yield request

    def _authorize(self, request: httpx.Request, challenge: Challenge, scope: str | None) -> None:
        if challenge.scheme == "basic" and self._credentials is not None:
            request.headers["Authorization"] = self._basic_header()
        elif challenge.scheme == "bearer":
            key = (challenge.realm, challenge.params.get("service", ""), scope or "")
            token = self._tokens.get(key)
            if token is not None:
                request.headers["Authorization"] = f"Bearer {token.value}"

    def _basic_header(self) -> str:
        assert self._credentials is not None
        pair = f"{self._credentials.username}:{self._credentials.password.value}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def _token_request(
        self, challenge: Challenge, scope: str | None, scheme: str
    ) -> httpx.Request | None:
        realm = httpx.URL(challenge.realm)
        if realm.scheme not in ("https", scheme):
            return None  # never send credentials to a plain-http realm of an https upstream
        headers = {}
        if self._credentials is not None:
            headers["Authorization"] = self._basic_header()
        return httpx.Request("GET", realm, params=_token_params(challenge, scope), headers=headers)

    def _oauth_request(self, challenge: Challenge, scope: str | None) -> httpx.Request:
        assert self._credentials is not None
        form = {
            **_token_params(challenge, scope),
            "grant_type": "password",
            "username": self._credentials.username,
            "password": self._credentials.password.value,
            "client_id": CLIENT_ID,
        }
        return httpx.Request("POST", challenge.realm, data=form)


def _token_params(challenge: Challenge, scope: str | None) -> dict[str, str]:
    params = {"service": challenge.params.get("service", "")}
    if scope:
        params["scope"] = scope
    return params


async def _read_token(response: httpx.Response) -> _Token | None:
    if response.status_code != 200:
        return None
    try:
        data = json.loads(await read_capped(response, MAX_TOKEN_BYTES))
        value = data.get("token") or data.get("access_token")
        lifetime = float(data.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
    except (ValueError, AttributeError, TypeError, BodyRefused):
        return None
    if not isinstance(value, str) or not value:
        return None
    return _Token(value, max(lifetime, 1.0))
