"""HTTP endpoints of the distribution API: parse once, route, dispatch by request kind."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx
import jwt
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Scope

from mirrorrouter import logs
from mirrorrouter.access import AccessPolicy
from mirrorrouter.audit import AuditLog
from mirrorrouter.cache.base import CacheUnavailable
from mirrorrouter.calls import Call
from mirrorrouter.clientauth import Authenticator, Identity, NotCached
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.config.model import GroupSettings, HostedSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.eviction import Evictor
from mirrorrouter.groups import Answer, GroupApi
from mirrorrouter.headers import challenge, parse_host
from mirrorrouter.hostedapi import HOSTED, HostedApi, index_response, tag_page
from mirrorrouter.manifests import OCI_INDEX
from mirrorrouter.mapping import Mapper, Resolution, RouteKind
from mirrorrouter.metrics import Metrics, Pull
from mirrorrouter.monitor import Monitor
from mirrorrouter.oci import (
    API_VERSION,
    API_VERSION_HEADER,
    CONTENT_DIGEST_HEADER,
    FILTERS_APPLIED_HEADER,
    NAMESPACE_HEADER,
    OciRequest,
    RequestKind,
    parse_request,
)
from mirrorrouter.pullthrough import BlobAnswer, CacheStatus, ManifestAnswer, Memory, Pullthrough
from mirrorrouter.responses import BlobResponse, RawResponse, parse_range
from mirrorrouter.shadowing import Shadowing
from mirrorrouter.timing import REAL_TIME, Timing

CACHE_HEADER = "X-Cache"
UPSTREAM_HEADER = "X-Upstream"

# The answer to a request whose body ended early (499: nginx's "client closed request"),
# rendered only for the access log: the client is gone.
ClientGone = RegistryError(
    ErrorCode.SIZE_INVALID, "the request body ended before its Content-Length", status=499
)


def answer_status(exc: Exception) -> int:
    """The status app.py's handlers answer ``exc`` with (for the access line)."""
    if isinstance(exc, RegistryError):
        return exc.status
    if isinstance(exc, ClientDisconnect):
        return ClientGone.status
    if isinstance(exc, CacheUnavailable):
        return ErrorCode.UNAVAILABLE.status
    return ErrorCode.UNKNOWN.status


def parse_scope(scope: Scope) -> OciRequest:
    """The one parse of an ASGI request into an ``OciRequest`` (both the fast path and the
    Starlette handlers use it)."""
    host: str | None = None
    range_header = ""
    accept: list[str] = []
    for name, value in scope["headers"]:
        if name == b"host":
            if host is not None:  # RFC 9110 7.2: a request with two is answered 400
                raise RegistryError(ErrorCode.NAME_INVALID, "more than one Host header")
            host = value.decode("latin-1")
        elif name == b"accept":
            accept.append(value.decode("latin-1"))
        elif name == b"range":
            range_header = value.decode("latin-1")
    query = scope.get("query_string", b"")
    return parse_request(
        scope["method"],
        scope["path"],
        query=parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else (),
        host=host or "",
        range_header=range_header or None,
        accept=accept,
    )


