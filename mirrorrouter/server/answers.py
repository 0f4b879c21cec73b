"""The answers the server gives itself, without the app: a request it refuses (malformed
HTTP 400, a head too large 431) or a connection it cannot take (503 at ``max_connections``).

They carry the OCI JSON envelope a registry client understands, not uvicorn's text/plain
(``error_response_bytes``: the whole HTTP/1.1 response, written straight to the transport
since no ASGI cycle exists), and they end the connection. Closing a socket with unread
request bytes makes the kernel send a reset that may destroy the answer before the client
reads it, so ``ClosingAnswer`` takes the connection over: write, half-close, discard what
still arrives, close at the client's EOF or after ``LINGER``. ``GatewayProtocol``
(protocol.py) decides when to answer; ``answer_and_close`` writes it to the access log,
writes the bytes and lets go of the connection.
"""

from __future__ import annotations

import asyncio
import secrets

from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.utils import get_remote_addr

from mirrorrouter import logs
from mirrorrouter.errors import RegistryError
from mirrorrouter.oci import API_VERSION, API_VERSION_HEADER

LINGER = 1.0  # how long a closing answer waits for the client to read it and hang up
MAX_LINGERING = 256  # closing answers waiting at once; past it they close at once


def answer_and_close(
    transport: asyncio.Transport,
    loop: asyncio.AbstractEventLoop,
    status: int,
    error: RegistryError,
    reason: str,
    *,
    default_headers: list[tuple[bytes, bytes]],
    access_log: bool,
) -> None:
    """Answer ``error`` with ``status`` on a connection no app serves, note it in the access
    log (when ``access_log``, with the client address and why it was ``refused``), and
    close the connection once the client has read it."""
    client = get_remote_addr(transport)
    if access_log:
        logs.access(
            "-",
            "-",
            status,
            request_id=secrets.token_hex(8),
            client=f"{client[0]}:{client[1]}" if client else None,
            user="anonymous",
            refused=reason,
        )
    answer = error_response_bytes(status, error, default_headers)
    ClosingAnswer.start(transport, loop, answer)


class ClosingAnswer(asyncio.Protocol):
    """Takes over a connection to send one last answer and close it so the client can read
    it: closing with unread request bytes would send a reset that may destroy the answer.
    So: write, half-close, discard what still arrives, close at the client's EOF or after
    ``LINGER``."""

    lingering = 0

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.timer = loop.call_later(LINGER, transport.abort)

    @classmethod
    def start(
        cls, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, answer: bytes
    ) -> None:
        transport.write(answer)
        if cls.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        cls.lingering += 1
        transport.set_protocol(cls(transport, loop))
        transport.write_eof()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        type(self).lingering -= 1
        self.timer.cancel()


def error_response_bytes(
    status: int, error: RegistryError, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A whole HTTP/1.1 response carrying ``error`` as the OCI JSON envelope."""
    body = error.body()
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (API_VERSION_HEADER.lower().encode(), API_VERSION.encode()),
        *((k.lower().encode(), v.encode("latin-1")) for k, v in error.headers.items()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return STATUS_LINE[status] + lines + b"\r\n" + body
