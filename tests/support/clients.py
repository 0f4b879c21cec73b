"""Runners for the real container clients the tests pull through the gateway with.

Every client process gets :func:`client_env`: ``HTTP(S)_PROXY`` point at a closed loopback port
(``127.0.0.1:9``) and ``NO_PROXY`` covers loopback, so a client that falls back to a public
registry name (``registry-1.docker.io``) fails at once, with no DNS lookup, while loopback
traffic is never proxied (Go never proxies loopback either).

Facts checked on Debian 12 (skopeo 1.9.3, podman 4.3.1, containerd/ctr 1.6.20):

skopeo
    ``--src-tls-verify=false`` / ``--dest-tls-verify=false`` / ``--tls-verify=false`` allow
    plain HTTP. ``CONTAINERS_REGISTRIES_CONF`` is ignored: the hidden global flag
    ``--registries-conf FILE`` works. Pushing an OCI layout with uncompressed layers recompresses
    them (new manifest digest) unless ``--preserve-digests`` is given; so does a copy into an
    ``oci:`` layout. A ``dir:`` copy keeps the bytes as served: ``manifest.json`` is the top
    manifest, instance manifests of a list are ``<hex>.manifest.json``, blobs are ``<hex>``.
    ``inspect`` reports the digest of the top-level manifest (the list, for a list).
podman
    No storage.conf is installed; overlay works on this ext4 root but leaves a bind mount of
    ``<root>/overlay`` behind, so the runner defaults to ``vfs``. The hidden global flag
    ``--registries-conf`` works and ``CONTAINERS_REGISTRIES_CONF`` is honoured too; both are set.
    Without ``--tmpdir`` podman writes ``/run/libpod``; without ``--network-config-dir`` it
    locks ``/etc/containers/networks``. ``--authfile`` must name an existing file. ``pull -q``
    prints the image ID (the config digest's hex). ``.Digest`` of a pulled image is the digest
    of what the tag named (the index, for a list); ``.RepoDigests`` also lists the instance. A
    failing pull is retried 3 times, 1 s apart (podman 4.3 has no ``--retry`` flag).
containerd / ctr
    In 1.6 ``ctr`` itself resolves and fetches (the daemon only stores), so the proxy variables
    matter on ``ctr``. ``--hosts-dir DIR`` reads ``DIR/<host[:port]>/hosts.toml`` or
    ``DIR/_default/hosts.toml``. An ``http://`` host URL is enough for plain HTTP; ``--plain-http``
    is not needed (without a hosts.toml, a ``127.0.0.1:PORT`` reference is also pulled over
    plain HTTP). A hosts.toml with no ``[host.…]`` table fails to parse in 1.6 (``server``
    alone is ignored). After every ``[host]`` fails, ctr falls back to ``server`` (or, when
    absent, the registry's default: ``https://registry-1.docker.io`` for docker.io). Requests to
    a mirror host carry ``?ns=<registry>`` (``ns=127.0.0.1%3A5099`` for a host:port name); none
    when the host is the registry itself. ctr never sends ``GET /v2/``: it starts with
    ``HEAD /v2/<name>/manifests/<tag>``, then GETs the manifest and blobs by digest, one
    ``Accept`` line ending in ``*/*``. It does Basic auth over plain HTTP after a 401.
    ``ctr content fetch`` records the image like ``images pull`` but does not unpack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from tests.support.service import Service

StrPath = str | os.PathLike[str]
# "user:password" or (user, password)
Creds = str | tuple[str, str]

SKOPEO = "skopeo"
PODMAN = "podman"
CONTAINERD = "containerd"
CTR = "ctr"

DEFAULT_TIMEOUT = 120.0
# A closed loopback port: a client that tries a public name fails here immediately.
PROXY_SINKHOLE = "http://127.0.0.1:9"
_LOOPBACK = "127.0.0.1,localhost"

# Variables that would steer a client away from the settings a runner chooses.
_STRIPPED_PREFIXES = ("CONTAINERS_", "CONTAINERD_", "REGISTRY_")
_STRIPPED_NAMES = frozenset(
    {"ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "DOCKER_CONFIG", "XDG_RUNTIME_DIR"}
)

_TRANSPORTS = (
    "docker://",
    "oci:",
    "dir:",
    "oci-archive:",
    "docker-archive:",
    "containers-storage:",
    "docker-daemon:",
)
_INDEX_KEYS = ("manifests",)


class ClientError(RuntimeError):
    """A client command failed or timed out; carries its argv, exit status and output."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        *,
        note: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited with {returncode}"
        message = f"{' '.join(self.argv)} {status}"
        if note:
            message += f" ({note})"
        message += f"\n--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}"
        super().__init__(message)


