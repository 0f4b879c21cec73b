"""The internal endpoint through which replicas follow each other's downloads.

While one replica holds a blob's cluster-wide lease (coordination.py) and downloads it,
the others stream it from that replica at ``GET <advertise_url>/_mirrorrouter/peer/
<upstream>/blobs/<digest>`` (fill.py is the client side). The request carries the lease's
token in ``X-Mirrorrouter-Lease`` (only a replica that read the lock from Redis knows it),
so the endpoint needs no client login and serves nothing but a download in progress; it
may carry ``Range: bytes=N-`` to resume.

The answer streams the download as it lands: 200 (``Content-Length`` when the size is
known) or 206 from byte N; the last byte only once the digest matched, and a download that
fails cuts the stream short. ``BLOB_UNKNOWN`` (404) when this replica is not downloading
that blob under that token (done, failed, or never), as an OCI JSON error like every other.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.reference import Digest, ReferenceError

if TYPE_CHECKING:
    from mirrorrouter.pull.pullthrough import Pullthrough

PEER_PATH = "/_mirrorrouter/peer/{upstream}/blobs/{digest}"
LEASE_HEADER = "X-Mirrorrouter-Lease"
_RANGE_FROM = re.compile(r"bytes=(\d+)-")


def peer_url(base: str, upstream: str, digest: Digest) -> str:
    """Where a replica advertised as ``base`` serves its download of ``digest``."""
    path = PEER_PATH.format(upstream=quote(upstream, safe=":"), digest=digest)
    return base.rstrip("/") + path


async def peer_blob(pull: Pullthrough, request: Request) -> Response:
    """Serve this replica's download in progress of a blob to another replica."""
    name = str(request.path_params.get("upstream", ""))
    upstream = pull.settings.upstreams.get(name)
    token = request.headers.get(LEASE_HEADER, "")
    not_here = RegistryError(ErrorCode.BLOB_UNKNOWN, "no download of that blob under that lease")
    try:
        digest = Digest.parse(str(request.path_params.get("digest", "")))
    except ReferenceError as exc:
        raise RegistryError(ErrorCode.DIGEST_INVALID, str(exc)) from exc
    if upstream is None or not token:
        raise not_here
    site = await pull.site(upstream)
    fill = site.fills.get(digest)
    if fill is None or fill.lease_token is None:
        raise not_here
    if not hmac.compare_digest(fill.lease_token.encode(), token.encode()):
        raise not_here
    start = 0
    if "range" in request.headers:
        match = _RANGE_FROM.fullmatch(request.headers["range"].strip())
        if match is None:
            raise RegistryError(ErrorCode.RANGE_INVALID, "peers resume with Range: bytes=N-")
        start = int(match[1])
    await fill.started.wait()
    if fill.error is not None or fill.path is None:
        raise not_here  # failed, or streaming uncached: nothing to follow
    size = fill.size
    if size is not None and start and start >= size:
        raise RegistryError(
            ErrorCode.RANGE_INVALID,
            f"byte {start} is past the blob's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    headers = {}
    if size is not None:
        headers["Content-Length"] = str(size - start)
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    return StreamingResponse(
        fill.read(start, None),
        status_code=206 if start else 200,
        headers=headers,
        media_type="application/octet-stream",
    )
