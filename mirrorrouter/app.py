"""The ASGI application: ``create_app(settings)`` builds the gateway's object graph once
(``Services``: every long-lived object, passed to whoever uses it), its routes, its
lifespan, and the one place an error becomes an answer (``error_response``).

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
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mirrorrouter.access.audit import AuditLog
from mirrorrouter.access.clientauth import Authenticator
from mirrorrouter.access.policy import AccessPolicy
from mirrorrouter.api.endpoints import ClientGone, Endpoints
from mirrorrouter.api.monitor import Monitor
from mirrorrouter.api.peer import peer_blob
from mirrorrouter.api.statuspage import render_status
from mirrorrouter.cache import Caches
from mirrorrouter.cache.base import CacheUnavailable
from mirrorrouter.cache.eviction import Evictor
from mirrorrouter.config import Settings, load_settings
from mirrorrouter.config.discovery import find_config
from mirrorrouter.coordination import Coordinator, open_coordinator
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.api import HostedApi
from mirrorrouter.hosted.shadowing import Shadowing
from mirrorrouter.mapping import Mapper
from mirrorrouter.metrics import Metrics
from mirrorrouter.oci import API_VERSION, API_VERSION_HEADER
from mirrorrouter.pull.peers import PEER_PATH
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.timing import REAL_TIME, Timing

log = logging.getLogger("mirrorrouter")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def error_response(error: RegistryError) -> Response:
    """The one place an error becomes an HTTP answer: the OCI JSON envelope."""
    headers = {API_VERSION_HEADER: API_VERSION, **error.headers}
    return Response(error.body(), error.status, headers, media_type="application/json")


async def _registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = ErrorCode.METHOD_NOT_ALLOWED if exc.status_code == 405 else ErrorCode.NOT_FOUND
    return error_response(RegistryError(code, str(exc.detail), status=exc.status_code))


async def _cache_unavailable(request: Request, exc: Exception) -> Response:
    """The cache's storage is down: a 503 the client retries, not a 500."""
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return error_response(RegistryError(ErrorCode.UNAVAILABLE, f"the cache is unreachable: {exc}"))


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The request body ended early: the client closed the connection, or the server gave
    up waiting for it (``server.body_timeout``). Nobody reads this answer; no traceback."""
    log.debug("%s %s: the request body ended early", request.method, request.url.path)
    return error_response(ClientGone)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(RegistryError(ErrorCode.UNKNOWN, "internal error; see the mirror's log"))


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
    hosted: HostedApi
    monitor: Monitor
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
    hosted = HostedApi(
        settings, clock=timing.wall, coordinator=coordinator, shadowing=shadowing, metrics=metrics
    )
    monitor = Monitor(settings, pull, metrics, access, caches, hosted.gc)
    endpoints = Endpoints(
        settings,
        mapper=mapper,
        metrics=metrics,
        pull=pull,
        auth=auth,
        access=access,
        audit=audit,
        hosted=hosted,
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
        monitor,
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
    endpoints, monitor = services.endpoints, services.monitor

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with services.running():
            yield

    app = Gateway(
        services,
        routes=[
            Route("/auth/token", endpoints.token, methods=["GET", "POST"]),
            Route("/metrics", _metrics(endpoints, monitor), methods=["GET"]),
            Route("/healthz", _healthz, methods=["GET", "HEAD"]),
            Route("/readyz", _readyz(monitor), methods=["GET", "HEAD"]),
            Route("/_/", _status(endpoints, monitor), methods=["GET", "HEAD"]),
            Route("/", _to_status, methods=["GET", "HEAD"]),
            Route(PEER_PATH, _peer(services.pull), methods=["GET"]),
            Route("/{path:path}", endpoints.dispatch, methods=ALL_METHODS),
        ],
        exception_handlers={
            RegistryError: _registry_error,
            CacheUnavailable: _cache_unavailable,
            ClientDisconnect: _client_gone,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
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


def _status(endpoints: Endpoints, monitor: Monitor) -> Callable[[Request], Awaitable[Response]]:
    async def status(request: Request) -> Response:
        viewer = await endpoints.monitoring_viewer(request, "the status page")
        return HTMLResponse(render_status(await monitor.status(viewer)))

    return status


async def _to_status(request: Request) -> Response:
    """A person opening the mirror's address finds the status page."""
    return RedirectResponse("/_/", status_code=307)


def _metrics(endpoints: Endpoints, monitor: Monitor) -> Callable[[Request], Awaitable[Response]]:
    async def metrics(request: Request) -> Response:
        await endpoints.monitoring_viewer(request, "/metrics")
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
