"""Facts about the machine and the tree, and how much CPU other processes took meanwhile.

A benchmark on a shared 2-core machine is only as good as the machine was quiet. The kernel
counts all user CPU time in ``/proc/stat``; this run's own share is its process tree's
(``/proc/PID/stat`` of the live descendants, ``os.times()`` for itself and the reaped ones).
The rest is someone else's: it is reported per phase, so a disturbed figure can be told.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.peers import process_tree

TICK = os.sysconf("SC_CLK_TCK")


def _machine_user_seconds() -> float:
    """User CPU time (user + nice) of the whole machine since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return (int(fields[1]) + int(fields[2])) / TICK


def _own_user_seconds() -> float:
    """User CPU time of this process, its reaped children and its live descendants."""
    times = os.times()
    total = times.user + times.children_user
    for pid in process_tree(os.getpid())[1:]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # After the command: state is field 3, utime 14, cutime 16 (1-based, see proc(5)).
        total += (int(fields[11]) + int(fields[13])) / TICK
    return total


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    machine_user: float
    own_user: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        return cls(time.monotonic(), _machine_user_seconds(), _own_user_seconds())


def foreign_share(start: CpuSnapshot, end: CpuSnapshot) -> float:
    """Other processes' user CPU between two snapshots, as a share of all cores' time."""
    wall = end.wall - start.wall
    if wall <= 0:
        return 0.0
    foreign = (end.machine_user - start.machine_user) - (end.own_user - start.own_user)
    return max(0.0, foreign) / (wall * (os.cpu_count() or 1))


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else ""


def machine_facts(repo_root: Path) -> dict[str, Any]:
    git = ["git", "-C", str(repo_root)]
    status = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.splitlines()
    return {
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        # What was measured: HEAD plus any uncommitted change to tracked files.
        "git_head": _first_line([*git, "rev-parse", "HEAD"]),
        "git_modified_files": status,
        "versions": {
            "nginx": _first_line(["/usr/sbin/nginx", "-v"]),
            "wrk": _first_line(["/usr/bin/wrk", "--version"]),
            "skopeo": _first_line(["/usr/bin/skopeo", "--version"]),
            "docker-registry": _first_line(["/usr/bin/docker-registry", "--version"]),
            "curl": _first_line(["/usr/bin/curl", "--version"]),
        },
    }
