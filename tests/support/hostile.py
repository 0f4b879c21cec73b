"""A hostile upstream: huge bodies made lazily (never held by the test either) and redirects
of tag lists and referrers to another host, a ``Collector`` that logs whatever it receives.

``HostileUpstream`` wants HTTP Basic credentials (so there are credentials to leak) and
answers, by repository:

- ``huge-error/*`` manifests: ``error_status`` with a JSON error body of ``error_bytes``,
  chunked (no Content-Length), so only reading it tells how long it is;
- ``huge-tags/*`` tag lists: a JSON tag list of ``list_bytes``, chunked;
- ``moved/*`` tag lists and every referrers request: 307 to the collector.

(Names have two components: the gateway would put ``library/`` before a docker.io name of
one.)

``sent`` records, per request path, how many body bytes went out before the client hung up.
"""

from __future__ import annotations

import base64
import itertools
import threading
from collections.abc import Callable

from tests.support.appserver import AppServer, Receive, Scope, Send, respond, stream_until_gone
from tests.support.cdn import RequestLog, received

MIB = 1024 * 1024
PIECE = 64 * 1024


def lazy_body(head: bytes, size: int, fill: bytes) -> Callable[[], bytes | None]:
    """Pieces of ``head`` then ``fill`` repeated, ``size`` bytes in all, made on demand."""
    left = [size]
    pieces = itertools.chain([head], itertools.repeat((fill * PIECE)[:PIECE]))

    def next_piece() -> bytes | None:
        if left[0] <= 0:
            return None
        piece = next(pieces)[: left[0]]
        left[0] -= len(piece)
        return piece

    return next_piece


class Collector:
    """Any request at all: logged, answered 200 with a JSON document that would pass as a
    tag list and a referrers index (what a gateway would hand its client)."""

    def __init__(self) -> None:
        self.log = RequestLog()
        self.server = AppServer(self._app)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = self.log.add(await received(scope, receive))
        seen.status = 200
        body = b'{"name":"loot","tags":["internal-secret"],"manifests":[]}'
        await respond(send, 200, body, {"Content-Type": "application/json"})


class HostileUpstream:
    """See the module docstring; ``collector`` receives the redirects."""

    def __init__(
        self,
        collector: Collector,
        *,
        user: tuple[str, str],
        error_status: int = 400,
        error_bytes: int = 600 * MIB,
        list_bytes: int = 64 * MIB,
    ) -> None:
        self.collector = collector
        self.credentials = "Basic " + base64.b64encode(":".join(user).encode()).decode()
        self.error_status = error_status
        self.error_bytes = error_bytes
        self.list_bytes = list_bytes
        self.log = RequestLog()
        self.sent: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self.server = AppServer(self._app)

    def sent_to(self, fragment: str) -> list[int]:
        """Body bytes sent for each request whose path contains ``fragment``."""
        with self._lock:
            return [n for path, counts in self.sent.items() if fragment in path for n in counts]

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = self.log.add(await received(scope, receive))
        path = seen.path
        if seen.headers.get("authorization") != self.credentials:
            seen.status = 401
            await respond(send, 401, b"", {"WWW-Authenticate": 'Basic realm="hostile"'})
            return
        if path.rstrip("/") == "/v2":
            seen.status = 200
            await respond(send, 200, b"{}", {"Content-Type": "application/json"})
            return
        if "/referrers/" in path or path.startswith("/v2/moved/"):
            seen.status = 307
            await respond(send, 307, b"", {"Location": f"{self.collector.server.url}/loot"})
            return
        if path.startswith("/v2/huge-error/") and "/manifests/" in path:
            head = b'{"errors":[{"code":"UNKNOWN","message":"'
            seen.status = self.error_status
            await self._stream(seen.path, receive, send, self.error_status, head, b" ")
            return
        if path.startswith("/v2/huge-tags/") and path.endswith("/tags/list"):
            seen.status = 200
            head = b'{"name":"huge-tags","tags":['
            await self._stream(seen.path, receive, send, 200, head, b'"t",', self.list_bytes)
            return
        seen.status = 404
        await respond(send, 404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')

    async def _stream(
        self,
        path: str,
        receive: Receive,
        send: Send,
        status: int,
        head: bytes,
        fill: bytes,
        size: int | None = None,
    ) -> None:
        headers = [(b"content-type", b"application/json")]  # chunked: no Content-Length
        await send({"type": "http.response.start", "status": status, "headers": headers})
        body = lazy_body(head, self.error_bytes if size is None else size, fill)
        sent = await stream_until_gone(receive, send, body)
        with self._lock:
            self.sent.setdefault(path, []).append(sent)
