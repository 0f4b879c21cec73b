"""Kind: a cluster config whose nodes mount containerd ``hosts.toml`` files, and the
KEP-1755 ConfigMap that tells tools in the cluster where the registry is."""

from __future__ import annotations

from mirrorrouter.cli.clientconfig.containerd import CONTAINERD_CERTS_DIR, hosts_files
from mirrorrouter.cli.clientconfig.files import (
    GeneratedFile,
    Output,
    Target,
    comment,
    generated_by,
    quoted,
)
from mirrorrouter.cli.clientconfig.mirror import ClientConfigError, MirrorURL

KIND_HOSTS_DIR = "/srv/kind/certs.d"  # where Kind's hosts.toml files live on the host
KIND_HELP_URL = "https://kind.sigs.k8s.io/docs/user/local-registry/"

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
        f"each node you add. {generated_by('kind')}"
    )
    patch = "\n".join(f"    {line}" for line in CRI_REGISTRY_PATCH.split("\n"))
    return (
        comment(about)
        + "kind: Cluster\n"
        + "apiVersion: kind.x-k8s.io/v1alpha4\n"
        + "containerdConfigPatches:\n"
        + "  - |-\n"
        + patch
        + "\n"
        + "nodes:\n"
        + "  - role: control-plane\n"
        + "    extraMounts:\n"
        + f"      - hostPath: {quoted(hosts_dir)}\n"
        + f"        containerPath: {quoted(CONTAINERD_CERTS_DIR)}\n"
        + "        readOnly: true\n"
    )


def local_registry_hosting_yaml(mirror: MirrorURL) -> str:
    """The KEP-1755 ConfigMap that tells tools in the cluster where the registry is."""
    about = (
        "KEP-1755: tells tools in the cluster where the registry is. The mirror is read-only: "
        f"pushes are refused. Apply with kubectl apply -f. {generated_by('kind')}"
    )
    return (
        comment(about)
        + "apiVersion: v1\n"
        + "kind: ConfigMap\n"
        + "metadata:\n"
        + '  name: "local-registry-hosting"\n'
        + '  namespace: "kube-public"\n'
        + "data:\n"
        + '  "localRegistryHosting.v1": |\n'
        + f"    host: {quoted(mirror.authority)}\n"
        + f"    help: {quoted(KIND_HELP_URL)}\n"
    )


def configure(target: Target) -> Output:
    table, mirror, hosts_dir, ca = target.table, target.mirror, target.kind_hosts_dir, target.ca
    if not hosts_dir.startswith("/"):
        raise ClientConfigError(f"the Kind hosts directory {hosts_dir!r} must be absolute")
    hosts_dir = hosts_dir.rstrip("/") or "/"
    files = [
        GeneratedFile(
            "kind-cluster.yaml", "kind-cluster.yaml", kind_cluster_yaml(mirror, hosts_dir)
        ),
        *hosts_files(table, mirror, hosts_dir, "certs.d", "kind", ca),
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
    return Output(files, notes)
