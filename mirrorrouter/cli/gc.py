"""``mirrorrouter gc``: garbage-collect hosted repository sets (the rules are in hosted/gc.py).
Registered by main.py through ``register``.

Run it from cron or a Kubernetes CronJob while the gateway serves: blobs and manifests
younger than ``gc_grace`` are spared, and upload sessions that received bytes within
``upload_ttl`` or that a request holds, so a push in progress is never cut short. (The
server sweeps abandoned upload sessions on its own too.)

``--dry-run`` also lists the set's repositories that shadow an upstream: those a later
upstream member of one of the set's groups has too, so that the group's clients get the
hosted one (pushed before the shadowing guard, or where ``allow_shadow`` permits it; see
shadowing.py). By what this mirror's caches know, without network; ``--ask-upstreams``
asks the upstreams' tag lists as well.

Exit codes: 0 done; 2 a usage error (no such hosted set, none configured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict

from mirrorrouter.cli.options import Subcommands, config_option
from mirrorrouter.cli.shadows import Shadowed, shadowing_report
from mirrorrouter.config import Settings, load_settings
from mirrorrouter.config.discovery import find_config
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.hosted.gc import GcReport
from mirrorrouter.hosted.store import HostedStore
from mirrorrouter.sizes import format_size


def register(sub: Subcommands) -> None:
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
    gc.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would go, and which repositories shadow an upstream; remove nothing",
    )
    gc.add_argument(
        "--ask-upstreams",
        action="store_true",
        help="with --dry-run: ask the upstreams' tag lists whether they have a repository, "
        "not only this mirror's caches",
    )
    gc.add_argument("--json", action="store_true", help="print JSON")
    gc.set_defaults(func=_gc)


def _gc(args: argparse.Namespace) -> int:
    settings = load_settings(find_config(args.config))
    names = [args.hosted] if args.hosted else list(settings.hosted)
    unknown = [n for n in names if n not in settings.hosted]
    if not names or unknown:
        configured = ", ".join(settings.hosted) or "none"
        what = f"no hosted set named {unknown[0]!r}" if unknown else "no hosted sets"
        print(f"mirrorrouter: gc: {what}; configured: {configured}", file=sys.stderr)
        return 2
    if args.ask_upstreams and not args.dry_run:
        print("mirrorrouter: gc: --ask-upstreams goes with --dry-run", file=sys.stderr)
        return 2
    results = {name: asyncio.run(_collect(settings, settings.hosted[name], args)) for name in names}
    if args.json:
        document = {
            name: {
                **asdict(report),
                **({"shadowing": [asdict(s) for s in shadowing]} if args.dry_run else {}),
            }
            for name, (report, shadowing) in results.items()
        }
        print(json.dumps(document, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for name, (report, shadowing) in results.items():
        print(
            f"hosted {name}: {verb} {report.blobs} blobs and {report.manifests} manifests "
            f"({format_size(report.freed)}), {report.uploads} abandoned uploads; "
            f"kept {report.kept}"
        )
        if args.dry_run:
            for line in _shadowing_lines(name, shadowing, args.ask_upstreams):
                print(line)
    return 0


def _shadowing_lines(name: str, shadowing: list[Shadowed], asked: bool) -> list[str]:
    if not shadowing:
        where = "the upstreams" if asked else "this mirror's caches (--ask-upstreams asks them)"
        return [f"hosted {name}: shadows no upstream repository that {where} know of"]
    lines = []
    for s in shadowing:
        if not s.certain:
            lines.append(
                f"hosted {name}: {s.repository} may shadow {s.upstream} "
                f"{s.upstream_repository} for group {s.group}: {s.upstream} {s.known_by}"
            )
            continue
        why = f"allowed by allow_shadow {s.allowed_by!r}" if s.allowed_by else "not allowed"
        lines.append(
            f"hosted {name}: {s.repository} shadows {s.upstream} {s.upstream_repository} for "
            f"group {s.group} (known from {s.known_by}; {why})"
        )
    return lines


async def _collect(
    settings: Settings, hosted: HostedSettings, args: argparse.Namespace
) -> tuple[GcReport, list[Shadowed]]:
    store = HostedStore(hosted)
    await store.open()
    try:
        report = await store.collect_garbage(dry_run=args.dry_run)
        if not args.dry_run:
            return report, []
        repositories = await store.repositories()
        shadowing = await shadowing_report(
            settings, hosted, repositories, ask_upstreams=args.ask_upstreams
        )
        return report, shadowing
    finally:
        await store.close()
