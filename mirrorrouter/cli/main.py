"""The ``mirrorrouter`` command: serve, resolve, check-config, client-config."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirrorrouter.access.policy import nobody_may_push
from mirrorrouter.cli import cache as cachecli
from mirrorrouter.cli import gc as hostedcli
from mirrorrouter.cli import warm as warmcli
from mirrorrouter.cli.clientconfig import CLIENTS, KIND_HOSTS_DIR, ClientConfigError, generate
from mirrorrouter.cli.connectivity import probe_all
from mirrorrouter.cli.formatting import print_table
from mirrorrouter.cli.shadows import explain_group, shadow_warnings
from mirrorrouter.config import (
    ConfigError,
    Settings,
    UpstreamSettings,
    load_settings,
    redact_url,
)
from mirrorrouter.config.discovery import CONFIG_ENV, find_config
from mirrorrouter.config.model import GroupSettings, Target
from mirrorrouter.errors import RegistryError
from mirrorrouter.logs import log_config
from mirrorrouter.mapping import Mapper, kind_of
from mirrorrouter.reference import ImageReference, InvalidReference
from mirrorrouter.server import tls


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"mirrorrouter: invalid configuration:\n{_indent(exc.problems)}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrorrouter", description="One container-registry mirror for every registry."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the mirror")
    _config_option(serve)
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="plain-HTTP port (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.set_defaults(func=_serve)

    resolve = sub.add_parser("resolve", help="show how image names are canonicalized and routed")
    _config_option(resolve)
    resolve.add_argument("images", nargs="+", metavar="IMAGE")
    resolve.add_argument("--json", action="store_true", help="print JSON")
    resolve.set_defaults(func=_resolve)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", nargs="?", type=Path, help="the file (default: as for serve)")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach the object stores and Redis it names (exit 1 when one fails)",
    )
    check.set_defaults(func=_check_config)

    client = sub.add_parser(
        "client-config",
        help="print the configuration that makes a client pull through the mirror",
        description="Print (or write) client configuration generated from the routing table: "
        "every upstream with its aliases, the named prefix routes, the default registry.",
    )
    _config_option(client)
    client.add_argument("--for", dest="client", required=True, choices=CLIENTS)
    client.add_argument(
        "--mirror-url",
        help="where clients reach the mirror, scheme://host[:port] without a path "
        "(default: http://<server.host, localhost for 0.0.0.0>:<server.port>, or "
        "https://...:<server.tls.port> when [server.tls] is set)",
    )
    client.add_argument(
        "--ca",
        type=Path,
        help="the CA certificate (PEM) that signed the mirror's certificate, written where "
        "each client looks for it (default with [server.tls]: the self-signed certificate "
        "that ends server.tls.certificate's chain, if it has one)",
    )
    client.add_argument(
        "--output-dir",
        type=Path,
        help="write the files under this directory instead of printing them",
    )
    client.set_defaults(func=_client_config)

    health = sub.add_parser(
        "healthcheck",
        help="exit 0 when the mirror configured in the config file answers /healthz",
        description="The container image's HEALTHCHECK: GET /healthz on the port the config "
        "names (server.port; with server.port = 0, https on server.tls.port, verifying no "
        "certificate), on loopback; exit 0 when it answers 200, 1 otherwise.",
    )
    _config_option(health)
    health.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    health.set_defaults(func=_healthcheck)

    # Operator commands live in modules of their own.
    for register in (cachecli.register, hostedcli.register, warmcli.register):
        register(sub, _config_option)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $MIRRORROUTER_CONFIG, ./mirrors.toml, "
        "/etc/mirrorrouter/mirrors.toml)",
    )


def _serve(args: argparse.Namespace) -> int:
    path = find_config(args.config).resolve()
    settings = load_settings(path)  # fail here, with the clear message, not in a worker
    if settings.server.tls is not None:
        try:  # what the workers will load: refused here, naming the file
            tls.server_context(settings.server.tls, tls.read_pair(settings.server.tls))
        except tls.CertificateError as exc:
            raise ConfigError([str(exc)]) from exc
    _warn(settings)
    os.environ[CONFIG_ENV] = str(path)
    workers = args.workers or settings.server.workers
    metrics_dir = None
    if workers > 1:
        # prometheus_client sums the workers' metrics from files here; it must be set (and
        # empty) before any worker imports it.
        metrics_dir = tempfile.mkdtemp(prefix="mirrorrouter-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run_uvicorn(settings, args, workers)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _run_uvicorn(settings: Settings, args: argparse.Namespace, workers: int) -> None:
    from mirrorrouter.server import httpserver

    config = httpserver.ServerConfig(
        "mirrorrouter.app:app_from_environment",
        settings.server,
        factory=True,
        host=args.host or settings.server.host,
        port=args.port or settings.server.port,
        workers=workers,
        timeout_graceful_shutdown=30,  # in-flight responses finish on SIGTERM
        log_level=settings.server.log_level,
        log_config=log_config(settings.server.log_level),
        access_log=False,  # the gateway writes its own access lines (server.access_log)
        loop="uvloop",
        proxy_headers=False,
        server_header=False,
    )
    httpserver.run(config)


@dataclass(frozen=True)
class _Verdict:
    image: str
    canonical: str | None
    address: str | None
    upstream: str | None  # the target's name (an upstream, hosted set or group)
    mirrors: list[dict[str, Any]]
    routes: list[str]
    error: str | None
    kind: str = "upstream"
    members: list[dict[str, Any]] = field(default_factory=list)  # a group's, in order
    proxy: str | None = None  # the upstream's outbound proxy, redacted

    @property
    def route_text(self) -> str:
        if self.canonical is None:
            return f"invalid name: {self.error}"
        if self.error:
            return f"not routed: {self.error}"
        if self.kind == "group":
            text = f"group {self.upstream}: " + " > ".join(
                f"{m['kind']} {m['name']} ({m['canonical_name']})"
                + (" [push]" if m["writable"] else "")
                for m in self.members
            )
        elif self.kind == "hosted":
            text = f"hosted {self.upstream}"
        else:
            text = f"upstream {self.upstream}: " + " > ".join(m["url"] for m in self.mirrors)
            if self.proxy:
                text += f" via proxy {self.proxy}"
        if self.routes:
            text += f" (also via {', '.join(self.routes)})"
        return text


def resolve_images(settings: Settings, images: Sequence[str]) -> list[_Verdict]:
    """Canonicalize and route each image name."""
    mapper = Mapper(settings)
    verdicts = []
    for image in images:
        try:
            ref = ImageReference.parse(image)
        except InvalidReference as exc:
            verdicts.append(_Verdict(image, None, None, None, [], [], str(exc)))
            continue
        try:
            resolution = mapper.resolve_image(ref)
        except RegistryError as exc:
            verdicts.append(
                _Verdict(image, ref.name, ref.manifest_url(), None, [], [], exc.message)
            )
            continue
        target = resolution.target
        members = []
        if isinstance(target, GroupSettings):
            for name in target.members:
                member = mapper.member(resolution, name)
                members.append(
                    {
                        "name": name,
                        "kind": kind_of(member.target),
                        "canonical_name": member.reference.name,
                        "writable": name == target.writable,
                        "mirrors": _mirrors(member.target),
                    }
                )
        routes = [r.label for r in mapper.routes_to(target)]
        verdicts.append(
            _Verdict(
                image,
                resolution.reference.name,
                ref.manifest_url(),
                target.name,
                _mirrors(target),
                routes,
                None,
                kind_of(target),
                members,
                _proxy(target),
            )
        )
    return verdicts


def _proxy(target: Target) -> str | None:
    """The configured outbound proxy, fit to show: it may carry user:password@."""
    if not isinstance(target, UpstreamSettings) or target.policy.proxy is None:
        return None
    return redact_url(target.policy.proxy)


def _mirrors(target: Target) -> list[dict[str, Any]]:
    if not isinstance(target, UpstreamSettings):
        return []
    return [
        {"url": m.url, "capabilities": sorted(c.value for c in m.capabilities)}
        for m in target.mirrors
    ]


def _resolve(args: argparse.Namespace) -> int:
    settings = load_settings(find_config(args.config))
    verdicts = resolve_images(settings, args.images)
    if args.json:
        print(json.dumps([_verdict_json(v) for v in verdicts], indent=2))
    else:
        header = ("IMAGE NAME", "CANONICAL NAME", "REGISTRY ADDRESS", "ROUTE")
        rows = [(v.image, v.canonical or "-", v.address or "-", v.route_text) for v in verdicts]
        print_table(header, rows)
    # "Not routed" is an answer; only a name that does not parse is a usage error.
    return 1 if any(v.canonical is None for v in verdicts) else 0


def _verdict_json(verdict: _Verdict) -> dict[str, Any]:
    return {
        "image": verdict.image,
        "canonical_name": verdict.canonical,
        "registry_address": verdict.address,
        "routed": verdict.error is None,
        "upstream": verdict.upstream,
        "kind": verdict.kind,
        "members": verdict.members,
        "mirrors": verdict.mirrors,
        "routes": verdict.routes,
        "proxy": verdict.proxy,
        "error": verdict.error,
    }


def _check_config(args: argparse.Namespace) -> int:
    path = find_config(args.file)
    settings = load_settings(path)
    print(f"{path}: OK")
    for upstream in settings.upstreams.values():
        mirrors = ", ".join(
            f"{m.url} [{'+'.join(sorted(c.value for c in m.capabilities))}]"
            for m in upstream.mirrors
        )
        proxy = _proxy(upstream)
        print(f"  upstream {upstream.name}: {mirrors}" + (f" via proxy {proxy}" if proxy else ""))
    for hosted in settings.hosted.values():
        print(f"  hosted {hosted.name}: {hosted.storage.directory}")
    for group in settings.groups.values():
        for line in explain_group(settings, group):
            print(f"  {line}")
    for route in settings.routes:
        print(f"  route {route.label} -> {route.target}")
    print(f"  default registry: {settings.default_registry}")
    if settings.server.tls is not None:
        findings = tls.check_files(settings.server.tls)
        problems = [str(f) for f in findings if not f.warning]
        if problems:
            raise ConfigError(problems)
        for finding in findings:
            print(f"warning: {finding}", file=sys.stderr)
        pair = tls.read_pair(settings.server.tls)
        print(f"  https on port {settings.server.tls.port}: {pair.describe()}")
    _warn(settings)
    if not args.connect:
        return 0
    probes = asyncio.run(probe_all(settings))
    for probe in probes:
        print(f"  {probe.service}: {'OK' if probe.ok else 'FAILED'}: {probe.detail}")
    if not probes:
        print("  nothing to connect to: no s3 cache and no redis coordination")
    return 0 if all(p.ok for p in probes) else 1


def _warn(settings: Settings) -> None:
    """What is valid but probably not meant (on stderr)."""
    for hosted in nobody_may_push(settings):
        print(
            f"warning: nobody may push to hosted {hosted.name}: no "
            f'[[hosted."{hosted.name}".access]] rule grants push (with [auth] on, a push '
            f"needs one; see docs/security.md)",
            file=sys.stderr,
        )
    for warning in shadow_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    server = settings.server
    if server.port == 0 and server.tls is not None and server.tls.client_ca is not None:
        print(
            "warning: server.port = 0 with server.tls.client_ca: health checks (the image's "
            "HEALTHCHECK, an https probe) cannot pass the handshake without a client "
            "certificate; keep a plain port for them",
            file=sys.stderr,
        )


def _client_config(args: argparse.Namespace) -> int:
    settings = load_settings(find_config(args.config))
    output_dir: Path | None = args.output_dir
    # Kind mounts the nodes' hosts.toml files from the host: from where --output-dir puts them.
    kind_hosts_dir = KIND_HOSTS_DIR if output_dir is None else str(output_dir.resolve() / "certs.d")
    try:
        ca = client_ca(settings, args.ca)
        config = generate(
            settings, args.client, args.mirror_url, kind_hosts_dir=kind_hosts_dir, ca=ca
        )
    except ClientConfigError as exc:
        print(f"mirrorrouter: client-config: {exc}", file=sys.stderr)
        return 2
    if output_dir is None:
        print(config.render(), end="")
    else:
        for path in config.write(output_dir):
            print(f"wrote {path}")
    for note in config.notes:
        print(f"# {note}", file=sys.stderr)
    return 0


def client_ca(settings: Settings, given: Path | None) -> str | None:
    """The PEM text of the CA clients must trust: ``--ca``, else with ``[server.tls]`` the
    self-signed certificate ending its chain; None when clients need none (plain HTTP, or a
    certificate from a CA they already trust)."""
    if given is not None:
        try:
            return "".join(tls.pem(cert) for cert in tls.read_certificates(given, "ca"))
        except tls.CertificateError as exc:
            raise ClientConfigError(f"--ca {exc.path}: {exc.message}") from exc
    if settings.server.tls is None:
        return None
    try:
        root = tls.chain_root(settings.server.tls.certificate)
    except tls.CertificateError as exc:
        raise ClientConfigError(f"{exc}; give the CA with --ca") from exc
    return tls.pem(root) if root is not None else None


def _healthcheck(args: argparse.Namespace) -> int:
    settings = load_settings(find_config(args.config))
    url = health_url(settings)
    # Straight to loopback: a proxy from the environment (HTTP_PROXY) must not carry it.
    # Over https nothing is verified: the question is whether this server answers.
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=unverified)
    )
    try:
        with opener.open(url, timeout=args.timeout) as response:
            healthy = response.status == 200
    except OSError as exc:  # URLError, refused, timed out
        print(f"mirrorrouter: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


def health_url(settings: Settings) -> str:
    """Where the health check finds this configuration's server: its own host, or loopback
    when it listens on every address; the plain port, else (``port = 0``) the HTTPS one."""
    host = settings.server.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    server = settings.server
    if server.port == 0 and server.tls is not None:
        return f"https://{host}:{server.tls.port}/healthz"
    return f"http://{host}:{server.port}/healthz"


def _indent(lines: list[str]) -> str:
    return "\n".join(f"  {line}" for line in lines)
