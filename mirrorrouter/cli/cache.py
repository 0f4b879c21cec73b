"""``mirrorrouter cache ls | du | prune | pin | unpin``: look into the caches and bound them
(the rules are in cache/eviction.py). Registered by main.py through ``register``.

Exit codes: 0 done; 1 a limit could not be met, another process was evicting, or a pin to
remove is not a runtime pin; 2 a usage error (an unknown upstream, a bad size or pattern).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from mirrorrouter.cache.eviction import EvictionReport, Evictor
from mirrorrouter.cache.images import Image, Survey
from mirrorrouter.cache.pins import (
    Pins,
    PinsError,
    change_runtime_pins,
    check_pin,
    load_pins,
    pins_path,
)
from mirrorrouter.cli.formatting import format_time, print_table, short_digest
from mirrorrouter.cli.options import Subcommands, config_option
from mirrorrouter.config import Settings, load_settings
from mirrorrouter.config.discovery import find_config
from mirrorrouter.reference import Digest, ImageReference, InvalidReference, canonical_registry
from mirrorrouter.sizes import format_size, parse_size

LOCK_WAIT_SECONDS = 30.0  # how long prune waits for another process's eviction round


def register(sub: Subcommands) -> None:
    """Add this module's subcommands to the `mirrorrouter` parser."""
    cache = sub.add_parser(
        "cache",
        help="look into the caches and bound them: ls, du, prune, pin, unpin",
        description="Look into the per-upstream caches and keep them within their limits "
        '([cache] max_size, [upstreams."X".cache] max_size); pinned images are never '
        "evicted.",
    )
    commands = cache.add_subparsers(dest="cache_command", required=True)

    ls = commands.add_parser(
        "ls", help="cached repositories and tags: digest, size, last access, pinned"
    )
    config_option(ls)
    ls.add_argument("--upstream", metavar="X", help="only this upstream's cache")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_ls)

    du = commands.add_parser("du", help="bytes and entries per upstream and in total, vs limits")
    config_option(du)
    du.add_argument("--json", action="store_true", help="print JSON")
    du.set_defaults(func=_du)

    prune = commands.add_parser(
        "prune",
        help="evict now, least recently used first, until the caches are within their limits",
    )
    config_option(prune)
    prune.add_argument("--dry-run", action="store_true", help="show what would go; remove nothing")
    prune.add_argument("--upstream", metavar="X", help="evict from this upstream's cache only")
    prune.add_argument(
        "--to",
        metavar="SIZE",
        type=_size,
        help="bring the caches (with --upstream: that cache) down to SIZE, such as 10GiB, "
        "instead of the configured limits",
    )
    prune.set_defaults(func=_prune)

    pin = commands.add_parser(
        "pin", help="never evict images matching PATTERN (kept in <cache>/pins.json)"
    )
    config_option(pin)
    pin.add_argument(
        "pattern",
        metavar="PATTERN",
        help="a glob over canonical name:tag (docker.io/library/alpine:*, gcr.io/distroless/*) "
        "or an image name (alpine:3.19)",
    )
    pin.set_defaults(func=_pin)

    unpin = commands.add_parser("unpin", help="remove a pin added with `cache pin`")
    config_option(unpin)
    unpin.add_argument("pattern", metavar="PATTERN")
    unpin.set_defaults(func=_unpin)


# --------------------------------------------------------------------------- commands


def _ls(args: argparse.Namespace) -> int:
    settings = _settings(args)
    upstream = _upstream(settings, args.upstream)
    if args.upstream is not None and upstream is None:
        return 2
    try:
        surveys = asyncio.run(Evictor(settings).survey(upstream))
        pins = load_pins(settings)
    except PinsError as exc:
        return _fail(str(exc), 1)
    rows = [row for survey in surveys for row in _image_rows(survey)]
    loose = [(s, [i for i in s.images if not i.is_manifest]) for s in surveys]
    pin_rows = [(p, "config") for p in pins.config] + [
        (p, "runtime") for p in pins.runtime if p not in pins.config
    ]
    if args.json:
        document = {
            "images": rows,
            "loose_blobs": {
                s.area.name: {"count": len(b), "bytes": sum(i.size for i in b)} for s, b in loose
            },
            "pins": [{"pattern": p, "source": source} for p, source in pin_rows],
        }
        print(json.dumps(document, indent=2))
        return 0
    if rows:
        header = ("UPSTREAM", "REPOSITORY", "TAG", "DIGEST", "SIZE", "LAST ACCESS", "CONTENT")
        print_table(
            (*header, "PINNED"),
            [
                (
                    r["upstream"],
                    r["repository"],
                    r["tag"] or "-",
                    short_digest(r["digest"]),
                    format_size(r["size"]) if r["content"] != "missing" else "-",
                    format_time(r["accessed"]),
                    r["content"],
                    r["pinned"] or "-",
                )
                for r in rows
            ],
        )
    else:
        print("no cached images")
    for survey, blobs in loose:
        if blobs:
            print(
                f"{survey.area.name}: {len(blobs)} blobs "
                f"({format_size(sum(i.size for i in blobs))}) referenced by no cached manifest"
            )
    if pin_rows:
        print("pins:")
        for pattern, source in pin_rows:
            where = "mirrors.toml [cache] pins" if source == "config" else str(pins_path(settings))
            print(f"  {pattern}  ({where})")
    return 0


