"""A real forward proxy on loopback: Debian's squid, the proxy corporate networks run.

Facts this module relies on (squid 5.7 on Debian 12):

- Started as root, squid switches to the ``proxy`` user (it will not serve as root), so its
  files live in a directory of its own under the system temp directory, owned by that user;
  started by anyone else it runs as them.
- ``-N`` keeps it in the foreground as our child. It accepts connections within 0.1 s.
- With no ``cache_dir`` and ``cache deny all`` nothing is cached: every request reaches the
  upstream. It tunnels ``CONNECT`` to any port (no ``SSL_ports`` rule here) at 1-2 GB/s on
  loopback; tinyproxy managed 0.6 GB/s, which would have measured the proxy, not the gateway.
- The access log has one line per transaction in squid's native format, written when the
  transaction ends (for a ``CONNECT`` tunnel: when the tunnel closes):
  ``time elapsed client TCP_MISS/200 bytes GET http://host:port/path user HIER_DIRECT/ip type``.
- With ``users``, Basic proxy authentication by ``basic_ncsa_auth`` over an htpasswd file
  (``htpasswd -m`` entries); the user column then names who was let through.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import quote

from tests.support.registry import HTPASSWD_BINARY, free_port, wait_until
from tests.support.service import Service, wait_accepting

SQUID_BINARY = "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
SYNC_URL = "http://127.0.0.1:9/mirrorrouter-proxy-sync-"


class ProxyStartError(RuntimeError):
    """squid exited or never accepted connections during startup."""


@dataclass(frozen=True)
class ProxiedRequest:
    """One transaction as squid logged it."""

    method: str
    target: str  # the absolute URL, or host:port for a CONNECT
    status: int
    user: str  # "-" when the request carried no credentials
    size: int


def parse_access_line(line: str) -> ProxiedRequest | None:
    fields = line.split()
    if len(fields) < 8 or "/" not in fields[3]:
        return None
    status = fields[3].rpartition("/")[2]
    return ProxiedRequest(
        method=fields[5],
        target=fields[6],
        status=int(status) if status.isdigit() else 0,
        user=fields[7],
        size=int(fields[4]) if fields[4].isdigit() else 0,
    )


class Squid(Service):
    """``squid -N`` on a free 127.0.0.1 port, as a forward proxy for plain requests and CONNECT."""

    def __init__(self, *, users: Mapping[str, str] | None = None) -> None:
        self.users = dict(users or {})
        self.port = 0
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._sync = itertools.count(1)

    def proxy_url(self, user: str | None = None, password: str = "") -> str:
        """``http://[user:password@]127.0.0.1:PORT``, credentials percent-encoded."""
        if user is None:
            return self.url
        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}"

    @property
    def access_log(self) -> Path:
        assert self.root is not None
        return self.root / "access.log"

    def config_text(self) -> str:
        assert self.root is not None
        root = self.root
        access = "http_access allow all"
        if self.users:
            access = (
                f"auth_param basic program {NCSA_AUTH} {root / 'htpasswd'}\n"
                "auth_param basic children 2 startup=1 idle=1\n"
                "acl users proxy_auth REQUIRED\n"
                "http_access allow users\n"
                "http_access deny all"
            )
        return f"""http_port 127.0.0.1:{self.port}
{access}
cache deny all
access_log stdio:{root / "access.log"}
cache_log {root / "cache.log"}
pid_filename {root / "squid.pid"}
coredump_dir {root}
visible_hostname mirrorrouter-test-proxy
shutdown_lifetime 0 seconds
logfile_rotate 0
"""

    def start(self) -> Self:
        self.root = Path(tempfile.mkdtemp(prefix="mirrorrouter-squid-"))
        if self.users:
            lines = [
                subprocess.run(
                    [HTPASSWD_BINARY, "-nbm", user, password],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout.strip()
                for user, password in self.users.items()
            ]
            (self.root / "htpasswd").write_text("\n".join(lines) + "\n")
        if os.geteuid() == 0:  # squid serves as "proxy": its files must be that user's
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "proxy", "proxy")
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            (self.root / "squid.conf").write_text(self.config_text())
            try:
                self._launch()
                return self
            except ProxyStartError:
                self.stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        assert self.root is not None
        with (self.root / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [SQUID_BINARY, "-N", "-f", str(self.root / "squid.conf")],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.root,
            )
        wait_accepting(
            self.process, self.port, what="squid", timeout=15, tail=self.tail, error=ProxyStartError
        )

    def tail(self) -> str:
        text = ""
        if self.root is not None:
            for name in ("stderr.log", "cache.log"):
                with contextlib.suppress(OSError):
                    text += (self.root / name).read_text(errors="replace")[-2000:]
        return text

    def requests(self) -> list[ProxiedRequest]:
        """Every transaction logged so far, except the sync markers."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        parsed = (parse_access_line(line) for line in text.splitlines())
        return [
            r
            for r in parsed
            # "-" lines are connections that sent nothing: the readiness probe.
            if r is not None and r.method != "-" and not r.target.startswith(SYNC_URL)
        ]

    def sync(self, timeout: float = 10.0) -> None:
        """Return once every transaction that ended before this call is in the log: a marker
        request (refused by squid, but logged) is sent and its line awaited."""
        marker = f"{SYNC_URL}{next(self._sync)}"
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(f"GET {marker} HTTP/1.0\r\n\r\n".encode())
            while sock.recv(65536):
                pass
        wait_until(lambda: marker in self.access_log.read_text(errors="replace"), timeout, marker)

    def stop(self) -> None:
        """SIGKILL: its orderly shutdown takes 2 s and has nothing to save (every line is
        written when its transaction ends; ``sync`` waits for them)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def close(self) -> None:
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
