"""HTTP endpoints of the distribution API: parse once, route, dispatch by request kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mirrorrouter.config import Settings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.mapping import Mapper, Resolution
from mirrorrouter.oci import API_VERSION, API_VERSION_HEADER, OciRequest, RequestKind, parse_request


def parse(request: Request) -> OciRequest:
    """The one parse of a Starlette request into an ``OciRequest``."""
    return parse_request(
        request.method,
        request.url.path,
        query=request.query_params.multi_items(),
        host=request.headers.get("host", ""),
        range_header=request.headers.get("range"),
        accept=request.headers.getlist("accept"),
    )


class Endpoints:
    """The request handlers, bound to one configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mapper = Mapper(settings)

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        yield

    async def dispatch(self, request: Request) -> Response:
        oci = parse(request)
        if oci.kind is RequestKind.BASE:
            return self.base(oci)
        resolution = self.mapper.resolve(oci)
        if oci.is_write:
            raise RegistryError(
                ErrorCode.UNSUPPORTED,
                f"{oci.method} is not supported: this mirror is read-only",
                detail={"route": resolution.describe},
            )
        return self.not_implemented(oci, resolution)

    def base(self, oci: OciRequest) -> Response:
        if oci.method not in ("GET", "HEAD"):
            raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.method} /v2/ is not supported")
        return Response(
            b"{}", 200, {API_VERSION_HEADER: API_VERSION}, media_type="application/json"
        )

    def not_implemented(self, oci: OciRequest, resolution: Resolution) -> Response:
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            f"{oci.kind.value} requests are not served yet",
            detail={"route": resolution.describe, "reference": str(resolution.reference)},
        )
