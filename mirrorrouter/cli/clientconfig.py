"""Client configuration generated from the routing table (``mirrorrouter client-config``).

For each kind of client, the files that make it pull through the mirror, derived from the
loaded ``Settings``: every configured upstream with its aliases, the named prefix routes and
the default registry. The rules each generator follows are those of docs/clients/:

- containerd (and Kind, k3s, which run containerd) sends ``?ns=<registry>`` to a mirror, so
  one mirror URL without a path serves every registry. Each ``hosts.toml`` names the mirror
  as ``server`` and as a ``[host]`` table: containerd 1.6 ignores a file without a ``[host]``
  table, and falls back to ``server`` (by default the registry itself) when every host fails.
- The Docker daemon's ``registry-mirrors`` covers docker.io only, takes no path and sends
  bare names, which the mirror serves from the default registry.
- podman/skopeo rewrite the image name with the mirror ``location`` and send no ``ns``: the
  default registry is mirrored at the root, every other upstream at ``/<prefix>`` (its first
  named prefix route) or ``/<registry host>``.
- An ``https://`` mirror with a private CA (``ca``): each client gets the CA where it looks
  for one, so the files alone make it trust the mirror: containerd (and Kind) a ``ca.crt``
  beside each ``hosts.toml``, named by ``ca = "ca.crt"`` (a relative path is relative to the
  file's directory); Docker ``/etc/docker/certs.d/<host:port>/ca.crt`` and podman/skopeo
  ``/etc/containers/certs.d/<host:port>/ca.crt`` (``*.crt`` there are CAs); k3s a file named
  by ``configs."<host:port>".tls.ca_file``.

TOML and JSON are written with the standard library (strings as JSON strings, which are valid
TOML basic strings and YAML double-quoted scalars); YAML is written by hand, every scalar
quoted.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.reference import (
    DOCKER_HUB,
    PATH_COMPONENT_RE,
    REGISTRY_RE,
    looks_like_registry,
)

CLIENTS = ("containerd", "docker", "podman", "k3s", "kind")

CONTAINERD_CERTS_DIR = "/etc/containerd/certs.d"
DOCKER_CERTS_DIR = "/etc/docker/certs.d"
CONTAINERS_CERTS_DIR = "/etc/containers/certs.d"
K3S_CA_FILE = "/etc/rancher/k3s/mirrorrouter-ca.crt"
CA_FILE = "ca.crt"  # the name Docker, podman and containerd give a CA in a host's directory
KIND_HOSTS_DIR = "/srv/kind/certs.d"  # where Kind's hosts.toml files live on the host
KIND_HELP_URL = "https://kind.sigs.k8s.io/docs/user/local-registry/"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_LOOPBACK_NAMES = ("localhost",)


class ClientConfigError(ValueError):
    """A mirror URL or client name that configuration cannot be generated for."""


@dataclass(frozen=True, slots=True)
class MirrorURL:
    """Where clients reach the mirror: ``scheme://host[:port]``, no path."""

    scheme: str  # http or https
    authority: str  # host[:port] as clients write it in image names

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    @property
    def insecure(self) -> bool:
        """Plain HTTP: every client must be told to allow it."""
        return self.scheme == "http"

    @property
    def hostname(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # parse_mirror_url checked it
        return host

    @property
    def port_suffix(self) -> str:
        """``:5000`` when the URL names a port, else empty."""
        port = urlsplit(self.url).port
        return f":{port}" if port is not None else ""

    @property
    def is_loopback(self) -> bool:
        host = self.hostname
        if host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_mirror_url(text: str) -> MirrorURL:
    """Check a mirror URL: ``http://`` or ``https://``, a host, an optional port, no path."""
    example = "such as http://mirror.corp:5000"
    try:
        parts = urlsplit(text.strip())
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ClientConfigError(f"mirror URL {text!r} is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise ClientConfigError(
            f"mirror URL {text!r} must start with http:// or https://, {example}"
        )
    if not parts.hostname:
        raise ClientConfigError(f"mirror URL {text!r} names no host; give one, {example}")
    if parts.username is not None or parts.password is not None:
        raise ClientConfigError(f"mirror URL {text!r} must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ClientConfigError(
            f"mirror URL {text!r} must be scheme://host[:port] with no path, query or "
            f"fragment: the mirror serves /v2/ at its root, and containerd (which sends "
            f"?ns=) and the Docker daemon (which rejects a mirror with a path) need none"
        )
    authority = parts.netloc
    if not REGISTRY_RE.fullmatch(authority) or (port is not None and port == 0):
        raise ClientConfigError(
            f"mirror URL {text!r}: {authority!r} is not a host[:port] that can stand in an "
            f"image name, {example}"
        )
    return MirrorURL(parts.scheme, authority)


def default_mirror_url(settings: Settings) -> str:
    """``http://<server.host>:<server.port>``, with localhost for a wildcard address; with
    ``[server.tls]``, ``https://`` and its port."""
    host = settings.server.host
    if host in _WILDCARD_HOSTS:
        host = "localhost"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    if settings.server.tls is not None:
        return f"https://{host}:{settings.server.tls.port}"
    return f"http://{host}:{settings.server.port}"


@dataclass(frozen=True, slots=True)
class GeneratedFile:
    """One configuration file: where the client reads it, and its text."""

    path: str  # where the client reads it (/etc/docker/daemon.json)
    relpath: str  # where --output-dir writes it, relative to that directory
    content: str
    comments: bool = True  # whether the format has '#' comments (JSON has none)
    printed: bool = True  # False: written by --output-dir only (stdout stays one JSON file)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What ``client-config --for CLIENT`` produces: files, and what to do with them."""

    client: str
    mirror: MirrorURL
    files: tuple[GeneratedFile, ...]
    notes: tuple[str, ...]

    def render(self) -> str:
        """Every file for stdout; each with a ``# <path>`` header where the format allows."""
        parts = []
        for file in self.files:
            if not file.printed:
                continue
            header = f"# {file.path}\n" if file.comments else ""
            parts.append(header + file.content)
        return "\n".join(parts)

    def write(self, directory: Path) -> list[Path]:
        """Write every file under ``directory`` (created as needed); return their paths."""
        written = []
        for file in self.files:
            target = directory / file.relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file.content, encoding="utf-8")
            written.append(target)
        return written


