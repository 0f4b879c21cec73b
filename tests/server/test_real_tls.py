"""Pulling through the HTTPS listener with real clients that verify its certificate.

A test CA signs the gateway's certificate for 127.0.0.1. skopeo, podman and ctr trust it only
through the files `mirrorrouter client-config --ca` writes (certs.d directories, hosts.toml
``ca``): no insecure flag anywhere. mTLS: without a certificate signed by ``client_ca`` the
handshake is refused. Rotation: the files are replaced on disk (or rewritten in place and
announced by SIGHUP) while a client keeps pulling on its open connection; new handshakes get
the new serial, the open connection keeps working, and the worker processes stay the same.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.clients import Containerd, Podman, Skopeo, read_local_image
from tests.support.gateway import GatewayProcess
from tests.support.images import ImageFactory, PushedImage, session_factory
from tests.support.registry import DistributionRegistry, free_port
from tests.support.testca import Issued, issue

pytestmark = pytest.mark.real

MONTH = datetime.timedelta(days=30)
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass
class World:
    hub: DistributionRegistry
    image: PushedImage
    ca: Issued
    directory: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One upstream registry with a runnable image, and a test CA."""
    root = tmp_path_factory.mktemp("tls")
    factory: ImageFactory = session_factory(tmp_path_factory)
    with DistributionRegistry(root / "hub") as hub:
        image = factory.push(factory.runnable("tls", seed=41), hub, "library/tls", "1")
        yield World(hub, image, issue(root, "ca"), root)


@dataclass
class TlsGateway:
    process: GatewayProcess
    tls_port: int
    cert: Path
    key: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def workers(self) -> set[int]:
        """The PIDs of the gateway's child processes (its workers)."""
        assert self.process.process is not None
        pid = self.process.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return {int(c) for c in children}


def start_gateway(
    world: World, workdir: Path, *, plain: bool = False, workers: int = 1, client_ca: str = ""
) -> TlsGateway:
    """A gateway whose certificate (for 127.0.0.1) comes from the test CA; HTTPS only
    unless ``plain``."""
    server = issue(workdir, "server", world.ca, LOOPBACK, lifetime=MONTH)
    tls_port = free_port()
    port = None if plain else 0
    config = f"""
[server]
access_log = true
workers = {workers}
{"" if plain else "port = 0"}
[server.tls]
port = {tls_port}
certificate = "server.crt"
key = "server.key"
{f'client_ca = "{client_ca}"' if client_ca else ""}
[cache]
directory = "{workdir / "cache"}"
[upstreams."docker.io"]
mirrors = [{{ url = "{world.hub.url}" }}]
"""
    # The config names its files relative to itself: put them beside it.
    gw_dir = workdir / "gateway"
    gw_dir.mkdir(parents=True, exist_ok=True)
    os.replace(server.cert_path, gw_dir / "server.crt")
    os.replace(server.key_path, gw_dir / "server.key")
    # Without a plain listener, readiness is asked over https (no client certificate: so
    # with client_ca, keep the plain one).
    probe = None if plain else f"https://127.0.0.1:{tls_port}/healthz"
    process = GatewayProcess(gw_dir, config, port=port, probe_url=probe)
    process.start()
    deadline = time.monotonic() + 20  # it answers once one worker is up: wait for them all
    while process.log().count("mirrorrouter.tls") < workers:
        assert time.monotonic() < deadline, process.log()[-3000:]
        time.sleep(0.02)
    return TlsGateway(process, tls_port, gw_dir / "server.crt", gw_dir / "server.key")


@pytest.fixture
def gateway(world: World, tmp_path: Path) -> Iterator[TlsGateway]:
    """An HTTPS-only gateway (server.port = 0)."""
    gw = start_gateway(world, tmp_path)
    try:
        yield gw
    finally:
        gw.process.stop()


