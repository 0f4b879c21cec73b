"""HTTP endpoints of the distribution API: parse once, route, identify, admit, ask the target
(an upstream, a hosted set, or a group's members) and answer.

Every request is parsed once (``calls.parse_scope``), routed by the mapper, identified
(``login.py``) and admitted by the one access check; then ``Targets`` (or ``GroupApi`` for
a group) answers it in typed values, which ``Renderer`` writes. Every answer, refusals
before routing included, gets an access line.
"""

from __future__ import annotations

import time
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

from mirrorrouter.access.clientauth import Identity, NotCached
from mirrorrouter.access.policy import AccessPolicy
from mirrorrouter.api.accesslog import AccessLog
from mirrorrouter.api.calls import Call, client_address, parse_scope
from mirrorrouter.api.failures import answer_status
from mirrorrouter.api.groups import GroupApi
from mirrorrouter.api.login import Logins
from mirrorrouter.api.rendering import Answer, Renderer, common_headers
from mirrorrouter.api.responses import BlobResponse, RawResponse
from mirrorrouter.api.targets import Targets
from mirrorrouter.config.model import GroupSettings, HostedSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.api import HostedApi
from mirrorrouter.mapping import Mapper, Resolution
from mirrorrouter.metrics import Metrics
from mirrorrouter.oci import API_VERSION, API_VERSION_HEADER, OciRequest, RequestKind
from mirrorrouter.served import Memory


class Endpoints:
    """The request handlers of the distribution API."""

    def __init__(
        self,
        *,
        mapper: Mapper,
        metrics: Metrics,
        access: AccessPolicy,
        logins: Logins,
        targets: Targets,
        groups: GroupApi,
        pushes: HostedApi,
        renderer: Renderer,
        access_log: AccessLog,
    ) -> None:
        """Everything comes built (app.py builds the object graph once)."""
        self.mapper = mapper
        self.metrics = metrics
        self.access = access
        self.logins = logins
        self.targets = targets
        self.groups = groups
        self.pushes = pushes
        self.render = renderer
        self.access_log = access_log

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
            identity = self.logins.cached_identity(scope)
            call = self._admit(scope, oci, resolution, identity)
            if isinstance(resolution.target, GroupSettings):
                found = self.groups.memory_manifest(call)
            else:
                answer = self.targets.remembered(resolution, oci.accept)
                found = None if answer is None or answer is Memory.MISSING else (call, answer)
        except (RegistryError, NotCached):
            return None
        if found is None:
            return None
        member, answer = found
        response = self.render.manifest(member, answer)
        self._count(oci, resolution, response.status_code)
        self.access_log.line(
            scope,
            response.status_code,
            started,
            call.identity,
            call.resolution,
            cache=answer.cache,
            size=len(response.body),
        )
        return response

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
                identity = await self.logins.identify(scope)
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
                self.access_log.line(scope, status, started, identity, resolution, size=size)

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
                common_headers(oci, resolution),
                oci.name,
            )
        if error.code is ErrorCode.UNAUTHORIZED:
            headers["WWW-Authenticate"] = self.logins.challenge(scope, name, push=oci.is_write)
        return error.with_context(route, headers)

    async def _serve(self, call: Call, request: Request) -> Answer:
        """Answer an admitted call from its target: an upstream, a hosted set, or a group's
        members (each asked the same typed way)."""
        oci = call.oci
        group = isinstance(call.resolution.target, GroupSettings)
        if oci.is_write:
            return await self._push(self.groups.writer(call) if group else call, request)
        if oci.kind is RequestKind.MANIFEST:
            if group:
                member, manifest = await self.groups.manifest(call)
                return self.render.manifest(member, manifest)
            return self.render.manifest(call, await self.targets.manifest(call))
        if oci.kind is RequestKind.BLOB:
            if group:
                member, blob = await self.groups.blob(call)
                return self.render.blob(member, blob)
            return self.render.blob(call, await self.targets.blob(call))
        if oci.kind is RequestKind.TAGS:
            tags = await (self.groups.tags(call) if group else self.targets.tags(call))
            return self.render.tags(call, tags)
        if oci.kind is RequestKind.REFERRERS:
            ask = self.groups.referrers if group else self.targets.referrers
            return self.render.referrers(call, await ask(call))
        raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.kind.value} is not supported")

    async def _push(self, call: Call, request: Request) -> Response:
        """A push (uploads, manifest PUT, DELETE) to the hosted set the call resolved to."""
        hosted = call.resolution.target
        assert isinstance(hosted, HostedSettings)  # access.check refuses pushes elsewhere
        mount_from = self._mount_from(call)
        ref = call.resolution.reference
        return await self.pushes.write(hosted, ref, call.oci, request, mount_from, call.identity)

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

    def base(self, scope: Scope, oci: OciRequest, identity: Identity | None) -> Response:
        if oci.method not in ("GET", "HEAD"):
            raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.method} /v2/ is not supported")
        if self.logins.auth is not None and identity is None:
            # Clients log in (and get anonymous tokens) from the challenge on /v2/.
            raise self.logins.auth.unauthorized("authentication required")
        return Response(
            b"{}", 200, {API_VERSION_HEADER: API_VERSION}, media_type="application/json"
        )
