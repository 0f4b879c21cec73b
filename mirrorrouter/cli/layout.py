"""Export and import of OCI image layout tarballs, for sites without a way upstream.

Export writes what the cache holds (after warming what is missing, unless ``cached_only``)::

    oci-layout                {"imageLayoutVersion": "1.0.0"}
    index.json                one entry per image; its annotation
                              org.opencontainers.image.ref.name is the canonical reference
                              (docker.io/library/alpine:3.19), which import routes by
    blobs/<alg>/<hex>         manifests (the exact bytes the cache stores) and blobs

An index is exported whole, byte for byte, but only the child manifests of the chosen
platforms (and their blobs) travel with it.

Import reads such a tarball and writes, into the cache of the upstream each reference
routes to: blobs, manifests, repository links and tag records, so pulls then work with
every upstream down. It checks everything before it commits anything: every manifest and
blob the references need must be in the archive and hash to its digest and size, else the
import is refused with every problem named and the cache is left as it was. Blobs are then
written through the cache's verifying writer (a second check), manifests after blobs, and
tags last, so a reader never finds a tag whose content is not there.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mirrorrouter.cache import DigestMismatch, StoredManifest, TagRecord
from mirrorrouter.cli.formatting import size_in_words
from mirrorrouter.cli.warmer import (
    DEFAULT_JOBS,
    DEFAULT_PLATFORMS,
    NoProgress,
    Progress,
    Warmer,
    WarmError,
    WarmReport,
    read_cached,
)
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.errors import RegistryError
from mirrorrouter.manifests import (
    MAX_INDEX_DEPTH,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    Descriptor,
    Index,
    PlatformSelector,
    media_type_of,
    parse_strict,
    referenced_digests,
)
from mirrorrouter.mapping import Mapper
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.reference import Digest, ImageReference, InvalidReference

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
COPY_CHUNK = 1024 * 1024


def blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


# ---------------------------------------------------------------------- export


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


# ---------------------------------------------------------------------- import


@dataclass
class _Site:
    """What an archive brings to one upstream's cache."""

    upstream: UpstreamSettings
    manifests: dict[Digest, StoredManifest] = field(default_factory=dict)
    blobs: dict[Digest, int] = field(default_factory=dict)
    links: dict[str, set[Digest]] = field(default_factory=dict)
    tags: dict[tuple[str, str], StoredManifest] = field(default_factory=dict)


@dataclass
class ImportReport:
    archive: Path
    images: list[str] = field(default_factory=list)
    upstreams: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    committed: bool = False
    blobs_written: int = 0
    blobs_cached: int = 0
    bytes_written: int = 0
    manifests_written: int = 0
    manifests_cached: int = 0
    tags: int = 0

    @property
    def ok(self) -> bool:
        return self.committed and not self.problems

    def summary(self) -> list[str]:
        if not self.committed:
            lines = [f"refused {self.archive}: nothing was imported"]
            return lines + [f"  {p}" for p in self.problems]
        lines = [
            f"imported {len(self.images)} images from {self.archive} into the cache of"
            f" {', '.join(self.upstreams)}",
            f"  blobs: {self.blobs_written} written ({size_in_words(self.bytes_written)}),"
            f" {self.blobs_cached} already cached",
            f"  manifests: {self.manifests_written} written, {self.manifests_cached} already"
            f" cached; tags: {self.tags}",
        ]
        lines += [f"  {image}" for image in self.images]
        lines += [f"  problem: {p}" for p in self.problems]
        return lines


