"""The internal endpoint through which replicas follow each other's downloads: the server
side of pull/peers.py's protocol (the module docstring there says what it answers)."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mirrorrouter.errors import ErrorCode, RegistryError, reference_error
from mirrorrouter.pull.peers import LEASE_HEADER
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.reference import Digest, InvalidReference

_RANGE_FROM = re.compile(r"bytes=(\d+)-")


async def peer_blob(pull: Pullthrough, request: Request) -> Response:
    """Serve this replica's download in progress of a blob to another replica."""
    name = str(request.path_params.get("upstream", ""))
    upstream = pull.settings.upstreams.get(name)
    token = request.headers.get(LEASE_HEADER, "")
    not_here = RegistryError(ErrorCode.BLOB_UNKNOWN, "no download of that blob under that lease")
    text = str(request.path_params.get("digest", ""))
    try:
        digest = Digest.parse(text)
    except InvalidReference as exc:
        raise reference_error(ErrorCode.DIGEST_INVALID, exc) from exc
    if upstream is None or not token:
        raise not_here
    fill = await pull.leased_fill(upstream, digest, token)
    if fill is None:
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
