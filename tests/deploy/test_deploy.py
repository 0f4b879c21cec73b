"""The container image and the deployment files, checked without a Docker engine or a cluster.

The Dockerfile's steps are run here as far as they can be outside Docker: its COPY sources
are built into a wheel and installed into a throw-away venv, its ``sed`` edit of the config
is run on a copy of mirrors.toml, its entrypoint is started and its HEALTHCHECK command is
run against it. docker-compose.yml and deploy/kubernetes/ are parsed and checked against
each other and against the Dockerfile (uid, ports, paths, probes); every config they ship
passes ``mirrorrouter check-config``. Nothing here leaves the machine.
"""

from __future__ import annotations

import configparser
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest
import yaml

from mirrorrouter.cli.main import main as cli_main
from mirrorrouter.config import Settings, load_settings
from tests.support.service import LOOPBACK_ONLY_ENV
from tests.support.testca import issue

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
CONTAINER_CONFIG = DEPLOY / "mirrors.toml"

CONFIG_PATH = "/etc/mirrorrouter/mirrors.toml"
CACHE_PATH = "/var/cache/mirrorrouter"
PORT = 5000
GRACEFUL_SHUTDOWN = 30  # seconds serve gives in-flight responses (cli.py)


# ---------------------------------------------------------------------------- the Dockerfile


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case
    args: str  # continuation lines joined

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value


def dockerfile() -> list[Instruction]:
    """The instructions, with ``\\`` continuations joined and comment lines dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        name, _, args = pending.partition(" ")
        instructions.append(Instruction(name.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def only(name: str) -> Instruction:
    found = [i for i in dockerfile() if i.name == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def healthcheck_command() -> list[str]:
    """HEALTHCHECK [--options] CMD [...]: the command, as exec form."""
    args = only("HEALTHCHECK").args
    command = args.partition("CMD ")[2]
    assert command.startswith("["), "HEALTHCHECK CMD should be in exec (JSON) form"
    return json.loads(command)  # type: ignore[no-any-return]


def healthcheck_options() -> dict[str, str]:
    options = only("HEALTHCHECK").args.partition("CMD ")[0]
    return dict(opt.removeprefix("--").split("=", 1) for opt in options.split())


def image_uid_gid() -> tuple[int, int]:
    user = only("USER").args
    assert re.fullmatch(r"\d+:\d+", user), f"USER {user}: numeric uid:gid, so that "
    "Kubernetes' runAsNonRoot can check it"
    uid, gid = (int(n) for n in user.split(":"))
    return uid, gid


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]]


def test_dockerfile_shape() -> None:
    steps = dockerfile()
    names = [i.name for i in steps]
    assert steps[0].name == "FROM" and steps[0].args.startswith("python:3.11-slim")
    uid, gid = image_uid_gid()
    assert uid > 0 and gid > 0
    assert only("VOLUME").args == CACHE_PATH
    assert only("EXPOSE").args == str(PORT)
    assert only("ENTRYPOINT").exec_form() == ["mirrorrouter", "serve", "--config", CONFIG_PATH]
    assert "CMD" not in names  # arguments after the image name go to serve
    # the user is set before anything runs as it, after everything that needs root
    assert names.index("USER") > max(i for i, n in enumerate(names) if n in ("RUN", "COPY"))
    # the cache directory is made and given to that user before it becomes a volume
    setup = steps[names.index("RUN")].args
    assert f"mkdir -p /etc/mirrorrouter {CACHE_PATH}" in setup
    assert f"chown {uid}:{gid} {CACHE_PATH}" in setup
    env = dict(re.findall(r"(\w+)=(\S+)", only("ENV").args))
    assert env["MIRRORROUTER_CONFIG"] == CONFIG_PATH


def test_dockerfile_copies_only_what_exists() -> None:
    for copy in (i for i in dockerfile() if i.name == "COPY"):
        *sources, _ = copy.args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_healthcheck_asks_the_configured_port_within_its_timeout() -> None:
    """The HEALTHCHECK runs ``mirrorrouter healthcheck`` (which reads server.port from the
    config) with a timeout shorter than the check's own."""
    command = healthcheck_command()
    assert command[:2] == ["mirrorrouter", "healthcheck"]
    timeout = float(command[command.index("--timeout") + 1])
    options = healthcheck_options()
    assert timeout < seconds(options["timeout"])
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys()