def _image_rows(survey: Survey) -> list[dict[str, Any]]:
    """One row per tag, and one per untagged top-level manifest and repository."""
    inventory = survey.inventory
    rows = []
    for (repository, tag), record in sorted(inventory.tags.items()):
        if record.digest in inventory.manifests:
            size, accessed, complete = survey.describe(record.digest)
            content = "complete" if complete else "partial"
        else:
            size, accessed, content = 0, 0.0, "missing"
        rows.append(_row(survey, repository, tag, record.digest, size, accessed, content))
    tagged = {r.digest for r in inventory.tags.values()}
    for image in survey.images:
        if not image.is_manifest or image.root in tagged:
            continue
        repositories = sorted(r for r, linked in inventory.links.items() if image.root in linked)
        content = "complete" if image.complete else "partial"
        for repository in repositories or ["-"]:
            rows.append(
                _row(survey, repository, None, image.root, image.size, image.accessed, content)
            )
    return rows


def _row(
    survey: Survey,
    repository: str,
    tag: str | None,
    digest: Digest,
    size: int,
    accessed: float,
    content: str,
) -> dict[str, Any]:
    return {
        "upstream": survey.area.name,
        "repository": repository,
        "tag": tag,
        "digest": str(digest),
        "size": size,
        "accessed": accessed,
        "content": content,
        "pinned": survey.pinned.get(digest),
    }


