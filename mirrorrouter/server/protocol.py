"""The server's connections: ``GatewayProtocol`` on uvicorn's httptools protocol, one per
connection, and ``GatewayCycle``, its request/response cycle.

uvicorn closes a connection only when it has been idle between requests; a client that sends
half a request line, headers without the blank line or half a body is kept forever, and
about 20,000 of them used every file descriptor. ``GatewayProtocol`` keeps uvicorn's parser,
ASGI cycle and flow control, and adds what a server facing hostile clients needs:

- ``header_timeout``: a new connection gets its first byte in, and every request its complete
  headers, within this time of the accept or of the request's first byte;
- ``body_timeout``: while the app waits for request body, the next chunk must arrive within
  this time. It never runs while reading is paused because the app is slow (flow control):
  the timer lives in the cycle's ``receive``, so it only runs while the app is waiting;
- ``keepalive_timeout``: a kept-alive connection idle between requests is closed;
- ``send_timeout``: a response the client stops reading (writing paused that long) is
  abandoned;
- request heads are capped at ``MAX_HEAD_BYTES`` (431): llhttp itself has no limit, and a
  client could otherwise stream headers into memory until the header timeout;
- ``max_connections`` per worker process: past it an idle kept-alive connection is closed to
  make room, or the new one is answered 503 ``UNAVAILABLE`` and closed;
- the answers the server gives itself (malformed HTTP 400, 431, 503) are the OCI JSON
  envelope, not uvicorn's text/plain (answers.py writes them), and written to the access
  log with the client address.

A connection has one deadline at a time (``Wait`` says which) and one timer, re-armed lazily:
moving the deadline later costs no timer operation, so a kept-alive connection's requests
cost fewer timer calls than uvicorn's own cancel-and-rearm per request.

Zero-copy ``sendfile`` serving (zerocopy.py) builds on ``GatewayProtocol`` and
``GatewayCycle``; ``ServerConfig`` (running.py) hands the protocol class and its
``[server]`` settings to uvicorn.

Written against uvicorn 0.55 (pinned in pyproject.toml): ``on_headers_complete`` and
``on_response_complete`` are uvicorn's with our cycle class and timers.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import time
import urllib.parse
import weakref
from typing import Any, cast

import httptools
import uvicorn
from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from mirrorrouter.config.model import ServerSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.server import answers, zerocopy

log = logging.getLogger("mirrorrouter.server")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; bearer tokens are a few KiB
_EARLY = 0.005  # a timer may fire this much before its deadline (millisecond clocks)
_LIMIT_WARNING_EVERY = 60.0


class Wait(enum.Enum):
    """What a connection waits for from its client, and so which timeout applies."""

    FIRST_BYTE = "first byte"  # a new connection: header_timeout from the accept
    HEAD = "head"  # a request's headers: header_timeout from their first byte
    BODY = "body"  # the app waits in receive(): body_timeout for the next chunk
    IDLE = "idle"  # kept alive between requests: keepalive_timeout
    APP = "app"  # the app is working or answering: no deadline (send_timeout on writes)


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the request head passed MAX_HEAD_BYTES."""


