"""Who is asking, as the gateway's HTTP API sees it: the credentials of a request, the
token realm (``docker login``, ``podman login``, containerd credentials), the challenges
that send a client there, and the login the status page and ``/metrics`` may ask for."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from mirrorrouter.access.clientauth import Authenticator, Identity
from mirrorrouter.access.policy import AccessPolicy
from mirrorrouter.api.accesslog import AccessLog
from mirrorrouter.api.calls import client_ip, header
from mirrorrouter.api.failures import answer_status
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.headers import challenge, parse_host


class Logins:
    """Client logins over HTTP; ``auth`` None: client authentication is off."""

    def __init__(
        self, auth: Authenticator | None, access: AccessPolicy, access_log: AccessLog
    ) -> None:
        self.auth = auth
        self.access = access
        self.access_log = access_log

    async def identify(self, scope: Scope) -> Identity | None:
        """Who is asking (None: no credentials, or client authentication is off); wrong
        credentials raise ``UNAUTHORIZED``, failed logins back off (passwords.py)."""
        if self.auth is None:
            return None
        return await self.auth.identify(header(scope, b"authorization"), client_ip(scope))

    def cached_identity(self, scope: Scope) -> Identity | None:
        """Who is asking, from memory alone (the fast path): a password that is not among
        the pairs proven good needs a bcrypt check, which never runs there, on the event
        loop (raises ``NotCached``)."""
        if self.auth is None:
            return None
        return self.auth.cached_identity(header(scope, b"authorization"))

    async def token(self, request: Request) -> Response:
        """The token realm (``docker login``, ``podman login``, containerd credentials)."""
        if self.auth is None:
            raise RegistryError(ErrorCode.NOT_FOUND, "client authentication is off here")
        started = time.perf_counter()
        status, identity, size = 500, None, 0
        try:
            answer = await self._issue(request, self.auth)
            user = _token_subject(answer)
            identity = Identity(user) if user else None
            response = JSONResponse(answer, headers={"Cache-Control": "no-store"})
            status, size = response.status_code, len(response.body)
            return response
        except Exception as exc:
            status = answer_status(exc)
            raise
        finally:
            self.access_log.line(request.scope, status, started, identity, None, size=size)

    async def _issue(self, request: Request, auth: Authenticator) -> dict[str, object]:
        client = client_ip(request.scope)
        try:
            if request.method == "POST":
                form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
                return await auth.issue(authorization=None, form=form, client=client)
            authorization = request.headers.get("authorization")
            return await auth.issue(authorization=authorization, client=client)
        except RegistryError as error:
            raise error.with_context("token realm", self._login_headers(error)) from error

    async def monitoring_viewer(self, request: Request, surface: str) -> Identity | None:
        """Who reads the status page or /metrics (``surface``), once ``auth.monitoring``
        admits them; 401 with a Basic challenge (a browser's login box, Prometheus'
        ``basic_auth``) for an anonymous client it does not admit, 403 for a user."""
        try:
            identity = await self.identify(request.scope)
            self.access.check_monitoring(identity, surface)
        except RegistryError as error:
            raise error.with_context(surface, self._login_headers(error)) from error
        return identity

    def _login_headers(self, error: RegistryError) -> dict[str, str]:
        """A refused login outside the registry API asks for Basic credentials."""
        if error.code is not ErrorCode.UNAUTHORIZED or self.auth is None:
            return {}
        return {"WWW-Authenticate": challenge("Basic", realm=self.auth.settings.service)}

    def challenge(self, scope: Scope, name: str, *, push: bool = False) -> str:
        """The ``WWW-Authenticate`` of a 401 of the registry API: the token realm (ours,
        at the address the client used, unless ``auth.realm`` names another) and the
        scope the client should ask a token for."""
        assert self.auth is not None
        realm = self.auth.settings.realm
        if realm is None:
            realm = f"{scope.get('scheme', 'http')}://{_authority(scope)}/auth/token"
        actions = "pull,push" if push else "pull"
        return self.auth.challenge(realm, f"repository:{name}:{actions}" if name else None)


def _authority(scope: Scope) -> str:
    """The request's validated ``host[:port]`` (``parse_scope`` refused any other), for
    URLs that send the client back here."""
    try:
        return str(parse_host(header(scope, b"host") or ""))
    except ValueError:
        return "localhost"


def _token_subject(answer: dict[str, object]) -> str | None:
    """The user a token the realm just issued names (None: anonymous)."""
    claims = jwt.decode(str(answer["token"]), options={"verify_signature": False})
    return str(claims.get("sub") or "") or None