class _Archive:
    """The members of an OCI layout tarball, by name (never extracted to disk)."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
        self.members = {
            m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile() or m.islnk()
        }

    def close(self) -> None:
        self.tar.close()

    def open(self, name: str) -> IO[bytes]:
        handle = self.tar.extractfile(self.members[name])
        assert handle is not None
        return handle

    def read(self, name: str, limit: int) -> bytes:
        member = self.members[name]
        size = member.size if member.isfile() else None
        if size is not None and size > limit:
            raise WarmError(f"{name} is {size} bytes, more than a manifest may be")
        with self.open(name) as handle:
            return handle.read(limit + 1)[:limit]

    def size(self, name: str) -> int:
        member = self.members[name]
        if member.islnk():
            return self.tar.getmember(member.linkname).size
        return member.size

    def hash(self, name: str, digest: Digest, on_bytes: Callable[[int], None]) -> tuple[str, int]:
        hasher = hashlib.new(digest.algorithm)
        total = 0
        with self.open(name) as handle:
            while chunk := handle.read(COPY_CHUNK):
                hasher.update(chunk)
                total += len(chunk)
                on_bytes(len(chunk))
        return hasher.hexdigest(), total


class _Walk:
    """Reads index.json and the manifests it names, collecting what goes where and every
    problem found on the way."""

    def __init__(self, archive: _Archive, settings: Settings, report: ImportReport) -> None:
        self.archive = archive
        self.mapper = Mapper(settings)
        self.report = report
        self.sites: dict[str, _Site] = {}

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def run(self) -> None:
        if LAYOUT_FILE not in self.archive.members:
            self.problem("not an OCI image layout: there is no oci-layout file")
            return
        try:
            layout = json.loads(self.archive.read(LAYOUT_FILE, 64 * 1024))
            index_data = self.archive.read(INDEX_FILE, MAX_MANIFEST_BYTES)
        except (KeyError, ValueError, WarmError) as exc:
            self.problem(f"unreadable oci-layout or index.json: {exc}")
            return
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != LAYOUT_VERSION:
            self.problem(f"oci-layout is not imageLayoutVersion {LAYOUT_VERSION}: {layout!r}")
        try:  # an archive comes from outside, like a push: its index must follow the schema
            index = parse_strict(index_data, OCI_INDEX)
        except RegistryError as exc:
            self.problem(f"index.json: {exc.message}")
            return
        if not isinstance(index, Index) or not index.children:
            self.problem("index.json names no manifests")
            return
        for entry in index.children:
            self.entry(entry)

    def entry(self, top: Descriptor) -> None:
        name = top.annotations.get(REF_NAME)
        if name is None:
            self.problem(
                f"index.json entry {top.digest} has no {REF_NAME} annotation with the"
                " canonical reference (such as docker.io/library/alpine:3.19)"
            )
            return
        try:
            ref = ImageReference.parse(name)
            resolution = self.mapper.resolve_image(ref)
        except InvalidReference as exc:
            self.problem(f"{name}: {exc}")
            return
        except RegistryError as exc:
            self.problem(f"{name}: {exc.message}")
            return
        ref, upstream = resolution.reference, resolution.upstream
        site = self.sites.setdefault(upstream.name, _Site(upstream))
        try:
            manifest = self.manifest(top, None)
            self.tree(site, ref.repository, manifest, 0)
        except WarmError as exc:
            self.problem(f"{ref}: {exc}")
            return
        if ref.tag is not None and ref.digest is None:
            site.tags[(ref.repository, ref.tag)] = manifest
        elif ref.digest is not None and ref.digest != manifest.digest:
            self.problem(f"{ref}: the archive's manifest is {manifest.digest}")
            return
        self.report.images.append(str(ref))

    def manifest(self, descriptor: Descriptor, parent_type: str | None) -> StoredManifest:
        name = blob_name(descriptor.digest)
        if name not in self.archive.members:
            raise WarmError(f"manifest {descriptor.digest} is not in the archive")
        data = self.archive.read(name, MAX_MANIFEST_BYTES)
        if Digest.of(data, descriptor.digest.algorithm) != descriptor.digest:
            raise WarmError(f"manifest {descriptor.digest} in the archive is corrupt")
        if descriptor.size is not None and descriptor.size != len(data):
            raise WarmError(f"manifest {descriptor.digest} is not {descriptor.size} bytes")
        media_type = descriptor.media_type or media_type_of(None, data) or parent_type
        if not media_type:
            raise WarmError(f"manifest {descriptor.digest} has no media type")
        return StoredManifest(descriptor.digest, media_type, data)

    def tree(self, site: _Site, repository: str, manifest: StoredManifest, depth: int) -> None:
        site.manifests[manifest.digest] = manifest
        links = site.links.setdefault(repository, set())
        links.update([manifest.digest, *referenced_digests(manifest)])
        parsed = read_cached(manifest)
        if isinstance(parsed, Index):
            present = [c for c in parsed.children if blob_name(c.digest) in self.archive.members]
            if not present:
                raise WarmError(f"none of the manifests of index {manifest.digest} is here")
            if depth >= MAX_INDEX_DEPTH:
                raise WarmError(f"indexes nested deeper than {MAX_INDEX_DEPTH} levels")
            for child in present:  # the platforms that were exported
                self.tree(site, repository, self.manifest(child, None), depth + 1)
            return
        for blob in parsed.descriptors:
            name = blob_name(blob.digest)
            if name not in self.archive.members:
                if blob.external:
                    continue
                raise WarmError(f"blob {blob.digest} of manifest {manifest.digest} is missing")
            if blob.size is not None and self.archive.size(name) != blob.size:
                raise WarmError(f"blob {blob.digest} in the archive is not {blob.size} bytes")
            site.blobs[blob.digest] = self.archive.size(name)


async def import_archive(
    pull: Pullthrough,
    settings: Settings,
    archive_path: Path,
    *,
    progress: Progress | None = None,
) -> ImportReport:
    """Import an OCI layout tarball into the caches of the upstreams its references route
    to: all of it after every check passed, or nothing."""
    progress = progress or NoProgress()
    report = ImportReport(archive_path)
    try:
        archive = await asyncio.to_thread(_Archive, archive_path)
    except (OSError, tarfile.TarError) as exc:
        report.problems.append(f"cannot read {archive_path}: {exc}")
        return report
    try:
        walk = _Walk(archive, settings, report)
        await asyncio.to_thread(walk.run)
        if report.problems:
            return report
        await _verify(archive, walk.sites, report, progress)
        if report.problems:
            return report
        await _commit(pull, archive, walk.sites, report, progress)
    finally:
        archive.close()
    return report


async def _verify(
    archive: _Archive, sites: dict[str, _Site], report: ImportReport, progress: Progress
) -> None:
    """Hash every blob the import needs, before anything is written."""
    blobs: dict[Digest, int] = {}
    for site in sites.values():
        blobs.update(site.blobs)
    task = progress.begin(f"verifying {report.archive.name}")
    progress.plan(task, sum(blobs.values()), len(blobs), "blobs")
    done_bytes = done_items = 0

    def on_bytes(count: int) -> None:
        nonlocal done_bytes
        done_bytes += count
        progress.update(task, done_bytes, done_items)

    for digest in blobs:
        hexdigest, size = await asyncio.to_thread(archive.hash, blob_name(digest), digest, on_bytes)
        if hexdigest != digest.hex:
            report.problems.append(
                f"blob {digest} in the archive is corrupt: it hashes to"
                f" {digest.algorithm}:{hexdigest}"
            )
        elif size != blobs[digest]:
            report.problems.append(
                f"blob {digest} in the archive is {size} bytes, not {blobs[digest]}"
            )
        done_items += 1
    progress.end(
        task, not report.problems, f"{len(report.problems)} corrupt" if report.problems else ""
    )


async def _commit(
    pull: Pullthrough,
    archive: _Archive,
    sites: dict[str, _Site],
    report: ImportReport,
    progress: Progress,
) -> None:
    """Blobs first (verified again by the cache's writer), then manifests, links, tags."""
    total = sum(sum(s.blobs.values()) for s in sites.values())
    count = sum(len(s.blobs) for s in sites.values())
    task = progress.begin(f"importing {report.archive.name}")
    progress.plan(task, total, count, "blobs")
    done_bytes = done_items = 0
    try:
        for plan in sites.values():
            cache = (await pull.site(plan.upstream)).cache
            for digest, size in plan.blobs.items():
                if await cache.blob_size(digest) is not None:
                    report.blobs_cached += 1
                else:
                    writer = cache.blob_writer(digest, size)
                    committed = False
                    try:
                        with archive.open(blob_name(digest)) as handle:
                            while chunk := await asyncio.to_thread(handle.read, COPY_CHUNK):
                                await writer.write(chunk)
                                progress.update(task, done_bytes + writer.written, done_items)
                        await writer.commit()
                        committed = True
                    finally:
                        if not committed:
                            await writer.abort()
                    report.blobs_written += 1
                    report.bytes_written += size
                done_bytes, done_items = done_bytes + size, done_items + 1
                progress.update(task, done_bytes, done_items)
    except DigestMismatch as exc:
        report.problems.append(
            f"the archive changed while being imported ({exc}): verified blobs written so"
            " far were kept; no manifest or tag was written"
        )
        progress.end(task, False, "changed")
        return
    now = pull.clock()
    for plan in sites.values():
        site = await pull.site(plan.upstream)
        for manifest in plan.manifests.values():
            if await site.cache.get_manifest(manifest.digest) is not None:
                report.manifests_cached += 1
            else:
                await site.cache.put_manifest(manifest)
                report.manifests_written += 1
        for repository, digests in plan.links.items():
            await site.link(repository, sorted(digests, key=str))
        for (repository, tag), manifest in plan.tags.items():
            record = TagRecord(manifest.digest, manifest.media_type, len(manifest.data), now)
            await site.put_tag(repository, tag, record)
            report.tags += 1
        report.upstreams.append(plan.upstream.name)
    report.committed = True
    progress.end(task, True, "")
