"""Runs the real gateway (``python -m mirrorrouter serve``) as a process on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import httpx

from tests.support.registry import free_port
from tests.support.service import Service

# A hosted set ``team`` placed before docker.io in the group ``dev`` (the Nexus-group and
# Kind set-ups), routed by the prefix ``dev``: tables to add to a config with docker.io.
# The team's own "app" is no docker.io library/app: it may be pushed whatever docker.io
# says (the shadowing guard would otherwise ask docker.io first, and refuse when it cannot).
HOSTED_FIRST_GROUP = """
[hosted."team"]
allow_shadow = ["app"]
[groups."dev"]
members = ["team", "docker.io"]
[[routes]]
prefix = "dev"
group = "dev"
"""


class GatewayProcess(Service):
    """``mirrorrouter serve`` with a given mirrors.toml, on a free 127.0.0.1 port."""

    def __init__(
        self,
        workdir: Path,
        config: str,
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        probe_url: str | None = None,
    ) -> None:
        """``port`` 0 turns the plain listener off; then ``probe_url`` (an https URL, asked
        without verification) says when it serves."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mirrors.toml"
        self.config_path.write_text(config)
        self.port = free_port() if port is None else port
        self.probe_url = probe_url
        self.log_path = workdir / "gateway.log"
        self.extra_env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        # No proxy for the gateway's own upstream traffic: upstreams are on loopback.
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mirrorrouter",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-3000:]}")
            try:
                # 200, or 401 when client authentication is on: either way it answers.
                probe = self.probe_url or f"{self.url}/v2/"
                if httpx.get(probe, timeout=1, verify=False).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown code runs."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[dict[str, Any]]:
        """The JSON access lines written so far (``server.access_log = true``)."""
        lines = []
        for text in self.log().splitlines():
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("logger") == "mirrorrouter.access":
                lines.append(entry)
        return lines