def generate(
    settings: Settings,
    client: str,
    mirror_url: str | None = None,
    *,
    kind_hosts_dir: str = KIND_HOSTS_DIR,
    ca: str | None = None,
) -> ClientConfig:
    """The configuration for ``client`` (one of ``CLIENTS``) to pull through the mirror.

    ``mirror_url`` defaults to :func:`default_mirror_url`. ``kind_hosts_dir`` is the absolute
    directory on the machine running Kind that holds the nodes' ``hosts.toml`` files. ``ca``
    is the PEM text of the CA an ``https://`` mirror's certificate is signed by, for clients
    that do not already trust it.
    """
    url_text = mirror_url if mirror_url is not None else default_mirror_url(settings)
    mirror = parse_mirror_url(url_text)
    table = RoutingTable(settings)
    notes: list[str] = []
    if mirror_url is None and mirror.is_loopback:
        notes.append(
            f"The mirror URL {mirror.url} was made from [server] in the config; pass "
            f"--mirror-url with a name the clients can reach."
        )
    if ca is not None and mirror.insecure:
        notes.append(f"No CA written: {mirror.url} is plain HTTP.")
        ca = None
    elif ca is None and not mirror.insecure:
        notes.append(
            "No CA written: the clients must already trust the CA of the mirror's certificate; "
            "for a private CA, pass --ca FILE."
        )
    if client == "containerd":
        files = _containerd(table, mirror, CONTAINERD_CERTS_DIR, "", "containerd", ca)
        notes += _containerd_notes()
    elif client == "docker":
        files, more = _docker(table, mirror, ca)
        notes += more
    elif client == "podman":
        files, more = _podman(table, mirror, ca)
        notes += more
    elif client == "k3s":
        files = _k3s(table, mirror, ca)
        notes += [
            "Copy registries.yaml"
            + (f" and {K3S_CA_FILE.rsplit('/', 1)[1]}" if ca else "")
            + " to /etc/rancher/k3s/ on every node that runs pods, then restart k3s "
            "(systemctl restart k3s, or k3s-agent on agents).",
            "k3s falls back to each registry's own endpoint after the mirror unless the node "
            "runs with --disable-default-registry-endpoint (v1.26.13+k3s1, v1.27.10+k3s1, "
            "v1.28.6+k3s1, v1.29.1+k3s1 and later).",
        ]
    elif client == "kind":
        files, more = _kind(table, mirror, kind_hosts_dir, ca)
        notes += more
    else:
        raise ClientConfigError(f"unknown client {client!r}; expected one of {', '.join(CLIENTS)}")
    return ClientConfig(client, mirror, tuple(files), tuple(notes))


