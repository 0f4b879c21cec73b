"""A fault-injecting HTTP reverse proxy for resilience tests: gateway -> FaultProxy -> registry.

:class:`FaultProxy` serves a raw ASGI app with uvicorn in a daemon thread on a free 127.0.0.1
port and forwards every request to a target base URL with httpx. Responses are streamed through
chunk by chunk with their status and end-to-end headers (``Location``, ``Content-Length``,
``Content-Range``, ``Docker-Content-Digest``, ``WWW-Authenticate``...) unchanged; redirects are
passed on, never followed. Rules, changeable from the test thread at any time, inject faults::

    with FaultProxy(registry.url) as proxy:
        proxy.status(503, path_contains="/manifests/", times=1)   # one 503, then pass-through
        proxy.cut_after(1000, path_contains="/blobs/", times=1)   # short body, then EOF
        proxy.corrupt(path_contains="/blobs/")                     # one flipped byte, forever
        proxy.delay(5, path_contains="/v2/", times=1)              # answer late
        proxy.ignore_range(path_contains="/blobs/")                # upstream answers 200
        proxy.clear()                                              # back to pass-through

Rule semantics:

- A rule matches when ``path_contains`` is a substring of the request path *including its query
  string* and, if ``method`` is given, the method is equal. ``times=N`` makes it apply to the
  next N matching requests, ``times=None`` forever. Each rule method returns the :class:`Rule`;
  ``rule.applied`` counts its uses and :meth:`FaultProxy.remove` withdraws it.
- A request takes at most one rule of each kind (the oldest matching one) and faults combine
  in this order: ``delay`` (before anything), ``status`` (answer without forwarding),
  ``ignore_range`` (drop ``Range`` from the forwarded request), then the body faults
  ``corrupt``, ``stall_after`` and ``cut_after``.
- Body faults are only taken (and consumed) for a 2xx upstream answer to a non-HEAD request, so
  a ``cut_after(..., times=1)`` is not wasted on a 401 challenge or a HEAD.
- ``cut_after(n)`` sends the headers (``Content-Length`` included, as upstream sent it) and the
  first ``n`` body bytes, then closes the connection; a body of ``n`` bytes or less is sent
  whole (the rule still counts as applied). ``corrupt(at=0)`` XORs the body byte at offset
  ``at`` with 0xFF (no flip when the body is shorter). ``stall_after(n, s)`` pauses ``s``
  seconds after ``n`` body bytes.

How the abort works (uvicorn 0.54, httptools protocol): an ASGI app that returns after
``http.response.start`` without a final ``more_body=False`` body message makes uvicorn log
"ASGI callable returned without completing response." and call ``transport.close()``. asyncio's
``close()`` flushes the bytes already written and then sends FIN, so the client receives the
headers and exactly ``n`` body bytes followed by EOF. Because ``Content-Length`` promised more,
httpx (h11) raises ``httpx.RemoteProtocolError: peer closed connection without sending complete
message body: received n bytes, expected N``; with a chunked upstream answer (no
``Content-Length``) uvicorn re-chunks and the missing terminating chunk is detected the same
way. That uvicorn log line is suppressed for deliberate cuts only (a filter keyed on a
context variable), so real errors still show.

Other behaviour worth knowing:

- The request log entry is written when the request arrives, so it exists before the client
  sees any answer; ``status`` and ``body_bytes`` are filled in as the answer goes out.
- A ``delay`` on a request without a body also watches the client: if the client gives up
  (read timeout) during the delay, nothing is forwarded upstream and the entry records
  ``error="client disconnected"``. Delays and stalls end at once when :meth:`FaultProxy.stop`
  is called (a delayed request is then answered 503).
- Upstream connection errors and timeouts are answered ``502`` with an OCI error body (entry
  ``error`` says why); ``upstream_timeout`` bounds every upstream phase.
- The ``Host`` sent upstream is the target's; ``X-Forwarded-Host``/``X-Forwarded-Proto`` carry
  the proxy's, so absolute URLs that distribution builds (upload ``Location`` headers) point
  back at the proxy and a push through the proxy stays behind it.
- :meth:`FaultProxy.stop` then :meth:`FaultProxy.start` serves again on the same port, which
  lets a test take the "upstream" down and bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, Self

import httpx
import uvicorn

from tests.support.service import Service

FaultKind = Literal["status", "cut_after", "corrupt", "delay", "stall_after", "ignore_range"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hop-by-hop headers (RFC 9110 7.6.1) plus the ones this proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

STOPPING_STATUS = 503
UPSTREAM_ERROR_STATUS = 502

_ABORTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "faultproxy_aborting", default=False
)


class _DeliberateAbortFilter(logging.Filter):
    """Drop uvicorn's complaint about the response this proxy cut on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _ABORTING.get()