@dataclass(frozen=True)
class Completed:
    """A finished client command."""

    argv: list[str]
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8."""
        return self.stdout.decode("utf-8", errors="replace")


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment every client process runs with.

    This process's environment without proxy, ``CONTAINERS_*``, ``CONTAINERD_*`` and
    ``REGISTRY_*`` variables, plus proxies aimed at a closed loopback port and ``NO_PROXY`` for
    loopback, then ``extra``.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in _STRIPPED_NAMES and not key.upper().startswith(_STRIPPED_PREFIXES)
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = PROXY_SINKHOLE
        env[name.lower()] = PROXY_SINKHOLE
    env["NO_PROXY"] = env["no_proxy"] = _LOOPBACK
    if extra:
        env.update(extra)
    return env


def run_client(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    cwd: StrPath | None = None,
) -> Completed:
    """Run one client command with :func:`client_env`; raise :class:`ClientError` on failure."""
    argv = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else client_env(),
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientError(
            argv, None, _decode(exc.stdout), _decode(exc.stderr), note=f"after {timeout}s"
        ) from exc
    stderr = _decode(done.stderr)
    if done.returncode != 0:
        raise ClientError(argv, done.returncode, _decode(done.stdout), stderr)
    return Completed(argv, done.stdout, stderr)


def sha256_digest(data: bytes) -> str:
    """Return ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def docker_ref(ref: str) -> str:
    """Return ``ref`` with a transport: ``docker://`` unless it already names one."""
    return ref if ref.startswith(_TRANSPORTS) else f"docker://{ref}"


def _creds(creds: Creds) -> str:
    return creds if isinstance(creds, str) else f"{creds[0]}:{creds[1]}"


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


# --------------------------------------------------------------------------------------------
# skopeo


@dataclass(frozen=True)
class LocalImage:
    """An image copied into a local ``dir:`` or ``oci:`` directory, verified on disk.

    ``manifest_digest`` is the top manifest (the index/list for a list copied with ``all``);
    ``manifest_digests`` holds it and every instance manifest present; ``blob_digests`` holds
    the configs and layers those manifests reference. Every file's content matched its digest.
    """

    path: Path
    layout: Literal["dir", "oci"]
    manifest_digest: str
    manifest_digests: frozenset[str]
    blob_digests: frozenset[str]