# --------------------------------------------------------------------------- the routing table


@dataclass(frozen=True, slots=True)
class Registry:
    """A registry name clients use, and the upstream that serves it."""

    name: str  # as it stands in image names: the upstream's name, or one of its aliases
    upstream: UpstreamSettings

    @property
    def is_alias(self) -> bool:
        return self.name != self.upstream.name


class RoutingTable:
    """The facts of ``Settings`` that client configuration depends on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def default_registry(self) -> str:
        return self.settings.default_registry

    @property
    def allow_unconfigured(self) -> tuple[str, ...]:
        return self.settings.allow_unconfigured

    def upstreams(self) -> list[UpstreamSettings]:
        """The configured upstreams, in the order of the config file."""
        return list(self.settings.upstreams.values())

    def registries(self) -> list[Registry]:
        """Every upstream, each followed by its aliases (sorted)."""
        found = []
        for upstream in self.upstreams():
            found.append(Registry(upstream.name, upstream))
            found += [Registry(alias, upstream) for alias in sorted(upstream.aliases)]
        return found

    def prefixes(self, upstream: UpstreamSettings) -> list[str]:
        """The named prefix routes of ``upstream``, in config order."""
        return [
            r.prefix
            for r in self.settings.routes
            if r.target == upstream.name and r.prefix is not None
        ]

    def hosts(self, upstream: UpstreamSettings) -> list[str]:
        """The Host-name routes of ``upstream``, in config order."""
        return [
            r.host for r in self.settings.routes if r.target == upstream.name and r.host is not None
        ]

    def path_prefix(self, upstream: UpstreamSettings) -> str | None:
        """The path under which a client that sends no ``ns`` reaches ``upstream``.

        ``""`` for the default registry (the root), else its first named prefix, else its
        registry host when that can be a path component of an image name (no port, and
        recognizably a host: a dot, or localhost). None when there is no such path.
        """
        if upstream.name == self.default_registry:
            return ""
        return self.named_path(upstream)

    def named_path(self, upstream: UpstreamSettings) -> str | None:
        """Like :meth:`path_prefix`, but never the root: a prefix, else the registry host."""
        prefixes = self.prefixes(upstream)
        if prefixes:
            return prefixes[0]
        if host_is_path_component(upstream.name):
            return upstream.name
        return None


def host_is_path_component(registry: str) -> bool:
    """Whether ``/v2/<registry>/...`` is routed to that registry (gcr.io yes, h:5000 no)."""
    return bool(PATH_COMPONENT_RE.fullmatch(registry)) and looks_like_registry(registry)


# --------------------------------------------------------------------------- formats


def _s(value: str) -> str:
    """A string as a TOML basic string, a JSON string and a YAML double-quoted scalar."""
    return json.dumps(value)


def _comment(text: str, width: int = 92) -> str:
    """``text`` as ``#`` comment lines, wrapped at ``width``."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = "#"
        for word in paragraph.split(" "):
            if len(line) + 1 + len(word) > width and line != "#":
                lines.append(line)
                line = "#"
            line += " " + word
        lines.append(line)
    return "\n".join(lines) + "\n"


def _generated(client: str) -> str:
    return f"Generated by `mirrorrouter client-config --for {client}`."


# --------------------------------------------------------------------------- containerd


def hosts_toml(mirror: MirrorURL, about: str, ca: bool = False) -> str:
    """A containerd ``hosts.toml``: the mirror as the only host, and as ``server`` too; with
    ``ca``, both trust the ``ca.crt`` beside the file (the top-level ``ca`` is the server's)."""
    trust = f"ca = {_s(CA_FILE)}\n" if ca else ""
    return (
        _comment(about)
        + f"server = {_s(mirror.url)}\n"
        + trust
        + "\n"
        + f"[host.{_s(mirror.url)}]\n"
        + '  capabilities = ["pull", "resolve"]\n'
        + ("  " + trust if trust else "")
    )


