"""HTTP answers for content: byte ranges and the blob streaming response."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.types import Receive, Scope, Send

from mirrorrouter.cache import BlobFile
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.server.zerocopy import ZERO_COPY_SEND

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int | None) -> tuple[int, int] | None:
    """The ``[start, end)`` a Range header asks of ``size`` bytes; None means the whole.

    Only single ranges are served (what registry clients send); a multi-range or malformed
    header is ignored, as RFC 9110 allows. An unsatisfiable one is a 416.
    """
    if not header or size is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # a suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        return max(0, size - length), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or (last and int(last) < start):
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> RegistryError:
    return RegistryError(
        ErrorCode.RANGE_INVALID,
        f"range not satisfiable: the blob has {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )


class RawResponse:
    """A complete answer sent as two ASGI messages, without a framework's header handling:
    the manifest hot path. Header names must be given in lower case."""

    __slots__ = ("body", "headers", "status_code")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.headers}
        )
        await send({"type": "http.response.body", "body": self.body})


class BlobResponse:
    """Sends a blob (or a range of it): a committed local file with one zero-copy message
    when the server offers ``http.response.zerocopysend`` (``sendfile``), anything else
    streamed from an async byte source, ~1 MiB per send."""

    def __init__(
        self,
        source: Callable[[int, int | None], AsyncIterator[bytes]],
        *,
        size: int | None,
        byte_range: tuple[int, int] | None,
        headers: Mapping[str, str],
        head: bool,
        on_sent: Callable[[int], None] | None = None,
        file: BlobFile | None = None,
    ) -> None:
        self.source = source
        self.file = file  # the committed blob's local file, when it may have one
        self.head = head
        self.on_sent = on_sent  # told how many body bytes went out, when the response ends
        self.headers = dict(headers)
        self.start = byte_range[0] if byte_range else 0
        self.end: int | None = byte_range[1] if byte_range else None
        self.headers["Accept-Ranges"] = "bytes"
        if byte_range is not None:
            assert size is not None
            self.status_code = 206
            self.headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1] - 1}/{size}"
            self.headers["Content-Length"] = str(byte_range[1] - byte_range[0])
        else:
            self.status_code = 200
            if size is not None:
                self.headers["Content-Length"] = str(size)
        self.size = size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status_code, "headers": raw})
        if self.head:
            await send({"type": "http.response.body", "body": b""})
            if self.on_sent is not None:
                self.on_sent(0)
            return
        end = self.size if self.end is None else self.end
        if (
            self.file is not None
            and end is not None
            and ZERO_COPY_SEND in scope.get("extensions", ())
            and await self._send_file(self.file, end, send)
        ):
            return
        chunks = self.source(self.start, self.end)
        sent = 0
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
        finally:
            if self.on_sent is not None:
                self.on_sent(sent)
            # Close the source now (its file descriptor), also when the client went away.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        await send({"type": "http.response.body", "body": b""})

    async def _send_file(self, file: BlobFile, end: int, send: Send) -> bool:
        """The bytes in one zero-copy message; False when there is no local file (then
        they are streamed). The file stays open until the server has sent them."""
        async with file() as fd:
            if fd is None:
                return False
            count = end - self.start
            try:
                with io.FileIO(fd, "rb", closefd=False) as handle:
                    await send(
                        {
                            "type": ZERO_COPY_SEND,
                            "file": handle,
                            "offset": self.start,
                            "count": count,
                            "more_body": False,
                        }
                    )
            finally:
                if self.on_sent is not None:
                    self.on_sent(count)
        return True
