"""Look at a page as a person would: Debian's chromium, headless, on loopback pages only.

``PageServer`` serves fixed HTML documents from 127.0.0.1 (a tiny ``http.server`` in a
thread); ``Chromium`` loads a page with the system's ``chromium`` and returns the DOM after
load (``--dump-dom``) or writes a PNG screenshot. Nothing is installed or downloaded here:
when no chromium is on ``PATH``, ``find_chromium()`` is None and tests skip.

Chromium is only ever pointed at ``http://127.0.0.1``: every URL is checked before it is
loaded, every other host name fails to resolve (``--host-resolver-rules``), and its
background traffic (updates, sync, component downloads) is switched off.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from tests.support.service import LOOPBACK_ONLY_ENV, Service

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "chromium is not installed (apt-get install chromium; scripts/test installs it)"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_chromium() -> str | None:
    """The system chromium on ``PATH``, or None."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class PageServer(Service):
    """Serves ``pages`` (path -> HTML text) on 127.0.0.1; any other path is a 404."""

    def __init__(self, pages: Mapping[str, str]) -> None:
        self.pages = {path: text.encode() for path, text in pages.items()}
        self.requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        pages, requests = self.pages, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                body = pages.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class Chromium:
    """The system chromium, headless, with a throw-away profile under ``workdir``."""

    def __init__(self, workdir: Path, executable: str | None = None, timeout: float = 60) -> None:
        found = executable or find_chromium()
        if found is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.executable = found
        self.workdir = workdir
        self.timeout = timeout

    def dump_dom(self, url: str) -> str:
        """The serialized DOM of ``url`` once it has loaded."""
        return self._run(url, ["--dump-dom"])

    def screenshot(self, url: str, path: Path, *, width: int = 1280, height: int = 900) -> Path:
        """A PNG of the top ``width`` x ``height`` CSS pixels of ``url``, written to ``path``."""
        self._run(
            url,
            [
                f"--screenshot={path}",
                f"--window-size={width},{height}",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
            ],
        )
        if not path.read_bytes().startswith(PNG_MAGIC):
            raise RuntimeError(f"chromium wrote no PNG to {path}")
        return path

    def _run(self, url: str, extra: list[str]) -> str:
        _require_loopback(url)
        self.workdir.mkdir(parents=True, exist_ok=True)
        profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=self.workdir)
        args = [
            self.executable,
            "--headless",
            # The sandbox needs user namespaces, which root and many containers lack; the
            # pages loaded here are our own, served from loopback.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-first-run",
            "--no-default-browser-check",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            *extra,
            url,
        ]
        env = {
            **os.environ,
            **LOOPBACK_ONLY_ENV,
            "HOME": self.workdir.as_posix(),
            "XDG_CONFIG_HOME": (self.workdir / "config").as_posix(),
            "XDG_CACHE_HOME": (self.workdir / "cache").as_posix(),
        }
        # Its own session, so a hung browser is ended with every helper process it started.
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"chromium did not load {url} in {self.timeout} s") from None
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        if proc.returncode != 0:
            tail = err.decode(errors="replace")[-2000:]
            raise RuntimeError(f"chromium exited {proc.returncode} for {url}:\n{tail}")
        return out.decode()


def _require_loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != "127.0.0.1":
        raise ValueError(f"chromium loads only http://127.0.0.1 pages here, not {url!r}")
