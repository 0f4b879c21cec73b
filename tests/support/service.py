"""The context-manager protocol shared by every test service (registries, proxies, daemons)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

# Every process a test starts gets proxies aimed at a closed loopback port: a client that
# falls back to a public registry name then fails fast, with no DNS lookup.
LOOPBACK_ONLY_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost",
}


def wait_accepting(
    process: subprocess.Popen[bytes],
    port: int,
    *,
    what: str,
    timeout: float,
    tail: Callable[[], str],
    error: type[Exception],
) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; raise ``error`` (with ``tail()``,
    the end of the logs) when ``process`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with {process.returncode}: {tail()}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.02)
    raise error(f"{what} not ready after {timeout:g}s: {tail()}")


class Service:
    """``with Service() as s`` starts it and always stops it (``close()``, which is ``stop()``
    unless a service has more to clean up)."""

    port: int  # every test service listens on 127.0.0.1:<port>

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the authority in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
