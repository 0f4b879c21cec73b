"""HTTP endpoints of the distribution API: parse once, route, dispatch by request kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

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
from mirrorrouter.pullthrough import ManifestAnswer, Pullthrough
from mirrorrouter.responses import BlobResponse, RawResponse, parse_range
from mirrorrouter.timing import REAL_TIME, Timing

CACHE_HEADER = "X-Cache"
UPSTREAM_HEADER = "X-Upstream"


def parse_scope(scope: Scope) -> OciRequest:
    """The one parse of an ASGI request into an ``OciRequest`` (both the fast path and the
    Starlette handlers use it)."""
    host = range_header = ""
    accept: list[str] = []
    for name, value in scope["headers"]:
        if name == b"host":
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
        host=host,
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
        self.pull = Pullthrough(settings, transport=transport, timing=timing)

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.pull.start()
        try:
            yield
        finally:
            await self.pull.close()

    def fast_manifest(self, scope: Scope) -> RawResponse | None:
        """A manifest GET/HEAD answered from memory before any framework code runs, or None
        (then the full path handles the request, errors included)."""
        try:
            oci = parse_scope(scope)
            if oci.kind is not RequestKind.MANIFEST:
                return None
            resolution = self.mapper.resolve(oci)
        except RegistryError:
            return None
        answer = self.pull.memory_manifest(resolution.upstream, resolution.reference, oci.accept)
        if answer is None:
            return None
        return self._manifest_response(oci, resolution, answer)

    async def dispatch(self, request: Request) -> Response | ASGIApp:
        oci = parse_scope(request.scope)
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

    async def manifest(self, oci: OciRequest, resolution: Resolution) -> RawResponse:
        answer = await self.pull.manifest_for_client(
            resolution.upstream, resolution.reference, oci.accept
        )
        return self._manifest_response(oci, resolution, answer)

    def _manifest_response(
        self, oci: OciRequest, resolution: Resolution, answer: ManifestAnswer
    ) -> RawResponse:
        manifest = answer.manifest
        headers = {
            **self._common_headers(oci, resolution),
            "content-type": manifest.media_type,
            "content-length": str(len(manifest.data)),
            CONTENT_DIGEST_HEADER: str(manifest.digest),
            CACHE_HEADER: answer.cache,
        }
        raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
        return RawResponse(200, raw, b"" if oci.method == "HEAD" else manifest.data)

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
