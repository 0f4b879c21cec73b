"""A real CNCF distribution registry (``docker-registry`` 2.8) run as a test upstream.

Facts this module relies on (checked against distribution 2.8.2 on Debian 12):

- Every ``REGISTRY_*`` environment variable overrides the config file, so the child gets an
  environment without any of them.
- The config file is YAML; JSON is YAML, so the config is written with :mod:`json`.
- With ``log.accesslog.disabled: false`` the registry writes one Apache *combined* line per
  request to **stdout** (gorilla ``CombinedLoggingHandler``), for every request including
  401s and ``GET /``. The JSON application log (``log.formatter: json``) goes to **stderr**; its
  ``"response completed"`` entries only cover requests that reached a route handler, so 401s
  from the auth layer never appear there. The access log is therefore the request log.
- Both logs are written after the response was sent: a client can hold the last byte before the
  line exists. :meth:`DistributionRegistry.sync` sends a marker request and waits for its line.
- ``GET /`` is answered by a liveness handler outside auth, handy as a readiness probe.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from tests.support.service import LOOPBACK_ONLY_ENV, Service

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "/usr/bin/htpasswd"


SYNC_PATH = "/?mirrorrouter-harness-sync="

# 127.0.0.1 - - [28/Nov/2026:20:03:58 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_COMBINED_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]*)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+)(?: (?P<proto>[^"]*))?" '
    r"(?P<status>\d{3}|-) (?P<size>\d+|-)"
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?'
)


class RegistryStartError(RuntimeError):
    """The registry process exited or never answered during startup."""


@dataclass(frozen=True)
class TokenAuthSettings:
    """Where a registry in token-auth mode sends clients and whose signatures it trusts."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the registry logged it."""

    method: str
    path: str  # path including the query string, as sent by the client
    status: int | None
    size: int | None = None
    user_agent: str = ""
    remote: str = ""

    @property
    def path_only(self) -> str:
        """The path without its query string."""
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> str:
        """The raw query string ("" when there is none)."""
        return urlsplit(self.path).query


def parse_log_line(line: str) -> LoggedRequest | None:
    """Parse one access-log line (combined format) or JSON app-log line into a request."""
    line = line.strip()
    if not line:
        return None
    if line.startswith("{"):
        return _parse_json_line(line)
    match = _COMBINED_LINE.match(line)
    if match is None:
        return None
    status = match["status"]
    size = match["size"]
    return LoggedRequest(
        method=match["method"],
        path=match["uri"],
        status=None if status == "-" else int(status),
        size=None if size == "-" else int(size),
        user_agent=match["agent"] or "",
        remote=match["remote"],
    )


