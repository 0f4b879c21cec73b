"""The blob download behind a fill: claim, fetch (resuming mid-blob), verify, commit.

One task per ``BlobFill`` (singleflight.py), owned here, never by a response. It claims the
download among worker processes, streams the blob from the upstream's mirrors into the
cache's writer (resuming with ``Range`` from the byte where a stream broke), verifies and
commits it. Content that fails verification marks its mirrors suspect for that digest and a
fresh fill starts from the next one; a cache that cannot take the bytes (a full disk) makes
readers stream straight from upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from mirrorrouter.cache import BlobWriter, Claim, DigestMismatch
from mirrorrouter.config import Capability
from mirrorrouter.errors import RegistryError, UpstreamError
from mirrorrouter.metrics import Metrics
from mirrorrouter.reference import Digest
from mirrorrouter.singleflight import BlobFill
from mirrorrouter.site import UpstreamSite
from mirrorrouter.timing import Timing

log = logging.getLogger("mirrorrouter.fill")

MAX_RESUMES = 5  # per blob download
CLAIM_POLL_SECONDS = 0.05  # how often a worker checks another worker's download


class Filler:
    """Starts and runs blob downloads; the tasks live until done or until ``close``."""

    def __init__(self, metrics: Metrics, timing: Timing) -> None:
        self.metrics = metrics
        self.timing = timing
        self.tasks: set[asyncio.Task[None]] = set()
        # Told (upstream, bytes) after each blob commit: the evictor keeps caches in bounds.
        self.on_commit: Callable[[str, int], None] | None = None

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def start(self, site: UpstreamSite, repository: str, digest: Digest) -> BlobFill:
        """Register a fill for the blob and start its download task."""
        fill = BlobFill(digest, repository)
        site.fills[digest] = fill
        task = asyncio.get_running_loop().create_task(self._run_fill(site, fill))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return fill

    async def _run_fill(self, site: UpstreamSite, fill: BlobFill) -> None:
        """Download, verify and commit one blob; readers follow ``fill`` meanwhile."""
        claim = None
        try:
            claim = await self._claim(site, fill)
            if claim is None:
                return  # another worker process committed it meanwhile
            writer = await self._download(site, fill)
            if writer is None:
                return  # degraded: readers stream straight from upstream
            committed = await writer.commit()
            await site.link(fill.repository, [fill.digest])
            fill.finish(committed)
            if self.on_commit is not None:
                self.on_commit(site.settings.name, writer.written)
        except DigestMismatch as error:
            self._on_corrupt(site, fill, error)
        except BaseException as error:
            if not isinstance(error, RegistryError | asyncio.CancelledError):
                log.warning("blob %s from %s failed: %s", fill.digest, fill.mirror, error)
            fill.fail(error)
            if isinstance(error, asyncio.CancelledError):
                raise
        finally:
            if claim is not None:
                claim.release()
            if site.fills.get(fill.digest) is fill:
                del site.fills[fill.digest]

    async def _claim(self, site: UpstreamSite, fill: BlobFill) -> Claim | None:
        """Claim the download among worker processes sharing the cache. While another
        process holds it, wait; when it is done, serve its committed blob (None), or take the
        claim over if it died or failed. One upstream fetch however many workers ask."""
        while True:
            claim = site.cache.try_claim(fill.digest)
            size = await site.cache.blob_size(fill.digest)
            if size is not None:
                if claim is not None:
                    claim.release()
                path = site.cache.blob_path(fill.digest)
                assert path is not None
                await site.link(fill.repository, [fill.digest])
                fill.begin(path, size, "cache")
                fill.progress(size)
                fill.finish(path)
                return None
            if claim is not None:
                return claim
            await self.timing.sleep(CLAIM_POLL_SECONDS)

    async def _download(self, site: UpstreamSite, fill: BlobFill) -> BlobWriter | None:
        """Stream the blob into a writer, resuming mid-blob with Range on the same or the
        next mirror; None when the cache could not take it (the fill is then degraded)."""
        writer: BlobWriter | None = None
        exclude = site.suspects.get(fill.digest, frozenset())
        if all(m.name in exclude for m in site.client.mirrors(Capability.PULL)):
            exclude = frozenset()  # every mirror failed once: ask them all again
        resumes = 0
        try:
            while True:
                offset = writer.written if writer is not None else 0
                try:
                    async with site.client.open_blob(
                        fill.repository, fill.digest, offset, exclude=exclude
                    ) as stream:
                        fill.mirrors.add(stream.mirror)
                        if writer is None:
                            writer = self._writer(site, fill, stream.size)
                            if writer is None:
                                return None
                            fill.begin(writer.spool_path, stream.size, stream.mirror)
                        elif None not in (stream.size, fill.size) and stream.size != fill.size:
                            raise UpstreamError(
                                f"blob size changed from {fill.size} to {stream.size}",
                                mirror=stream.mirror,
                                is_temporary=False,
                            )
                        if not await self._spool(site, fill, writer, stream.chunks()):
                            writer = None
                            return None
                    return writer
                except UpstreamError as error:
                    if writer is None or not error.is_temporary or resumes >= MAX_RESUMES:
                        raise
                    resumes += 1
                    self.metrics.resumes.labels(site.settings.name).inc()
                    log.warning(
                        "blob %s: %s; resuming at byte %d (resume %d)",
                        fill.digest,
                        error,
                        writer.written,
                        resumes,
                    )
        except BaseException:
            if writer is not None:
                await writer.abort()
            raise

    async def _spool(
        self, site: UpstreamSite, fill: BlobFill, writer: BlobWriter, chunks: AsyncIterator[bytes]
    ) -> bool:
        """Write the chunks, telling readers as bytes land; False when the cache could not
        take them (the writer is aborted and the fill degraded)."""
        try:
            try:
                async for chunk in chunks:
                    await writer.write(chunk)  # readers hear of it through on_written
                    self.metrics.fetched(site.settings.name, len(chunk))
            finally:
                await writer.flush()  # keep what arrived, also before a resume
        except OSError as error:
            await writer.abort()
            self._degrade(site, fill, error)
            return False
        return True

    def _writer(self, site: UpstreamSite, fill: BlobFill, size: int | None) -> BlobWriter | None:
        try:
            return site.cache.blob_writer(fill.digest, size, on_written=fill.progress)
        except OSError as error:
            fill.size = size
            self._degrade(site, fill, error)
            return None

    def _degrade(self, site: UpstreamSite, fill: BlobFill, error: OSError) -> None:
        """The cache cannot take the blob (disk full): serve it without caching."""
        log.error(
            "cache of %s cannot store blob %s (%s): streaming it from upstream uncached",
            site.settings.name,
            fill.digest,
            error,
        )
        repository, digest = fill.repository, fill.digest

        async def direct(start: int, end: int | None) -> AsyncIterator[bytes]:
            async with site.client.open_blob(repository, digest, start) as stream:
                remaining = None if end is None else end - start
                async for chunk in stream.chunks():
                    if remaining is not None:
                        chunk = chunk[:remaining]
                        remaining -= len(chunk)
                    if chunk:
                        yield chunk
                    if remaining == 0:
                        return

        fill.degrade(direct, fill.size)

    def _on_corrupt(self, site: UpstreamSite, fill: BlobFill, error: DigestMismatch) -> None:
        """Never cache or serve the bad bytes; never ask those mirrors for this blob again
        (for a while), and start over from the next mirror so a retry finds it."""
        bad = site.suspects.get(fill.digest, frozenset()) | frozenset(fill.mirrors)
        site.suspects[fill.digest] = bad
        log.error(
            "blob %s from mirror %s failed verification (%s): not cached",
            fill.digest,
            ", ".join(sorted(fill.mirrors)),
            error,
        )
        for name in fill.mirrors:
            site.client.report_failure(name)
        fill.fail(error)
        del site.fills[fill.digest]
        if any(m.name not in bad for m in site.client.mirrors(Capability.PULL)):
            self.start(site, fill.repository, fill.digest)
