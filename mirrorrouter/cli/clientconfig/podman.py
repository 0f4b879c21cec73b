"""podman and skopeo: a ``registries.conf.d`` drop-in with a mirror per registry.

podman/skopeo rewrite the image name with the mirror ``location`` and send no ``ns``: every
upstream is mirrored at ``/<prefix>`` (its first named prefix route) or ``/<registry host>``.
With a private CA, ``/etc/containers/certs.d/<host:port>/ca.crt`` (``*.crt`` there are CAs).
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

CONTAINERS_CERTS_DIR = "/etc/containers/certs.d"


def configure(target: Target) -> Output:
    table, mirror, ca = target.table, target.mirror, target.ca
    intro = (
        f"Every registry mirrorrouter serves, pulled through it at {mirror.url}. Mirrors are "
        f"tried first, then the registry's location (the registry itself). "
        f"{generated_by('podman')}"
    )
    blocks = [comment(intro)]
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
            f"prefix = {quoted(registry.name)}",
            f"location = {quoted(registry.name)}",
            "",
            "[[registry.mirror]]",
            f"location = {quoted(location)}",
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
        blocks.append(comment(text))
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
        files.append(host_file(CONTAINERS_CERTS_DIR, "certs.d", mirror.authority, ca, CA_FILE))
        notes.append(
            f"The mirror's CA goes to {CONTAINERS_CERTS_DIR}/{mirror.authority}/{CA_FILE} "
            f"(rootless: ~/.config/containers/certs.d/); --output-dir DIR writes "
            f"DIR/certs.d/{mirror.authority}/{CA_FILE}. skopeo and podman take a directory "
            f"with --cert-dir too."
        )
    return Output(files, notes)