class Endpoints:
    """The request handlers, bound to one configuration."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timing: Timing = REAL_TIME,
    ) -> None:
        self.settings = settings
        self.mapper = Mapper(settings)
        self.metrics = Metrics()
        self.pull = Pullthrough(settings, transport=transport, timing=timing, metrics=self.metrics)
        self.auth = (
            Authenticator(settings.auth, clock=timing.wall, monotonic=timing.monotonic)
            if settings.auth
            else None
        )
        self.access = AccessPolicy(settings)
        self.audit = AuditLog(settings.audit.file)
        # The evictor keeps the injected clocks but waits on the real sleep: its interval is
        # a background cadence, and tests inject a sleep that returns at once (for retries).
        self.evictor = Evictor(settings, timing=replace(timing, sleep=asyncio.sleep))
        self.pull.filler.on_commit = self.evictor.committed
        self.shadowing = Shadowing(settings, self.access, self.pull, clock=timing.monotonic)
        self.hosted = HostedApi(
            settings,
            clock=timing.wall,
            coordinator=self.pull.coordinator,
            shadowing=self.shadowing,
            metrics=self.metrics,
        )
        self.groups = GroupApi(self.mapper, self.access, self._serve)
        self.monitor = Monitor(settings, self.pull, self.metrics, self.access, self.hosted.gc)

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.pull.start()
        await self.hosted.start()
        self.evictor.start()  # a round now, then one a minute, and when a commit crosses a limit
        try:
            yield
        finally:
            await self.evictor.stop()
            await self.pull.close()
            await self.hosted.close()
            self.audit.close()
            if self.auth is not None:
                self.auth.close()

    def _admit(
        self, scope: Scope, oci: OciRequest, resolution: Resolution, identity: Identity | None
    ) -> Call:
        """May they? The one check both the fast and the full path make."""
        self.access.check(identity, resolution, push=oci.is_write)
        return Call(oci, resolution, identity, client_address(scope), scope)

    def fast_manifest(self, scope: Scope) -> RawResponse | None:
        """A manifest GET/HEAD answered from memory before any framework code runs, or None
        (then the full path handles the request, errors included).

        Memory answers only what it knows for certain, by the same rules the full path
        follows: an upstream's linked digest or tag within its TTL, a hosted set's manifest
        at its current generation, and for a group the first member that has it, each
        member before it known not to (groups.py, ``memory_manifest``)."""
        started = time.perf_counter()
        try:
            oci = parse_scope(scope)
            if oci.kind is not RequestKind.MANIFEST:
                return None
            resolution = self.mapper.resolve(oci)
            # A password that is not among the pairs proven good needs a bcrypt check: that
            # never runs here, on the event loop; the full path does it in its own threads.
            authorization = _header(scope, b"authorization")
            identity = self.auth.cached_identity(authorization) if self.auth else None
            call = self._admit(scope, oci, resolution, identity)
            if isinstance(resolution.target, GroupSettings):
                found = self.groups.memory_manifest(call, self._remembered)
            else:
                answer = self._remembered(resolution, oci.accept)
                found = None if answer is None or answer is Memory.MISSING else (call, answer)
        except (RegistryError, NotCached):
            return None
        if found is None:
            return None
        member, answer = found
        response = self._manifest_response(member, answer)
        self._count(oci, resolution, response.status_code)
        self._log_access(
            scope,
            response.status_code,
            started,
            call.identity,
            call.resolution,
            cache=answer.cache,
            size=len(response.body),
        )
        return response

    def _remembered(
        self, resolution: Resolution, accept: tuple[str, ...]
    ) -> ManifestAnswer | Literal[Memory.MISSING] | None:
        """What memory alone says of an upstream's or a hosted set's manifest (None: the full
        path must decide)."""
        target, ref = resolution.target, resolution.reference
        if isinstance(target, HostedSettings):
            return self.hosted.memory_manifest(target, ref, accept)
        assert isinstance(target, UpstreamSettings)
        return self.pull.remembered(target, ref, accept)

    async def dispatch(self, request: Request) -> Response | ASGIApp:
        """Parse, route, identify, admit and serve one distribution API request; every
        answer, refusals before routing included, gets an access line."""
        scope = request.scope
        started = time.perf_counter()
        oci: OciRequest | None = None
        resolution: Resolution | None = None
        identity: Identity | None = None
        status, size, logged_later = 500, 0, False
        try:
            oci = parse_scope(scope)
            if oci.kind is not RequestKind.BASE:
                resolution = self.mapper.resolve(oci)
            try:
                identity = await self.identify(scope)
                if resolution is None:
                    response: Answer = self.base(scope, oci, identity)
                else:
                    call = self._admit(scope, oci, resolution, identity)
                    response = await self._serve(call, request)
            except RegistryError as error:
                raise self._in_context(error, scope, oci, resolution) from error
            status = response.status_code
            if isinstance(response, BlobResponse):
                logged_later = True  # when its body has been sent (BlobResponse.on_sent)
            else:
                size = len(response.body)
            return response
        except Exception as exc:
            status = answer_status(exc)
            raise
        finally:
            if oci is not None and resolution is not None:
                self._count(oci, resolution, status)
            if not logged_later:
                self._log_access(scope, status, started, identity, resolution, size=size)

    def _count(self, oci: OciRequest, resolution: Resolution, status: int) -> None:
        route = resolution.route.label if resolution.route else resolution.via.value
        self.metrics.request(route, resolution.target.name, oci.method, status)

    def _in_context(
        self, error: RegistryError, scope: Scope, oci: OciRequest, resolution: Resolution | None
    ) -> RegistryError:
        """``error`` saying which route was taken (so an operator can see why), with the
        challenge a 401 needs."""
        if resolution is None:  # /v2/ itself
            route, headers, name = "base", {}, ""
        else:
            route, headers, name = (
                resolution.describe,
                self._common_headers(oci, resolution),
                oci.name,
            )
        if error.code is ErrorCode.UNAUTHORIZED:
            headers["WWW-Authenticate"] = self._challenge(scope, name, push=oci.is_write)
        return error.with_context(route, headers)

    async def _serve(self, call: Call, request: Request) -> Answer:
        """Answer an admitted call from its target: an upstream, a hosted set or a group."""
        oci, target = call.oci, call.resolution.target
        if isinstance(target, GroupSettings):
            return await self.groups.serve(call, request)
        hosted = target if isinstance(target, HostedSettings) else None
        ref = call.resolution.reference
        if oci.is_write:
            assert hosted is not None  # access.check refuses pushes to anything else
            mount_from = self._mount_from(call)
            return await self.hosted.write(hosted, ref, oci, request, mount_from, call.identity)
        if oci.method not in ("GET", "HEAD"):
            raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.method} is not supported here")
        if oci.kind is RequestKind.MANIFEST:
            if hosted is None:
                return await self.manifest(call)
            stored = await self.hosted.manifest(hosted, ref, oci.accept)
            return self._manifest_response(call, ManifestAnswer(stored, HOSTED, hosted.name))
        if oci.kind is RequestKind.BLOB:
            if hosted is None:
                return await self.blob(call)
            blob = await self.hosted.blob(hosted, ref)
            answer = BlobAnswer(blob.size, HOSTED, hosted.name, blob.stream, file=blob.file)
            return self._blob_response(call, answer)
        if oci.kind is RequestKind.TAGS:
            if hosted is None:
                return await self.tags(call)
            return tag_page(oci.name, await self.hosted.tags(hosted, ref), oci)
        if oci.kind is RequestKind.REFERRERS:
            if hosted is None:
                return await self.referrers(call)
            artifact_type = oci.query_value("artifactType")
            body = await self.hosted.referrers(hosted, ref, artifact_type)
            return index_response(body, oci, bool(artifact_type))
        raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.kind.value} is not supported")

    def _mount_from(self, call: Call) -> str | None:
        """The repository of the same hosted set a ``?mount=&from=`` names, routed the way
        the request itself was; None when it names none there that this client may pull."""
        source = call.oci.query_value("from")
        if not source or not call.oci.query_value("mount"):
            return None
        hosted = call.resolution.target
        try:
            resolution = self.mapper.resolve(replace(call.oci, name=source, upload_id=None))
            if isinstance(resolution.target, GroupSettings):
                if hosted.name not in resolution.target.members:
                    return None
                resolution = self.mapper.member(resolution, hosted.name)
            if resolution.target != hosted:
                return None
            self.access.check(call.identity, resolution)
        except RegistryError:
            return None
        return resolution.reference.repository

    async def identify(self, scope: Scope) -> Identity | None:
        """Who is asking (None: no credentials, or client authentication is off); wrong
        credentials raise ``UNAUTHORIZED``, failed logins back off (passwords.py)."""
        if self.auth is None:
            return None
        return await self.auth.identify(_header(scope, b"authorization"), client_ip(scope))

    def base(self, scope: Scope, oci: OciRequest, identity: Identity | None) -> Response:
        if oci.method not in ("GET", "HEAD"):
            raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.method} /v2/ is not supported")
        if self.auth is not None and identity is None:
            # Clients log in (and get anonymous tokens) from the challenge on /v2/.
            raise self.auth.unauthorized("authentication required")
        return Response(
            b"{}", 200, {API_VERSION_HEADER: API_VERSION}, media_type="application/json"
        )

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
            self._log_access(request.scope, status, started, identity, None, size=size)

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

    def _challenge(self, scope: Scope, name: str, *, push: bool = False) -> str:
        assert self.auth is not None
        realm = self.auth.settings.realm
        if realm is None:
            realm = f"{scope.get('scheme', 'http')}://{_authority(scope)}/auth/token"
        actions = "pull,push" if push else "pull"
        return self.auth.challenge(realm, f"repository:{name}:{actions}" if name else None)

    async def manifest(self, call: Call) -> RawResponse:
        reference = call.resolution.reference
        answer = await self.pull.manifest_for_client(
            call.resolution.upstream, reference, call.oci.accept
        )
        return self._manifest_response(call, answer)

    def _manifest_response(self, call: Call, answer: ManifestAnswer) -> RawResponse:
        manifest = answer.manifest
        headers = {
            **self._common_headers(call.oci, call.resolution),
            "content-type": manifest.media_type,
            "content-length": str(len(manifest.data)),
            CONTENT_DIGEST_HEADER: str(manifest.digest),
            CACHE_HEADER: answer.cache,
        }
        raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
        if answer.cache != HOSTED:
            self.metrics.cache_result(answer.upstream, "manifest", answer.cache)
        if call.oci.method == "HEAD":
            return RawResponse(200, raw, b"")
        self._record_pull(
            call, str(manifest.digest), answer.mirror, answer.cache, len(manifest.data)
        )
        return RawResponse(200, raw, manifest.data)

    async def blob(self, call: Call) -> BlobResponse | Response:
        digest = call.resolution.reference.digest
        assert digest is not None
        upstream, repository = call.resolution.upstream, call.resolution.reference.repository
        get = call.oci.method == "GET"
        answer = await self.pull.blob(upstream, repository, digest, body=get)
        if answer.cache == CacheStatus.HIT and get:
            url = await self.pull.blob_redirect(upstream, digest)
            if url is not None:
                self.metrics.cache_result(upstream.name, "blob", answer.cache)
                self._record_pull(call, str(digest), None, answer.cache, 0)
                headers = {
                    **self._common_headers(call.oci, call.resolution),
                    CONTENT_DIGEST_HEADER: str(digest),
                    CACHE_HEADER: answer.cache,
                    "Location": url,
                }
                return Response(b"", 307, headers)
        return self._blob_response(call, answer)

    def _blob_response(self, call: Call, answer: BlobAnswer) -> BlobResponse:
        digest = call.resolution.reference.digest
        upstream = answer.upstream
        headers = {
            **self._common_headers(call.oci, call.resolution),
            "Content-Type": "application/octet-stream",
            CONTENT_DIGEST_HEADER: str(digest),
            CACHE_HEADER: answer.cache,
        }

        if answer.cache != HOSTED:
            self.metrics.cache_result(upstream, "blob", answer.cache)

        started = time.perf_counter()
        byte_range = parse_range(call.oci.range, answer.size)
        status = 206 if byte_range else 200

        def sent(count: int) -> None:
            if answer.cache == CacheStatus.HIT:
                self.metrics.served_from_cache(upstream, count)
            if call.oci.method == "GET":
                self._record_pull(call, str(digest), answer.mirror, answer.cache, count)
            self._log_access(
                call.scope,
                status,
                started,
                call.identity,
                call.resolution,
                cache=answer.cache,
                mirror=answer.mirror,
                size=count,
            )

        return BlobResponse(
            answer.stream,
            size=answer.size,
            byte_range=byte_range,
            headers=headers,
            head=call.oci.method == "HEAD",
            on_sent=sent,
            file=answer.file,
        )

    def _record_pull(
        self, call: Call, digest: str, mirror: str | None, cache: str, size: int
    ) -> None:
        """A manifest or blob GET answered: the audit log and the status page's recent pulls."""
        user = call.identity.name if call.identity else "anonymous"
        reference = str(call.resolution.reference)
        upstream = call.resolution.target.name
        self.metrics.pulled(
            Pull(time.time(), user, reference, digest, upstream, cache, size, call.resolution)
        )
        if not self.audit.enabled:
            return
        self.audit.record(
            client=call.client,
            user=user,
            reference=reference,
            digest=digest,
            upstream=upstream,
            mirror=mirror,
            cache=cache,
            bytes=size,
        )

    async def tags(self, call: Call) -> Response:
        oci = call.oci
        query = {k: v for k, v in oci.query if k in ("n", "last")}
        repository = call.resolution.reference.repository
        upstream = await self.pull.tags(call.resolution.upstream, repository, query)
        headers = {**self._common_headers(oci, call.resolution), CACHE_HEADER: "MISS"}
        link = upstream.headers.get("link")
        if link:
            headers["Link"] = client_link(link, oci)
        body = b"" if oci.method == "HEAD" else upstream.data
        return Response(body, 200, headers, media_type="application/json")

    async def referrers(self, call: Call) -> Response:
        oci = call.oci
        artifact_type = oci.query_value("artifactType")
        body, filtered = await self.pull.referrers(
            call.resolution.upstream, call.resolution.reference, artifact_type
        )
        headers = {**self._common_headers(oci, call.resolution), "Content-Type": OCI_INDEX}
        if filtered:
            headers[FILTERS_APPLIED_HEADER] = "artifactType"
        return Response(b"" if oci.method == "HEAD" else body, 200, headers)

    def _common_headers(self, oci: OciRequest, resolution: Resolution) -> dict[str, str]:
        headers = {API_VERSION_HEADER: API_VERSION, UPSTREAM_HEADER: resolution.target.name}
        if resolution.via is RouteKind.NAMESPACE and oci.ns:
            headers[NAMESPACE_HEADER] = oci.ns
        return headers

    def _log_access(
        self,
        scope: Scope | None,
        status: int,
        started: float,
        identity: Identity | None,
        resolution: Resolution | None,
        *,
        cache: str | None = None,
        mirror: str | None = None,
        size: int = 0,
    ) -> None:
        """One structured access line, when ``server.access_log`` is on: always the client
        address and the user (``anonymous`` when none was established)."""
        if not self.settings.server.access_log or scope is None:
            return
        query = scope.get("query_string", b"")
        path = scope["path"] + ("?" + query.decode("latin-1") if query else "")
        route = upstream = None
        if resolution is not None:
            route = resolution.route.label if resolution.route else resolution.via.value
            upstream = resolution.target.name
        logs.access(
            scope["method"],
            path,
            status,
            request_id=secrets.token_hex(8),
            client=client_address(scope) or None,
            user=identity.name if identity else "anonymous",
            route=route,
            upstream=upstream,
            mirror=mirror,
            cache=cache,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            bytes=size,
        )


def client_ip(scope: Scope) -> str:
    """The client's IP address (failed logins back off by it); "" when the server has none."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def client_address(scope: Scope) -> str:
    """``ip:port`` of the client ("" when the server does not say)."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


def _authority(scope: Scope) -> str:
    """The request's validated ``host[:port]`` (``parse_scope`` refused any other), for
    URLs that send the client back here."""
    try:
        return str(parse_host(_header(scope, b"host") or ""))
    except ValueError:
        return "localhost"


def _token_subject(answer: dict[str, object]) -> str | None:
    """The user a token the realm just issued names (None: anonymous)."""
    claims = jwt.decode(str(answer["token"]), options={"verify_signature": False})
    return str(claims.get("sub") or "") or None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def client_link(link: str, oci: OciRequest) -> str:
    """Rewrite an upstream ``Link: </v2/<upstream name>/tags/list?..>`` to the client's name.

    The client must be able to follow it through the same route: same prefix, same name,
    same ``ns``.
    """
    target, _, rest = link.partition(">")
    query = dict(parse_qsl(target.lstrip(" <").partition("?")[2]))
    return f"<{oci.client_url('tags/list', query)}>{rest}"