_ABORT_FILTER = _DeliberateAbortFilter()


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _ABORT_FILTER not in logger.filters:
        logger.addFilter(_ABORT_FILTER)


def closed_port_url() -> str:
    """URL of a 127.0.0.1 port with nothing listening (bound, read, closed): connects fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class HungServer(Service):
    """A 127.0.0.1 port that accepts every connection and never answers (nor reads): a
    mirror that hangs. ``connections`` counts the connections accepted."""

    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()

    @property
    def connections(self) -> int:
        return len(self._held)

    def start(self) -> Self:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        listener.settimeout(0.05)  # so the accept loop notices stop()
        self._listener, self.port = listener, listener.getsockname()[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept, name="hung-server", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(connection)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for connection in [*self._held, *([self._listener] if self._listener else [])]:
            connection.close()
        self._listener = self._thread = None


def oci_error_body(code: str, message: str) -> bytes:
    """An OCI distribution error document: ``{"errors": [{"code", "message", "detail"}]}``."""
    error = {"code": code, "message": message, "detail": {"faultproxy": True}}
    return json.dumps({"errors": [error]}, separators=(",", ":")).encode()


def default_error_code(status: int, path: str) -> str:
    """The OCI/distribution error code a registry would send with ``status`` for ``path``."""
    if status == 404:
        if "/manifests/" in path:
            return "MANIFEST_UNKNOWN"
        if "/blobs/" in path:
            return "BLOB_UNKNOWN"
        return "NAME_UNKNOWN"
    return {
        400: "UNSUPPORTED",
        401: "UNAUTHORIZED",
        403: "DENIED",
        416: "BLOB_UNKNOWN",
        429: "TOOMANYREQUESTS",
        503: "UNAVAILABLE",
    }.get(status, "UNKNOWN")


@dataclass
class Rule:
    """One fault rule. ``remaining`` is None for a rule that never runs out."""

    kind: FaultKind
    path_contains: str = ""
    method: str | None = None
    remaining: int | None = None
    applied: int = 0
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    error_code: str | None = None
    nbytes: int = 0
    seconds: float = 0.0
    at: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies to ``method path`` (path with query)."""
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path_contains in path


@dataclass(frozen=True)
class ProxiedRequest:
    """One request as the proxy saw it.

    ``fault`` is the applied faults joined with ``+`` in the order they acted (e.g.
    ``"delay+status"``), or None for a plain pass-through. ``status`` is what the client was
    sent (None if nothing was), ``body_bytes`` how many body bytes went out.
    """

    method: str
    path: str  # path including the query string
    range: str | None
    faults: tuple[FaultKind, ...] = ()
    status: int | None = None
    upstream_status: int | None = None
    body_bytes: int = 0
    error: str | None = None

    @property
    def fault(self) -> str | None:
        """The applied faults joined with ``+``, or None."""
        return "+".join(self.faults) or None

    @property
    def path_only(self) -> str:
        """The path without its query string."""
        return self.path.split("?", 1)[0]


