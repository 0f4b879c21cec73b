"""Zero-copy sending: the server side of the ASGI ``http.response.zerocopysend`` extension.

An app that has a response's bytes in a file sends ``{"type": "http.response.zerocopysend",
"file": <an object with fileno()>, "offset": ..., "count": ...}`` and the server moves them
from the page cache to the socket with ``sendfile(2)``: no copy into Python, none back into
the kernel. ``GatewayCycle.send`` (protocol.py) frames the bytes as a body would be; this
module moves them.

**Why not ``loop.sendfile``.** uvloop, which ``mirrorrouter serve`` runs on, implements
neither ``loop.sendfile`` nor ``loop.sock_sendfile`` (both raise ``NotImplementedError``),
and both loops refuse ``add_writer`` on a descriptor a transport owns. So ``FileSend``
writes to the socket itself:

- it starts only once the transport's own write buffer is empty (the response head went
  out first), and nothing else writes to the connection meanwhile: the cycle is inside the
  app's ``send`` and pipelined requests wait for its end, as they do for any response;
- it calls ``os.sendfile`` on the transport's (non-blocking) socket at once, and whatever
  the socket cannot take yet is sent from a writability callback registered on a
  *duplicate* of the socket's descriptor (``os.dup``: the loop's watch is per descriptor
  number, the socket is the same). Each writable event moves as much as the socket takes
  in one call, in the callback itself: no task switch per chunk;
- the duplicate holds the socket open: it is closed the moment the send ends, fails, or the
  connection is lost (``abandon``), so closing the transport closes the connection as ever;
- ``send_timeout`` still applies: no progress for that long and the connection is aborted,
  as when the transport's writes stay paused that long.

Only plain TCP connections take this path (``socket_fd``): over TLS the kernel cannot
encrypt what ``sendfile`` moves, and the scope does not offer the extension, so the app
sends body messages as before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

log = logging.getLogger("mirrorrouter.server")

ZERO_COPY_SEND = "http.response.zerocopysend"
_EARLY = 0.005  # a timer may fire this much before its deadline (millisecond clocks)


class FileEnded(Exception):
    """The file held fewer bytes than the send was to move (it was truncated)."""


class SendStalled(Exception):
    """The client took nothing for ``send_timeout``."""


def socket_fd(transport: asyncio.BaseTransport) -> int | None:
    """The descriptor of the connection's socket when ``sendfile`` may write to it: plain
    TCP; None over TLS or for a transport without a socket."""
    if transport.get_extra_info("sslcontext") is not None:
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        fd = int(sock.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return fd if fd >= 0 else None


class FileSend:
    """One ``sendfile`` of ``count`` bytes of ``fd`` from ``offset`` to a connection's
    socket, driven by the socket's writability (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.WriteTransport,
        sock: int,
        fd: int,
        offset: int,
        count: int,
        send_timeout: float,
    ) -> None:
        self.loop = loop
        self.transport = transport
        self.sock = sock
        self.fd = fd
        self.offset = offset
        self.remaining = count
        self.sent = 0
        self.send_timeout = send_timeout
        self._done: asyncio.Future[None] | None = None
        self._watched: int | None = None  # the duplicate descriptor being watched
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0

    async def run(self) -> int:
        """Send; the bytes sent. Raises ``OSError`` when the client went away,
        ``FileEnded``, ``SendStalled``, or ``ConnectionAbortedError`` on ``abandon``."""
        if self.transport.get_write_buffer_size() == 0 and self._step():
            return self.sent
        self._done = self.loop.create_future()
        self._progress = self.loop.time()
        self._watched = os.dup(self.sock)
        try:
            self.loop.add_writer(self._watched, self._on_writable)
            self._timer = self.loop.call_at(self._progress + self.send_timeout, self._on_timer)
            await self._done
        finally:
            self._stop()
        return self.sent

    def abandon(self) -> None:
        """The connection is gone: stop now and let go of the socket."""
        self._finish(ConnectionAbortedError("the connection was closed"))

    def _step(self) -> bool:
        """One ``sendfile`` call; True when the send is over (every byte, or an error
        recorded in ``_done``, or raised when there is no ``_done`` yet)."""
        try:
            moved = os.sendfile(self.sock, self.fd, self.offset, self.remaining)
        except BlockingIOError:
            return False
        except InterruptedError:
            return False
        except OSError as exc:
            if self._done is None:
                raise
            self._finish(exc)
            return True
        if moved == 0:
            ended = FileEnded(f"the file ended {self.remaining} bytes early")
            if self._done is None:
                raise ended
            self._finish(ended)
            return True
        self.offset += moved
        self.sent += moved
        self.remaining -= moved
        if self.remaining <= 0:
            self._finish(None)
            return True
        return False

    def _on_writable(self) -> None:
        if self.transport.get_write_buffer_size():
            return  # the transport's own bytes (the response head) go first
        if self._step():
            return
        self._progress = self.loop.time()

    def _on_timer(self) -> None:
        self._timer = None
        due = self._progress + self.send_timeout
        if due - self.loop.time() > _EARLY:
            self._timer = self.loop.call_at(due, self._on_timer)
            return
        self._finish(SendStalled(f"the client read nothing for {self.send_timeout:.0f}s"))

    def _finish(self, error: BaseException | None) -> None:
        done = self._done
        self._stop()
        if done is None or done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def _stop(self) -> None:
        """Unwatch and close the duplicate descriptor, stop the timer (idempotent)."""
        watched, self._watched = self._watched, None
        if watched is not None:
            self.loop.remove_writer(watched)
            os.close(watched)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# What a send that ended early on the client's side raises: quiet, like a hang-up during
# an ordinary body (uvicorn's send returns silently once the client is gone).
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_QUIET_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


def client_gone(exc: BaseException) -> bool:
    """Whether a send failed because the client went away (not worth a warning)."""
    return isinstance(exc, CLIENT_GONE) or (isinstance(exc, OSError) and exc.errno in _QUIET_ERRNOS)