class Skopeo:
    """``skopeo`` with TLS verification off for plain-HTTP registries and no policy checks.

    ``registries_conf`` (a file) is the default for every call; ``authfile`` likewise.
    """

    def __init__(
        self,
        *,
        registries_conf: StrPath | None = None,
        authfile: StrPath | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        binary: str = SKOPEO,
    ) -> None:
        self.registries_conf = registries_conf
        self.authfile = authfile
        self.timeout = timeout
        self.binary = binary

    def run(
        self,
        *args: str,
        registries_conf: StrPath | None = None,
        timeout: float | None = None,
    ) -> Completed:
        """Run ``skopeo [--registries-conf F] --insecure-policy ARGS``."""
        conf = registries_conf if registries_conf is not None else self.registries_conf
        argv = [self.binary, "--insecure-policy"]
        if conf is not None:
            # skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF; this hidden flag works.
            argv += ["--registries-conf", os.fspath(conf)]
        argv += args
        return run_client(argv, timeout=timeout or self.timeout)

    def copy(
        self,
        src: str,
        dest: str,
        *,
        src_creds: Creds | None = None,
        dest_creds: Creds | None = None,
        all_platforms: bool = False,
        registries_conf: StrPath | None = None,
        extra: Iterable[str] = (),
    ) -> str:
        """``skopeo copy SRC DEST``; return the digest of the manifest written to DEST.

        A bare ``host/repo:tag`` means ``docker://``. Pass ``extra=("--preserve-digests",)``
        to push an OCI layout without recompressing its layers.
        """
        src, dest = docker_ref(src), docker_ref(dest)
        with tempfile.TemporaryDirectory(prefix="mr-skopeo-") as scratch:
            digestfile = Path(scratch) / "digest"
            args = ["copy", "--quiet", "--digestfile", str(digestfile)]
            if src.startswith("docker://"):
                args.append("--src-tls-verify=false")
            if dest.startswith("docker://"):
                args.append("--dest-tls-verify=false")
            if src_creds is not None:
                args += ["--src-creds", _creds(src_creds)]
            if dest_creds is not None:
                args += ["--dest-creds", _creds(dest_creds)]
            if self.authfile is not None:
                args += ["--authfile", os.fspath(self.authfile)]
            if all_platforms:
                args.append("--all")
            args += [*extra, src, dest]
            self.run(*args, registries_conf=registries_conf)
            return digestfile.read_text().strip()

    def _inspect_args(self, ref: str, creds: Creds | None) -> list[str]:
        ref = docker_ref(ref)
        args = ["inspect"]
        if ref.startswith("docker://"):
            args.append("--tls-verify=false")
        if creds is not None:
            args += ["--creds", _creds(creds)]
        if self.authfile is not None:
            args += ["--authfile", os.fspath(self.authfile)]
        return args

    def inspect_raw(
        self, ref: str, creds: Creds | None = None, *, registries_conf: StrPath | None = None
    ) -> bytes:
        """Return the exact manifest bytes the registry served for ``ref``."""
        args = [*self._inspect_args(ref, creds), "--raw", docker_ref(ref)]
        return self.run(*args, registries_conf=registries_conf).stdout

    def inspect_digest(
        self, ref: str, creds: Creds | None = None, *, registries_conf: StrPath | None = None
    ) -> str:
        """Return the digest of the top-level manifest ``ref`` names (``--no-tags``).

        ``--no-tags`` because skopeo would list tags from the real registry name even when a
        mirror served the manifest.
        """
        args = [*self._inspect_args(ref, creds), "--no-tags", "--format", "{{.Digest}}"]
        out = self.run(*args, docker_ref(ref), registries_conf=registries_conf).text.strip()
        if not out.startswith("sha256:"):
            raise ClientError([self.binary, *args], 0, out, "", note="no digest in output")
        return out

    def copy_to_local(
        self,
        ref: str,
        dest_dir: StrPath,
        *,
        layout: Literal["dir", "oci"] = "dir",
        creds: Creds | None = None,
        all_platforms: bool = False,
        registries_conf: StrPath | None = None,
        tag: str = "latest",
    ) -> LocalImage:
        """Copy ``ref`` into a new local directory and return what landed there.

        ``dir`` keeps the manifests as served. ``oci`` adds ``--preserve-digests`` (else skopeo
        compresses layers and rewrites manifests), which fails for Docker schema2 sources.
        """
        path = Path(dest_dir)
        extra: tuple[str, ...]
        if layout == "dir":
            dest, extra = f"dir:{path}", ()
        else:
            dest, extra = f"oci:{path}:{tag}", ("--preserve-digests",)
        self.copy(
            ref,
            dest,
            src_creds=creds,
            all_platforms=all_platforms,
            registries_conf=registries_conf,
            extra=extra,
        )
        return read_local_image(path, layout, tag=tag)


