"""``mirrorrouter import``: an OCI image layout tarball (layout.py) written into the cache of
the upstream each reference routes to: blobs, manifests, repository links and tag records,
so pulls then work with every upstream down.

It checks everything before it commits anything: every manifest and blob the references
need must be in the archive and hash to its digest and size, else the import is refused
with every problem named and the cache is left as it was. Blobs are then written through
the cache's verifying writer (a second check), manifests after blobs, and tags last, so a
reader never finds a tag whose content is not there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mirrorrouter.cache import DigestMismatch, StoredManifest, TagRecord
from mirrorrouter.cli.formatting import size_in_words
from mirrorrouter.cli.layout import (
    COPY_CHUNK,
    INDEX_FILE,
    LAYOUT_FILE,
    LAYOUT_VERSION,
    REF_NAME,
    blob_name,
)
from mirrorrouter.cli.progress import NoProgress, Progress
from mirrorrouter.cli.warmer import WarmError, read_cached
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.errors import RegistryError
from mirrorrouter.manifests import (
    MAX_INDEX_DEPTH,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    Descriptor,
    Index,
    media_type_of,
    parse_strict,
    referenced_digests,
)
from mirrorrouter.mapping import Mapper
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.reference import Digest, ImageReference, InvalidReference


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
