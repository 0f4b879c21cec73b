"""The ASGI application: ``create_app(settings)`` wires routes, lifespan and error rendering.

Nothing happens at import time; ``app_from_environment`` is the factory uvicorn imports
when it runs several workers (each worker reads the config named by MIRRORROUTER_CONFIG).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mirrorrouter.api.endpoints import ClientGone, Endpoints
from mirrorrouter.api.peer import peer_blob
from mirrorrouter.api.statuspage import render_status
from mirrorrouter.cache.base import CacheUnavailable
from mirrorrouter.config import Settings, load_settings
from mirrorrouter.config.discovery import find_config
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.oci import API_VERSION, API_VERSION_HEADER
from mirrorrouter.pull.peers import PEER_PATH
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


class Gateway(Starlette):
    """The Starlette app, with the hottest request answered before the middleware stack.

    A manifest that memory can serve (a linked digest, a tag within its TTL) is every pull's
    first request; answering it without routing and middleware layers roughly doubles the
    requests a worker serves. Everything else, errors included, takes the full path.
    """

    def __init__(self, endpoints: Endpoints, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoints = endpoints

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
    """Build the gateway application for ``settings``.

    ``transport`` replaces the network for upstream traffic (tests use httpx.MockTransport
    or an ASGITransport around a fake registry); ``timing`` replaces clocks and sleep.
    """
    endpoints = Endpoints(settings, transport=transport, timing=timing or REAL_TIME)
    app = Gateway(
        endpoints,
        routes=[
            Route("/auth/token", endpoints.token, methods=["GET", "POST"]),
            Route("/metrics", _metrics(endpoints), methods=["GET"]),
            Route("/healthz", _healthz, methods=["GET", "HEAD"]),
            Route("/readyz", _readyz(endpoints), methods=["GET", "HEAD"]),
            Route("/_/", _status(endpoints), methods=["GET", "HEAD"]),
            Route("/", _to_status, methods=["GET", "HEAD"]),
            Route(PEER_PATH, _peer(endpoints), methods=["GET"]),
            Route("/{path:path}", endpoints.dispatch, methods=ALL_METHODS),
        ],
        exception_handlers={
            RegistryError: _registry_error,
            CacheUnavailable: _cache_unavailable,
            ClientDisconnect: _client_gone,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=endpoints.lifespan,
    )
    app.state.settings = settings
    return app


async def _healthz(request: Request) -> Response:
    """The process is alive and answering."""
    return JSONResponse({"status": "ok"})


def _readyz(endpoints: Endpoints) -> Callable[[Request], Awaitable[Response]]:
    async def readyz(request: Request) -> Response:
        strict = request.query_params.get("strict", "").lower() in ("1", "true", "yes")
        ready, body = endpoints.monitor.readiness(strict=strict)
        return JSONResponse(body, status_code=200 if ready else 503)

    return readyz


def _status(endpoints: Endpoints) -> Callable[[Request], Awaitable[Response]]:
    async def status(request: Request) -> Response:
        viewer = await endpoints.monitoring_viewer(request, "the status page")
        return HTMLResponse(render_status(await endpoints.monitor.status(viewer)))

    return status


async def _to_status(request: Request) -> Response:
    """A person opening the mirror's address finds the status page."""
    return RedirectResponse("/_/", status_code=307)


def _metrics(endpoints: Endpoints) -> Callable[[Request], Awaitable[Response]]:
    async def metrics(request: Request) -> Response:
        await endpoints.monitoring_viewer(request, "/metrics")
        return Response(await endpoints.monitor.metrics_page(), media_type=CONTENT_TYPE_LATEST)

    return metrics


def _peer(endpoints: Endpoints) -> Callable[[Request], Awaitable[Response]]:
    async def peer(request: Request) -> Response:
        return await peer_blob(endpoints.pull, request)

    return peer


def app_from_environment() -> Gateway:
    """Factory for ``uvicorn --factory``: reads the config file as every command finds it
    (config/discovery.py; ``serve`` names it in $MIRRORROUTER_CONFIG for its workers)."""
    return create_app(load_settings(find_config()))