def _containerd(
    table: RoutingTable,
    mirror: MirrorURL,
    root: str,
    relroot: str,
    client: str,
    ca: str | None = None,
) -> list[GeneratedFile]:
    files = []
    names = [r.name for r in table.registries()]
    if table.allow_unconfigured:
        names.append("_default")
    for registry in table.registries():
        what = registry.name
        if registry.is_alias:
            what += f" (an alias of {registry.upstream.name})"
        about = (
            f"{what} through mirrorrouter only: the mirror is the server too, so containerd "
            f"never falls back to the registry itself. {_generated(client)}"
        )
        files.append(_host_file(root, relroot, registry.name, hosts_toml(mirror, about, bool(ca))))
    if table.allow_unconfigured:
        about = (
            f"Every other registry through mirrorrouter only. The mirror serves those matching "
            f"routing.allow_unconfigured ({', '.join(table.allow_unconfigured)}) and refuses "
            f"the rest, which then cannot be pulled at all. {_generated(client)}"
        )
        files.append(_host_file(root, relroot, "_default", hosts_toml(mirror, about, bool(ca))))
    if ca is not None:
        files += [_host_file(root, relroot, name, ca, CA_FILE) for name in names]
    return files


def _host_file(
    root: str, relroot: str, host: str, content: str, name: str = "hosts.toml"
) -> GeneratedFile:
    """``<root>/<host>/<name>``: a file in one host's directory of a ``certs.d`` tree."""
    rel = f"{relroot}/{host}/{name}" if relroot else f"{host}/{name}"
    return GeneratedFile(f"{root}/{host}/{name}", rel, content)


def _containerd_notes() -> list[str]:
    return [
        f"Write each file as {CONTAINERD_CERTS_DIR}/<registry>/hosts.toml (--output-dir DIR "
        f"writes DIR/<registry>/hosts.toml). They take effect on the next pull.",
        "The CRI plugin (kubelet, crictl) reads them once /etc/containerd/config.toml has, "
        'for containerd 1.6/1.7: [plugins."io.containerd.grpc.v1.cri".registry] config_path = '
        f'"{CONTAINERD_CERTS_DIR}" (containerd 2.x: '
        '[plugins."io.containerd.cri.v1.images".registry]); restart containerd after that.',
        f"ctr does not read config_path: ctr images pull --hosts-dir {CONTAINERD_CERTS_DIR} "
        f"docker.io/library/alpine:3.19",
    ]


# --------------------------------------------------------------------------- docker


def _docker(
    table: RoutingTable, mirror: MirrorURL, ca: str | None
) -> tuple[list[GeneratedFile], list[str]]:
    config: dict[str, list[str]] = {}
    notes = [
        "Merge these keys into /etc/docker/daemon.json, then restart the daemon "
        "(sudo systemctl restart docker); docker info lists them.",
    ]
    hub = table.settings.upstream_for(DOCKER_HUB)
    if hub is None:
        notes.append(
            "No registry-mirrors: docker.io is not served by this mirror, and the daemon "
            "uses registry-mirrors for docker.io only."
        )
    elif table.default_registry != DOCKER_HUB:
        notes.append(
            f"No registry-mirrors: the daemon sends docker.io names without a prefix, which "
            f"the mirror serves from routing.default_registry ({table.default_registry}), not "
            f"docker.io. Set default_registry to docker.io to use registry-mirrors."
        )
    else:
        config["registry-mirrors"] = [mirror.url]
    insecure = [mirror.authority]
    for upstream in table.upstreams():
        insecure += [f"{host}{mirror.port_suffix}" for host in table.hosts(upstream)]
    if mirror.insecure:
        config["insecure-registries"] = insecure
    notes.append("Other registries: name the mirror in the image, followed by a route:")
    for upstream in table.upstreams():
        ways = list(table.prefixes(upstream))
        if host_is_path_component(upstream.name):
            ways.append(upstream.name)
        names = [f"{mirror.authority}/{way}/<repository>:<tag>" for way in ways]
        names += [
            f"{host}{mirror.port_suffix}/<repository>:<tag>" for host in table.hosts(upstream)
        ]
        if names:
            notes.append(f"  {upstream.name}: docker pull " + "  or  ".join(names))
        else:
            notes.append(
                f"  {upstream.name}: cannot be named in a Docker image name through the mirror "
                f"(a registry with a port is no path component); add a [[routes]] prefix for it"
            )
    if table.allow_unconfigured:
        notes.append(
            f"  registries matching {', '.join(table.allow_unconfigured)}: docker pull "
            f"{mirror.authority}/<registry>/<repository>:<tag>"
        )
    notes.append(
        "Such images are stored under the mirror's name; docker tag gives them their original "
        "name. Nothing falls back there: if the mirror fails, the pull fails."
    )
    content = json.dumps(config, indent=2) + "\n"
    files = [GeneratedFile("/etc/docker/daemon.json", "daemon.json", content, comments=False)]
    if ca is not None:
        # The daemon looks for a registry's CA in certs.d/<host:port>/, for every name the
        # mirror is reached by; stdout stays daemon.json alone, so only --output-dir writes it.
        files += [
            replace(_host_file(DOCKER_CERTS_DIR, "certs.d", host, ca, CA_FILE), printed=False)
            for host in insecure
        ]
        notes.append(
            f"The mirror's CA goes to {DOCKER_CERTS_DIR}/<host:port>/{CA_FILE} for "
            f"{', '.join(insecure)} (--output-dir DIR writes DIR/certs.d/...); the daemon "
            f"reads it at the next pull, no restart needed."
        )
    return files, notes


