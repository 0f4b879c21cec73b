"""Lean load clients: a raw-socket blob reader, curl, wrk and skopeo, each bounded in time.

The blob reader speaks just enough HTTP/1.1 for one GET and then discards the body in the
kernel: ``recv(MSG_TRUNC)`` on a TCP socket drops up to 1 MiB per call without copying it to
user space (Linux, ``man 7 tcp``), so the reader costs the machine far less than the server
it measures. Where the flag is refused it falls back to ``recv_into`` a reused buffer. It
reads faster than ``curl -o /dev/null``; the run measures both against nginx every time.
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.support.images import MANIFEST_ACCEPT, client_environment

CURL_BINARY = "/usr/bin/curl"
WRK_BINARY = "/usr/bin/wrk"
SKOPEO_BINARY = "/usr/bin/skopeo"
BUFFER = 1024 * 1024
DISCARD = getattr(socket, "MSG_TRUNC", 0)
ACCEPT_MANIFESTS = ", ".join(MANIFEST_ACCEPT)


class ClientError(RuntimeError):
    """A request failed, answered an unexpected status, or returned the wrong size.

    ``raw`` keeps what was measured anyway (wrk's counts), for the JSON file.
    """

    def __init__(self, message: str, raw: Any = None) -> None:
        super().__init__(message)
        self.raw = raw


@dataclass(frozen=True)
class Read:
    """One whole-blob GET: what arrived and how long it took (connect to last byte)."""

    status: int
    body_bytes: int
    seconds: float
    cache: str  # the X-Cache header, "" when absent
    started: float  # perf_counter() at connect
    finished: float


def get_discard(host: str, port: int, path: str, *, timeout: float = 120.0) -> Read:
    """``GET path`` over a new connection; count and discard the body."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: mirrorrouter-bench\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        received = 0
        head_end = -1
        while head_end < 0:  # the head fits in the buffer; everything after it is body
            count = sock.recv_into(view[received:])
            if not count:
                raise ClientError(f"GET {path}: connection closed in the response head")
            received += count
            head_end = buffer.find(b"\r\n\r\n", 0, received)
            if head_end < 0 and received == BUFFER:
                raise ClientError(f"GET {path}: response head larger than 1 MiB")
        head = bytes(buffer[:head_end]).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            raise ClientError(f"GET {path}: chunked answer; this reader counts raw bytes")
        length = int(headers["content-length"]) if "content-length" in headers else None
        body = received - head_end - 4
        flags = DISCARD
        while length is None or body < length:
            try:
                count = sock.recv_into(view, BUFFER, flags)
            except OSError:
                if not flags:
                    raise
                flags = 0  # the kernel refused MSG_TRUNC here: copy instead
                continue
            if not count:
                break
            body += count
    finished = time.perf_counter()
    if length is not None and body != length:
        raise ClientError(f"GET {path}: {body} of {length} body bytes, then the peer closed")
    return Read(status, body, finished - started, headers.get("x-cache", ""), started, finished)


@dataclass(frozen=True)
class ParallelReads:
    """``clients`` concurrent readers, each doing ``repeat`` whole GETs one after another."""

    clients: int
    reads: list[Read]
    wall: float  # from the common start to the last byte of the last reader

    @property
    def total_bytes(self) -> int:
        return sum(r.body_bytes for r in self.reads)

    @property
    def bytes_per_second(self) -> float:
        return self.total_bytes / self.wall

    def raw(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "wall_s": self.wall,
            "total_bytes": self.total_bytes,
            "reads": [
                {k: v for k, v in asdict(r).items() if k not in ("started", "finished")}
                for r in self.reads
            ],
        }


def parallel_reads(
    host: str,
    port: int,
    path: str,
    *,
    clients: int,
    repeat: int = 1,
    expected_size: int | None = None,
    timeout: float = 180.0,
) -> ParallelReads:
    """``clients`` readers of one URL (see ``run_parallel``)."""
    job = functools.partial(get_discard, host, port, path, timeout=timeout)
    return run_parallel(
        [job] * clients,
        repeat=repeat,
        expected_size=expected_size,
        timeout=timeout,
        what=f"GET {host}{path}",
    )


def run_parallel(
    jobs: Sequence[Callable[[], Read]],
    *,
    repeat: int = 1,
    expected_size: int | None = None,
    timeout: float = 180.0,
    what: str = "GET",
) -> ParallelReads:
    """Run one reader thread per job (another gateway, a redirect to follow...), released
    together; wall time to the last byte; raise if any read went wrong.

    ``recv_into`` releases the GIL, so the threads read in parallel; the main thread only
    waits (bounded by ``timeout``).
    """
    results: list[list[Read]] = [[] for _ in jobs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs) + 1)

    def reader(index: int) -> None:
        try:
            barrier.wait(timeout)
            for _ in range(repeat):
                results[index].append(jobs[index]())
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=reader, args=(i,), name=f"reader-{i}", daemon=True)
        for i in range(len(jobs))
    ]
    for thread in threads:
        thread.start()
    barrier.wait(timeout)
    start = time.perf_counter()
    deadline = time.monotonic() + timeout * repeat
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise ClientError(f"{what}: readers still running after {timeout * repeat:.0f}s")
    if errors:
        raise ClientError(f"{what}: {errors[0]!r}") from errors[0]
    reads = [read for per_client in results for read in per_client]
    for read in reads:
        if read.status != 200:
            raise ClientError(f"{what}: HTTP {read.status}")
        if expected_size is not None and read.body_bytes != expected_size:
            raise ClientError(f"{what}: {read.body_bytes} bytes, expected {expected_size}")
    wall = max(read.finished for read in reads) - start
    return ParallelReads(len(jobs), reads, wall)


