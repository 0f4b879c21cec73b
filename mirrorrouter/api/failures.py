"""How a failure is answered: the OCI JSON envelope (``error_response``, the one place an
error becomes an HTTP answer) and the exception handlers app.py installs, so every error a
request raises leaves the gateway the same way: never HTML, never a traceback, never a 500
for bad input. ``answer_status`` says which status a handler gives, for the access line
written before the handler runs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from mirrorrouter.cache.base import CacheUnavailable
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.oci import API_VERSION, API_VERSION_HEADER

log = logging.getLogger("mirrorrouter")

# The answer to a request whose body ended early (499: nginx's "client closed request"),
# rendered only for the access log: the client is gone.
ClientGone = RegistryError(
    ErrorCode.SIZE_INVALID, "the request body ended before its Content-Length", status=499
)


def error_response(error: RegistryError) -> Response:
    """The one place an error becomes an HTTP answer: the OCI JSON envelope."""
    headers = {API_VERSION_HEADER: API_VERSION, **error.headers}
    return Response(error.body(), error.status, headers, media_type="application/json")


def answer_status(exc: Exception) -> int:
    """The status the handlers below answer ``exc`` with (for the access line)."""
    if isinstance(exc, RegistryError):
        return exc.status
    if isinstance(exc, ClientDisconnect):
        return ClientGone.status
    if isinstance(exc, CacheUnavailable):
        return ErrorCode.UNAVAILABLE.status
    return ErrorCode.UNKNOWN.status


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


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    RegistryError: _registry_error,
    CacheUnavailable: _cache_unavailable,
    ClientDisconnect: _client_gone,
    HTTPException: _http_error,
    Exception: _unexpected_error,
}