# --------------------------------------------------------------------------- podman


def _podman(
    table: RoutingTable, mirror: MirrorURL, ca: str | None
) -> tuple[list[GeneratedFile], list[str]]:
    intro = (
        f"Every registry mirrorrouter serves, pulled through it at {mirror.url}. Mirrors are "
        f"tried first, then the registry's location (the registry itself). "
        f"{_generated('podman')}"
    )
    blocks = [_comment(intro)]
    skipped: list[str] = []
    for registry in table.registries():
        # A named path for every registry, the default one too: at the root, a named prefix
        # would take a default-registry namespace of the same name (docker.io/gcr/foo).
        path = table.named_path(registry.upstream)
        if path is None:
            skipped.append(registry.name)
            continue
        location = f"{mirror.authority}/{path}"
        lines = []
        if registry.is_alias:
            lines.append(f"# {registry.name} is an alias of {registry.upstream.name}")
        lines += [
            "[[registry]]",
            f"prefix = {_s(registry.name)}",
            f"location = {_s(registry.name)}",
            "",
            "[[registry.mirror]]",
            f"location = {_s(location)}",
        ]
        if mirror.insecure:
            lines.append("insecure = true")
        blocks.append("\n".join(lines) + "\n")
    notes = [
        "Save as /etc/containers/registries.conf.d/50-mirrorrouter.conf (rootless: "
        "~/.config/containers/registries.conf.d/); podman and skopeo read it on their next run. "
        "skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF: pass --registries-conf FILE instead.",
    ]
    if skipped:
        text = (
            f"Not listed: {', '.join(skipped)}. podman sends no ns, and a registry with a port "
            f"cannot be a path component of the mirror location; add a [[routes]] prefix for it."
        )
        blocks.append(_comment(text))
        notes.append(text)
    if table.allow_unconfigured:
        notes.append(
            f"Registries matching {', '.join(table.allow_unconfigured)} have no entry here: "
            f"name the mirror in the image instead, podman pull "
            f"{mirror.authority}/<registry>/<repository>:<tag>"
        )
    content = "\n".join(blocks)
    path = "/etc/containers/registries.conf.d/50-mirrorrouter.conf"
    files = [GeneratedFile(path, "50-mirrorrouter.conf", content)]
    if ca is not None:
        files.append(_host_file(CONTAINERS_CERTS_DIR, "certs.d", mirror.authority, ca, CA_FILE))
        notes.append(
            f"The mirror's CA goes to {CONTAINERS_CERTS_DIR}/{mirror.authority}/{CA_FILE} "
            f"(rootless: ~/.config/containers/certs.d/); --output-dir DIR writes "
            f"DIR/certs.d/{mirror.authority}/{CA_FILE}. skopeo and podman take a directory "
            f"with --cert-dir too."
        )
    return files, notes


# --------------------------------------------------------------------------- k3s