def read_local_image(
    path: StrPath, layout: Literal["dir", "oci"], *, tag: str = "latest"
) -> LocalImage:
    """Read a skopeo ``dir:`` or ``oci:`` directory and verify every file it references."""
    root = Path(path)
    if layout == "dir":
        top = (root / "manifest.json").read_bytes()

        def manifest_file(digest: str) -> Path:
            return root / f"{digest.removeprefix('sha256:')}.manifest.json"

        def blob_file(digest: str) -> Path:
            return root / digest.removeprefix("sha256:")
    else:
        index = json.loads((root / "index.json").read_text())
        entries = index.get("manifests", [])
        named = [
            m
            for m in entries
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
        ]
        if not (named or len(entries) == 1):
            raise ValueError(f"{root}/index.json has no single entry for tag {tag!r}")
        chosen = (named or entries)[0]

        def blob_file(digest: str) -> Path:
            algorithm, _, hexpart = digest.partition(":")
            return root / "blobs" / algorithm / hexpart

        manifest_file = blob_file
        top = blob_file(chosen["digest"]).read_bytes()
        if sha256_digest(top) != chosen["digest"]:
            raise ValueError(f"{root}: top manifest does not match {chosen['digest']}")

    top_digest = sha256_digest(top)
    manifests = {top_digest}
    blobs: set[str] = set()
    pending = [top]
    while pending:
        document = json.loads(pending.pop())
        if any(key in document for key in _INDEX_KEYS):
            for child in document["manifests"]:
                file = manifest_file(child["digest"])
                if not file.exists():
                    continue  # a platform that was not copied
                data = file.read_bytes()
                _verify(file, data, child["digest"])
                manifests.add(child["digest"])
                pending.append(data)
            continue
        referenced = [layer["digest"] for layer in document.get("layers", [])]
        referenced += [layer["blobSum"] for layer in document.get("fsLayers", [])]
        if "config" in document:
            referenced.append(document["config"]["digest"])
        for digest in referenced:
            file = blob_file(digest)
            _verify(file, file.read_bytes(), digest)
            blobs.add(digest)
    return LocalImage(root, layout, top_digest, frozenset(manifests), frozenset(blobs))


def _verify(file: Path, data: bytes, digest: str) -> None:
    if sha256_digest(data) != digest:
        raise ValueError(f"{file} does not match {digest}")


# --------------------------------------------------------------------------------------------
# podman


def registry_block(
    prefix: str,
    mirror_locations: str | Sequence[str],
    *,
    insecure: bool = True,
    location: str | None = None,
    mirror_by_digest_only: bool = False,
    blocked: bool = False,
) -> str:
    """Return one ``[[registry]]`` table with its ``[[registry.mirror]]`` entries, in order.

    Mirrors are tried in the order given, then ``location`` (default: ``prefix``).
    """
    mirrors = [mirror_locations] if isinstance(mirror_locations, str) else list(mirror_locations)
    lines = [
        "[[registry]]",
        f"prefix = {_toml_str(prefix)}",
        f"location = {_toml_str(location or prefix)}",
    ]
    if blocked:
        lines.append("blocked = true")
    if mirror_by_digest_only:
        lines.append("mirror-by-digest-only = true")
    for mirror in mirrors:
        lines += [
            "",
            "[[registry.mirror]]",
            f"location = {_toml_str(mirror)}",
            f"insecure = {'true' if insecure else 'false'}",
        ]
    return "\n".join(lines) + "\n"


def registries_conf_with_mirror(
    prefix: str,
    mirror_location: str | Sequence[str],
    insecure: bool = True,
    *,
    location: str | None = None,
    mirror_by_digest_only: bool = False,
) -> str:
    """Return a whole registries.conf sending pulls under ``prefix`` to ``mirror_location``.

    ``mirror_location`` is ``host:port[/path]``, no scheme (``insecure`` means plain HTTP is
    allowed). Short names resolve nowhere: ``unqualified-search-registries`` is empty.
    """
    return registries_conf_text(
        registry_block(
            prefix,
            mirror_location,
            insecure=insecure,
            location=location,
            mirror_by_digest_only=mirror_by_digest_only,
        )
    )


