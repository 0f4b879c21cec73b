"""Warm-up: pre-pull images into the cache, through the same ``Pullthrough`` the gateway uses.

For each image name (canonicalized and routed as ``mirrorrouter resolve`` does): the manifest
by tag (which stores the tag record) or by digest; for an index, the child manifests of the
requested platforms; then every blob those manifests name. Everything goes through
``Pullthrough``, so verification, single-flight, download claims shared with gateway
processes on the same cache directory, repository links and tag records all work exactly
as for a client's pull. A blob is "fetched" when this run downloaded it and "cached" when
the cache already had it.

The same walk, run with ``cached_only``, reads the tree from the cache alone and never asks
an upstream: ``exporter.py`` uses it to export what is cached. Progress is shown through
``progress.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

from mirrorrouter.cache import DigestMismatch, StoredManifest
from mirrorrouter.cli.formatting import size_in_words
from mirrorrouter.cli.progress import NoProgress, Progress
from mirrorrouter.config import Settings, UpstreamSettings
from mirrorrouter.errors import RegistryError, UpstreamError
from mirrorrouter.manifests import (
    DEFAULT_PLATFORM,
    MAX_INDEX_DEPTH,
    Index,
    Parsed,
    PlatformSelector,
    platform_text,
    read_tolerant,
)
from mirrorrouter.mapping import Mapper
from mirrorrouter.oci import CacheResult
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.pull.singleflight import FillFailed
from mirrorrouter.reference import Digest, ImageReference, InvalidReference
from mirrorrouter.timing import REAL_TIME, Timing

DEFAULT_JOBS = 4  # images warmed at once
BLOB_CONCURRENCY = 4  # blobs of one image fetched at once
BLOB_ATTEMPTS = 2  # a fill cut short (a corrupt mirror) is joined once more: it restarts


class WarmError(Exception):
    """Why one image could not be warmed (or exported): said in the summary."""


DEFAULT_PLATFORMS = PlatformSelector((DEFAULT_PLATFORM,))


def read_cached(manifest: StoredManifest) -> Parsed:
    """What a cached manifest names (malformed entries skipped, as everywhere stored bytes
    are read); ``WarmError`` for what is not a manifest at all."""
    parsed = read_tolerant(manifest.data, manifest.media_type)
    if parsed is None:
        raise WarmError(f"manifest {manifest.digest} is not a JSON object")
    return parsed


# ---------------------------------------------------------------------- results


@dataclass
class ImageResult:
    """What warming one image did, and the tree it consists of (for export)."""

    image: str  # as given
    reference: ImageReference | None = None  # canonical
    upstream: UpstreamSettings | None = None
    manifests: list[StoredManifest] = field(default_factory=list)  # the top one first
    blobs: dict[Digest, int | None] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)  # of the chosen index entries
    manifests_fetched: int = 0
    manifests_cached: int = 0
    blobs_fetched: int = 0
    blobs_cached: int = 0
    bytes_fetched: int = 0
    bytes_cached: int = 0
    stale: bool = False  # the tag came from cache because every mirror failed
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str:
        return str(self.reference) if self.reference is not None else self.image

    @property
    def top(self) -> StoredManifest:
        return self.manifests[0]

    def line(self) -> str:
        if self.error is not None:
            return f"FAILED  {self.name}  {self.error}"
        blobs = self.blobs_fetched + self.blobs_cached
        text = (
            f"ok      {self.name}  {self.top.digest}  {blobs} blobs: {self.blobs_fetched} fetched"
            f" ({size_in_words(self.bytes_fetched)}), {self.blobs_cached} cached"
            f" ({size_in_words(self.bytes_cached)})"
        )
        if self.platforms:
            text += f"  [{', '.join(self.platforms)}]"
        if self.stale:
            text += "  (tag served stale: every mirror failed)"
        return text


@dataclass
class WarmReport:
    results: list[ImageResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.results if not r.ok]

    def total(self, attribute: str) -> int:
        return sum(int(getattr(r, attribute)) for r in self.results)

    def summary(self, verb: str = "warmed") -> list[str]:
        good = len(self.results) - len(self.failed)
        lines = [
            f"{verb} {good} of {len(self.results)} images"
            + (f", {len(self.failed)} failed" if self.failed else ""),
            f"  manifests: {self.total('manifests_fetched')} fetched,"
            f" {self.total('manifests_cached')} already cached",
            f"  blobs (layers and configs): {self.total('blobs_fetched')} fetched"
            f" ({size_in_words(self.total('bytes_fetched'))}),"
            f" {self.total('blobs_cached')} already cached"
            f" ({size_in_words(self.total('bytes_cached'))})",
        ]
        lines += [r.line() for r in self.results]
        return lines


@dataclass(frozen=True, slots=True)
class _BlobOutcome:
    fetched: bool
    size: int


# ---------------------------------------------------------------------- the walk


class Warmer:
    """Warms (or, with ``cached_only``, looks up in the cache) a list of images."""

    def __init__(
        self,
        pull: Pullthrough,
        settings: Settings,
        *,
        platforms: PlatformSelector = DEFAULT_PLATFORMS,
        progress: Progress | None = None,
        cached_only: bool = False,
        jobs: int = DEFAULT_JOBS,
    ) -> None:
        self.pull = pull
        self.mapper = Mapper(settings)
        self.platforms = platforms
        self.progress = progress or NoProgress()
        self.cached_only = cached_only
        self._jobs = asyncio.Semaphore(max(1, jobs))
        # One fetch per blob per run, however many images share it.
        self._blob_tasks: dict[tuple[str, Digest], asyncio.Task[_BlobOutcome]] = {}

    async def run(self, images: Sequence[str]) -> WarmReport:
        results = await asyncio.gather(*(self._guarded(image) for image in images))
        return WarmReport(list(results))

    async def _guarded(self, image: str) -> ImageResult:
        async with self._jobs:
            return await self.image(image)

    async def image(self, image: str) -> ImageResult:
        result = ImageResult(image)
        task = self.progress.begin(image)
        try:
            try:
                ref = ImageReference.parse(image)
            except InvalidReference as exc:
                raise WarmError(f"invalid name: {exc}") from exc
            resolution = self.mapper.resolve_image(ref)
            result.reference, result.upstream = resolution.reference, resolution.upstream
            await self._walk(result, resolution.upstream, resolution.reference)
            sizes = [size or 0 for size in result.blobs.values()]
            self.progress.plan(task, sum(sizes), len(sizes), "blobs")
            await self._blobs(result, resolution.upstream, task)
        except WarmError as exc:
            result.error = str(exc)
        except RegistryError as exc:
            result.error = describe(exc)
        if result.ok:
            self.progress.end(
                task,
                True,
                f"{result.blobs_fetched} blobs fetched ({size_in_words(result.bytes_fetched)}),"
                f" {result.blobs_cached} cached",
            )
        else:
            self.progress.end(task, False, result.error or "")
        return result

    async def _walk(
        self, result: ImageResult, upstream: UpstreamSettings, ref: ImageReference
    ) -> None:
        top = await self._manifest(result, upstream, ref)
        pending: list[tuple[StoredManifest, int]] = [(top, 0)]
        while pending:
            manifest, depth = pending.pop(0)
            result.manifests.append(manifest)
            parsed = read_cached(manifest)
            if not isinstance(parsed, Index):
                for blob in parsed.descriptors:
                    if not blob.external:
                        result.blobs.setdefault(blob.digest, blob.size)
                continue
            chosen = [c for c in parsed.children if self.platforms.selects(c.platform)]
            if not chosen:
                offered = ", ".join(platform_text(c.platform) for c in parsed.children)
                raise WarmError(
                    f"the index {manifest.digest} has no manifest for {self.platforms}"
                    f" (it has: {offered or 'none'})"
                )
            if depth >= MAX_INDEX_DEPTH:
                raise WarmError(f"indexes nested deeper than {MAX_INDEX_DEPTH} levels")
            for child in chosen:
                child_ref = ImageReference(ref.registry, ref.repository, None, child.digest)
                stored = await self._manifest(result, upstream, child_ref)
                pending.append((stored, depth + 1))
                if depth == 0:
                    result.platforms.append(platform_text(child.platform))

    async def _manifest(
        self, result: ImageResult, upstream: UpstreamSettings, ref: ImageReference
    ) -> StoredManifest:
        if self.cached_only:
            stored = await cached_manifest(self.pull, upstream, ref)
            result.manifests_cached += 1
            return stored
        answer = await self.pull.manifest(upstream, ref)
        if answer.cache == CacheResult.MISS:
            result.manifests_fetched += 1
        else:
            result.manifests_cached += 1
            result.stale = result.stale or answer.cache == CacheResult.STALE
        return answer.manifest

    async def _blobs(self, result: ImageResult, upstream: UpstreamSettings, task: int) -> None:
        assert result.reference is not None
        repository = result.reference.repository
        limit = asyncio.Semaphore(BLOB_CONCURRENCY)
        progress: dict[Digest, int] = {}
        done = 0

        def report() -> None:
            self.progress.update(task, sum(progress.values()), done)

        async def one(digest: Digest, size: int | None) -> None:
            nonlocal done

            def on_bytes(count: int) -> None:
                progress[digest] = count
                report()

            async with limit:
                key = (upstream.name, digest)
                shared = self._blob_tasks.get(key)
                if shared is None:
                    shared = asyncio.ensure_future(
                        self._blob(upstream, repository, digest, size, on_bytes)
                    )
                    self._blob_tasks[key] = shared
                    outcome = await shared
                    fetched = outcome.fetched
                else:  # another image of this run fetches it: cached as far as we go
                    outcome = await asyncio.shield(shared)
                    fetched = False
            progress[digest] = outcome.size
            done += 1
            report()
            if fetched:
                result.blobs_fetched += 1
                result.bytes_fetched += outcome.size
            else:
                result.blobs_cached += 1
                result.bytes_cached += outcome.size

        outcomes = await asyncio.gather(
            *(one(d, s) for d, s in result.blobs.items()), return_exceptions=True
        )
        failures = []
        for digest, outcome in zip(result.blobs, outcomes, strict=True):
            if isinstance(outcome, WarmError):
                failures.append(f"blob {digest}: {outcome}")
            elif isinstance(outcome, BaseException):
                raise outcome
        if failures:
            raise WarmError(
                f"{len(failures)} of {len(result.blobs)} blobs failed: " + "; ".join(failures)
            )

    async def _blob(
        self,
        upstream: UpstreamSettings,
        repository: str,
        digest: Digest,
        size: int | None,
        on_bytes: Callable[[int], None],
    ) -> _BlobOutcome:
        site = await self.pull.site(upstream)
        if self.cached_only:
            stored = await site.cache.blob_size(digest)
            if stored is None:
                raise WarmError("not in the cache")
            return _BlobOutcome(False, stored)
        reason = ""
        for _ in range(BLOB_ATTEMPTS):
            on_bytes(0)
            try:
                answer = await self.pull.blob(upstream, repository, digest)
                if answer.cache == CacheResult.HIT:
                    return _BlobOutcome(False, answer.size or size or 0)
                received = 0
                async for chunk in answer.stream(0, None):
                    received += len(chunk)
                    on_bytes(received)
            except RegistryError as exc:
                raise WarmError(describe(exc)) from exc
            except (FillFailed, UpstreamError, DigestMismatch, httpx.HTTPError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                continue  # a failed fill starts over from the next mirror: join it
            if await site.cache.blob_size(digest) is None:
                raise WarmError("fetched, but the cache could not keep it (is the disk full?)")
            return _BlobOutcome(True, received)
        raise WarmError(reason)


async def cached_manifest(
    pull: Pullthrough, upstream: UpstreamSettings, ref: ImageReference
) -> StoredManifest:
    """A manifest from the cache alone (a tag through its tag record)."""
    site = await pull.site(upstream)
    digest = ref.digest
    if digest is None:
        record = await site.get_tag(ref.repository, ref.tag or "latest")
        if record is None:
            raise WarmError(f"tag {ref} is not in the cache of {upstream.name}")
        digest = record.digest
    stored = await site.get_manifest(digest)
    if stored is None:
        raise WarmError(f"manifest {digest} of {ref.name} is not in the cache of {upstream.name}")
    return stored


def describe(error: RegistryError) -> str:
    """A registry error in one line, with what each mirror answered."""
    text = error.message
    detail = error.detail
    if isinstance(detail, dict) and isinstance(detail.get("tried"), list):
        tried = [
            f"{t.get('mirror')}: {t.get('result')}" for t in detail["tried"] if isinstance(t, dict)
        ]
        if tried:
            text += f" ({'; '.join(tried)})"
    return text


# ---------------------------------------------------------------------- entry points


def read_image_list(path: Path | TextIO) -> list[str]:
    """Image names, one a line; ``#`` starts a comment, blank lines are skipped."""
    text = path.read() if not isinstance(path, Path) else path.read_text()
    names = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


async def warm_images(
    settings: Settings,
    images: Iterable[str],
    *,
    platforms: PlatformSelector = DEFAULT_PLATFORMS,
    progress: Progress | None = None,
    jobs: int = DEFAULT_JOBS,
    transport: httpx.AsyncBaseTransport | None = None,
    timing: Timing = REAL_TIME,
) -> WarmReport:
    """Warm ``images`` with a Pullthrough of its own over the configured caches."""
    pull = Pullthrough(settings, transport=transport, timing=timing)
    try:
        warmer = Warmer(pull, settings, platforms=platforms, progress=progress, jobs=jobs)
        return await warmer.run(list(images))
    finally:
        await pull.close()
