"""The container image, built from the Dockerfile and run the way users run it, with podman.

The base image is made from Debian packages (``mmdebstrap``, the machine's own apt sources)
and the project's wheels are prepared beforehand, both by ``scripts/test`` before the suite
runs (``prepare_image_inputs`` in scripts/lib.sh); the build itself runs with no network,
pip reading only those wheels. The container then runs as users run it: read-only root,
``/tmp`` on a tmpfs, the config mounted read-only, the cache on a volume, every capability
dropped; it must run as its non-root uid, pass its HEALTHCHECK on the port the config
names, serve a skopeo pull from a real upstream on the host (a MISS, then a HIT, digests
equal to the upstream's), keep its cache on the volume, and stop cleanly on SIGTERM.
``docker-compose.yml`` gets the same checks through Debian's ``podman-compose``.

Notes for these machines (shared/design/testing-notes.md): the sandbox cannot raise
rlimits, so explicit ``--ulimit`` values below the host's hard limits are passed; the build
uses ``--format docker`` so the HEALTHCHECK is kept; the container reaches the host's
loopback at 10.0.2.2 with ``slirp4netns:allow_host_loopback=true``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.clients import Podman, Skopeo
from tests.support.images import PushedImage, session_factory
from tests.support.registry import DistributionRegistry, free_port

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ROOT / "build" / "image-test"  # scripts/lib.sh prepare_image_inputs writes these
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE = "localhost/mirrorrouter:0.1.0"  # the name docker-compose.yml gives it
UID = 10001
HOST_LOOPBACK = "10.0.2.2"  # the host's 127.0.0.1 as slirp4netns shows it to a container
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
STOP_GRACE = 40  # seconds, as docker-compose.yml's stop_grace_period


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """podman with private storage (overlay: the image's layers are large for vfs copies)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    for needed in ("rootfs.tar", "wheels", "pip.conf"):
        assert (INPUTS / needed).exists(), (
            f"{INPUTS / needed} is missing: scripts/test prepares the image inputs "
            "(prepare_image_inputs in scripts/lib.sh)"
        )
    runner = Podman(storage_driver="overlay", timeout=180)
    try:
        yield runner
    finally:
        # overlay leaves its mounts behind; unmount them before the directory goes.
        subprocess.run(
            runner.argv("system", "reset", "--force"),
            env=runner.env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        subprocess.run(["umount", "-R", str(runner.root)], capture_output=True, check=False)
        runner.close()


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The project image, built offline from the Dockerfile on the Debian-made base."""
    podman.run("import", str(INPUTS / "rootfs.tar"), BASE_IMAGE)
    podman.run(
        "build",
        "--from", BASE_IMAGE,
        "--format", "docker",  # keeps HEALTHCHECK (the OCI format has no such field)
        "--network", "none",
        *ULIMITS,
        "--volume", f"{INPUTS / 'wheels'}:/wheels:ro",
        "--volume", f"{INPUTS / 'pip.conf'}:/etc/pip.conf:ro",
        "--tag", IMAGE,
        str(ROOT),
    )  # fmt: skip
    return IMAGE


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DistributionRegistry, PushedImage]]:
    """A real distribution registry on the host's loopback holding a small image."""
    root = tmp_path_factory.mktemp("image-upstream")
    factory = session_factory(tmp_path_factory)
    # The container reaches it through slirp4netns' 10.0.2.2, which arrives at 127.0.0.1.
    with DistributionRegistry(root / "hub") as hub:
        pushed = factory.push(factory.small("imagetest", seed=31), hub, "library/app", "1")
        yield hub, pushed


def container_config(upstream_port: int, port: int) -> str:
    """The config users would mount: docker.io from the test upstream, the cache on the
    volume, a port other than 5000 (the health check must follow it)."""
    return f"""
[server]
host = "0.0.0.0"
port = {port}
[cache]
directory = "/var/cache/mirrorrouter"
[upstreams."docker.io"]
mirrors = [{{ url = "http://{HOST_LOOPBACK}:{upstream_port}" }}]
"""


@dataclass
class Running:
    name: str
    host_port: int
    volume: str


def wait_healthy(podman: Podman, name: str, deadline: float = 60.0) -> None:
    """Run the image's HEALTHCHECK on demand (no systemd timers here) until it passes."""
    end = time.monotonic() + deadline
    while True:
        check = subprocess.run(
            podman.argv("healthcheck", "run", name),
            env=podman.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode == 0:
            return
        assert time.monotonic() < end, f"{name} never became healthy: {check.stdout}{check.stderr}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def running(
    podman: Podman,
    image: str,
    upstream: tuple[DistributionRegistry, PushedImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Running]:
    """The image running as users run it (read-only root, tmpfs /tmp, config read-only,
    cache on a named volume, no capabilities)."""
    hub, _ = upstream
    config_dir = tmp_path_factory.mktemp("image-config")
    config = config_dir / "mirrors.toml"
    config.write_text(container_config(hub.port, 5001))
    config.chmod(0o644)
    host_port = free_port()
    name, volume = "mr-image-test", "mr-image-cache"
    podman.run("volume", "create", volume)
    podman.run(
        "run", "--detach", "--name", name,
        "--read-only", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        *ULIMITS,
        "--network", "slirp4netns:allow_host_loopback=true",
        # podman copies its own proxy variables (the tests' closed-port proxy) into the
        # container unless told not to; the gateway must reach the upstream directly.
        "--http-proxy=false",
        "--publish", f"127.0.0.1:{host_port}:5001",
        "--volume", f"{config}:/etc/mirrorrouter/mirrors.toml:ro",
        "--volume", f"{volume}:/var/cache/mirrorrouter",
        image,
    )  # fmt: skip
    try:
        wait_healthy(podman, name)
        yield Running(name, host_port, volume)
    finally:
        subprocess.run(
            podman.argv("rm", "--force", "--time", "5", name),
            env=podman.env(),
            capture_output=True,
            timeout=60,
            check=False,
        )


def test_image_runs_as_its_non_root_user(podman: Podman, running: Running) -> None:
    """The process inside runs as uid 10001, and the image declares that user."""
    assert podman.run("exec", running.name, "id", "-u").text.strip() == str(UID)
    inspected = json.loads(podman.run("image", "inspect", IMAGE).text)[0]
    assert inspected["Config"]["User"] == f"{UID}:{UID}"
    assert inspected["Healthcheck"]["Test"][:3] == ["CMD", "mirrorrouter", "healthcheck"]


def test_healthcheck_follows_the_configured_port(podman: Podman, running: Running) -> None:
    """The HEALTHCHECK passes against a server on port 5001, and fails when nothing answers."""
    wait_healthy(podman, running.name, deadline=10)
    # A config naming a port nothing listens on: the check fails (exit 1), quickly.
    other = subprocess.run(
        podman.argv(
            "exec", running.name, "sh", "-c",
            "sed 's/^port = 5001/port = 5999/' /etc/mirrorrouter/mirrors.toml > /tmp/other.toml"
            " && mirrorrouter healthcheck --config /tmp/other.toml --timeout 2",
        ),
        env=podman.env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert other.returncode == 1, other.stdout + other.stderr


def test_serves_a_pull_miss_then_hit_with_the_cache_on_the_volume(
    podman: Podman,
    running: Running,
    upstream: tuple[DistributionRegistry, PushedImage],
    tmp_path: Path,
) -> None:
    """skopeo pulls through the container twice: a MISS then a HIT, digests equal the
    upstream's, and the blobs land on the cache volume."""
    _, pushed = upstream
    gateway = f"127.0.0.1:{running.host_port}"
    url = f"http://{gateway}/v2/library/app/manifests/1"
    accept = {"Accept": pushed.media_type}
    with httpx.Client(trust_env=False, timeout=30) as client:
        first = client.get(url, headers=accept)
        second = client.get(url, headers=accept)
    assert first.status_code == second.status_code == 200, first.text
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.headers["docker-content-digest"] == pushed.digest
    local = Skopeo().copy_to_local(f"{gateway}/library/app:1", tmp_path / "pulled")
    assert local.manifest_digest == pushed.digest
    assert set(local.blob_digests) == {b.digest for b in pushed.blobs}
    inspected = podman.run("volume", "inspect", running.volume, "--format", "{{.Mountpoint}}")
    mountpoint = Path(inspected.text.strip())
    cached = {p.name for p in mountpoint.rglob("*") if p.is_file()}
    for blob in pushed.blobs:
        assert blob.digest.removeprefix("sha256:") in cached, f"{blob.digest} not on the volume"


def test_stops_cleanly_on_sigterm(podman: Podman, running: Running) -> None:
    """SIGTERM ends the server within the grace period with exit status 0."""
    started = time.monotonic()
    podman.run("stop", "--time", str(STOP_GRACE), running.name)
    assert time.monotonic() - started < STOP_GRACE, "stop waited for SIGKILL"
    state = json.loads(podman.run("inspect", running.name).text)[0]["State"]
    assert state["ExitCode"] == 0, podman.run("logs", running.name).text[-3000:]


# ---------------------------------------------------------------------------- docker compose


def compose_project(directory: Path, config: Path, host_port: int) -> Path:
    """docker-compose.yml as shipped, with only what this machine needs changed: the host
    port, the config file, slirp4netns networking (to reach the host's loopback) and ulimits
    the sandbox allows."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["mirrorrouter"]
    assert service["image"] == IMAGE.removeprefix("localhost/")
    assert service["ports"] == ["5000:5000"]
    service["ports"] = [f"127.0.0.1:{host_port}:5001"]
    service["volumes"] = [
        v.replace("./deploy/mirrors.toml", str(config)) for v in service["volumes"]
    ]
    service["network_mode"] = "slirp4netns:allow_host_loopback=true"
    service["ulimits"] = {"nofile": 20000, "nproc": 32768}
    path = directory / "docker-compose.yml"
    path.write_text(yaml.safe_dump(compose))
    return path


def slirp_only_podman(directory: Path) -> Path:
    """A podman for podman-compose 1.0.3, which adds its project network (``--net``) to every
    container even beside ``network_mode``; podman refuses both at once. The test's service
    runs on slirp4netns (to reach the host's loopback), so that one option pair is dropped."""
    shim = directory / "podman"
    shim.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "args = sys.argv[1:]\n"
        "if any(a.startswith('slirp4netns') for a in args):\n"
        "    for flag in ('--net', '--network-alias'):\n"
        "        if flag in args:\n"
        "            at = args.index(flag)\n"
        "            del args[at : at + 2]\n"
        f"os.execvp({shutil.which('podman')!r}, [{shutil.which('podman')!r}, *args])\n"
    )
    shim.chmod(0o755)
    return shim


def test_docker_compose_runs_the_image(
    podman: Podman,
    image: str,
    upstream: tuple[DistributionRegistry, PushedImage],
    tmp_path: Path,
) -> None:
    """podman-compose starts docker-compose.yml's service (read-only root, tmpfs /tmp, no
    capabilities), it becomes healthy, serves a pull byte-exact and stops on SIGTERM."""
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed")
    hub, pushed = upstream
    config = tmp_path / "mirrors.toml"
    config.write_text(container_config(hub.port, 5001))
    config.chmod(0o644)
    host_port = free_port()
    compose = compose_project(tmp_path, config, host_port)
    global_args = podman.argv()[1:]  # the private storage and state flags
    base = [
        "podman-compose", "--project-name", "mrcompose", "--file", str(compose),
        "--podman-path", str(slirp_only_podman(tmp_path)),
        *(f"--podman-args={arg}" for arg in global_args),
        "--podman-run-args=--http-proxy=false",
    ]  # fmt: skip

    def compose_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args],
            env=podman.env(),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            cwd=tmp_path,
        )

    up = compose_run("up", "--detach")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    try:
        names = podman.run("ps", "--all", "--format", "{{.Names}}").text.split()
        (name,) = [n for n in names if n.startswith("mrcompose")]
        inspected = json.loads(podman.run("inspect", name).text)[0]
        assert inspected["HostConfig"]["ReadonlyRootfs"] is True
        assert inspected["Config"]["Image"].endswith(IMAGE.removeprefix("localhost/"))
        wait_healthy(podman, name)
        with httpx.Client(trust_env=False, timeout=30) as client:
            answer = client.get(
                f"http://127.0.0.1:{host_port}/v2/library/app/manifests/1",
                headers={"Accept": pushed.media_type},
            )
        assert answer.status_code == 200, answer.text
        assert answer.headers["docker-content-digest"] == pushed.digest
    finally:
        down = compose_run("down", "--volumes")
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
