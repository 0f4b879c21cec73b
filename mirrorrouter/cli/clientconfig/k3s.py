"""k3s: ``registries.yaml`` with the mirror as every registry's endpoint.

With a private CA, a file named by ``configs."<host:port>".tls.ca_file``.
"""

from __future__ import annotations

from mirrorrouter.cli.clientconfig.files import (
    GeneratedFile,
    Output,
    Target,
    comment,
    generated_by,
    quoted,
)

K3S_CA_FILE = "/etc/rancher/k3s/mirrorrouter-ca.crt"


def configure(target: Target) -> Output:
    table, mirror, ca = target.table, target.mirror, target.ca
    intro = (
        f"k3s registries.yaml: every registry mirrorrouter serves, through {mirror.url}. "
        f"{generated_by('k3s')}"
    )
    lines = [comment(intro).rstrip("\n"), "mirrors:"]
    names = [r.name for r in table.registries()]
    if table.allow_unconfigured:
        names.append("*")  # every other registry; the mirror serves the allowed ones
    for name in names:
        lines += [f"  {quoted(name)}:", "    endpoint:", f"      - {quoted(mirror.url)}"]
    if ca is not None:
        # TLS settings are keyed by the endpoint's host:port, not by the mirrored registry.
        lines += [
            "configs:",
            f"  {quoted(mirror.authority)}:",
            "    tls:",
            f"      ca_file: {quoted(K3S_CA_FILE)}",
        ]
    registries = "\n".join(lines) + "\n"
    files = [GeneratedFile("/etc/rancher/k3s/registries.yaml", "registries.yaml", registries)]
    if ca is not None:
        files.append(GeneratedFile(K3S_CA_FILE, K3S_CA_FILE.rsplit("/", 1)[1], ca))
    return Output(files, _notes(ca is not None))


def _notes(with_ca: bool) -> list[str]:
    return [
        "Copy registries.yaml"
        + (f" and {K3S_CA_FILE.rsplit('/', 1)[1]}" if with_ca else "")
        + " to /etc/rancher/k3s/ on every node that runs pods, then restart k3s "
        "(systemctl restart k3s, or k3s-agent on agents).",
        "k3s falls back to each registry's own endpoint after the mirror unless the node "
        "runs with --disable-default-registry-endpoint (v1.26.13+k3s1, v1.27.10+k3s1, "
        "v1.28.6+k3s1, v1.29.1+k3s1 and later).",
    ]
