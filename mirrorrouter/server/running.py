"""Starting and running the server: what ``mirrorrouter serve`` calls once the config is
valid.

``ServerConfig`` is uvicorn's configuration with ``GatewayProtocol`` (protocol.py) and the
``[server]`` settings it reads, pickled as it is to each worker process when
``workers > 1``. ``run`` starts it the way ``uvicorn.run`` does, after
``fit_descriptor_limit`` has made room for ``max_connections`` under ``RLIMIT_NOFILE`` and
with the listening sockets bound once, in the parent. ``GatewayServer`` adds the HTTPS
listener of ``[server.tls]`` in every worker and makes SIGHUP reload its certificate
(tls.py); ``Supervisor`` passes SIGHUP on to the workers instead of restarting them.

Written against uvicorn 0.55 (pinned in pyproject.toml): ``Supervisor`` overrides where
uvicorn's ``Multiprocess`` makes its workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import uvicorn
from uvicorn._types import ASGIApplication
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from mirrorrouter.config.model import ServerSettings
from mirrorrouter.server import tls
from mirrorrouter.server.protocol import GatewayProtocol

log = logging.getLogger("mirrorrouter.server")

# A connection sending a blob holds its socket, a cache file and, while sendfile waits for
# the socket, a duplicate of it (zerocopy.py); the spare covers the listeners, upstream
# connection pools, locks and logs.
DESCRIPTORS_PER_CONNECTION = 3
SPARE_DESCRIPTORS = 1024


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration with ``GatewayProtocol`` and the ``[server]`` settings it
    reads; pickled to every worker process as it is."""

    def __init__(self, app: ASGIApplication | str, server: ServerSettings, **kwargs: Any) -> None:
        super().__init__(app, http=GatewayProtocol, ws="none", **kwargs)
        self.server_settings = server


def fit_descriptor_limit(max_connections: int) -> int:
    """How many connections a worker may hold: raise the soft ``RLIMIT_NOFILE`` toward the
    hard limit so that ``max_connections`` fit, and when they cannot, the number that does
    (with a warning). Children inherit the raised limit."""
    needed = DESCRIPTORS_PER_CONNECTION * max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file-descriptor limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    spare = min(SPARE_DESCRIPTORS, soft // 4)
    fitting = max(1, (soft - spare) // DESCRIPTORS_PER_CONNECTION)
    log.warning(
        "server.max_connections = %d needs %d file descriptors (%d per connection and %d "
        "spare) but the limit is %d (hard %s): using %d; raise `ulimit -n` (LimitNOFILE, "
        "--ulimit nofile) to allow more",
        max_connections,
        needed,
        DESCRIPTORS_PER_CONNECTION,
        SPARE_DESCRIPTORS,
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        fitting,
    )
    return fitting


def run(config: ServerConfig) -> None:
    """Serve until stopped, as ``uvicorn.run`` does: one process, or a supervisor and
    ``config.workers`` worker processes sharing the listening sockets (bound here, once:
    the plain one unless ``[server] port`` is 0, and the HTTPS one of ``[server.tls]``)."""
    settings = config.server_settings
    limit = fit_descriptor_limit(settings.max_connections)
    config.server_settings = replace(settings, max_connections=limit)
    sockets = []
    if config.port:
        sockets.append(config.bind_socket())
    if settings.tls is not None:
        sockets.append(_bind(config.host, settings.tls.port, "https"))
    server = GatewayServer(config)
    try:
        if config.workers > 1:
            Supervisor(config, sockets=sockets).run()
        else:
            server.run(sockets=sockets)
    except KeyboardInterrupt:  # pragma: no cover
        pass
    if config.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)


def _bind(host: str, port: int, scheme: str) -> socket.socket:
    """A listening socket as ``uvicorn.Config.bind_socket`` makes one, for another port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", host, port, exc)
        sys.exit(STARTUP_FAILURE)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    log.info("listening on %s://%s:%d", scheme, shown, port)
    sock.set_inheritable(True)
    return sock


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the HTTPS listener of ``[server.tls]`` beside the plain one, in
    the same process, sharing its connections (one ``max_connections``), lifespan and
    shutdown; and SIGHUP reloading the TLS certificate instead of ending the process.

    uvicorn applies one ``config.ssl`` to every socket it is given, so it gets the plain
    sockets and the HTTPS ones are served here, with a context of this process's own
    (tls.Certificates). The handshake must end within ``header_timeout``, like a request's
    headers; only then is the connection counted and handed to ``GatewayProtocol``, whose
    ``scope["scheme"]`` is then ``https`` (uvicorn reads it off the transport)."""

    config: ServerConfig

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self.certificates: tls.Certificates | None = None
        self._chores: set[asyncio.Task[Any]] = set()
        self._hangup = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        settings = self.config.server_settings.tls
        secure = [s for s in sockets or () if settings and s.getsockname()[1] == settings.port]
        plain = None if sockets is None else [s for s in sockets if s not in secure]
        # Before `started`: the supervisor forwards SIGHUP only to started workers.
        self._catch_hangups(True)
        await super().startup(sockets=plain)
        if settings is None or not secure:
            return
        try:
            self.certificates = tls.Certificates(settings)
        except tls.CertificateError as exc:
            log.error("cannot serve HTTPS: %s", exc)
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        loop = asyncio.get_running_loop()
        for sock in secure:
            server = await loop.create_server(
                self._protocol,
                sock=sock,
                ssl=self.certificates.context,
                backlog=self.config.backlog,
                ssl_handshake_timeout=self.config.server_settings.header_timeout,
            )
            self.servers.append(server)
        self._chore(self.certificates.watch())

    def _protocol(self, _loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
        # uvicorn's create_protocol (a closure inside its startup)
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
            _loop=_loop,
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._catch_hangups(False)
        for task in self._chores:
            task.cancel()
        await super().shutdown(sockets=sockets)

    def _catch_hangups(self, on: bool) -> None:
        if threading.current_thread() is not threading.main_thread() or on == self._hangup:
            return  # signals reach the main thread only (a server in a test's thread)
        loop = asyncio.get_running_loop()
        if on:
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        else:
            loop.remove_signal_handler(signal.SIGHUP)
        self._hangup = on

    def _on_hangup(self) -> None:
        if self.certificates is None:
            log.info("SIGHUP: no [server.tls] certificate to reload; nothing else is reloaded")
            return
        self._chore(self.certificates.reload("SIGHUP"))

    def _chore(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)


class _Worker(Process):
    """A worker process of the supervisor, running ``GatewayServer``."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GatewayServer(self.config)  # type: ignore[arg-type]
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's supervisor (uvicorn 0.55's, where it makes workers: ours run
    ``GatewayServer``), where SIGHUP reloads the TLS certificate in every worker instead of
    replacing the workers one by one: it is passed on to each started worker (one still
    starting reads the files as it starts)."""

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = _Worker(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving (the app, TLS, the sockets): so would its successor.
                log.error("worker [%s] failed to start; stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("worker [%s] died; starting another", process.pid)
            process = _Worker(self.config, self.sockets)
            process.start()
            self.processes[idx] = process

    def handle_hup(self) -> None:
        for process in self.processes:
            if process.pid is not None and process.is_ready(timeout=1):
                os.kill(process.pid, signal.SIGHUP)
        log.info("SIGHUP passed on to the workers: they reload the TLS certificate")

    def handle_ttin(self) -> None:
        log.info("SIGTTIN: one more worker")
        self.processes_num += 1
        process = _Worker(self.config, self.sockets)
        process.start()
        self.processes.append(process)