def run_sed_step(config: Path) -> None:
    """The Dockerfile's RUN that edits the copied mirrors.toml, on ``config`` instead."""
    (step,) = [i for i in dockerfile() if i.name == "RUN" and "sed -i" in i.args]
    assert CONFIG_PATH in step.args
    script = step.args.replace(CONFIG_PATH, shlex.quote(str(config)))
    subprocess.run(["sh", "-ec", script], check=True, timeout=30)


def test_sed_step_puts_the_cache_on_the_volume(tmp_path: Path) -> None:
    config = tmp_path / "mirrors.toml"
    shutil.copy(ROOT / "mirrors.toml", config)
    run_sed_step(config)
    settings = load_settings(config)
    assert settings.cache.directory == Path(CACHE_PATH)
    assert all(u.cache.directory.is_relative_to(CACHE_PATH) for u in settings.upstreams.values())
    assert cli_main(["check-config", str(config)]) == 0
    # the edit changed that one line and nothing else
    before = (ROOT / "mirrors.toml").read_text().splitlines()
    after = config.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith(f'directory = "{CACHE_PATH}"')


def test_sed_step_fails_the_build_when_it_no_longer_matches(tmp_path: Path) -> None:
    config = tmp_path / "mirrors.toml"
    config.write_text('[cache]\ndirectory = "somewhere-else"\n')
    with pytest.raises(subprocess.CalledProcessError):
        run_sed_step(config)


# ---------------------------------------------------------------------------- the image's venv


