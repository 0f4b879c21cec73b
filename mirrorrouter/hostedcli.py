"""``mirrorrouter gc``: garbage-collect hosted repository sets (the rules are in hosted.py).
Registered by cli.py through ``register``.

Run it from cron or a Kubernetes CronJob while the gateway serves: blobs and manifests
younger than ``gc_grace`` are spared, and upload sessions that received bytes within
``upload_ttl`` or that a request holds, so a push in progress is never cut short. (The
server sweeps abandoned upload sessions on its own too.)

Exit codes: 0 done; 2 a usage error (no such hosted set, none configured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import asdict

from mirrorrouter.config import load_settings
from mirrorrouter.eviction import format_size
from mirrorrouter.hosted import GcReport, HostedStore

ConfigOption = Callable[[argparse.ArgumentParser], None]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], config_option: ConfigOption
) -> None:
    """Add this module's subcommands to the `mirrorrouter` parser."""
    gc = sub.add_parser(
        "gc",
        help="garbage-collect hosted repositories: remove what no manifest references",
        description="Remove blobs and manifests of hosted repository sets that no manifest "
        "linked into a repository references any more (after DELETEs and re-pushed tags), "
        "older than the set's gc_grace, and upload sessions idle longer than its upload_ttl.",
    )
    config_option(gc)
    gc.add_argument("--hosted", metavar="NAME", help="only this hosted set (default: all)")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    gc.add_argument("--json", action="store_true", help="print JSON")
    gc.set_defaults(func=_gc)


def _gc(args: argparse.Namespace) -> int:
    from mirrorrouter.cli import default_config_path  # cli.py imports this module

    settings = load_settings(args.config or default_config_path())
    names = [args.hosted] if args.hosted else list(settings.hosted)
    unknown = [n for n in names if n not in settings.hosted]
    if not names or unknown:
        configured = ", ".join(settings.hosted) or "none"
        what = f"no hosted set named {unknown[0]!r}" if unknown else "no hosted sets"
        print(f"mirrorrouter: gc: {what}; configured: {configured}", file=sys.stderr)
        return 2
    reports = {
        name: asyncio.run(_collect(HostedStore(settings.hosted[name]), args.dry_run))
        for name in names
    }
    if args.json:
        print(json.dumps({name: asdict(report) for name, report in reports.items()}, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for name, report in reports.items():
        print(
            f"hosted {name}: {verb} {report.blobs} blobs and {report.manifests} manifests "
            f"({format_size(report.freed)}), {report.uploads} abandoned uploads; "
            f"kept {report.kept}"
        )
    return 0


async def _collect(store: HostedStore, dry_run: bool) -> GcReport:
    await store.open()
    try:
        return await store.collect_garbage(dry_run=dry_run)
    finally:
        await store.close()