def curl_read(url: str, *, timeout: float = 120.0) -> tuple[int, float]:
    """``curl -s -o /dev/null``: (bytes, seconds) as curl reports them."""
    done = subprocess.run(
        [CURL_BINARY, "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=client_environment(),
        check=True,
    )
    size, seconds = done.stdout.split()
    return int(size), float(seconds)


# -- wrk -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    requests: int
    non_2xx: int
    socket_errors: int
    latency_ms: dict[str, float]  # percentile ("50%") -> milliseconds
    output: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(text)
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    if rate is None or total is None:
        raise ClientError(f"unexpected wrk output: {output[-500:]}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    latency = {
        m[1] + "%": _milliseconds(m[2])
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.MULTILINE)
    }
    return WrkResult(
        requests_per_second=float(rate[1]),
        requests=int(total[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        latency_ms=latency,
        output=output,
    )


def run_wrk(
    url: str, *, threads: int = 2, connections: int = 32, duration: float = 5.0
) -> WrkResult:
    """``wrk -tT -cC -dDs --latency -H 'Accept: <the four manifest types>' URL``."""
    done = subprocess.run(
        [
            WRK_BINARY,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout",
            "5s",
            "--latency",
            "-H",
            f"Accept: {ACCEPT_MANIFESTS}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        env=client_environment(),
    )
    if done.returncode != 0:
        raise ClientError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout)


# -- skopeo --------------------------------------------------------------------------------


def skopeo_pull(reference: str, dest: Path, *, timeout: float = 300.0) -> float:
    """``skopeo copy --src-tls-verify=false docker://REF dir:DEST``; return the wall seconds.

    The destination must not exist; the caller removes it afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="bench-skopeo-") as scratch:
        authfile = Path(scratch) / "auth.json"
        authfile.write_text('{"auths":{}}')  # never pick up the user's stored credentials
        command = [
            SKOPEO_BINARY,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--src-authfile",
            str(authfile),
            f"docker://{reference}",
            f"dir:{dest}",
        ]
        started = time.perf_counter()
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=client_environment()
        )
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise ClientError(f"skopeo copy {reference} failed: {done.stderr.strip()[-800:]}")
    return seconds
