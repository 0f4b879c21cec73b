"""Subcommands of `mirrorrouter` registered by this module (see main.py): warm, export, import.

They work on the configured caches directly, whether or not a gateway runs on the same
cache directory: downloads go through the same ``Pullthrough`` (claims shared across
processes, verified, atomic commits). Progress goes to stderr (bars on a terminal, plain
lines otherwise); the summary goes to stdout. Exit status: 0 when every image succeeded,
1 when any failed (or an import was refused), 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.logging import RichHandler

from mirrorrouter.cli.exporter import ExportReport, export_images
from mirrorrouter.cli.importer import ImportReport, import_archive
from mirrorrouter.cli.options import Subcommands, config_option
from mirrorrouter.cli.progress import Progress, RichProgress, make_progress
from mirrorrouter.cli.warmer import DEFAULT_JOBS, read_image_list, warm_images
from mirrorrouter.config import Settings, load_settings
from mirrorrouter.config.discovery import find_config
from mirrorrouter.manifests import PlatformSelector
from mirrorrouter.pull.pullthrough import Pullthrough

PLATFORM_HELP = (
    "which entries of a multi-platform index to take: os/arch[/variant] names, comma-separated"
    " (linux/amd64,linux/arm64), or all (default: linux/amd64)"
)


class UsageError(Exception):
    """A bad argument: said on stderr, exit status 2."""


def register(sub: Subcommands) -> None:
    """Add this module's subcommands to the `mirrorrouter` parser."""
    warm = sub.add_parser(
        "warm",
        help="pre-pull images into the cache",
        description="Pull images into the cache of the upstreams they route to: the manifest "
        "by tag (stored with its tag record), for an index the manifests of the chosen "
        "platforms, and every blob. Prints a summary; exits 1 when any image failed.",
    )
    config_option(warm)
    _image_options(warm)
    warm.set_defaults(func=_warm)

    export = sub.add_parser(
        "export",
        help="write images from the cache as an OCI image layout tarball",
        description="Write an OCI image layout tarball (oci-layout, index.json with the "
        "canonical reference of each image, blobs/) from the cache, warming first what is "
        "missing. Nothing is written unless every image is complete.",
    )
    config_option(export)
    _image_options(export)
    export.add_argument("-o", "--output", type=Path, required=True, help="the tarball to write")
    export.add_argument(
        "--cached-only",
        action="store_true",
        help="never ask an upstream: fail for images not wholly in the cache",
    )
    export.set_defaults(func=_export)

    load = sub.add_parser(
        "import",
        help="load an OCI image layout tarball into the cache",
        description="Write the manifests, blobs, tags and repository links of an exported "
        "tarball into the cache of the upstreams its references route to, so pulls work with "
        "every upstream down. Everything is verified first; a bad archive imports nothing.",
    )
    config_option(load)
    load.add_argument("archive", type=Path, help="the tarball (from mirrorrouter export)")
    load.set_defaults(func=_import)


def _image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image names, as for resolve")
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        action="append",
        default=[],
        help="read image names from FILE, one a line, # starts a comment (- for stdin); "
        "may be repeated",
    )
    parser.add_argument("--platform", default="linux/amd64", help=PLATFORM_HELP)
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        help=f"images handled at once (default: {DEFAULT_JOBS})",
    )


def _warm(args: argparse.Namespace) -> int:
    return _guarded(_run_warm, args)


def _export(args: argparse.Namespace) -> int:
    return _guarded(_run_export, args)


def _import(args: argparse.Namespace) -> int:
    return _guarded(_run_import, args)


def _guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args)
    except UsageError as exc:
        print(f"mirrorrouter {args.command}: {exc}", file=sys.stderr)
        return 2


def _run_warm(args: argparse.Namespace) -> int:
    settings, images, platforms = _settings(args), _images(args), _platforms(args)
    with _reporting() as progress:
        report = asyncio.run(
            warm_images(settings, images, platforms=platforms, progress=progress, jobs=args.jobs)
        )
    print("\n".join(report.summary()))
    return 0 if report.ok else 1


def _run_export(args: argparse.Namespace) -> int:
    settings, images, platforms = _settings(args), _images(args), _platforms(args)
    output: Path = args.output
    if not output.parent.is_dir():
        raise UsageError(f"{output.parent} is not a directory")

    async def run(progress: Progress) -> ExportReport:
        pull = Pullthrough(settings)
        try:
            return await export_images(
                pull,
                settings,
                images,
                output,
                platforms=platforms,
                cached_only=args.cached_only,
                progress=progress,
                jobs=args.jobs,
            )
        finally:
            await pull.close()

    with _reporting() as progress:
        report = asyncio.run(run(progress))
    print("\n".join(report.summary(args.cached_only)))
    return 0 if report.ok else 1


def _run_import(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def run(progress: Progress) -> ImportReport:
        pull = Pullthrough(settings)
        try:
            return await import_archive(pull, settings, args.archive, progress=progress)
        finally:
            await pull.close()

    with _reporting() as progress:
        report = asyncio.run(run(progress))
    print("\n".join(report.summary()))
    return 0 if report.ok else 1


# ---------------------------------------------------------------------- helpers


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(find_config(args.config))


def _images(args: argparse.Namespace) -> list[str]:
    images = list(args.images)
    for path in args.file:
        try:
            images += read_image_list(sys.stdin if str(path) == "-" else path)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not images:
        raise UsageError("name at least one image (or --file)")
    return images


def _platforms(args: argparse.Namespace) -> PlatformSelector:
    try:
        return PlatformSelector.parse(args.platform)
    except ValueError as exc:
        raise UsageError(f"--platform: {exc}") from exc


@contextlib.contextmanager
def _reporting() -> Iterator[Progress]:
    """Progress on stderr, with warnings of the pull-through (resumes, failovers) among it."""
    progress = make_progress(sys.stderr)
    handler: logging.Handler
    if isinstance(progress, RichProgress):
        handler = RichHandler(console=progress.console, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("mirrorrouter")
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    try:
        yield progress
    finally:
        progress.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
