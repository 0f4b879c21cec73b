"""The servers the benchmark compares against, and reading a process tree's memory.

Everything runs on 127.0.0.1 and is a context manager (``tests.support.service.Service``):
leaving the ``with`` block stops it, also on an exception or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.gateway import GatewayProcess
from tests.support.registry import free_port
from tests.support.service import Service, wait_accepting

NGINX_BINARY = "/usr/sbin/nginx"
BLOB_PATH = "/blob"  # where nginx serves the one blob file


class NginxError(RuntimeError):
    """nginx exited or never answered during startup."""


class NginxServer(Service):
    """Debian's nginx serving one file at ``/blob`` with sendfile: the ceiling for blob GETs.

    ``root`` holds the generated ``nginx.conf``, the pid file, the error log and the temp
    paths; nothing is written outside it. The master runs in the foreground (``daemon off``)
    as our child, so stopping it takes its workers along.
    """

    def __init__(self, root: Path, blob_file: Path, *, worker_processes: str = "auto") -> None:
        self.root = root
        self.blob_file = blob_file.resolve()
        self.worker_processes = worker_processes
        self.config_path = root / "nginx.conf"
        self.error_log = root / "error.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        temp = self.root / "temp"
        # Running as root, the workers would drop to "nobody", which cannot read a 0700 temp
        # directory: they stay root ("user root;") as the benchmark does.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""daemon off;
{user}worker_processes {self.worker_processes};
pid {self.root / "nginx.pid"};
error_log {self.error_log} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {temp / "client"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    server {{
        listen 127.0.0.1:{self.port};
        location = {BLOB_PATH} {{
            alias {self.blob_file};
            default_type application/octet-stream;
        }}
    }}
}}
"""

    @property
    def pid(self) -> int:
        """The master's process id (its workers are its children)."""
        assert self.process is not None, "nginx is not running"
        return self.process.pid

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "temp").mkdir(exist_ok=True)
        last: NginxError | None = None
        for _ in range(3):  # a free port can be taken between the probe and nginx's bind
            self.port = free_port()
            self.config_path.write_text(self.config_text())
            try:
                self._launch()
                return self
            except NginxError as exc:
                last = exc
                self.stop()
                if "Address already in use" not in str(exc):
                    raise
            except BaseException:
                self.stop()
                raise
        assert last is not None
        raise last

    def _launch(self) -> None:
        with (self.root / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [
                    NGINX_BINARY,
                    "-p",
                    str(self.root),
                    "-c",
                    str(self.config_path),
                    "-e",
                    str(self.error_log),
                ],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        wait_accepting(
            self.process, self.port, what="nginx", timeout=10, tail=self.log_tail, error=NginxError
        )

    def log_tail(self) -> str:
        text = ""
        for path in (self.root / "stderr.log", self.error_log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")[-2000:]
        return text

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # SIGTERM: fast shutdown of master and workers
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def gateway_config(
    upstream_url: str,
    cache_dir: Path,
    *,
    workers: int = 1,
    ca_bundle: Path | None = None,
    first_mirrors: Sequence[str] = (),
    extra: str = "",
) -> str:
    """A mirrors.toml routing docker.io (the default registry) to one loopback upstream,
    after ``first_mirrors`` (asked first, in this order), trusting ``ca_bundle`` for a TLS
    one; ``extra`` adds tables (hosted sets, groups, routes)."""
    mirrors = ", ".join(f'{{ url = "{url}" }}' for url in [*first_mirrors, upstream_url])
    tls = f'[upstreams."docker.io".tls]\nca_bundle = "{ca_bundle}"\n' if ca_bundle else ""
    return f"""
[server]
workers = {workers}
[cache]
directory = "{cache_dir}"
[upstreams."docker.io"]
mirrors = [{mirrors}]
tag_ttl = "10m"
{tls}{extra}"""


class Gateway(GatewayProcess):
    """:class:`GatewayProcess` for one loopback upstream; with several workers it also
    waits until every worker runs. ``env`` adds variables (the proxy ones, say)."""

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        cache_dir: Path,
        *,
        workers: int,
        ca_bundle: Path | None = None,
        env: dict[str, str] | None = None,
        first_mirrors: Sequence[str] = (),
        extra: str = "",
    ) -> None:
        config = gateway_config(
            upstream_url,
            cache_dir,
            workers=workers,
            ca_bundle=ca_bundle,
            first_mirrors=first_mirrors,
            extra=extra,
        )
        super().__init__(workdir, config, env=env)
        self.workers = workers

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Self:
        try:
            super().start()
            self._wait_for_workers()
        except BaseException:
            self.stop()  # also on Ctrl-C: never leave a half-started gateway behind
            raise
        return self

    def _wait_for_workers(self) -> None:
        if self.workers > 1:
            # uvicorn's supervisor answers as soon as one worker is up; wait for the others
            # so that no measurement includes a worker's import time.
            deadline = time.monotonic() + 30
            while len(worker_pids(self.pid)) < self.workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway workers did not start: {self.log()[-2000:]}")
                time.sleep(0.05)
            time.sleep(1.0)


# -- process memory ------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc/*/stat``), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command may contain spaces and parentheses: the fields follow the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(sorted(children.get(current, [])))
    return tree


def worker_pids(pid: int) -> list[int]:
    """The uvicorn worker processes below a supervisor (Python children running the app)."""
    workers = []
    for child in process_tree(pid)[1:]:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) of ``pid`` and its descendants, summed over their live
    threads from ``/proc/*/task/*/schedstat`` (nanoseconds: finer than the clock ticks of
    ``/proc/PID/stat``, which would round a 0.1 s sample by 10%)."""
    total = 0
    for process in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                total += int(Path(f"/proc/{process}/task/{task}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def status_kib(pid: int, key: str) -> int | None:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_name(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in cmdline[:4] if part)[:80]


@dataclass
class RssSampler:
    """Samples the summed VmRSS of a process tree every ``interval`` seconds in a thread."""

    pid: int
    interval: float = 0.01
    peak_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        pids = process_tree(self.pid)
        last_tree = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_tree > 0.5:  # workers may come and go; rarely rescan
                pids = process_tree(self.pid)
                last_tree = time.monotonic()
            total = sum(status_kib(p, "VmRSS") or 0 for p in pids)
            self.peak_kib = max(self.peak_kib, total)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
