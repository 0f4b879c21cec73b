"""The ``mirrorrouter`` command: the parser, and serve, check-config, client-config and
healthcheck; the other subcommands are modules of their own (resolve, cache, gc, warm with
export and import), each adding itself with ``register``."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import ssl
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mirrorrouter.access.policy import nobody_may_push
from mirrorrouter.cli import cache, gc, resolve, warm
from mirrorrouter.cli.clientconfig import CLIENTS, KIND_HOSTS_DIR, ClientConfigError, generate
from mirrorrouter.cli.connectivity import probe_all
from mirrorrouter.cli.options import config_option
from mirrorrouter.cli.resolve import shown_proxy
from mirrorrouter.cli.shadows import explain_group, shadow_warnings
from mirrorrouter.config import (
    ConfigError,
    Settings,
    load_settings,
)
from mirrorrouter.config.discovery import CONFIG_ENV, find_config
from mirrorrouter.logs import log_config
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
    config_option(serve)
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="plain-HTTP port (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.set_defaults(func=_serve)

    resolve.register(sub)

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
    config_option(client)
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
    config_option(health)
    health.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    health.set_defaults(func=_healthcheck)

    # Operator commands live in modules of their own.
    for command in (cache, gc, warm):
        command.register(sub)
    return parser


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
    from mirrorrouter.server import running

    config = running.ServerConfig(
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
    running.run(config)


def _check_config(args: argparse.Namespace) -> int:
    path = find_config(args.file)
    settings = load_settings(path)
    print(f"{path}: OK")
    for upstream in settings.upstreams.values():
        mirrors = ", ".join(
            f"{m.url} [{'+'.join(sorted(c.value for c in m.capabilities))}]"
            for m in upstream.mirrors
        )
        proxy = shown_proxy(upstream)
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