def _du(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        surveys = asyncio.run(Evictor(settings).survey())
    except PinsError as exc:
        return _fail(str(exc), 1)
    entries: list[dict[str, Any]] = []
    for survey in surveys:
        inventory = survey.inventory
        entries.append(
            {
                "upstream": survey.area.name,
                "directory": str(survey.area.directory),
                "images": sum(1 for i in survey.images if i.is_manifest),
                "manifests": len(inventory.manifests),
                "blobs": len(inventory.blobs),
                "tags": len(inventory.tags),
                "in_flight": inventory.in_flight,
                "bytes": survey.usage,
                "limit": survey.area.max_size,
            }
        )
    total: dict[str, Any] = {
        "bytes": sum(e["bytes"] for e in entries),
        "limit": settings.cache.max_size,
        "manifests": sum(e["manifests"] for e in entries),
        "blobs": sum(e["blobs"] for e in entries),
        "tags": sum(e["tags"] for e in entries),
        "in_flight": sum(e["in_flight"] for e in entries),
    }
    if args.json:
        print(json.dumps({"upstreams": entries, "total": total}, indent=2))
        return 0
    header = ("UPSTREAM", "IMAGES", "MANIFESTS", "BLOBS", "TAGS", "IN FLIGHT", "SIZE", "BYTES")
    rows = [
        (
            e["upstream"],
            str(e["images"]),
            str(e["manifests"]),
            str(e["blobs"]),
            str(e["tags"]),
            format_size(e["in_flight"]),
            format_size(e["bytes"]),
            str(e["bytes"]),
            *_against(e["bytes"], e["limit"]),
        )
        for e in entries
    ]
    rows.append(
        (
            "total",
            str(sum(e["images"] for e in entries)),
            str(total["manifests"]),
            str(total["blobs"]),
            str(total["tags"]),
            format_size(total["in_flight"]),
            format_size(total["bytes"]),
            str(total["bytes"]),
            *_against(total["bytes"], total["limit"]),
        )
    )
    print_table((*header, "LIMIT", "USE"), rows)
    return 0


def _against(size: int, limit: int | None) -> tuple[str, str]:
    if limit is None:
        return "-", "-"
    use = f"{100 * size / limit:.0f}%"
    return format_size(limit), use + (" OVER" if size > limit else "")


def _prune(args: argparse.Namespace) -> int:
    settings = _settings(args)
    upstream = _upstream(settings, args.upstream)
    if args.upstream is not None and upstream is None:
        return 2
    evictor = Evictor(settings)
    if not evictor.bounded and args.to is None:
        print(
            'no limits are configured ([cache] max_size, [upstreams."X".cache] max_size) and '
            "no --to SIZE was given: nothing to do"
        )
        return 0
    logger = logging.getLogger("mirrorrouter.eviction")
    level = logger.level
    logger.setLevel(logging.ERROR)  # shortfalls are reported below, once
    try:
        report = asyncio.run(
            evictor.enforce(
                upstream=upstream, to=args.to, dry_run=args.dry_run, wait=LOCK_WAIT_SECONDS
            )
        )
    except PinsError as exc:
        return _fail(f"{exc}; nothing was evicted", 1)
    finally:
        logger.setLevel(level)
    if report.busy:
        return _fail("another process is evicting from these caches; try again", 1)
    _print_report(report, upstream)
    for shortfall in report.shortfalls:
        print(
            f"mirrorrouter: cache prune: {shortfall.scope} "
            f"{'would still hold' if report.dry_run else 'still holds'} "
            f"{format_size(shortfall.usage)}, over {format_size(shortfall.limit)}: "
            "the rest is pinned or in use",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def _print_report(report: EvictionReport, upstream: str | None) -> None:
    verb = "would evict" if report.dry_run else "evicted"
    for evicted in report.evicted:
        print(
            f"{verb} {evicted.upstream} {_what(evicted.image)} "
            f"{format_size(evicted.freed)} (last access {format_time(evicted.image.accessed)})"
        )
    for name, image in report.in_use:
        print(f"skipped {name} {_what(image)}: in use")
    if not report.evicted:
        print("nothing to evict" if report.ok else "nothing could be evicted")
    for name, usage in report.usage.items():
        if upstream is None or name == upstream:
            limit = report.limits.get(name)
            print(f"{name}: {format_size(usage)}" + (f" of {format_size(limit)}" if limit else ""))
    if upstream is None:
        limit = report.total_limit
        line = f"total: {format_size(report.total)}"
        print(line + (f" of {format_size(limit)}" if limit else ""))
    print(f"{'would free' if report.dry_run else 'freed'} {format_size(report.freed)}")


def _what(image: Image) -> str:
    if not image.is_manifest:
        return f"blob {short_digest(str(image.root))}"
    tags = ", ".join(f"{r}:{t}" for r, t in image.tags) or "untagged"
    return f"{tags} {short_digest(str(image.root))}"


def _pin(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pattern = _pattern(args.pattern)
    if pattern is None:
        return 2
    try:
        if pattern in settings.cache.pins:
            print(f"{pattern} is already pinned in the config ([cache] pins)")
            return 0
        if not change_runtime_pins(settings, add=pattern):
            print(f"{pattern} is already pinned")
            return 0
        surveys = asyncio.run(Evictor(settings).survey())
    except (PinsError, OSError) as exc:
        return _fail(str(exc), 1)
    print(f"pinned {pattern}")
    new = Pins(runtime=(pattern,))
    matching = [
        f"{s.area.name}/{r}:{t}"
        for s in surveys
        for r, t in sorted(s.inventory.tags)
        if new.match_tag(f"{s.area.name}/{r}", t)
    ]
    if matching:
        tags = "tag" if len(matching) == 1 else "tags"
        print(f"it pins {len(matching)} cached {tags}: {', '.join(matching)}")
    else:
        print("it matches no cached tag yet; images are kept once pulled")
    return 0


def _unpin(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pattern = _pattern(args.pattern)
    if pattern is None:
        return 2
    try:
        if change_runtime_pins(settings, remove=pattern):
            print(f"unpinned {pattern}")
            return 0
        runtime = load_pins(settings).runtime
    except (PinsError, OSError) as exc:
        return _fail(str(exc), 1)
    if pattern in settings.cache.pins:
        source = settings.source or "the config"
        return _fail(f"{pattern} is pinned in {source} ([cache] pins): remove it there", 1)
    known = ", ".join(runtime) or "none"
    return _fail(f"{pattern} is not pinned; runtime pins: {known}", 1)


# --------------------------------------------------------------------------- helpers


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(find_config(args.config))


def _upstream(settings: Settings, name: str | None) -> str | None:
    """The cache an ``--upstream`` names (an alias works too); None and a message if none."""
    if name is None:
        return None
    names = [a.name for a in Evictor(settings).areas()]
    upstream = settings.upstream_for(canonical_registry(name))
    found = upstream.name if upstream is not None else canonical_registry(name)
    if found in names:
        return found
    _fail(f"no cache for upstream {name!r}; caches: {', '.join(names) or 'none'}", 2)
    return None


def _pattern(text: str) -> str | None:
    """A pin pattern in canonical form: an image name without glob characters is
    normalized (``alpine`` -> ``docker.io/library/alpine:latest``)."""
    if not any(c in text for c in "*?["):
        try:
            return str(ImageReference.parse(text))
        except InvalidReference as exc:
            _fail(f"not an image name or pattern: {exc}", 2)
            return None
    problem = check_pin(text)
    if problem is not None:
        _fail(f"pattern {text!r}: {problem}", 2)
        return None
    return text


def _size(text: str) -> int:
    size = parse_size(text)
    if not size:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 500MiB, 20GiB or 1TB, not {text!r}"
        )
    return size


def _fail(message: str, code: int) -> int:
    print(f"mirrorrouter: cache: {message}", file=sys.stderr)
    return code
