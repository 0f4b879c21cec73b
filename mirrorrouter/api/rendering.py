"""Typed answers (served.py) turned into HTTP answers, with the headers every content answer
carries (``X-Upstream``, ``X-Cache``, ``Docker-Content-Digest``, ``OCI-Namespace``), and
each pull recorded (the cache-result metrics, the status page's recent pulls, the audit
log). Tag pages and referrers indexes made by the gateway are paginated and written here.
"""

from __future__ import annotations

import json
import time
from typing import TypeAlias
from urllib.parse import parse_qsl

from starlette.responses import Response

from mirrorrouter.access.audit import AuditLog
from mirrorrouter.api.accesslog import AccessLog
from mirrorrouter.api.calls import Call
from mirrorrouter.api.responses import BlobResponse, RawResponse, parse_range
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.manifests import OCI_INDEX
from mirrorrouter.mapping import Resolution, RouteKind
from mirrorrouter.metrics import Metrics, Pull
from mirrorrouter.oci import (
    API_VERSION,
    API_VERSION_HEADER,
    CACHE_HEADER,
    CONTENT_DIGEST_HEADER,
    FILTERS_APPLIED_HEADER,
    NAMESPACE_HEADER,
    UPSTREAM_HEADER,
    CacheResult,
    OciRequest,
)
from mirrorrouter.served import BlobAnswer, ManifestAnswer, Referrers, TagList

Answer: TypeAlias = Response | RawResponse | BlobResponse


class Renderer:
    """Writes the HTTP answer of a call from what its target answered."""

    def __init__(self, metrics: Metrics, audit: AuditLog, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.audit = audit
        self.access_log = access_log

    def manifest(self, call: Call, answer: ManifestAnswer) -> RawResponse:
        manifest = answer.manifest
        headers = {
            **common_headers(call.oci, call.resolution),
            "content-type": manifest.media_type,
            "content-length": str(len(manifest.data)),
            CONTENT_DIGEST_HEADER: str(manifest.digest),
            CACHE_HEADER: answer.cache,
        }
        raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
        if answer.cache is not CacheResult.HOSTED:
            self.metrics.cache_result(answer.upstream, "manifest", answer.cache)
        if call.oci.method == "HEAD":
            return RawResponse(200, raw, b"")
        self._record_pull(
            call, str(manifest.digest), answer.mirror, answer.cache, len(manifest.data)
        )
        return RawResponse(200, raw, manifest.data)

    def blob(self, call: Call, answer: BlobAnswer) -> BlobResponse | Response:
        if answer.location is not None:
            return self._redirect(call, answer, answer.location)
        return self._blob_response(call, answer)

    def _redirect(self, call: Call, answer: BlobAnswer, url: str) -> Response:
        """A cached blob the client fetches from object storage (``redirect`` in
        ``[cache.s3]``): counted and recorded here, sent by the store."""
        digest = call.resolution.reference.digest
        self.metrics.cache_result(answer.upstream, "blob", answer.cache)
        self._record_pull(call, str(digest), None, answer.cache, 0)
        headers = {
            **common_headers(call.oci, call.resolution),
            CONTENT_DIGEST_HEADER: str(digest),
            CACHE_HEADER: answer.cache,
            "Location": url,
        }
        return Response(b"", 307, headers)

    def _blob_response(self, call: Call, answer: BlobAnswer) -> BlobResponse:
        digest = call.resolution.reference.digest
        upstream = answer.upstream
        headers = {
            **common_headers(call.oci, call.resolution),
            "Content-Type": "application/octet-stream",
            CONTENT_DIGEST_HEADER: str(digest),
            CACHE_HEADER: answer.cache,
        }

        if answer.cache is not CacheResult.HOSTED:
            self.metrics.cache_result(upstream, "blob", answer.cache)

        started = time.perf_counter()
        byte_range = parse_range(call.oci.range, answer.size)
        status = 206 if byte_range else 200

        def sent(count: int) -> None:
            if answer.cache == CacheResult.HIT:
                self.metrics.served_from_cache(upstream, count)
            if call.oci.method == "GET":
                self._record_pull(call, str(digest), answer.mirror, answer.cache, count)
            self.access_log.line(
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
        self, call: Call, digest: str, mirror: str | None, cache: CacheResult, size: int
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

    def tags(self, call: Call, answer: TagList) -> Response:
        """An upstream's page as it came (its ``Link`` rewritten to the client's name), or
        a list of the gateway's own, paginated here."""
        oci = call.oci
        if answer.page is None:
            return tag_page(oci.name, answer.names(), oci)
        headers = {**common_headers(oci, call.resolution), CACHE_HEADER: CacheResult.MISS}
        if answer.link:
            headers["Link"] = client_link(answer.link, oci)
        body = b"" if oci.method == "HEAD" else answer.page
        return Response(body, 200, headers, media_type="application/json")

    def referrers(self, call: Call, answer: Referrers) -> Response:
        oci = call.oci
        if answer.upstream is None:
            return index_response(answer.index, oci, answer.filtered)
        headers = {**common_headers(oci, call.resolution), "Content-Type": OCI_INDEX}
        if answer.filtered:
            headers[FILTERS_APPLIED_HEADER] = "artifactType"
        return Response(b"" if oci.method == "HEAD" else answer.index, 200, headers)


def common_headers(oci: OciRequest, resolution: Resolution) -> dict[str, str]:
    """What every answer of a routed request says: the API version, the target that
    answered, and the ``ns`` it was routed by."""
    headers = {API_VERSION_HEADER: API_VERSION, UPSTREAM_HEADER: resolution.target.name}
    if resolution.via is RouteKind.NAMESPACE and oci.ns:
        headers[NAMESPACE_HEADER] = oci.ns
    return headers


def tag_page(name: str, tags: list[str], oci: OciRequest) -> Response:
    """A ``tags/list`` answer paginated here (``n``, ``last``), with the ``Link`` to the
    next page written as the client addressed us."""
    last = oci.query_value("last")
    ordered = sorted(set(tags))
    if last:
        ordered = [t for t in ordered if t > last]
    headers = {API_VERSION_HEADER: API_VERSION}
    n_text = oci.query_value("n")
    if n_text:
        try:
            n = int(n_text)
        except ValueError:
            raise RegistryError(ErrorCode.UNSUPPORTED, f"n={n_text!r} is not a number") from None
        if n < 0:
            raise RegistryError(ErrorCode.UNSUPPORTED, f"n={n} is negative")
        if len(ordered) > n:
            ordered = ordered[:n]
            if ordered:
                query = {"n": str(n), "last": ordered[-1]}
                headers["Link"] = f'<{oci.client_url("tags/list", query)}>; rel="next"'
    body = b"" if oci.method == "HEAD" else json.dumps({"name": name, "tags": ordered}).encode()
    return Response(body, 200, headers, media_type="application/json")


def index_response(body: bytes, oci: OciRequest, filtered: bool) -> Response:
    headers = {API_VERSION_HEADER: API_VERSION, "Content-Type": OCI_INDEX}
    if filtered:
        headers[FILTERS_APPLIED_HEADER] = "artifactType"
    return Response(b"" if oci.method == "HEAD" else body, 200, headers)


def client_link(link: str, oci: OciRequest) -> str:
    """Rewrite an upstream ``Link: </v2/<upstream name>/tags/list?..>`` to the client's name.

    The client must be able to follow it through the same route: same prefix, same name,
    same ``ns``.
    """
    target, _, rest = link.partition(">")
    query = dict(parse_qsl(target.lstrip(" <").partition("?")[2]))
    return f"<{oci.client_url('tags/list', query)}>{rest}"
