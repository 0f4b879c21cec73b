"""The access line of every answer (``server.access_log``): always the client's address and
the user (``anonymous`` when none was established), also for answers given before routing."""

from __future__ import annotations

import secrets
import time

from starlette.types import Scope

from mirrorrouter import logs
from mirrorrouter.access.clientauth import Identity
from mirrorrouter.api.calls import client_address
from mirrorrouter.mapping import Resolution
from mirrorrouter.oci import CacheResult


class AccessLog:
    """Writes one structured access line per answer, when the configuration asks for them."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def line(
        self,
        scope: Scope | None,
        status: int,
        started: float,
        identity: Identity | None,
        resolution: Resolution | None,
        *,
        cache: CacheResult | None = None,
        mirror: str | None = None,
        size: int = 0,
    ) -> None:
        """The line of one answer; ``started`` is its ``time.perf_counter()`` at the door."""
        if not self.enabled or scope is None:
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
