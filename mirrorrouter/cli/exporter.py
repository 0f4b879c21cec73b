"""``mirrorrouter export``: what the cache holds (after warming what is missing, unless
``cached_only``), written as an OCI image layout tarball (layout.py).

An index is exported whole, byte for byte, but only the child manifests of the chosen
platforms (and their blobs) travel with it. Nothing is written unless every image is
complete: the tarball appears whole, by rename, or not at all.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrorrouter.cli.formatting import size_in_words
from mirrorrouter.cli.layout import INDEX_FILE, LAYOUT_FILE, LAYOUT_VERSION, REF_NAME, blob_name
from mirrorrouter.cli.progress import NoProgress, Progress
from mirrorrouter.cli.warmer import DEFAULT_JOBS, DEFAULT_PLATFORMS, Warmer, WarmError, WarmReport
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.manifests import OCI_INDEX, PlatformSelector
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.reference import Digest


@dataclass
class ExportReport:
    warm: WarmReport
    output: Path
    written: bool = False
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.written and self.warm.ok

    def summary(self, cached_only: bool) -> list[str]:
        lines = self.warm.summary("found in cache" if cached_only else "warmed")
        if self.written:
            lines.insert(
                0,
                f"wrote {self.output}: {len(self.warm.results)} images, {self.manifests}"
                f" manifests, {self.blobs} blobs ({size_in_words(self.bytes)})",
            )
        else:
            reason = self.error or "an image failed"
            lines.insert(0, f"did not write {self.output}: {reason}")
        return lines


async def export_images(
    pull: Pullthrough,
    settings: Settings,
    images: Sequence[str],
    output: Path,
    *,
    platforms: PlatformSelector = DEFAULT_PLATFORMS,
    cached_only: bool = False,
    progress: Progress | None = None,
    jobs: int = DEFAULT_JOBS,
) -> ExportReport:
    """Write ``images`` as one OCI layout tarball; nothing is written unless every image is
    complete (the tarball appears whole, by rename, or not at all)."""
    progress = progress or NoProgress()
    warmer = Warmer(
        pull, settings, platforms=platforms, progress=progress, cached_only=cached_only, jobs=jobs
    )
    report = ExportReport(await warmer.run(images), output)
    if not report.warm.ok:
        return report
    index_entries: list[dict[str, Any]] = []
    manifests: dict[Digest, bytes] = {}
    blobs: dict[Digest, tuple[UpstreamSettings, int]] = {}
    seen_refs: set[str] = set()
    for result in report.warm.results:
        assert result.reference is not None and result.upstream is not None
        for manifest in result.manifests:
            manifests.setdefault(manifest.digest, manifest.data)
        for digest, size in result.blobs.items():
            blobs.setdefault(digest, (result.upstream, size or 0))
        name = str(result.reference)
        if name in seen_refs:
            continue
        seen_refs.add(name)
        index_entries.append(
            {
                "mediaType": result.top.media_type,
                "digest": str(result.top.digest),
                "size": len(result.top.data),
                "annotations": {REF_NAME: name},
            }
        )
    with tempfile.TemporaryDirectory(prefix=".export-", dir=output.parent) as scratch:
        try:
            files = await _blob_files(pull, blobs, Path(scratch))
        except WarmError as exc:
            report.error = str(exc)
            return report
        total = sum(len(d) for d in manifests.values()) + sum(s for _, s in files.values())
        task = progress.begin(f"writing {output}")
        progress.plan(task, total, len(manifests) + len(files), "files")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
        await asyncio.to_thread(
            _write_tar, output, index, manifests, files, lambda b, n: progress.update(task, b, n)
        )
        progress.end(task, True, "")
    report.written = True
    report.manifests, report.blobs = len(manifests), len(files)
    report.bytes = total
    return report


async def _blob_files(
    pull: Pullthrough, blobs: dict[Digest, tuple[UpstreamSettings, int]], scratch: Path
) -> dict[Digest, tuple[Path, int]]:
    """Where each blob's committed bytes are (copied to ``scratch`` from a backend that
    keeps no local files)."""
    files = {}
    for digest, (upstream, _) in blobs.items():
        cache = (await pull.site(upstream)).cache
        size = await cache.blob_size(digest)
        if size is None:
            raise WarmError(f"blob {digest} left the cache of {upstream.name} meanwhile")
        path = cache.blob_path(digest)
        if path is None:
            path = scratch / digest.hex
            with path.open("wb") as handle:
                async for chunk in cache.read_blob(digest, 0, size):
                    handle.write(chunk)
        files[digest] = (path, size)
    return files


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid = size, 0, 0, 0
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info


def _write_tar(
    output: Path,
    index: dict[str, Any],
    manifests: dict[Digest, bytes],
    files: dict[Digest, tuple[Path, int]],
    on_progress: Callable[[int, int], None],
) -> None:
    """The tarball, into a temporary name beside ``output`` and renamed when complete."""
    partial = output.with_name(f".{output.name}.partial")
    done_bytes = done_items = 0
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            layout = json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()
            tar.addfile(_tar_info(LAYOUT_FILE, len(layout)), io.BytesIO(layout))
            data = json.dumps(index, indent=2).encode()
            tar.addfile(_tar_info(INDEX_FILE, len(data)), io.BytesIO(data))
            tar.addfile(_tar_info("blobs", directory=True))
            algorithms = sorted({d.algorithm for d in [*manifests, *files]})
            for algorithm in algorithms:
                tar.addfile(_tar_info(f"blobs/{algorithm}", directory=True))
            for digest, data in manifests.items():
                tar.addfile(_tar_info(blob_name(digest), len(data)), io.BytesIO(data))
                done_bytes, done_items = done_bytes + len(data), done_items + 1
                on_progress(done_bytes, done_items)
            for digest, (path, size) in files.items():
                if digest in manifests:
                    continue
                with path.open("rb") as handle:
                    tar.addfile(_tar_info(blob_name(digest), size), handle)
                done_bytes, done_items = done_bytes + size, done_items + 1
                on_progress(done_bytes, done_items)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