def registries_conf_text(*blocks: str) -> str:
    """Return a registries.conf (v2) made of ``blocks`` and no short-name search."""
    header = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
    return "\n".join([header, *blocks])


class Podman(Service):
    """``podman`` confined to a temporary directory, storage driver ``vfs`` by default.

    ``registries_conf`` is a file (a :class:`~os.PathLike`) or the TOML text itself (a
    :class:`str`); by default a registries.conf with no registries at all is used, never
    ``/etc/containers/registries.conf``. Credentials go to a private auth file.
    Call :meth:`close` (or use ``with``) to remove every trace.
    """

    def __init__(
        self,
        *,
        registries_conf: str | os.PathLike[str] | None = None,
        storage_driver: str = "vfs",
        base_dir: StrPath | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        binary: str = PODMAN,
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mr-podman-", dir=base_dir))
        self.root = self.base / "root"
        self.runroot = self.base / "runroot"
        self.tmpdir = self.base / "libpod-tmp"
        self.image_tmpdir = self.base / "image-tmp"
        self.network_dir = self.base / "networks"
        self.volume_dir = self.base / "volumes"
        self.authfile = self.base / "auth.json"
        self.storage_conf = self.base / "storage.conf"
        self.containers_conf = self.base / "containers.conf"
        self.storage_driver = storage_driver
        self.timeout = timeout
        self.binary = binary
        for directory in (self.root, self.runroot, self.tmpdir, self.image_tmpdir):
            directory.mkdir(parents=True)
        self.network_dir.mkdir()
        self.volume_dir.mkdir()
        # podman refuses an --authfile that does not exist.
        self.authfile.write_text('{"auths": {}}\n')
        self.storage_conf.write_text(
            "[storage]\n"
            f"driver = {_toml_str(storage_driver)}\n"
            f"graphroot = {_toml_str(str(self.root))}\n"
            f"runroot = {_toml_str(str(self.runroot))}\n"
        )
        self.containers_conf.write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        )
        self.registries_conf = self.base / "registries.conf"
        self.set_registries_conf(registries_conf)
        self._closed = False

    def set_registries_conf(self, conf: str | os.PathLike[str] | None) -> None:
        """Use ``conf`` (a file, or TOML text) as registries.conf from now on."""
        if conf is None:
            text = registries_conf_text()
        elif isinstance(conf, str):
            text = conf
        else:
            text = Path(conf).read_text()
        self.registries_conf.write_text(text)

    def env(self) -> dict[str, str]:
        """The environment podman runs with (see :func:`client_env`)."""
        return client_env(
            {
                "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
                "CONTAINERS_CONF": str(self.containers_conf),
                "REGISTRY_AUTH_FILE": str(self.authfile),
                "TMPDIR": str(self.image_tmpdir),
            }
        )

    def argv(self, *args: str) -> list[str]:
        """Return the full podman command line for ``args``."""
        return [
            self.binary,
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--tmpdir", str(self.tmpdir),
            "--network-config-dir", str(self.network_dir),
            "--volumepath", str(self.volume_dir),
            "--storage-driver", self.storage_driver,
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--registries-conf", str(self.registries_conf),
            *args,
        ]  # fmt: skip

    def run(
        self, *args: str, input: bytes | None = None, timeout: float | None = None
    ) -> Completed:
        """Run ``podman <private state flags> ARGS``."""
        if self._closed:
            raise RuntimeError("podman runner is closed")
        return run_client(
            self.argv(*args), timeout=timeout or self.timeout, env=self.env(), input=input
        )

    def _auth_args(self, tls_verify: bool, creds: Creds | None) -> list[str]:
        args = ["--authfile", str(self.authfile), f"--tls-verify={str(tls_verify).lower()}"]
        if creds is not None:
            args += ["--creds", _creds(creds)]
        return args

    def pull(
        self,
        ref: str,
        tls_verify: bool = False,
        creds: Creds | None = None,
        *,
        platform: str | None = None,
    ) -> str:
        """``podman pull ref``; return the image ID (hex of the config digest)."""
        args = ["pull", "--quiet", *self._auth_args(tls_verify, creds)]
        if platform is not None:
            args += ["--platform", platform]
        lines = self.run(*args, ref).text.split()
        if not lines:
            raise ClientError(self.argv(*args, ref), 0, "", "", note="no image ID printed")
        return lines[-1]

    def inspect(self, ref: str) -> dict[str, object]:
        """Return ``podman image inspect ref`` as a dict."""
        data = json.loads(self.run("image", "inspect", ref).text)
        if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
            raise ClientError(self.argv("image", "inspect", ref), 0, str(data), "")
        return data[0]

    def image_digest(self, ref: str) -> str:
        """Return the digest of the manifest ``ref`` was pulled as (the list, for a list)."""
        digest = self.inspect(ref).get("Digest")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise ClientError(self.argv("image", "inspect", ref), 0, str(digest), "")
        return digest

    def repo_digests(self, ref: str) -> list[str]:
        """Return ``RepoDigests`` (``name@sha256:…``: the list's and the instance's)."""
        value = self.inspect(ref).get("RepoDigests") or []
        return [str(v) for v in value] if isinstance(value, list) else []

    def login(self, registry: str, user: str, password: str, *, tls_verify: bool = False) -> None:
        """``podman login`` into the private auth file (password on stdin)."""
        args = [
            "login",
            *self._auth_args(tls_verify, None),
            "--username", user,
            "--password-stdin",
            registry,
        ]  # fmt: skip
        self.run(*args, input=password.encode())

    def logout(self, registry: str) -> None:
        """``podman logout`` from the private auth file."""
        self.run("logout", "--authfile", str(self.authfile), registry)

    def push_manifest_list(
        self, layout_ref: str, dest: str, *, tls_verify: bool = False, creds: Creds | None = None
    ) -> str:
        """Every platform of a multi-arch image (``oci:DIR:REF``) as a manifest list, then
        ``podman manifest push --all``; return the digest of the list pushed."""
        name = f"list-{time.monotonic_ns()}"
        self.run("manifest", "create", name)
        self.run("manifest", "add", "--all", name, layout_ref)
        digestfile = self.base / f"push-digest-{time.monotonic_ns()}"
        self.run(
            "manifest",
            "push",
            "--all",
            "--quiet",
            *self._auth_args(tls_verify, creds),
            "--digestfile",
            str(digestfile),
            name,
            dest,
        )
        return digestfile.read_text().strip()

    def push(
        self, src: str, dest: str, *, tls_verify: bool = False, creds: Creds | None = None
    ) -> str:
        """``podman push src dest``; return the digest of the manifest pushed."""
        digestfile = self.base / f"push-digest-{time.monotonic_ns()}"
        self.run(
            "push",
            "--quiet",
            *self._auth_args(tls_verify, creds),
            "--digestfile", str(digestfile),
            src,
            dest,
        )  # fmt: skip
        try:
            return digestfile.read_text().strip()
        finally:
            digestfile.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove containers (if any), unmount leftovers and delete the temporary state."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ClientError):
            ids = run_client(self.argv("ps", "--all", "--quiet"), timeout=60, env=self.env())
            if ids.text.split():
                run_client(
                    self.argv("rm", "--all", "--force", "--time", "0"), timeout=60, env=self.env()
                )
        remove_tree(self.base)

    def start(self) -> Self:
        """Podman needs no daemon: its state directory is ready from the constructor on."""
        return self

    def stop(self) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# containerd


