"""The ASGI application: ``create_app(settings)`` builds the gateway's object graph once
(``Services``: every long-lived object, passed to whoever uses it), its routes, its
lifespan, and the one error exit: every exception a request raises reaches the handlers
installed here (api/failures.py), which write the OCI JSON envelope.

Nothing happens at import time; ``app_from_environment`` is the factory uvicorn imports
when it runs several workers (each worker reads the config named by MIRRORROUTER_CONFIG).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mirrorrouter.access.audit import AuditLog
from mirrorrouter.access.clientauth import Authenticator
from mirrorrouter.access.policy import AccessPolicy
from mirrorrouter.api.accesslog import AccessLog
from mirrorrouter.api.endpoints import Endpoints
from mirrorrouter.api.failures import EXCEPTION_HANDLERS
from mirrorrouter.api.groups import GroupApi
from mirrorrouter.api.login import Logins
from mirrorrouter.api.monitor import Monitor
from mirrorrouter.api.peer import peer_blob
from mirrorrouter.api.rendering import Renderer
from mirrorrouter.api.statuspage import render_status
from mirrorrouter.api.targets import Targets
from mirrorrouter.cache import Caches
from mirrorrouter.cache.eviction import Evictor
from mirrorrouter.config import Settings, load_settings
from mirrorrouter.config.discovery import find_config
from mirrorrouter.coordination import Coordinator, open_coordinator
from mirrorrouter.hosted.api import HostedApi
from mirrorrouter.hosted.sets import HostedSets
from mirrorrouter.hosted.shadowing import Shadowing
from mirrorrouter.mapping import Mapper
from mirrorrouter.metrics import Metrics
from mirrorrouter.pull.peers import PEER_PATH
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.timing import REAL_TIME, Timing

log = logging.getLogger("mirrorrouter")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass
class Services:
    """The gateway's long-lived objects, each built once (``build_services``) and passed to
    whoever uses it; the app's lifespan starts and closes them."""

    settings: Settings
    metrics: Metrics
    mapper: Mapper
    caches: Caches
    coordinator: Coordinator
    pull: Pullthrough
    auth: Authenticator | None
    access: AccessPolicy
    audit: AuditLog
    evictor: Evictor
    shadowing: Shadowing
    hosted: HostedSets
    pushes: HostedApi
    monitor: Monitor
    logins: Logins
    targets: Targets
    groups: GroupApi
    endpoints: Endpoints

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start what works in the background, and close everything at the end."""
        await self.pull.start()
        await self.hosted.start()
        self.evictor.start()  # a round now, then one a minute, and when a commit crosses a limit
        try:
            yield
        finally:
            await self.evictor.stop()
            await self.pull.close()
            await self.pushes.close()
            await self.hosted.close()
            await self.caches.close()
            await self.coordinator.close()
            self.audit.close()
            if self.auth is not None:
                self.auth.close()


def build_services(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    timing: Timing = REAL_TIME,
) -> Services:
    """The object graph of one gateway process: every long-lived object, built once."""
    metrics = Metrics()
    mapper = Mapper(settings)
    caches = Caches()
    coordinator = open_coordinator(settings.coordination, clock=timing.monotonic)
    # The evictor keeps the injected clocks but waits on the real sleep: its interval is a
    # background cadence, and tests inject a sleep that returns at once (for retries).
    evictor = Evictor(settings, caches=caches, timing=replace(timing, sleep=asyncio.sleep))
    pull = Pullthrough(
        settings,
        transport=transport,
        timing=timing,
        metrics=metrics,
        coordinator=coordinator,
        caches=caches,
        on_commit=evictor.committed,
    )
    auth = (
        Authenticator(settings.auth, clock=timing.wall, monotonic=timing.monotonic)
        if settings.auth
        else None
    )
    access = AccessPolicy(settings)
    audit = AuditLog(settings.audit.file)
    shadowing = Shadowing(settings, access, pull, clock=timing.monotonic)
    hosted = HostedSets(settings, clock=timing.wall, coordinator=coordinator, metrics=metrics)
    pushes = HostedApi(hosted, coordinator=coordinator, shadowing=shadowing)
    monitor = Monitor(settings, pull, metrics, access, caches, hosted.gc)
    access_log = AccessLog(settings.server.access_log)
    logins = Logins(auth, access, access_log)
    targets = Targets(pull, hosted)
    groups = GroupApi(mapper, access, targets)
    endpoints = Endpoints(
        mapper=mapper,
        metrics=metrics,
        access=access,
        logins=logins,
        targets=targets,
        groups=groups,
        pushes=pushes,
        renderer=Renderer(metrics, audit, access_log),
        access_log=access_log,
    )
    return Services(
        settings,
        metrics,
        mapper,
        caches,
        coordinator,
        pull,
        auth,
        access,
        audit,
        evictor,
        shadowing,
        hosted,
        pushes,
        monitor,
        logins,
        targets,
        groups,
        endpoints,
    )


class Gateway(Starlette):
    """The Starlette app, with the hottest request answered before the middleware stack.

    A manifest that memory can serve (a linked digest, a tag within its TTL) is every pull's
    first request; answering it without routing and middleware layers roughly doubles the
    requests a worker serves. Everything else, errors included, takes the full path.
    """

    def __init__(self, services: Services, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.services = services
        self.endpoints = services.endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            response = self.endpoints.fast_manifest(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    timing: Timing | None = None,
) -> Gateway:
    """Build the gateway application for ``settings``: its object graph (``Services``), its
    routes, the one place errors become answers.

    ``transport`` replaces the network for upstream traffic (tests use httpx.MockTransport
    or an ASGITransport around a fake registry); ``timing`` replaces clocks and sleep.
    """
    services = build_services(settings, transport=transport, timing=timing or REAL_TIME)
    endpoints, logins, monitor = services.endpoints, services.logins, services.monitor

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with services.running():
            yield

    app = Gateway(
        services,
        routes=[
            Route("/auth/token", logins.token, methods=["GET", "POST"]),
            Route("/metrics", _metrics(logins, monitor), methods=["GET"]),
            Route("/healthz", _healthz, methods=["GET", "HEAD"]),
            Route("/readyz", _readyz(monitor), methods=["GET", "HEAD"]),
            Route("/_/", _status(logins, monitor), methods=["GET", "HEAD"]),
            Route("/", _to_status, methods=["GET", "HEAD"]),
            Route(PEER_PATH, _peer(services.pull), methods=["GET"]),
            Route("/{path:path}", endpoints.dispatch, methods=ALL_METHODS),
        ],
        exception_handlers=EXCEPTION_HANDLERS,  # the one error exit (api/failures.py)
        lifespan=lifespan,
    )
    app.state.settings = settings
    return app


async def _healthz(request: Request) -> Response:
    """The process is alive and answering."""
    return JSONResponse({"status": "ok"})


def _readyz(monitor: Monitor) -> Callable[[Request], Awaitable[Response]]:
    async def readyz(request: Request) -> Response:
        strict = request.query_params.get("strict", "").lower() in ("1", "true", "yes")
        ready, body = monitor.readiness(strict=strict)
        return JSONResponse(body, status_code=200 if ready else 503)

    return readyz


def _status(logins: Logins, monitor: Monitor) -> Callable[[Request], Awaitable[Response]]:
    async def status(request: Request) -> Response:
        viewer = await logins.monitoring_viewer(request, "the status page")
        return HTMLResponse(render_status(await monitor.status(viewer)))

    return status


async def _to_status(request: Request) -> Response:
    """A person opening the mirror's address finds the status page."""
    return RedirectResponse("/_/", status_code=307)


def _metrics(logins: Logins, monitor: Monitor) -> Callable[[Request], Awaitable[Response]]:
    async def metrics(request: Request) -> Response:
        await logins.monitoring_viewer(request, "/metrics")
        return Response(await monitor.metrics_page(), media_type=CONTENT_TYPE_LATEST)

    return metrics


def _peer(pull: Pullthrough) -> Callable[[Request], Awaitable[Response]]:
    async def peer(request: Request) -> Response:
        return await peer_blob(pull, request)

    return peer


def app_from_environment() -> Gateway:
    """Factory for ``uvicorn --factory``: reads the config file as every command finds it
    (config/discovery.py; ``serve`` names it in $MIRRORROUTER_CONFIG for its workers)."""
    return create_app(load_settings(find_config()))