def _k3s(table: RoutingTable, mirror: MirrorURL, ca: str | None) -> list[GeneratedFile]:
    intro = (
        f"k3s registries.yaml: every registry mirrorrouter serves, through {mirror.url}. "
        f"{_generated('k3s')}"
    )
    lines = [_comment(intro).rstrip("\n"), "mirrors:"]
    names = [r.name for r in table.registries()]
    if table.allow_unconfigured:
        names.append("*")  # every other registry; the mirror serves the allowed ones
    for name in names:
        lines += [f"  {_s(name)}:", "    endpoint:", f"      - {_s(mirror.url)}"]
    if ca is not None:
        # TLS settings are keyed by the endpoint's host:port, not by the mirrored registry.
        lines += [
            "configs:",
            f"  {_s(mirror.authority)}:",
            "    tls:",
            f"      ca_file: {_s(K3S_CA_FILE)}",
        ]
    registries = "\n".join(lines) + "\n"
    files = [GeneratedFile("/etc/rancher/k3s/registries.yaml", "registries.yaml", registries)]
    if ca is not None:
        files.append(GeneratedFile(K3S_CA_FILE, K3S_CA_FILE.rsplit("/", 1)[1], ca))
    return files


# --------------------------------------------------------------------------- kind

CRI_REGISTRY_PATCH = (
    f'[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{CONTAINERD_CERTS_DIR}"'
)


def kind_cluster_yaml(mirror: MirrorURL, hosts_dir: str) -> str:
    """A Kind ``Cluster`` whose nodes read ``hosts.toml`` files mounted from ``hosts_dir``."""
    about = (
        f"A Kind cluster whose nodes pull through mirrorrouter at {mirror.url}. Their "
        f"containerd reads {CONTAINERD_CERTS_DIR}/<registry>/hosts.toml, mounted from "
        f"{hosts_dir} on this machine (`mirrorrouter client-config --for kind --output-dir "
        f"DIR` writes them to DIR/certs.d). Every node needs the mount: copy extraMounts to "
        f"each node you add. {_generated('kind')}"
    )
    patch = "\n".join(f"    {line}" for line in CRI_REGISTRY_PATCH.split("\n"))
    return (
        _comment(about)
        + "kind: Cluster\n"
        + "apiVersion: kind.x-k8s.io/v1alpha4\n"
        + "containerdConfigPatches:\n"
        + "  - |-\n"
        + patch
        + "\n"
        + "nodes:\n"
        + "  - role: control-plane\n"
        + "    extraMounts:\n"
        + f"      - hostPath: {_s(hosts_dir)}\n"
        + f"        containerPath: {_s(CONTAINERD_CERTS_DIR)}\n"
        + "        readOnly: true\n"
    )


def local_registry_hosting_yaml(mirror: MirrorURL) -> str:
    """The KEP-1755 ConfigMap that tells tools in the cluster where the registry is."""
    about = (
        "KEP-1755: tells tools in the cluster where the registry is. The mirror is read-only: "
        f"pushes are refused. Apply with kubectl apply -f. {_generated('kind')}"
    )
    return (
        _comment(about)
        + "apiVersion: v1\n"
        + "kind: ConfigMap\n"
        + "metadata:\n"
        + '  name: "local-registry-hosting"\n'
        + '  namespace: "kube-public"\n'
        + "data:\n"
        + '  "localRegistryHosting.v1": |\n'
        + f"    host: {_s(mirror.authority)}\n"
        + f"    help: {_s(KIND_HELP_URL)}\n"
    )


def _kind(
    table: RoutingTable, mirror: MirrorURL, hosts_dir: str, ca: str | None
) -> tuple[list[GeneratedFile], list[str]]:
    if not hosts_dir.startswith("/"):
        raise ClientConfigError(f"the Kind hosts directory {hosts_dir!r} must be absolute")
    hosts_dir = hosts_dir.rstrip("/") or "/"
    files = [
        GeneratedFile(
            "kind-cluster.yaml", "kind-cluster.yaml", kind_cluster_yaml(mirror, hosts_dir)
        ),
        *_containerd(table, mirror, hosts_dir, "certs.d", "kind", ca),
        GeneratedFile(
            "local-registry-hosting.yaml",
            "local-registry-hosting.yaml",
            local_registry_hosting_yaml(mirror),
        ),
    ]
    notes = [
        f"Put the hosts.toml files under {hosts_dir} (--output-dir DIR writes them to "
        f"DIR/certs.d and points hostPath there), then: kind create cluster --config "
        f"kind-cluster.yaml && kubectl apply -f local-registry-hosting.yaml",
        "Node images from Kind v0.27.0 on already set config_path; the patch is for older ones.",
    ]
    if mirror.is_loopback:
        notes.append(
            f"{mirror.hostname} inside a Kind node is the node itself: use a --mirror-url the "
            f"nodes can reach (for a mirror container on the kind network, its container name)."
        )
    return files, notes