# Kept-alive connections idle between requests, per server, oldest first: the ones closed
# to make room at the connection limit.
_IDLE: weakref.WeakKeyDictionary[ServerState, dict[GatewayProtocol, None]] = (
    weakref.WeakKeyDictionary()
)


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines, a head-size cap, a connection limit and
    OCI answers of its own. One instance per connection."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.settings: ServerSettings = getattr(config, "server_settings", ServerSettings())
        self._idle = _IDLE.setdefault(server_state, {})
        self._wait = Wait.FIRST_BYTE
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._stall: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._file_send: zerocopy.FileSend | None = None

    # ------------------------------------------------------------------ the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.settings.max_connections and not self._make_room():
            _warn_at_limit(self.settings.max_connections)
            error = RegistryError(
                ErrorCode.UNAVAILABLE,
                "the mirror is at its connection limit; retry shortly",
                headers={"Retry-After": "1"},
            )
            self._answer_and_close(transport, 503, error, "max_connections")
            return
        super().connection_made(transport)
        self._expect(Wait.FIRST_BYTE, self.settings.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._forget()
        if self._file_send is not None:
            self._file_send.abandon()  # it holds the socket open: let go of it now

    def _forget(self) -> None:
        """Stop every timer and leave the idle list: the connection is gone or handed on."""
        self._idle.pop(self, None)
        self._deadline = None
        for timer in (self._timer, self._stall):
            if timer is not None:
                timer.cancel()
        self._timer = self._stall = None

    def _make_room(self) -> bool:
        """At the limit, close the longest-idle kept-alive connection for a new one (clients
        reopen a kept-alive connection the server closed; that is how keep-alive works)."""
        while self._idle:
            oldest = next(iter(self._idle))
            oldest._forget()
            if not oldest.transport.is_closing():
                oldest.transport.close()
                return True
        return False

    def data_received(self, data: bytes) -> None:
        if self._wait is Wait.FIRST_BYTE or self._wait is Wait.IDLE:
            self._expect(Wait.HEAD, self.settings.header_timeout)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # no WebSockets here (ws = "none")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                limit = MAX_HEAD_BYTES // 1024
                self._refuse(431, f"the request line and headers exceed {limit} KiB", "too large")
            else:
                self._refuse(400, f"malformed HTTP/1.1 request: {_reason(exc)}", "malformed")

    def _refuse(self, status: int, message: str, reason: str) -> None:
        """Answer a request that cannot be served and close the connection. Once a response
        has started nothing can be written in between: the connection is cut instead."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.abort()
                return
            # A malformed body: the app waiting for it is told the client is gone, as
            # connection_lost would (which now goes to the closing answer instead).
            cycle.disconnected = True
            cycle.message_event.set()
        error = RegistryError(ErrorCode.UNSUPPORTED, message, status=status)
        self.connections.discard(self)
        self._forget()
        self.flow.resume_reading()  # the closing answer reads until the client hangs up
        self._answer_and_close(self.transport, status, error, reason)

    def _answer_and_close(
        self, transport: asyncio.Transport, status: int, error: RegistryError, reason: str
    ) -> None:
        answers.answer_and_close(
            transport,
            self.loop,
            status,
            error,
            reason,
            default_headers=self.server_state.default_headers,
            access_log=self.settings.access_log,
        )

    # ------------------------------------------------------------------ parser callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn 0.55's, counting the head's bytes (inline: it runs for every header).
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        name = name.lower()
        value = value.rstrip(b" \t")  # RFC 9110 5.5: trailing whitespace is not the value
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # uvicorn 0.55's, with GatewayCycle and without limit_concurrency (the connection
        # limit is enforced at the accept, before any request is read).
        self._head_bytes = 0
        self._wait, self._deadline = Wait.APP, None  # _expect(APP), from HEAD: never idle
        http_version = self.parser.get_http_version()
        method = self.parser.get_method()
        self.scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            self.scope["http_version"] = http_version
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        self.scope["path"] = self.root_path + path
        self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        self.scope["query_string"] = parsed_url.query or b""
        if self._sendfile_socket is not None:
            self.scope["extensions"] = {zerocopy.ZERO_COPY_SEND: {}}

        existing_cycle = self.cycle
        cycle = GatewayCycle(
            self.scope,
            self.transport,
            self.flow,
            self.logger,
            self.access_logger,
            self.access_log,
            self.server_state.default_headers,
            asyncio.Event(),
            self.expect_100_continue,
            http_version != "1.0" and self.parser.should_keep_alive(),
            self.on_response_complete,
        )
        cycle.protocol = self
        self.cycle = cycle
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:
            # Pipelined HTTP requests are queued up.
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def on_response_complete(self) -> None:
        # uvicorn 0.55's, with our keep-alive deadline in place of its timer.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._expect(Wait.IDLE, self.settings.keepalive_timeout)

    def waiting_for_body(self, waiting: bool) -> None:
        """The app starts (or stops) waiting in ``receive`` for more request body."""
        if waiting:
            self._expect(Wait.BODY, self.settings.body_timeout)
        elif self._wait is Wait.BODY:
            self._expect(Wait.APP, None)

    # ------------------------------------------------------------------ writing

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.settings.send_timeout, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    @functools.cached_property
    def _sendfile_socket(self) -> int | None:
        """The socket ``sendfile`` writes to; None over TLS (see zerocopy.py)."""
        return zerocopy.socket_fd(self.transport)

    async def send_file(self, fd: int, offset: int, count: int) -> bool:
        """Move ``count`` bytes of ``fd`` from ``offset`` to the client with ``sendfile``;
        False when the connection was cut instead (client gone, stalled, file too short)."""
        assert self._sendfile_socket is not None
        sender = zerocopy.FileSend(
            self.loop,
            self.transport,
            self._sendfile_socket,
            fd,
            offset,
            count,
            self.settings.send_timeout,
        )
        self._file_send = sender
        try:
            await sender.run()
            return True
        except zerocopy.SendStalled:
            self._log_stalled()
        except zerocopy.FileEnded as exc:
            log.warning("%s: response cut: %s", _address(self.client), exc)
        except OSError as exc:
            if not zerocopy.client_gone(exc):
                log.warning("%s: sendfile failed: %s", _address(self.client), exc)
        finally:
            self._file_send = None
        self.transport.abort()
        return False

    def _send_stalled(self) -> None:
        self._stall = None
        self._log_stalled()
        self.transport.abort()

    def _log_stalled(self) -> None:
        log.info(
            "%s: the client read nothing for %.0fs; response abandoned",
            _address(self.client),
            self.settings.send_timeout,
        )

    # ------------------------------------------------------------------ deadlines

    def _expect(self, wait: Wait, timeout: float | None) -> None:
        """Wait for ``wait`` from now on, ``timeout`` seconds at most (None: no deadline)."""
        if self._wait is Wait.IDLE:
            self._idle.pop(self, None)
        self._wait = wait
        if wait is Wait.IDLE:
            self._idle[self] = None
        if timeout is None:
            self._deadline = None
            return
        deadline = self.loop.time() + timeout
        self._deadline = deadline
        if self._timer is not None:
            if self._timer_due <= deadline:
                return  # it fires first and moves itself to the deadline
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)
        self._timer_due = deadline

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.transport.is_closing():
            return
        if deadline - self.loop.time() > _EARLY:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_due = deadline
            return
        level = logging.INFO if self._wait is Wait.BODY else logging.DEBUG
        log.log(
            level, "%s: %s timed out; connection closed", _address(self.client), self._wait.value
        )
        self._forget()
        # A client that stopped sending gets no answer (as nginx and Go's net/http do);
        # connection_lost tells an app waiting for body that the client is gone.
        self.transport.close()
        if self.transport.get_write_buffer_size():
            # The last response is still queued and the client is not reading it.
            self.loop.call_later(self.settings.send_timeout, self.transport.abort)


class GatewayCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, telling its protocol while the app waits for
    request body (the body timeout runs only then), and sending the zero-copy extension's
    messages with ``sendfile`` (offered in the scope on plain TCP connections only)."""

    protocol: GatewayProtocol

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == zerocopy.ZERO_COPY_SEND and self.response_started:
            await self._send_file(cast(dict[str, Any], message))
        else:
            await super().send(message)

    async def _send_file(self, message: dict[str, Any]) -> None:
        """``http.response.zerocopysend``: the file's bytes as a body message would carry
        them (Content-Length kept, chunk framing when chunked); then the message's
        ``more_body`` as an empty body message, which completes the response as uvicorn
        does."""
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message {message['type']!r} after the response")
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        file = message["file"]
        fd = file if isinstance(file, int) else file.fileno()
        offset = message.get("offset")
        position = offset is None  # from the file's position, which then moves on
        if offset is None:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        count = message.get("count")
        if count is None:
            count = max(0, os.fstat(fd).st_size - offset)
        if count and self.scope["method"] != "HEAD":
            if self.chunked_encoding:
                self.transport.write(b"%x\r\n" % count)
            elif count > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            else:
                self.expected_content_length -= count
            if not await self.protocol.send_file(fd, offset, count):
                self.disconnected = True  # the connection was cut (connection_lost follows)
                return
            if position:
                os.lseek(fd, offset + count, os.SEEK_SET)
            if self.chunked_encoding:
                self.transport.write(b"\r\n")
        more_body = bool(message.get("more_body", False))
        await super().send({"type": "http.response.body", "body": b"", "more_body": more_body})

    async def receive(self) -> ASGIReceiveEvent:
        if not self.more_body or self.disconnected or self.response_complete:
            return await super().receive()
        self.protocol.waiting_for_body(True)
        try:
            return await super().receive()
        finally:
            self.protocol.waiting_for_body(False)


def _reason(exc: httptools.HttpParserError) -> str:
    return str(exc) or type(exc).__name__


def _address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown client"


_last_limit_warning = 0.0


def _warn_at_limit(limit: int) -> None:
    global _last_limit_warning
    now = time.monotonic()
    if now - _last_limit_warning >= _LIMIT_WARNING_EVERY:
        _last_limit_warning = now
        log.warning(
            "server.max_connections (%d) reached: new connections get 503 until some close",
            limit,
        )
