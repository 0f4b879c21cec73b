"""containerd: a ``hosts.toml`` per registry (Kind's nodes use the same files).

containerd (and Kind, k3s, which run containerd) sends ``?ns=<registry>`` to a mirror, so one
mirror URL without a path serves every registry. Each ``hosts.toml`` names the mirror as
``server`` and as a ``[host]`` table: containerd 1.6 ignores a file without a ``[host]``
table, and falls back to ``server`` (by default the registry itself) when every host fails.
With a private CA, a ``ca.crt`` beside each ``hosts.toml``, named by ``ca = "ca.crt"`` (a
relative path is relative to the file's directory).
"""

from __future__ import annotations

from mirrorrouter.cli.clientconfig.files import (
    CA_FILE,
    GeneratedFile,
    Output,
    Target,
    comment,
    generated_by,
    host_file,
    quoted,
)
from mirrorrouter.cli.clientconfig.mirror import MirrorURL
from mirrorrouter.cli.clientconfig.routing import RoutingTable

CONTAINERD_CERTS_DIR = "/etc/containerd/certs.d"


def configure(target: Target) -> Output:
    files = hosts_files(
        target.table, target.mirror, CONTAINERD_CERTS_DIR, "", "containerd", target.ca
    )
    return Output(files, _notes())


def hosts_toml(mirror: MirrorURL, about: str, ca: bool = False) -> str:
    """A containerd ``hosts.toml``: the mirror as the only host, and as ``server`` too; with
    ``ca``, both trust the ``ca.crt`` beside the file (the top-level ``ca`` is the server's)."""
    trust = f"ca = {quoted(CA_FILE)}\n" if ca else ""
    return (
        comment(about)
        + f"server = {quoted(mirror.url)}\n"
        + trust
        + "\n"
        + f"[host.{quoted(mirror.url)}]\n"
        + '  capabilities = ["pull", "resolve"]\n'
        + ("  " + trust if trust else "")
    )


def hosts_files(
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
            f"never falls back to the registry itself. {generated_by(client)}"
        )
        files.append(host_file(root, relroot, registry.name, hosts_toml(mirror, about, bool(ca))))
    if table.allow_unconfigured:
        about = (
            f"Every other registry through mirrorrouter only. The mirror serves those matching "
            f"routing.allow_unconfigured ({', '.join(table.allow_unconfigured)}) and refuses "
            f"the rest, which then cannot be pulled at all. {generated_by(client)}"
        )
        files.append(host_file(root, relroot, "_default", hosts_toml(mirror, about, bool(ca))))
    if ca is not None:
        files += [host_file(root, relroot, name, ca, CA_FILE) for name in names]
    return files


def _notes() -> list[str]:
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
