"""What every benchmark run does around its phases (run.py, scaling.py): signals end the
run cleanly, phases run in order inside the bench's service stack, a failure still reports
what was measured, stray child processes are reaped, the JSON document and the table are
written, and the temporary directory goes (unless kept). Also the upstream-request helpers
both share."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from benchmarks.clients import ClientError, run_wrk
from benchmarks.machine import CpuSnapshot, foreign_share, machine_facts
from benchmarks.peers import process_name, process_tree
from benchmarks.results import Results, Row
from tests.support.registry import DistributionRegistry, LoggedRequest
from tests.support.service import Service

S = TypeVar("S", bound=Service)


class BenchBase:
    """What both benchmark suites' ``Bench`` do alike: log lines, rotate contenders,
    record one measurement (a failure is recorded and the run goes on), watch phases for a
    disturbed machine, start services onto the run's stack."""

    label_width = 6
    world: Any  # the suite's servers; ``world.upstream`` is the upstream registry
    plan: Any  # the suite's plan; ``plan.wrk_duration`` is how long wrk runs

    def __init__(self, rounds: int, labels: Mapping[str, str]) -> None:
        self.results = Results(rounds)
        self.labels = labels
        self.started = time.monotonic()
        self.meta: dict[str, Any] = {}
        self.stack = contextlib.ExitStack()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    @staticmethod
    def order(contenders: Sequence[str], round_index: int) -> list[str]:
        """The contenders, rotated by the round: each goes first in some round."""
        shift = round_index % len(contenders)
        return [*contenders[shift:], *contenders[:shift]]

    def attempt(
        self,
        key: str,
        contender: str,
        round_index: int,
        action: Callable[[], tuple[float, Any]],
        show: Callable[[float], str],
    ) -> None:
        """Run one measurement; an ordinary failure is recorded and the run goes on."""
        measure = self.results.measures[key]
        name = f"{contender:<{self.label_width}}"
        try:
            value, raw = action()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"[:600]
            measure.fail(contender, round_index, text, getattr(exc, "raw", None))
            self.results.warn(f"{measure.title} / {self.labels[contender]}: {text}")
            self.log(f"  {name} {key}: ERROR {text}")
            return
        measure.record(contender, round_index, value, raw)
        self.log(f"  {name} {key}: {show(value)}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Note how much CPU other processes took during the phase (a disturbed machine)."""
        before = CpuSnapshot.take()
        try:
            yield
        finally:
            share = foreign_share(before, CpuSnapshot.take())
            self.meta.setdefault("foreign_cpu_share", {})[name] = round(share, 4)
            if share > 0.05 and name != "setup":
                self.results.warn(
                    f"other processes used {share:.0%} of the machine's CPU during the "
                    f"{name} phase: its figures are disturbed"
                )

    def manifest_rate(self, name: str, kind: str, round_index: int, url: str) -> tuple[float, Any]:
        """wrk's requests/s for one manifest URL, and the upstream requests it caused."""
        upstream = self.world.upstream
        since = upstream.mark()
        result = run_wrk(url, duration=self.plan.wrk_duration)
        # Requests still in flight when wrk stops finish afterwards (the peer's revalidations
        # queue up): wait until the upstream is quiet, so that they neither count for nor
        # overlap the next contender.
        upstream_requests = settle(upstream, since)
        raw = {
            "requests": result.requests,
            "non_2xx": result.non_2xx,
            "socket_errors": result.socket_errors,
            "latency_ms": result.latency_ms,
            "upstream_requests": len(upstream_requests),
            "upstream_by_kind": kinds(upstream_requests),
        }
        if result.requests:
            self.results.measures[f"manifest_{kind}_upstream"].record(
                name, round_index, len(upstream_requests) / result.requests, raw["upstream_by_kind"]
            )
        if result.non_2xx:
            raise ClientError(
                f"{result.non_2xx} of {result.requests} answers were not 2xx/3xx "
                f"({result.requests_per_second:.0f} req/s)",
                raw,
            )
        if result.socket_errors:
            self.results.warn(f"wrk {url}: {result.socket_errors} socket errors")
        return result.requests_per_second, raw

    @staticmethod
    def start(stack: contextlib.ExitStack, service: S) -> S:
        """Start a service and register its close (stop and clean up); a half-started one is
        closed at once."""
        try:
            service.start()
        except BaseException:
            service.close()
            raise
        stack.callback(service.close)  # stop, and remove what it keeps of its own
        return service


class RunPlan(Protocol):
    out: Path
    keep: bool


class Bench(Protocol):
    """What the runner needs of a benchmark (run.Bench, scaling.Bench)."""

    meta: dict[str, Any]
    results: Results
    started: float
    stack: contextlib.ExitStack

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def setup(self, root: Path) -> None: ...

    def log(self, message: str) -> None: ...

    def rows(self) -> list[Row]: ...

    def document(self, rows: list[Row], complete: bool) -> dict[str, Any]: ...


def run_bench(
    bench: Bench,
    plan: RunPlan,
    *,
    prefix: str,
    repo_root: Path,
    phases: Sequence[tuple[str, Callable[[], None]]],
    report: Callable[[list[Row]], None],
) -> int:
    """Set up in a fresh temp directory, run ``phases`` in order, then always: reap, write
    the JSON, clean up, print the report. 0 when every phase completed."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_on_signal)
    bench.meta.update(machine_facts(repo_root))
    root = Path(tempfile.mkdtemp(prefix=prefix))
    bench.meta["workdir"] = str(root)
    complete = False
    try:
        with bench.stack:
            with bench.phase("setup"):
                bench.setup(root)
            for name, run in phases:
                with bench.phase(name):
                    run()
        complete = True
    except Exception as exc:
        # Not Ctrl-C (that ends the run after the cleanup below): report what was measured.
        bench.results.warn(f"the run stopped early: {type(exc).__name__}: {exc}")
        bench.log(f"run failed: {exc!r}")
    finally:
        bench.meta["duration_s"] = round(time.monotonic() - bench.started, 1)
        bench.meta["loadavg_end"] = os.getloadavg()
        leftovers = reap_leftovers()
        if leftovers:
            bench.results.warn(f"processes left running after cleanup, killed: {leftovers}")
        rows = bench.rows() if hasattr(bench, "world") else []
        plan.out.parent.mkdir(parents=True, exist_ok=True)
        plan.out.write_text(json.dumps(bench.document(rows, complete), indent=1) + "\n")
        if plan.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
        report(rows)
    return 0 if complete else 1


def settle(
    registry: DistributionRegistry, since: int, *, quiet: float = 0.3, limit: float = 10.0
) -> list[LoggedRequest]:
    """The registry's requests since ``since`` once no new one came for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    seen = registry.requests(since)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = registry.requests(since)
        if len(now) == len(seen):
            break
        seen = now
    return seen


def kinds(requests: Sequence[LoggedRequest]) -> dict[str, int]:
    """Count upstream requests by method and kind of path ("GET /v2/", "HEAD manifests")."""
    counts: dict[str, int] = {}
    for request in requests:
        path = request.path_only
        kind = next((k for k in ("manifests", "blobs", "tags") if f"/{k}/" in path), path)
        key = f"{request.method} {kind}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def reap_leftovers() -> list[str]:
    """Stop any child process still running (a cleanup bug): by pid, our descendants only."""
    found = []
    for pid in reversed(process_tree(os.getpid())[1:]):
        found.append(f"{pid} {process_name(pid)}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found