def default_server(registry: str) -> str | None:
    """Return the upstream containerd falls back to for ``registry`` (None for ``_default``)."""
    if registry == "_default":
        return None
    if registry == "docker.io":
        return "https://registry-1.docker.io"
    return f"https://{registry}"


def write_hosts_toml(
    hosts_dir: StrPath,
    registry: str,
    mirror_url: str | Sequence[str],
    capabilities: Sequence[str] = ("pull", "resolve"),
    override_path: bool = False,
    skip_verify: bool = True,
    *,
    server: str | None = "auto",
    headers: Mapping[str, str | Sequence[str]] | None = None,
) -> Path:
    """Write ``hosts_dir/<registry>/hosts.toml`` (containerd docs/hosts.md) and return it.

    ``registry`` is the name in image references (``docker.io``, ``127.0.0.1:5000``) or
    ``_default``. Each ``mirror_url`` (``http://127.0.0.1:PORT`` for plain HTTP; with
    ``override_path`` the URL path is the API root, e.g. ``http://h:p/v2``) becomes a
    ``[host."URL"]`` table, tried in order. ``server="auto"`` writes the registry's own upstream
    (:func:`default_server`); ``None`` omits it (containerd then still falls back to that
    default); any other string is written as given. Every request to a mirror carries
    ``?ns=<registry>``.
    """
    mirrors = [mirror_url] if isinstance(mirror_url, str) else list(mirror_url)
    if not mirrors:
        raise ValueError("containerd 1.6 ignores a hosts.toml without any [host] table")
    resolved_server = default_server(registry) if server == "auto" else server
    lines: list[str] = []
    if resolved_server is not None:
        lines += [f"server = {_toml_str(resolved_server)}", ""]
    for url in mirrors:
        table = f"host.{_toml_str(url)}"
        lines += [
            f"[{table}]",
            f"  capabilities = [{', '.join(_toml_str(c) for c in capabilities)}]",
            f"  skip_verify = {'true' if skip_verify else 'false'}",
        ]
        if override_path:
            lines.append("  override_path = true")
        if headers:
            lines.append(f"  [{table}.header]")
            for name, value in headers.items():
                values = [value] if isinstance(value, str) else list(value)
                lines.append(f"    {_toml_str(name)} = [{', '.join(map(_toml_str, values))}]")
        lines.append("")
    path = Path(hosts_dir) / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class Containerd(Service):
    """A real ``containerd`` daemon with private root, state and socket, driven with ``ctr``.

    CRI and the snapshotters that cannot work here are disabled, unpacking uses ``native``
    (no mounts), and nothing listens on TCP. Start with :meth:`start` or ``with``.
    """

    def __init__(
        self,
        *,
        namespace: str = "default",
        snapshotter: str = "native",
        start_timeout: float = 20.0,
        timeout: float = DEFAULT_TIMEOUT,
        base_dir: StrPath | None = None,
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mr-ctrd-", dir=base_dir))
        self.address = str(self.base / "containerd.sock")
        if len(self.address) > 100:  # unix socket paths are limited to 108 bytes
            shutil.rmtree(self.base)
            self.base = Path(tempfile.mkdtemp(prefix="mr-ctrd-", dir="/tmp"))
            self.address = str(self.base / "containerd.sock")
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.config_path = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.start_timeout = start_timeout
        self.timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def config_text(self) -> str:
        """The daemon's config.toml."""
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ]
        return "\n".join(
            [
                "version = 2",
                f"root = {_toml_str(str(self.root))}",
                f"state = {_toml_str(str(self.state))}",
                f"disabled_plugins = [{', '.join(map(_toml_str, disabled))}]",
                "",
                "[grpc]",
                f"  address = {_toml_str(self.address)}",
                '  tcp_address = ""',
                "",
                "[ttrpc]",
                f"  address = {_toml_str(self.address + '.ttrpc')}",
                "",
                "[debug]",
                '  address = ""',
                '  level = "info"',
                "",
                "[metrics]",
                '  address = ""',
                "",
                # Its default path is /opt/containerd.
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {_toml_str(str(self.base / 'opt'))}",
                "",
            ]
        )

    @property
    def running(self) -> bool:
        """Whether the daemon process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the daemon and wait until ``ctr version`` answers."""
        if self.running:
            return self
        if self._stopped:
            raise RuntimeError("containerd runner was stopped")
        self.config_path.write_text(self.config_text())
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=client_env(),
                cwd=self.base,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise ClientError(
                    [CONTAINERD, "--config", str(self.config_path)], code, "", self.log_text()
                )
            if os.path.exists(self.address):
                try:
                    self.ctr("version", timeout=5)
                    return self
                except ClientError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise ClientError(
                    [CONTAINERD, "--config", str(self.config_path)],
                    None,
                    "",
                    self.log_text(),
                    note=f"not ready after {self.start_timeout}s",
                )
            time.sleep(0.05)

    def log_text(self) -> str:
        """The daemon's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ctr(self, *args: str, timeout: float | None = None) -> Completed:
        """Run ``ctr --address SOCK --namespace NS ARGS``."""
        argv = [CTR, "--address", self.address, "--namespace", self.namespace, *args]
        env = client_env({"CONTAINERD_SNAPSHOTTER": self.snapshotter})
        return run_client(argv, timeout=timeout or self.timeout, env=env)

    def ctr_pull(
        self,
        ref: str,
        hosts_dir: StrPath | None,
        *,
        all_platforms: bool = False,
        platform: str | None = None,
        user: Creds | None = None,
        plain_http: bool = False,
        unpack: bool = True,
        extra: Iterable[str] = (),
    ) -> str:
        """``ctr images pull --hosts-dir DIR ref``; return the image's target digest.

        ``ref`` must be fully qualified (``docker.io/library/x:tag``). ``unpack=False`` uses
        ``ctr content fetch`` instead, which records the image without unpacking its layers
        (for test layers that are not tar files).
        """
        if unpack:
            args = ["images", "pull", "--snapshotter", self.snapshotter]
        else:
            args = ["content", "fetch"]
        if hosts_dir is not None:
            args += ["--hosts-dir", os.fspath(hosts_dir)]
        if all_platforms:
            args.append("--all-platforms")
        if platform is not None:
            args += ["--platform", platform]
        if user is not None:
            args += ["--user", _creds(user)]
        if plain_http:
            args.append("--plain-http")
        self.ctr(*args, *extra, ref)
        return self.image_digest(ref)

    def images(self) -> dict[str, str]:
        """Return ``{name: target digest}`` for every image in the namespace."""
        lines = self.ctr("images", "ls").text.splitlines()
        result: dict[str, str] = {}
        for line in lines[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[2].startswith("sha256:"):
                result[fields[0]] = fields[2]
        return result

    def image_digest(self, ref: str) -> str:
        """Return the target digest (index or manifest) of image ``ref``."""
        images = self.images()
        if ref not in images:
            raise ClientError(
                [CTR, "images", "ls"], 0, json.dumps(images), "", note=f"no image {ref}"
            )
        return images[ref]

    def remove_image(self, ref: str) -> None:
        """``ctr images rm --sync ref`` (content is garbage-collected)."""
        self.ctr("images", "rm", "--sync", ref)

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL), unmount leftovers, delete its state."""
        self._stopped = True
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        remove_tree(self.base)


# --------------------------------------------------------------------------------------------
# shared helpers


def _toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string for everything these files hold.
    return json.dumps(value)


def mounts_under(path: StrPath) -> list[str]:
    """Return mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    base = os.path.realpath(path)
    found: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape_mount(fields[4])
        if point == base or point.startswith(base + os.sep):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def remove_tree(path: StrPath) -> None:
    """Lazily unmount everything below ``path``, then delete it (best effort, retried once)."""
    for attempt in range(2):
        for point in mounts_under(path):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ["umount", "--lazy", point], capture_output=True, timeout=30, check=False
                )
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt:
                shutil.rmtree(path, ignore_errors=True)


def ctr_content_digests(containerd: Containerd) -> set[str]:
    """Return the digest of every blob in ``containerd``'s content store (``ctr content ls``)."""
    lines = containerd.ctr("content", "ls", "--quiet").text.split()
    return {line for line in lines if line.startswith("sha256:")}