def client_config(gw: TlsGateway, client: str, out: Path, world: World) -> Path:
    """``client-config --for CLIENT --ca <test CA> --output-dir OUT``, as a process."""
    argv = [sys.executable, "-m", "mirrorrouter", "client-config", "--for", client]
    argv += ["--config", str(gw.process.config_path), "--mirror-url", gw.url]
    argv += ["--ca", str(world.ca.cert_path), "--output-dir", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return out


def test_skopeo_podman_and_ctr_pull_over_verified_tls(
    world: World, gateway: TlsGateway, tmp_path: Path
) -> None:
    """Each client, given only the generated files, verifies the mirror's certificate and
    pulls the upstream's digest; the health check answers over https without a plain port."""
    ref = "docker.io/library/tls:1"
    podman_files = client_config(gateway, "podman", tmp_path / "podman", world)
    cert_dir = podman_files / "certs.d" / f"127.0.0.1:{gateway.tls_port}"
    conf = podman_files / "50-mirrorrouter.conf"
    assert "insecure" not in conf.read_text()

    skopeo = Skopeo(registries_conf=conf)
    skopeo.run("copy", "--quiet", "--src-cert-dir", str(cert_dir), f"docker://{ref}",
               f"dir:{tmp_path / 'skopeo'}")  # fmt: skip
    assert read_local_image(tmp_path / "skopeo", "dir").manifest_digest == world.image.digest

    with Podman(registries_conf=conf) as podman:
        podman.run("pull", "--quiet", "--authfile", str(podman.authfile),
                   "--cert-dir", str(cert_dir), ref)  # fmt: skip
        assert podman.image_digest(ref) == world.image.digest

    hosts = client_config(gateway, "containerd", tmp_path / "hosts", world)
    with Containerd(base_dir=tmp_path) as containerd:
        assert containerd.ctr_pull(ref, hosts) == world.image.digest

    log = gateway.process.log()
    assert "/v2/docker.io/library/tls/manifests/1 " in log  # skopeo and podman, by host
    assert "/v2/library/tls/manifests/1?ns=docker.io" in log  # ctr, by ns
    health = subprocess.run(
        [sys.executable, "-m", "mirrorrouter", "healthcheck", "--config",
         str(gateway.process.config_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert health.returncode == 0, health.stderr


def test_mtls_refuses_a_client_without_a_certificate_in_the_handshake(
    world: World, tmp_path: Path
) -> None:
    """With client_ca, a client without a certificate is refused during the handshake and
    never reaches the app; skopeo with a certificate signed by client_ca pulls."""
    nodes = issue(tmp_path, "nodes")
    gw = start_gateway(world, tmp_path, plain=True, client_ca=str(nodes.cert_path))
    try:
        cert_dir = tmp_path / "client-certs"
        cert_dir.mkdir()
        node = issue(cert_dir, "node", nodes, ("node-1",))
        bare = ssl.create_default_context(cafile=str(world.ca.cert_path))
        bare.maximum_version = ssl.TLSVersion.TLSv1_2  # the refusal ends the handshake itself
        seen = gw.process.log().count("GET /v2/")  # the readiness probe's, over plain HTTP
        with pytest.raises(ssl.SSLError):
            serial_of_new_handshake(gw.tls_port, bare)
        assert gw.process.log().count("GET /v2/") == seen  # nothing got through
        bare.load_cert_chain(node.cert_path, node.key_path)  # the same client, with one
        assert request(gw.tls_port, bare, "/v2/") == 200
        os.replace(node.cert_path, cert_dir / "node.cert")  # containers-certs.d: *.cert + *.key
        (cert_dir / "ca.crt").write_bytes(world.ca.cert_path.read_bytes())
        digest = Skopeo().run(
            "inspect", "--no-tags", "--cert-dir", str(cert_dir), "--format", "{{.Digest}}",
            f"docker://127.0.0.1:{gw.tls_port}/library/tls:1",
        ).text.strip()  # fmt: skip
        assert digest == world.image.digest
    finally:
        gw.process.stop()


def request(port: int, context: ssl.SSLContext, path: str) -> int:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def serial_of_new_handshake(port: int, context: ssl.SSLContext) -> int:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.connect()
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        connection.close()


class KeptPuller:
    """Pulls one blob again and again on one kept-alive connection, in a thread, checking
    its digest each time."""

    def __init__(self, port: int, context: ssl.SSLContext, image: PushedImage) -> None:
        self.connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
        blob = max(image.blobs, key=lambda b: b.size)
        self.path = f"/v2/library/tls/blobs/{blob.digest}?ns=docker.io"
        self.digest = blob.digest
        self.pulls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self.pull()  # opens the connection, before any rotation
        assert self.connection.sock is not None
        self.socket = self.connection.sock
        self.serial = self._serial()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _serial(self) -> int:
        assert self.connection.sock is not None
        der = self.connection.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def pull(self) -> None:
        self.connection.request("GET", self.path)
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200 or f"sha256:{hashlib.sha256(body).hexdigest()}" != self.digest:
            self.failures.append(f"{response.status}, {len(body)} bytes")
        self.pulls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pull()
            except OSError as exc:
                self.failures.append(repr(exc))
                return

    def stop(self) -> None:
        """Stop pulling; the connection must still be the first one, with its certificate."""
        self._stop.set()
        self._thread.join(30)
        assert self.connection.sock is self.socket, "the connection was reopened"
        assert self._serial() == self.serial
        self.connection.close()


def wait_for_serial(port: int, context: ssl.SSLContext, serial: int, in_a_row: int) -> None:
    """Until ``in_a_row`` new handshakes in a row present ``serial`` (they land on any
    worker: each must have reloaded)."""
    deadline = time.monotonic() + 20
    streak = 0
    while streak < in_a_row:
        assert time.monotonic() < deadline, "new handshakes never all got the new certificate"
        streak = streak + 1 if serial_of_new_handshake(port, context) == serial else 0
        if not streak:
            time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_certificate_replaced_on_disk_while_a_client_keeps_pulling(
    world: World, tmp_path: Path, workers: int
) -> None:
    """The Secret's files replaced by a new certificate from the same CA: new handshakes get
    the new serial in every worker, the client pulling on its open connection never fails,
    and no worker is restarted."""
    gw = start_gateway(world, tmp_path, workers=workers)
    trust = ssl.create_default_context(cafile=str(world.ca.cert_path))
    try:
        before = gw.workers()
        puller = KeptPuller(gw.tls_port, trust, world.image)
        new = issue(tmp_path, "next", world.ca, LOOPBACK, lifetime=MONTH)
        assert new.cert.serial_number != puller.serial
        os.replace(new.key_path, gw.key)
        os.replace(new.cert_path, gw.cert)
        wait_for_serial(gw.tls_port, trust, new.cert.serial_number, in_a_row=4 * workers)
        pulled = puller.pulls
        deadline = time.monotonic() + 10
        while puller.pulls < pulled + 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # it goes on pulling after the reload too
        puller.stop()
        assert puller.failures == []
        assert puller.pulls >= pulled + 3
        assert gw.workers() == before
        assert gw.process.log().count("TLS certificate reloaded (the files changed)") == workers
    finally:
        gw.process.stop()


def rewrite_in_place(target: Path, data: bytes) -> None:
    """Overwrite ``target`` keeping its inode, size and mtime: only a SIGHUP can tell."""
    stat = target.stat()
    assert len(data) == stat.st_size
    with target.open("r+b") as file:
        file.write(data)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_sighup_reloads_every_worker_without_restarting_them(world: World, tmp_path: Path) -> None:
    """With workers = 2, SIGHUP to the supervisor reloads the certificate in both workers
    (files rewritten so that watching them could not tell), and replaces no worker."""
    gw = start_gateway(world, tmp_path, workers=2)
    trust = ssl.create_default_context(cafile=str(world.ca.cert_path))
    try:
        before = gw.workers()
        old_serial = serial_of_new_handshake(gw.tls_port, trust)
        size = gw.cert.stat().st_size
        for attempt in range(100):  # ECDSA signatures vary in length: find one that fits
            # a subject as long as "server", the one start_gateway issued
            new = issue(tmp_path, f"hup{attempt:03d}", world.ca, LOOPBACK, lifetime=MONTH)
            if new.cert_path.stat().st_size == size:
                break
        else:
            pytest.fail("no certificate of the same size in 100 tries")
        rewrite_in_place(gw.key, new.key_path.read_bytes())
        rewrite_in_place(gw.cert, new.cert_path.read_bytes())
        assert gw.process.process is not None  # the watchers see nothing new: only SIGHUP
        gw.process.process.send_signal(signal.SIGHUP)
        wait_for_serial(gw.tls_port, trust, new.cert.serial_number, in_a_row=8)
        assert new.cert.serial_number != old_serial
        assert gw.workers() == before
        assert gw.process.log().count("TLS certificate reloaded (SIGHUP)") == 2
        assert request(gw.tls_port, trust, "/v2/") == 200
    finally:
        gw.process.stop()
