"""An ASGI app served by uvicorn in a daemon thread on a free loopback port, over TLS when
given a certificate: the test servers that stand for CDNs, token realms and hostile
upstreams (cdn.py, hostile.py) run on it.

Also ``stream_until_gone``: a body made as it is sent, which stops when the client hangs
up (uvicorn's ``send`` returns quietly after a disconnect, so a sender must watch for it).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Self

import uvicorn

from tests.support.service import Service

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


class AppServer(Service):
    """``app`` on ``https://<name>:<port>`` (with ``cert``) or ``http://``; ``name`` is the
    host the URL names (``127.0.0.1`` or ``localhost``, both on loopback)."""

    def __init__(
        self, app: Asgi, *, cert: tuple[Path, Path] | None = None, name: str = "127.0.0.1"
    ) -> None:
        self.app = app
        self.cert = cert
        self.name = name
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"{self.name}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.cert else 'http'}://{self.host}"

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            http="httptools",
            ws="none",
            lifespan="off",
            interface="asgi3",  # a bound method looks like ASGI2 to uvicorn's guess
            proxy_headers=False,
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=1,
            ssl_certfile=str(self.cert[0]) if self.cert else None,
            ssl_keyfile=str(self.cert[1]) if self.cert else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"test server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(10)
        if thread.is_alive():
            server.force_exit = True
            thread.join(10)


async def respond(
    send: Send, status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> None:
    """A whole answer: status, headers (Content-Length added), body."""
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def stream_until_gone(
    receive: Receive, send: Send, pieces: Callable[[], bytes | None]
) -> int:
    """Send ``pieces()`` until it returns None or the client hangs up; the bytes sent."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    sent = 0
    try:
        while not gone.is_set():
            piece = pieces()
            if piece is None:
                await send({"type": "http.response.body", "body": b""})
                break
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
            await asyncio.sleep(0)  # let the watcher see a hang-up
    finally:
        watcher.cancel()
    return sent
