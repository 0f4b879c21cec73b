"""Client configuration generated from the routing table (``mirrorrouter client-config``).

For each kind of client, the files that make it pull through the mirror, derived from the
loaded ``Settings``: every configured upstream with its aliases, the named prefix routes and
the default registry. One module per client dialect (containerd, docker, podman, k3s, kind),
each a ``configure(Target) -> Output``; the rules each follows are those of docs/clients/ and
its module docstring. An ``https://`` mirror with a private CA (``--ca``): each client gets
the CA where it looks for one, so the files alone make it trust the mirror.
"""

from __future__ import annotations

from collections.abc import Callable

from mirrorrouter.cli.clientconfig import containerd, docker, k3s, kind, podman
from mirrorrouter.cli.clientconfig.files import ClientConfig, GeneratedFile, Output, Target
from mirrorrouter.cli.clientconfig.kind import KIND_HOSTS_DIR
from mirrorrouter.cli.clientconfig.mirror import (
    ClientConfigError,
    MirrorURL,
    default_mirror_url,
    parse_mirror_url,
)
from mirrorrouter.cli.clientconfig.routing import RoutingTable
from mirrorrouter.config import Settings

__all__ = [
    "CLIENTS",
    "KIND_HOSTS_DIR",
    "ClientConfig",
    "ClientConfigError",
    "GeneratedFile",
    "MirrorURL",
    "default_mirror_url",
    "generate",
    "parse_mirror_url",
]

DIALECTS: dict[str, Callable[[Target], Output]] = {
    "containerd": containerd.configure,
    "docker": docker.configure,
    "podman": podman.configure,
    "k3s": k3s.configure,
    "kind": kind.configure,
}
CLIENTS = tuple(DIALECTS)


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
    configure = DIALECTS.get(client)
    if configure is None:
        raise ClientConfigError(f"unknown client {client!r}; expected one of {', '.join(CLIENTS)}")
    url_text = mirror_url if mirror_url is not None else default_mirror_url(settings)
    mirror = parse_mirror_url(url_text)
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
    files, more = configure(Target(RoutingTable(settings), mirror, ca, kind_hosts_dir))
    return ClientConfig(client, mirror, tuple(files), tuple(notes + more))