@dataclass(frozen=True)
class ImageVenv:
    """The package as the Dockerfile installs it (from its COPY sources only), in a venv."""

    root: Path
    bin: Path

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **LOOPBACK_ONLY_ENV, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("MIRRORROUTER_CONFIG", None)
        env.pop("PYTHONPATH", None)
        return subprocess.run(
            args, capture_output=True, text=True, timeout=60, env=env, cwd=self.root, **kwargs
        )


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> ImageVenv:
    """COPY pyproject.toml README.md / COPY mirrorrouter, then ``pip install .``, offline.

    setuptools builds the package from a directory holding only what the Dockerfile copies
    (so a file the build needs but the image lacks fails here), with the package discovery
    and metadata of pyproject.toml. The files are copied into a fresh venv as pip would
    install them (a wheel needs the ``wheel`` package, which a fresh venv lacks). The
    dependencies are not downloaded: the venv sees this project's venv's site-packages
    through a .pth file, and ``test_image_declares_what_it_imports`` checks that
    pyproject.toml declares every one the package imports.
    """
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    src.mkdir()
    steps = dockerfile()
    install = next(i for i, s in enumerate(steps) if s.name == "RUN" and "pip install" in s.args)
    assert "pip install --no-cache-dir . " in steps[install].args + " "
    for copy in steps[:install]:
        if copy.name != "COPY":
            continue
        *sources, dest = copy.args.split()
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") else src / dest
            if (ROOT / source).is_dir():
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(ROOT / source, target, ignore=ignore)
            else:
                shutil.copy(ROOT / source, target)
    (src / "meta").mkdir()
    build = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", "import setuptools; setuptools.setup()",
         "-q", "egg_info", "--egg-base", "meta", "build", "--build-lib", "lib"],
        cwd=src, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / python / "site-packages"
    shutil.copytree(src / "lib", site, dirs_exist_ok=True)
    (egg_info,) = (src / "meta").glob("*.egg-info")
    shutil.copytree(egg_info, site / egg_info.name)
    scripts = configparser.ConfigParser()
    scripts.read(egg_info / "entry_points.txt")
    for name, target in scripts["console_scripts"].items():
        module, _, function = target.partition(":")
        script = venv / "bin" / name
        script.write_text(
            f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {function}\n"
            f"sys.exit({function}())\n"
        )
        script.chmod(0o755)
    (site / "deps-from-the-dev-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return ImageVenv(root, venv / "bin")


def test_image_venv_runs_its_own_copy(image_venv: ImageVenv) -> None:
    out = image_venv.run(
        str(image_venv.bin / "python"), "-c", "import mirrorrouter; print(mirrorrouter.__file__)"
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(image_venv.root / "venv")


def test_entrypoint_help(image_venv: ImageVenv) -> None:
    program, *args = only("ENTRYPOINT").exec_form()
    out = image_venv.run(str(image_venv.bin / program), *args, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: mirrorrouter serve" in out.stdout


CLOSURE = textwrap.dedent(
    """
    import ast, importlib.metadata as md, json, pathlib, sys
    from packaging.requirements import Requirement
    import mirrorrouter
    imported = set()
    for path in pathlib.Path(mirrorrouter.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    imported -= set(sys.stdlib_module_names) | {"mirrorrouter", "__future__"}
    by_module = md.packages_distributions()
    unknown = sorted(m for m in imported if m not in by_module)
    needed = {d.lower().replace("_", "-") for m in imported for d in by_module.get(m, [])}
    declared, todo = set(), [("mirrorrouter", frozenset())]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, extras) in declared:
            continue
        declared.add((key, extras))
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in (extras or {""})
            ):
                todo.append((req.name, frozenset(req.extras)))
    names = {d for d, _ in declared}
    print(json.dumps({"undeclared": sorted(needed - names), "not installed": unknown}))
    """
)


def test_image_declares_what_it_imports(image_venv: ImageVenv) -> None:
    """Every distribution mirrorrouter's modules import (anywhere, lazily too) is among its
    declared dependencies or theirs: ``pip install .`` in the image brings only those."""
    out = image_venv.run(str(image_venv.bin / "python"), "-c", CLOSURE)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found == {"undeclared": [], "not installed": []}, (
        f"mirrorrouter imports distributions pyproject.toml does not declare: {found}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthcheck(port: int, directory: Path) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, with the shipped config's server.port set to ``port``."""
    config = directory / f"health-{port}.toml"
    shipped = (ROOT / "mirrors.toml").read_text()
    assert f"\nport = {PORT}" in shipped
    config.write_text(shipped.replace(f"\nport = {PORT}", f"\nport = {port}", 1))
    _program, *args = healthcheck_command()
    return subprocess.run(
        [sys.executable, "-m", "mirrorrouter", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=15, env={**os.environ, **LOOPBACK_ONLY_ENV},
    )  # fmt: skip


@pytest.fixture
def served(image_venv: ImageVenv, tmp_path: Path) -> Iterator[int]:
    """The entrypoint serving the image's config (with its cache under tmp_path) on a port."""
    config = tmp_path / "mirrors.toml"
    shutil.copy(ROOT / "mirrors.toml", config)
    run_sed_step(config)
    text = config.read_text().replace(f'"{CACHE_PATH}"', f'"{tmp_path / "cache"}"')
    config.write_text(text)
    port = free_port()
    program, *args = only("ENTRYPOINT").exec_form()
    args[args.index("--config") + 1] = str(config)
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, **LOOPBACK_ONLY_ENV, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [str(image_venv.bin / program), *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve did not listen within 30 s"
                time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACEFUL_SHUTDOWN + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_entrypoint_serves_and_the_healthcheck_passes(served: int, tmp_path: Path) -> None:
    assert healthcheck(served, tmp_path).returncode == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{served}/readyz", timeout=5) as response:
        assert response.status == 200


def test_healthcheck_fails_without_a_healthy_server(tmp_path: Path) -> None:
    assert healthcheck(free_port(), tmp_path).returncode != 0  # nothing listening

    class Unhealthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(503 if self.path == "/healthz" else 404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert healthcheck(server.server_address[1], tmp_path).returncode != 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ---------------------------------------------------------------------------- the configs


def portable(settings: Settings) -> Settings:
    """``settings`` with the cache directories relative to the cache root, and no source."""
    root = settings.cache.directory
    upstreams = {
        name: replace(u, cache=replace(u.cache, directory=u.cache.directory.relative_to(root)))
        for name, u in settings.upstreams.items()
    }
    return replace(
        settings,
        cache=replace(settings.cache, directory=Path(".")),
        upstreams=upstreams,
        source=None,
    )


def check_container_config(text: str, tmp_path: Path) -> Settings:
    """A config for the container: valid, its cache on the volume, otherwise mirrors.toml."""
    config = tmp_path / "container.toml"
    config.write_text(text)
    assert cli_main(["check-config", str(config)]) == 0
    settings = load_settings(config)
    assert settings.cache.directory == Path(CACHE_PATH)
    assert settings.server.port == PORT and settings.server.host == "0.0.0.0"
    if settings.audit.file is not None:
        assert settings.audit.file.is_relative_to(CACHE_PATH)
    assert portable(settings) == portable(load_settings(ROOT / "mirrors.toml")), (
        "deploy/mirrors.toml (and the ConfigMap) should say what mirrors.toml says, with the "
        "cache on the volume: change them together"
    )
    return settings


def test_container_config_is_mirrors_toml_on_the_volume(tmp_path: Path) -> None:
    check_container_config(CONTAINER_CONFIG.read_text(), tmp_path)


# ---------------------------------------------------------------------------- YAML


def yaml_files() -> list[Path]:
    return sorted([COMPOSE, *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


def kube() -> dict[str, dict[str, Any]]:
    """The manifests listed in kustomization.yaml, by kind."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every manifest is listed in kustomization.yaml"
    objects: dict[str, dict[str, Any]] = {}
    for name in listed:
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
            assert doc["kind"] not in objects, f"a second {doc['kind']}"
            objects[doc["kind"]] = doc
    namespace = kustomization["namespace"]
    assert objects["Namespace"]["metadata"]["name"] == namespace
    for kind, doc in objects.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, kind
    return objects


def test_kubernetes_objects() -> None:
    assert set(kube()) == {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    }


def test_configmap_holds_the_container_config(tmp_path: Path) -> None:
    data = kube()["ConfigMap"]["data"]
    assert set(data) == {Path(CONFIG_PATH).name}
    assert data[Path(CONFIG_PATH).name] == CONTAINER_CONFIG.read_text()
    check_container_config(data[Path(CONFIG_PATH).name], tmp_path)


def test_deployment() -> None:
    objects = kube()
    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"  # a ReadWriteOnce volume
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["terminationGracePeriodSeconds"] > GRACEFUL_SHUTDOWN

    uid, gid = image_uid_gid()
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid)
    assert security["seccompProfile"]["type"] == "RuntimeDefault"

    (container,) = pod["containers"]
    assert "command" not in container  # the image's ENTRYPOINT
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}

    def probe(kind: str) -> str:
        get = container[kind]["httpGet"]
        assert ports.get(get["port"], get["port"]) == PORT
        return str(get["path"])

    assert probe("livenessProbe") == "/healthz"
    assert probe("startupProbe") == "/healthz"
    assert probe("readinessProbe") == "/readyz"

    # the only writable paths: the cache (the claim) and /tmp; the config read-only
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {str(Path(CONFIG_PATH).parent), CACHE_PATH, "/tmp"}
    config = volumes[mounts[str(Path(CONFIG_PATH).parent)]["name"]]
    assert mounts[str(Path(CONFIG_PATH).parent)]["readOnly"] is True
    assert config["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    cache = volumes[mounts[CACHE_PATH]["name"]]
    claim = objects["PersistentVolumeClaim"]
    assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_service_reaches_the_pod() -> None:
    objects = kube()
    service = objects["Service"]["spec"]
    template = objects["Deployment"]["spec"]["template"]
    assert service["selector"].items() <= template["metadata"]["labels"].items()
    (port,) = service["ports"]
    assert port["port"] == PORT
    (container,) = template["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get(port["targetPort"], port["targetPort"]) == PORT


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    labels = kube()["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) not here")
def test_kustomize_builds() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert sorted(d["kind"] for d in docs) == sorted(kube())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].partition(":")[2], "kustomization.yaml sets the image's tag"


def test_compose(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["mirrorrouter"]
    assert (ROOT / service["build"] / "Dockerfile").exists()
    assert f"{PORT}:{PORT}" in service["ports"]
    volumes = {}
    for spec in service["volumes"]:
        source, target, *mode = spec.split(":")
        volumes[target] = (source, mode)
    # the cache: the named volume
    source, _ = volumes[CACHE_PATH]
    assert source in compose["volumes"]
    # the config: a file of the repository, read-only, that is a valid container config
    source, mode = volumes[CONFIG_PATH]
    assert mode == ["ro"]
    assert (ROOT / source).resolve() == CONTAINER_CONFIG
    check_container_config((ROOT / source).read_text(), tmp_path)
    # as in Kubernetes: a read-only root with /tmp writable, graceful stop, healthcheck
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert seconds(service["stop_grace_period"]) > GRACEFUL_SHUTDOWN
    health = service["healthcheck"]
    assert health["test"] == ["CMD", *healthcheck_command()]
    options = healthcheck_options()
    assert {k: health[k.replace("-", "_")] for k in options} == {
        k: (int(v) if k == "retries" else v) for k, v in options.items()
    }


# ---------------------------------------------------------------------------- the TLS overlay

KUBE_TLS = DEPLOY / "kubernetes-tls"


def tls_overlay() -> dict[str, Any]:
    """The overlay's kustomization, patches and Certificate, parsed."""
    kustomization = yaml.safe_load((KUBE_TLS / "kustomization.yaml").read_text())
    patches = {}
    for patch in kustomization["patches"]:
        doc = yaml.safe_load((KUBE_TLS / patch["path"]).read_text())
        patches[doc["kind"]] = doc
    return {
        "kustomization": kustomization,
        "patches": patches,
        "certificate": yaml.safe_load((KUBE_TLS / "certificate.yaml").read_text()),
        "config": (KUBE_TLS / "mirrors.toml").read_text(),
    }


def test_tls_overlay_config_is_the_container_config_with_https(tmp_path: Path) -> None:
    """The overlay's mirrors.toml is deploy/mirrors.toml with the plain listener off and
    [server.tls] on the mounted Secret's files; with those files present it passes
    check-config."""
    text = tls_overlay()["config"]
    server = tomllib.loads(text)["server"]
    assert server["port"] == 0
    certificate, key = server["tls"]["certificate"], server["tls"]["key"]
    assert (Path(certificate).name, Path(key).name) == ("tls.crt", "tls.key")  # the Secret's
    cert = issue(tmp_path, "mirror", issue(tmp_path, "ca"), lifetime=datetime.timedelta(days=90))
    config = tmp_path / "mounted.toml"
    config.write_text(
        text.replace(certificate, str(cert.cert_path)).replace(key, str(cert.key_path))
    )
    assert cli_main(["check-config", str(config)]) == 0
    checked = load_settings(config)
    assert checked.server.tls is not None and checked.server.tls.port == server["tls"]["port"]
    plain = replace(checked, server=replace(checked.server, port=PORT, tls=None))
    assert portable(plain) == portable(load_settings(CONTAINER_CONFIG))


def test_tls_overlay_mounts_the_secret_and_probes_over_https() -> None:
    """The overlay serves the config's TLS port, mounts the Certificate's Secret read-only
    where the config reads it (no subPath: the kubelet then updates the files), probes over
    https, and the Service forwards to that port."""
    overlay = tls_overlay()
    kustomization = overlay["kustomization"]
    assert "../kubernetes" in kustomization["resources"]
    (generator,) = kustomization["configMapGenerator"]
    base_config = kube()["ConfigMap"]["metadata"]
    assert (generator["name"], generator["behavior"]) == (base_config["name"], "replace")
    assert generator["files"] == ["mirrors.toml"]
    assert generator["options"]["disableNameSuffixHash"] is True
    tls = tomllib.loads(overlay["config"])["server"]["tls"]
    deployment = overlay["patches"]["Deployment"]["spec"]["template"]["spec"]
    (container,) = deployment["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert ports == {"https": tls["port"]}
    for kind, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                       ("readinessProbe", "/readyz")]:  # fmt: skip
        assert container[kind]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] is True and "subPath" not in mount
    assert {str(Path(tls["certificate"]).parent), str(Path(tls["key"]).parent)} == {
        mount["mountPath"]
    }
    (volume,) = deployment["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["secret"]["secretName"] == overlay["certificate"]["spec"]["secretName"]
    assert overlay["certificate"]["kind"] == "Certificate"
    service = overlay["patches"]["Service"]["spec"]
    (port,) = [p for p in service["ports"] if "name" in p]
    assert port["targetPort"] == "https" and port["port"] == tls["port"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) not here")
def test_tls_overlay_kustomize_builds() -> None:
    """kustomize merges the overlay: the pod mounts the config and the Secret, the
    ConfigMap holds the overlay's config, the Service has only the https port."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE_TLS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout)}
    assert set(docs) == {*kube(), "Certificate"}
    assert docs["ConfigMap"]["data"] == {"mirrors.toml": tls_overlay()["config"]}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/mirrorrouter", "/etc/mirrorrouter-tls", CACHE_PATH, "/tmp"}
    assert [p["name"] for p in container["ports"]] == ["https"]
    assert [p["name"] for p in docs["Service"]["spec"]["ports"]] == ["https"]
