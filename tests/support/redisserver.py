"""A real ``redis-server`` (Debian's redis-server 7) on a free loopback port, for coordination.

Nothing is persisted (``--save ''``, ``--appendonly no``); the server runs in its own
directory (a pytest ``tmp_path``) so a stray dump file never lands in the work tree.
``stop()`` then ``start()`` restarts it on the same port, empty: an outage.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from tests.support.registry import free_port
from tests.support.service import Service

REDIS_BINARY = "redis-server"


class RedisStartError(RuntimeError):
    """redis-server exited or never answered during startup."""


def redis_available() -> bool:
    return shutil.which(REDIS_BINARY) is not None


class RedisServer(Service):
    """``redis-server --port PORT --bind 127.0.0.1`` as a child process."""

    def __init__(self, root: Path, *, startup_timeout: float = 10.0) -> None:
        self.root = Path(root)
        self.log_path = self.root / "redis.log"
        self.startup_timeout = startup_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        fixed = self.port
        for attempt in range(3):
            self.port = fixed or free_port()
            try:
                self._launch()
                return self
            except RedisStartError as exc:
                if "in use" not in str(exc) or attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    REDIS_BINARY,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.root),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise RedisStartError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
            if self._pong():
                return
            time.sleep(0.02)
        self.stop()
        raise RedisStartError(f"redis-server did not answer: {self.log_path.read_text()[-2000:]}")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=5)
