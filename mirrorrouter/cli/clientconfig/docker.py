"""The Docker daemon: ``daemon.json`` keys, and how to name every other registry.

The daemon's ``registry-mirrors`` covers docker.io only, takes no path and sends bare names,
which the mirror serves from the default registry. With a private CA,
``/etc/docker/certs.d/<host:port>/ca.crt`` for every name the mirror is reached by.
"""

from __future__ import annotations

import json
from dataclasses import replace

from mirrorrouter.cli.clientconfig.files import CA_FILE, GeneratedFile, Output, Target, host_file
from mirrorrouter.cli.clientconfig.routing import host_is_path_component
from mirrorrouter.reference import DOCKER_HUB

DOCKER_CERTS_DIR = "/etc/docker/certs.d"


def configure(target: Target) -> Output:
    table, mirror, ca = target.table, target.mirror, target.ca
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
            replace(host_file(DOCKER_CERTS_DIR, "certs.d", host, ca, CA_FILE), printed=False)
            for host in insecure
        ]
        notes.append(
            f"The mirror's CA goes to {DOCKER_CERTS_DIR}/<host:port>/{CA_FILE} for "
            f"{', '.join(insecure)} (--output-dir DIR writes DIR/certs.d/...); the daemon "
            f"reads it at the next pull, no restart needed."
        )
    return Output(files, notes)