class FaultProxy(Service):
    """A reverse proxy to ``target`` (``http://host:port[/prefix]``) with injectable faults."""

    def __init__(
        self,
        target: str,
        *,
        upstream_timeout: float = 30.0,
        graceful_timeout: int = 1,
    ) -> None:
        self.target = target.rstrip("/")
        self.upstream_timeout = upstream_timeout
        self.graceful_timeout = graceful_timeout
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[ProxiedRequest] = []
        self._log_start = 0
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        """Serve in a daemon thread; the first start picks a free port, later ones reuse it."""
        if self._server is not None:
            return self
        _install_log_filter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self._port or 0))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._asgi,
            host="127.0.0.1",
            port=self._port,
            loop="asyncio",
            http="httptools",
            ws="none",
            lifespan="on",
            interface="asgi3",
            proxy_headers=False,
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=self.graceful_timeout,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"faultproxy-{self._port}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"fault proxy on port {self._port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: ends delays and stalls at once, then shuts uvicorn down."""
        server, thread, loop = self._server, self._thread, self._loop
        self._server = self._thread = None
        if server is None or thread is None:
            return
        stopping = self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stopping.set)
        server.should_exit = True
        thread.join(timeout=timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=timeout)
        if thread.is_alive():
            raise RuntimeError(f"fault proxy on port {self._port} did not stop")

    @property
    def port(self) -> int:
        """The port (kept across stop/start)."""
        if self._port is None:
            raise RuntimeError("fault proxy never started")
        return self._port

    # -- rules -----------------------------------------------------------------------------

    def status(
        self,
        code: int,
        *,
        path_contains: str = "",
        method: str | None = None,
        times: int | None = None,
        headers: Mapping[str, str] | None = None,
        error_code: str | None = None,
        body: bytes | None = None,
    ) -> Rule:
        """Answer matching requests with ``code`` and an OCI JSON error, without forwarding.

        ``headers`` are added (e.g. ``{"Retry-After": "2"}``); ``error_code`` overrides the
        OCI code (default from :func:`default_error_code`); ``body`` replaces the JSON.
        """
        return self._add(
            Rule(
                "status",
                status=code,
                headers=tuple((headers or {}).items()),
                error_code=error_code,
                body=body,
            ),
            path_contains,
            method,
            times,
        )

    def cut_after(
        self,
        nbytes: int,
        *,
        path_contains: str = "",
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Forward, but close the connection after ``nbytes`` of the response body."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        return self._add(Rule("cut_after", nbytes=nbytes), path_contains, method, times)

    def corrupt(
        self,
        *,
        path_contains: str = "",
        method: str | None = None,
        times: int | None = None,
        at: int = 0,
    ) -> Rule:
        """Forward, but XOR the body byte at offset ``at`` with 0xFF (same length)."""
        if at < 0:
            raise ValueError("at must be >= 0")
        return self._add(Rule("corrupt", at=at), path_contains, method, times)

    def delay(
        self,
        seconds: float,
        *,
        path_contains: str = "",
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Wait ``seconds`` before doing anything else with matching requests."""
        return self._add(Rule("delay", seconds=seconds), path_contains, method, times)

    def stall_after(
        self,
        nbytes: int,
        seconds: float,
        *,
        path_contains: str = "",
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Forward, but pause ``seconds`` after ``nbytes`` of the body (a mid-body stall)."""
        rule = Rule("stall_after", nbytes=nbytes, seconds=seconds)
        return self._add(rule, path_contains, method, times)

    def ignore_range(
        self,
        *,
        path_contains: str = "",
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Drop the ``Range`` header when forwarding, so upstream answers 200 in full."""
        return self._add(Rule("ignore_range"), path_contains, method, times)

    def remove(self, rule: Rule) -> None:
        """Withdraw one rule (no error if it is gone already)."""
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Remove every rule: plain pass-through from now on (the log is kept)."""
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[Rule]:
        """Snapshot of the active rules (copies)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._rules]

    def _add(self, rule: Rule, path_contains: str, method: str | None, times: int | None) -> Rule:
        if times is not None and times < 0:
            raise ValueError("times must be >= 0 or None")
        rule.path_contains = path_contains
        rule.method = method
        rule.remaining = times
        with self._lock:
            self._rules.append(rule)
        return rule

    def _take(self, kinds: tuple[FaultKind, ...], method: str, path: str) -> dict[str, Rule]:
        """Consume the oldest matching rule of each kind, atomically."""
        taken: dict[str, Rule] = {}
        with self._lock:
            for kind in kinds:
                for rule in self._rules:
                    if rule.kind == kind and rule.matches(method, path):
                        rule.applied += 1
                        if rule.remaining is not None:
                            rule.remaining -= 1
                        taken[kind] = dataclasses.replace(rule)
                        break
            self._rules = [r for r in self._rules if r.remaining is None or r.remaining > 0]
        return taken

    # -- request log -----------------------------------------------------------------------

    def requests(self, since: int | None = None) -> list[ProxiedRequest]:
        """Requests seen after ``since`` (a :meth:`mark`; default: the last :meth:`clear_log`)."""
        with self._lock:
            start = self._log_start if since is None else since
            return list(self._log[start:])

    def mark(self) -> int:
        """A log offset to pass as ``since``."""
        with self._lock:
            return len(self._log)

    def clear_log(self) -> None:
        """Forget the requests seen so far (the default ``since`` moves to now)."""
        with self._lock:
            self._log_start = len(self._log)

    def count(
        self,
        method: str | None = None,
        path_contains: str = "",
        *,
        fault: str | None = None,
        since: int | None = None,
    ) -> int:
        """How many requests matched ``method`` (None: any), the path substring and ``fault``.

        ``fault`` matches one applied fault kind (``"status"``) or the joined string
        (``"delay+status"``).
        """
        return sum(
            1
            for r in self.requests(since)
            if (method is None or r.method == method.upper())
            and path_contains in r.path
            and (fault is None or fault == r.fault or fault in r.faults)
        )

    def _record(self, entry: ProxiedRequest) -> int:
        with self._lock:
            self._log.append(entry)
            return len(self._log) - 1

    def _update(self, index: int, **changes: Any) -> None:
        with self._lock:
            entry = self._log[index]
            if "faults" in changes:
                changes["faults"] = entry.faults + tuple(changes["faults"])
            self._log[index] = dataclasses.replace(entry, **changes)

    # -- the ASGI app ----------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                self._stopping = asyncio.Event()
                self._client = httpx.AsyncClient(
                    trust_env=False,
                    follow_redirects=False,
                    timeout=self.upstream_timeout,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        path = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        range_header = _header(headers, b"range")
        index = self._record(ProxiedRequest(method=method, path=path, range=range_header))
        has_body = _header(headers, b"transfer-encoding") is not None or (
            _header(headers, b"content-length") not in (None, "0")
        )

        delayed = self._take(("delay",), method, path)
        if delayed:
            self._update(index, faults=("delay",))
            outcome = await self._wait(delayed["delay"].seconds, None if has_body else receive)
            if outcome == "disconnected":
                self._update(index, error="client disconnected")
                return
            if outcome == "stopping":
                await self._send_error(send, index, STOPPING_STATUS, "UNAVAILABLE", "stopping")
                return
        answered = self._take(("status",), method, path)
        if answered:
            rule = answered["status"]
            self._update(index, faults=("status",))
            code = rule.error_code or default_error_code(rule.status, path)
            body = rule.body if rule.body is not None else oci_error_body(code, "injected fault")
            await self._send_simple(send, index, rule.status, body, rule.headers)
            return

        ignore = self._take(("ignore_range",), method, path)
        if ignore:
            self._update(index, faults=("ignore_range",))
        await self._forward(scope, receive, send, index, path, headers, has_body, bool(ignore))

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        index: int,
        path: str,
        headers: list[tuple[bytes, bytes]],
        has_body: bool,
        drop_range: bool,
    ) -> None:
        client = self._client
        if client is None:
            await self._send_error(send, index, STOPPING_STATUS, "UNAVAILABLE", "not started")
            return
        method: str = scope["method"]
        connection_tokens = {
            token.strip().lower().encode()
            for token in (_header(headers, b"connection") or "").split(",")
            if token.strip()
        }
        upstream_headers = [
            (name, value)
            for name, value in headers
            if name not in _HOP_BY_HOP
            and name not in connection_tokens
            and name not in (b"host", b"x-forwarded-host", b"x-forwarded-proto")
            and not (drop_range and name == b"range")
        ]
        client_host = _header(headers, b"host") or self.host
        upstream_headers += [
            (b"x-forwarded-host", client_host.encode("latin-1")),
            (b"x-forwarded-proto", b"http"),
        ]
        body_state = {"done": not has_body}

        async def request_body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionResetError("client disconnected while sending the body")
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    body_state["done"] = True
                    return

        request = httpx.Request(
            method,
            self.target + path,
            headers=upstream_headers,
            content=request_body() if has_body else None,
        )
        try:
            upstream = await client.send(request, stream=True)
        except Exception as exc:
            message = f"upstream: {type(exc).__name__}: {exc}"
            self._update(index, error=message)
            await self._send_error(send, index, UPSTREAM_ERROR_STATUS, "UNAVAILABLE", message)
            return

        watcher: asyncio.Task[None] | None = None
        try:
            self._update(index, upstream_status=upstream.status_code)
            body_faults: dict[str, Rule] = {}
            if method != "HEAD" and 200 <= upstream.status_code < 300:
                body_faults = self._take(("corrupt", "stall_after", "cut_after"), method, path)
                if body_faults:
                    self._update(index, faults=tuple(body_faults))
            response_headers = [
                (name.lower(), value)
                for name, value in upstream.headers.raw
                if name.lower() not in _HOP_BY_HOP
            ]
            if body_state["done"]:
                watcher = asyncio.create_task(_wait_disconnect(receive))
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status_code,
                    "headers": response_headers,
                }
            )
            self._update(index, status=upstream.status_code)
            await self._pump(send, index, upstream, body_faults, watcher)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await upstream.aclose()

    async def _pump(
        self,
        send: Send,
        index: int,
        upstream: httpx.Response,
        faults: dict[str, Rule],
        watcher: asyncio.Task[None] | None,
    ) -> None:
        """Stream the upstream body to the client, applying the body faults."""
        corrupt_at = faults["corrupt"].at if "corrupt" in faults else None
        stall = faults.get("stall_after")
        cut_at = faults["cut_after"].nbytes if "cut_after" in faults else None
        sent = 0

        async def forward(data: bytes) -> None:
            nonlocal sent
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": True})
                sent += len(data)
                self._update(index, body_bytes=sent)

        try:
            async for raw in upstream.aiter_raw():
                chunk = raw
                if watcher is not None and watcher.done():
                    self._update(index, error="client disconnected")
                    return
                if corrupt_at is not None and sent <= corrupt_at < sent + len(chunk):
                    flipped = bytearray(chunk)
                    flipped[corrupt_at - sent] ^= 0xFF
                    chunk = bytes(flipped)
                if stall is not None and sent + len(chunk) > stall.nbytes:
                    split = max(stall.nbytes - sent, 0)
                    await forward(chunk[:split])
                    chunk = chunk[split:]
                    if await self._wait(stall.seconds, None) == "stopping":
                        self._abort(index, "stopped during a stall")
                        return
                    stall = None
                if cut_at is not None and sent + len(chunk) > cut_at:
                    await forward(chunk[: cut_at - sent])
                    self._abort(index, None)
                    return
                await forward(chunk)
        except httpx.HTTPError as exc:
            self._abort(index, f"upstream body: {type(exc).__name__}: {exc}")
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _abort(self, index: int, error: str | None) -> None:
        """Return without finishing the response: uvicorn flushes, then closes the socket."""
        _ABORTING.set(True)
        if error is not None:
            self._update(index, error=error)

    async def _wait(self, seconds: float, receive: Receive | None) -> str:
        """Sleep up to ``seconds``: "elapsed", "stopping", or "disconnected" (if watching)."""
        stopping = self._stopping
        if stopping is None or stopping.is_set():
            return "stopping"
        waiters: dict[asyncio.Task[Any], str] = {asyncio.create_task(stopping.wait()): "stopping"}
        if receive is not None:
            waiters[asyncio.create_task(_wait_disconnect(receive))] = "disconnected"
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if not done:
            return "elapsed"
        return "stopping" if stopping.is_set() else waiters[next(iter(done))]

    async def _send_error(
        self, send: Send, index: int, status: int, code: str, message: str
    ) -> None:
        await self._send_simple(send, index, status, oci_error_body(code, message), ())

    async def _send_simple(
        self,
        send: Send,
        index: int,
        status: int,
        body: bytes,
        extra: tuple[tuple[str, str], ...],
    ) -> None:
        headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"docker-distribution-api-version", b"registry/2.0"),
            (b"content-length", str(len(body)).encode()),
        ]
        overridden = {name.lower().encode() for name, _ in extra}
        headers = [(n, v) for n, v in headers if n not in overridden]
        headers += [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self._update(index, status=status, body_bytes=len(body))


async def _wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone (any request body left is read and dropped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes), decoded, or None."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