def _parse_json_line(line: str) -> LoggedRequest | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not str(entry.get("msg", "")).startswith(
        "response completed"
    ):
        return None
    method = entry.get("http.request.method")
    uri = entry.get("http.request.uri")
    if not isinstance(method, str) or not isinstance(uri, str):
        return None
    status = entry.get("http.response.status")
    written = entry.get("http.response.written")
    return LoggedRequest(
        method=method,
        path=uri,
        status=status if isinstance(status, int) else None,
        size=written if isinstance(written, int) else None,
        user_agent=str(entry.get("http.request.useragent", "")),
        remote=str(entry.get("http.request.remoteaddr", "")),
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def htpasswd_line(user: str, password: str) -> str:
    """Return a bcrypt htpasswd entry made by ``htpasswd -Bbn`` (distribution needs bcrypt)."""
    done = subprocess.run(
        [HTPASSWD_BINARY, "-Bbn", user, password],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip()


def child_environment() -> dict[str, str]:
    """Return this process's environment minus ``REGISTRY_*``, confined to loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(LOOPBACK_ONLY_ENV)
    return env


class DistributionRegistry(Service):
    """A ``docker-registry serve`` child process on a free 127.0.0.1 port.

    ``root`` is a directory owned by the caller (a pytest ``tmp_path``); the registry keeps its
    storage in ``root/storage`` and writes ``config.yml``, ``access.log`` (stdout, one combined
    line per request) and ``registry.log`` (stderr, JSON) beside it. Auth is anonymous unless
    ``users`` (htpasswd Basic) or ``token`` (bearer tokens from a token server) is given.
    ``proxy_remoteurl`` turns the registry into a pull-through cache of that upstream.
    """

    def __init__(
        self,
        root: Path,
        *,
        users: Mapping[str, str] | None = None,
        token: TokenAuthSettings | None = None,
        proxy_remoteurl: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        port: int | None = None,
        delete_enabled: bool = True,
        startup_timeout: float = 15.0,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if users is not None and token is not None:
            raise ValueError("choose htpasswd users or token auth, not both")
        self.root = Path(root)
        self.storage_dir = self.root / "storage"
        self.config_path = self.root / "config.yml"
        self.access_log_path = self.root / "access.log"
        self.app_log_path = self.root / "registry.log"
        self.htpasswd_path = self.root / "htpasswd"
        self.users = dict(users) if users is not None else None
        self.token = token
        self.proxy_remoteurl = proxy_remoteurl
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.delete_enabled = delete_enabled
        self.startup_timeout = startup_timeout
        self.extra_config = dict(extra_config or {})
        self._requested_port = port
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._sync_counter = itertools.count(1)
        self._frozen = False

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The ``127.0.0.1:PORT`` authority used in image references."""
        self._require_port()
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The registry's process id (benchmarks read its CPU time)."""
        assert self._process is not None, "the registry is not running"
        return self._process.pid

    def start(self) -> Self:
        """Write the config, start the process and wait until ``GET /`` answers."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.users is not None:
            lines = [htpasswd_line(u, p) for u, p in sorted(self.users.items())]
            self.htpasswd_path.write_text("\n".join(lines) + "\n")
        # A restart keeps its port, so clients and gateways configured with the URL reconnect.
        fixed_port = self._requested_port or self.port
        last_error: RegistryStartError | None = None
        for attempt in range(3):
            self.port = fixed_port or free_port()
            try:
                self._launch()
                return self
            except RegistryStartError as exc:
                # A free port can be taken between probe and bind (pick another), a fixed one
                # can still be held by the previous process (wait a moment).
                last_error = exc
                if "address already in use" not in str(exc):
                    raise
                if fixed_port:
                    time.sleep(0.1 * (attempt + 1))
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s); logs stay readable.

        ``start()`` afterwards restarts on the same port with the same storage.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            self._frozen = False
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def freeze(self) -> None:
        """SIGSTOP the process: connections are accepted by the kernel but never answered."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)
            self._frozen = True

    def thaw(self) -> None:
        """SIGCONT a frozen process."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)
        self._frozen = False

    def config(self) -> dict[str, Any]:
        """Return the registry configuration as a dict (written to ``config.yml`` as JSON)."""
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "formatter": "json",
                "accesslog": {"disabled": False},
                "fields": {"service": "registry"},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": self.delete_enabled},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                "secret": "mirrorrouter-test-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.users is not None:
            config["auth"] = {"htpasswd": {"realm": "basic-realm", "path": str(self.htpasswd_path)}}
        elif self.token is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.rootcertbundle),
                }
            }
        if self.proxy_remoteurl is not None:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remoteurl}
            if self.proxy_username is not None:
                proxy["username"] = self.proxy_username
            if self.proxy_password is not None:
                proxy["password"] = self.proxy_password
            config["proxy"] = proxy
        _deep_merge(config, self.extra_config)
        return config

    def _launch(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        # Append: offsets from mark() stay valid across a stop()/start() (an outage).
        with (
            self.access_log_path.open("ab") as stdout,
            self.app_log_path.open("ab") as stderr,
        ):
            self._process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=child_environment(),
                cwd=self.root,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.01
        while True:
            process = self._process
            assert process is not None
            if process.poll() is not None:
                self._process = None
                raise RegistryStartError(
                    f"docker-registry exited with {process.returncode}: {self.app_log_tail()}"
                )
            if _port_answers(self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RegistryStartError(
                    f"docker-registry not ready after {self.startup_timeout}s: "
                    f"{self.app_log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _require_port(self) -> None:
        if not self.port:
            raise RuntimeError("registry not started")

    # -- storage -------------------------------------------------------------------------

    def has_blob(self, repository: str, digest: str) -> bool:
        """Whether the blob is committed in storage and linked into the repository.

        In proxy mode the background copy commits a blob some time after the first client got
        it; until then distribution 2.8 may fetch it from upstream again (or even answer an
        error), so tests wait for this before asserting "served locally".
        """
        algorithm, _, hexdigest = digest.partition(":")
        v2 = self.storage_dir / "docker" / "registry" / "v2"
        data = v2 / "blobs" / algorithm / hexdigest[:2] / hexdigest / "data"
        link = v2 / "repositories" / repository / "_layers" / algorithm / hexdigest / "link"
        try:
            # The link is written in place (not renamed): compare its whole content.
            return data.is_file() and link.read_text() == digest
        except OSError:
            return False

    def has_manifest(self, repository: str, digest: str) -> bool:
        """Whether a manifest revision is linked into the repository's storage."""
        algorithm, _, hexdigest = digest.partition(":")
        link = (
            self.storage_dir
            / "docker/registry/v2/repositories"
            / repository
            / "_manifests/revisions"
            / algorithm
            / hexdigest
            / "link"
        )
        try:
            return link.read_text() == digest
        except OSError:
            return False

    # -- logs ----------------------------------------------------------------------------

    def app_log(self) -> list[dict[str, Any]]:
        """Return the parsed JSON application log (stderr) entries."""
        entries: list[dict[str, Any]] = []
        if not self.app_log_path.exists():
            return entries
        for line in self.app_log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def app_log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the application log, for error messages."""
        if not self.app_log_path.exists():
            return ""
        return "\n".join(self.app_log_path.read_text(errors="replace").splitlines()[-lines:])

    def sync(self, timeout: float = 5.0) -> None:
        """Make every request answered so far visible in the log.

        Sends ``GET /?mirrorrouter-harness-sync=N`` and waits until its access-log line exists;
        lines of requests that completed earlier have been written by then. A stopped or
        frozen registry writes nothing more, so there is nothing to wait for.
        """
        if not self.running or self._frozen:
            return
        marker = f"{SYNC_PATH}{next(self._sync_counter)}"
        if not _port_answers(self.port, marker, timeout=timeout):
            raise TimeoutError(f"registry on port {self.port} did not answer {marker}")
        wait_until(
            lambda: any(r.path == marker for r in self._all_requests()),
            timeout,
            f"access-log line for {marker}",
        )

    def _all_requests(self) -> list[LoggedRequest]:
        if not self.access_log_path.exists():
            return []
        requests: list[LoggedRequest] = []
        with self.access_log_path.open(errors="replace") as handle:
            for line in handle:
                # Only complete lines: the writer may be halfway through the last one.
                if not line.endswith("\n"):
                    break
                request = parse_log_line(line)
                if request is not None:
                    requests.append(request)
        return requests

    def mark(self) -> int:
        """Return a log offset; pass it as ``since`` to see only later requests."""
        self.sync()
        return len(self._all_requests())

    def clear_log(self) -> None:
        """Forget every request logged so far (the default ``since`` moves to now)."""
        self._offset = self.mark()

    def requests(self, since: int | None = None, *, sync: bool = True) -> list[LoggedRequest]:
        """Return the logged requests after ``since`` (default: the last :meth:`clear_log`).

        Readiness probes and sync markers (``GET /...``) are left out.
        """
        if sync:
            self.sync()
        start = self._offset if since is None else since
        return [
            r
            for r in self._all_requests()[start:]
            if not r.path.startswith(SYNC_PATH) and r.path != "/"
        ]

    def count(
        self,
        method: str,
        path_substring: str = "",
        *,
        since: int | None = None,
        status: int | None = None,
    ) -> int:
        """Count logged requests with this method whose path contains ``path_substring``."""
        return sum(
            1
            for r in self.requests(since)
            if r.method == method.upper()
            and path_substring in r.path
            and (status is None or r.status == status)
        )

    def blob_gets(self, since: int | None = None) -> list[LoggedRequest]:
        """Return the ``GET /v2/.../blobs/<digest>`` requests (uploads excluded)."""
        return [
            r
            for r in self.requests(since)
            if r.method == "GET" and "/blobs/" in r.path and "/blobs/uploads" not in r.path
        ]

    def manifest_requests(
        self, method: str | None = None, since: int | None = None
    ) -> list[LoggedRequest]:
        """Return the ``/v2/.../manifests/<ref>`` requests, optionally for one method."""
        return [
            r
            for r in self.requests(since)
            if "/manifests/" in r.path and (method is None or r.method == method.upper())
        ]


def wait_until(
    condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``condition`` with a short backoff until it holds; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _port_answers(port: int, path: str = "/", timeout: float = 0.5) -> bool:
    """Whether ``GET path`` answers on the port (``/`` is the liveness handler, outside auth).

    A raw HTTP/1.0 request: cheaper than an httpx client, which builds an SSL context.
    """
    request = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            return sock.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def _deep_merge(target: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            _deep_merge(current, value)
        else:
            target[key] = value
