"""HTTP endpoints of the distribution API: parse once, route, dispatch by request kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from mirrorrouter.config import Settings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.mapping import Mapper, Resolution, RouteKind
from mirrorrouter.oci import (
    API_VERSION,
    API_VERSION_HEADER,
    CONTENT_DIGEST_HEADER,
    FILTERS_APPLIED_HEADER,
    NAMESPACE_HEADER,
    OCI_INDEX,
    OciRequest,
    RequestKind,
    parse_request,
)
from mirrorrouter.pullthrough import Pullthrough
from mirrorrouter.responses import BlobResponse, parse_range
from mirrorrouter.timing import REAL_TIME, Timing

CACHE_HEADER = "X-Cache"
UPSTREAM_HEADER = "X-Upstream"


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

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timing: Timing = REAL_TIME,
    ) -> None:
        self.settings = settings
        self.mapper = Mapper(settings)
        self.pull = Pullthrough(settings, transport=transport, timing=timing)

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.pull.start()
        try:
            yield
        finally:
            await self.pull.close()

    async def dispatch(self, request: Request) -> Response | ASGIApp:
        oci = parse(request)
        if oci.kind is RequestKind.BASE:
            return self.base(oci)
        resolution = self.mapper.resolve(oci)
        try:
            if oci.is_write:
                raise RegistryError(
                    ErrorCode.UNSUPPORTED,
                    f"{oci.method} is not supported: this mirror is read-only",
                )
            if oci.method not in ("GET", "HEAD"):
                raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.method} is not supported here")
            if oci.kind is RequestKind.MANIFEST:
                return await self.manifest(oci, resolution)
            if oci.kind is RequestKind.BLOB:
                return await self.blob(oci, resolution)
            if oci.kind is RequestKind.TAGS:
                return await self.tags(oci, resolution)
            if oci.kind is RequestKind.REFERRERS:
                return await self.referrers(oci, resolution)
            raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.kind.value} is not supported")
        except RegistryError as error:
            # Say which route was taken, so an operator can see why.
            headers = self._common_headers(oci, resolution)
            raise error.with_context(resolution.describe, headers) from error

    def base(self, oci: OciRequest) -> Response:
        if oci.method not in ("GET", "HEAD"):
            raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.method} /v2/ is not supported")
        return Response(
            b"{}", 200, {API_VERSION_HEADER: API_VERSION}, media_type="application/json"
        )

    async def manifest(self, oci: OciRequest, resolution: Resolution) -> Response:
        answer = await self.pull.manifest_for_client(
            resolution.upstream, resolution.reference, oci.accept
        )
        manifest = answer.manifest
        headers = {
            **self._common_headers(oci, resolution),
            "Content-Type": manifest.media_type,
            "Content-Length": str(len(manifest.data)),
            CONTENT_DIGEST_HEADER: str(manifest.digest),
            CACHE_HEADER: answer.cache,
        }
        body = b"" if oci.method == "HEAD" else manifest.data
        return Response(body, 200, headers)

    async def blob(self, oci: OciRequest, resolution: Resolution) -> BlobResponse:
        digest = resolution.reference.digest
        assert digest is not None
        answer = await self.pull.blob(resolution.upstream, resolution.reference.repository, digest)
        headers = {
            **self._common_headers(oci, resolution),
            "Content-Type": "application/octet-stream",
            CONTENT_DIGEST_HEADER: str(digest),
            CACHE_HEADER: answer.cache,
        }
        byte_range = parse_range(oci.range, answer.size)
        return BlobResponse(
            answer.stream,
            size=answer.size,
            byte_range=byte_range,
            headers=headers,
            head=oci.method == "HEAD",
        )

    async def tags(self, oci: OciRequest, resolution: Resolution) -> Response:
        query = {k: v for k, v in oci.query if k in ("n", "last")}
        upstream = await self.pull.tags(resolution.upstream, resolution.reference.repository, query)
        headers = {**self._common_headers(oci, resolution), CACHE_HEADER: "MISS"}
        link = upstream.headers.get("link")
        if link:
            headers["Link"] = client_link(link, oci)
        body = b"" if oci.method == "HEAD" else upstream.content
        return Response(body, 200, headers, media_type="application/json")

    async def referrers(self, oci: OciRequest, resolution: Resolution) -> Response:
        artifact_type = oci.query_value("artifactType")
        body, filtered = await self.pull.referrers(
            resolution.upstream, resolution.reference, artifact_type
        )
        headers = {**self._common_headers(oci, resolution), "Content-Type": OCI_INDEX}
        if filtered:
            headers[FILTERS_APPLIED_HEADER] = "artifactType"
        return Response(b"" if oci.method == "HEAD" else body, 200, headers)

    def _common_headers(self, oci: OciRequest, resolution: Resolution) -> dict[str, str]:
        headers = {API_VERSION_HEADER: API_VERSION, UPSTREAM_HEADER: resolution.upstream.name}
        if resolution.via is RouteKind.NAMESPACE and oci.ns:
            headers[NAMESPACE_HEADER] = oci.ns
        return headers


def client_link(link: str, oci: OciRequest) -> str:
    """Rewrite an upstream ``Link: </v2/<upstream name>/tags/list?..>`` to the client's name.

    The client must be able to follow it through the same route: same prefix, same name,
    same ``ns``.
    """
    target, _, rest = link.partition(">")
    query = dict(parse_qsl(target.lstrip(" <").partition("?")[2]))
    if oci.ns:
        query["ns"] = oci.ns
    prefix = f"/{oci.prefix}" if oci.prefix else ""
    return f"<{prefix}/v2/{oci.name}/tags/list?{urlencode(query)}>{rest}"
