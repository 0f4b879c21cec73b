"""The blob download behind a fill: claim, fetch (resuming mid-blob), verify, commit.

One task per ``BlobFill`` (singleflight.py), owned here, never by a response. It claims the
download among worker processes (the cache's claim) and among replicas (the coordinator's
lease), streams the blob from the upstream's mirrors into the cache's writer, verifies and
commits it. A stream that breaks is resumed with ``Range`` at the byte reached, from the
next mirror in turn, for as long as the resumes make progress (``_Resumes``). Content that
fails verification marks its mirrors suspect for that digest and a fresh fill starts from
the next one (readers waiting for a verified blob follow it); a cache that cannot take the
bytes (a full disk) makes readers stream straight from upstream.

Replicas (coordination/): while another replica holds a blob's lease, this one follows
it. It streams the blob from that replica's peer endpoint (peer.py) into its own
writer, so its own clients get bytes as they land, and verifies and commits them as usual.
When that stream breaks and the lease has expired (the holder died), it takes the lease
over and resumes from upstream at its own byte offset; when the blob was committed to the
shared cache meanwhile, it reads the rest from there. A holder without an advertise_url
is waited for instead: its committed blob, or the lease's expiry.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from mirrorrouter.cache import BlobWriter, Claim, DigestMismatch
from mirrorrouter.config import Capability
from mirrorrouter.coordination import Coordinator, Holder, Lease, LocalCoordinator
from mirrorrouter.errors import RegistryError, UpstreamError
from mirrorrouter.metrics import Metrics
from mirrorrouter.pull.peers import LEASE_HEADER, peer_url
from mirrorrouter.pull.singleflight import BlobFill
from mirrorrouter.pull.site import UpstreamSite
from mirrorrouter.reference import Digest
from mirrorrouter.timing import Timing
from mirrorrouter.upstream.answers import blob_size_from_headers

log = logging.getLogger("mirrorrouter.fill")

CLAIM_POLL_SECONDS = 0.05  # how often a worker checks another worker's download
PEER_CONNECT_TIMEOUT = 2.0  # seconds; a replica that does not answer is not followed


@dataclass(slots=True)
class _Claimed:
    """A download this worker may make: the cache's claim, the cluster-wide lease (None
    when a peer or the committed copy sent the whole blob) and the bytes already spooled."""

    claim: Claim
    lease: Lease | None
    writer: BlobWriter | None


class _Resumes:
    """How long a blob whose stream broke is resumed: while resumes make progress.

    It gives up when a full round of mirrors made no progress (every mirror that may serve
    the blob, or one of them twice when the others' circuits are open, broke without adding
    a byte since a stream last did), or when no byte arrived for ``patience`` seconds (the
    upstream's retry_deadline). Never after a count: a long blob over a flaky line goes on
    as long as it moves."""

    def __init__(self, mirrors: frozenset[str], patience: float, timing: Timing) -> None:
        self.mirrors = mirrors  # those that may serve the blob
        self.patience = patience
        self.clock = timing.monotonic
        # When bytes last arrived, near enough: the download's start, or the break of a
        # stream that brought some.
        self.moved = self.clock()
        self.stalled: set[str] = set()  # mirrors that broke without progress since then

    def stop(self, mirror: str, *, progressed: bool) -> str | None:
        """Why to give up after ``mirror``'s stream broke, or None to resume."""
        now = self.clock()
        if progressed:
            self.moved, self.stalled = now, set()
        elif mirror in self.stalled:
            return "no mirror moved it on in a full round"
        else:
            self.stalled.add(mirror)
        if self.mirrors <= self.stalled:
            return "no mirror moved it on in a full round"
        if now - self.moved >= self.patience:
            return f"no progress for {now - self.moved:.0f}s (retry_deadline)"
        return None


class Filler:
    """Starts and runs blob downloads; the tasks live until done or until ``close``."""

    def __init__(
        self,
        metrics: Metrics,
        timing: Timing,
        *,
        coordinator: Coordinator | None = None,
        on_commit: Callable[[str, int], None] | None = None,
        peer_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.metrics = metrics
        self.timing = timing
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self.tasks: set[asyncio.Task[None]] = set()
        # Told (upstream, bytes) after each blob commit: the evictor keeps caches in bounds.
        self.on_commit = on_commit
        self._peer_transport = peer_transport
        self._peer_client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._peer_client is not None:
            await self._peer_client.aclose()

    def join_or_start(self, site: UpstreamSite, repository: str, digest: Digest) -> BlobFill:
        """The fill of the blob in progress, with one more follower; or, when there is
        none, a new fill whose download task starts now. Readers only read what this
        returns: a fill is changed by this object alone."""
        fill = site.fills.get(digest)
        if fill is None:
            return self._start(site, repository, digest)
        fill.followers += 1
        self.metrics.followers.labels(site.settings.name).inc()
        return fill

    def leased(self, site: UpstreamSite, digest: Digest, token: str) -> BlobFill | None:
        """The fill another replica may follow (the peer endpoint): this replica's download
        of the blob under the cluster-wide lease ``token``; None when there is none (done,
        failed, never started) or it is held under another token."""
        fill = site.fills.get(digest)
        if fill is None or fill.lease_token is None:
            return None
        if not hmac.compare_digest(fill.lease_token.encode(), token.encode()):
            return None
        return fill

    def _start(self, site: UpstreamSite, repository: str, digest: Digest) -> BlobFill:
        """Register a fill for the blob and start its download task."""
        fill = BlobFill(digest, repository)
        site.fills[digest] = fill
        task = asyncio.get_running_loop().create_task(self._run_fill(site, fill))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return fill

    async def _run_fill(self, site: UpstreamSite, fill: BlobFill) -> None:
        """Download, verify and commit one blob; readers follow ``fill`` meanwhile."""
        claimed = None
        try:
            claimed = await self._claim(site, fill)
            if claimed is None:
                return  # another worker or replica committed it meanwhile, or degraded
            writer = claimed.writer
            if claimed.lease is not None:  # ours to fetch, after what a peer already sent
                fill.lease_token = claimed.lease.token
                writer = await self._download(site, fill, writer)
                if writer is None:
                    return  # degraded: readers stream straight from upstream
            assert writer is not None
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
            if claimed is not None:
                claimed.claim.release()
                if claimed.lease is not None:
                    await claimed.lease.release()
            if site.fills.get(fill.digest) is fill:
                del site.fills[fill.digest]

    async def _claim(self, site: UpstreamSite, fill: BlobFill) -> _Claimed | None:
        """Claim the download among worker processes sharing the cache and among replicas.

        While another process of this cache holds it, wait. While another replica holds
        the lease, follow that replica's download (holding this cache's claim, so local
        workers wait for this one). When the blob is committed meanwhile, serve it (None);
        when the holder died or failed, take the lease over. One upstream fetch however
        many workers and replicas ask."""
        upstream = site.settings.name
        claim: Claim | None = None
        writer: BlobWriter | None = None
        followed = False  # a failing peer is logged once per fill
        try:
            while True:
                if claim is None:
                    claim = site.cache.try_claim(fill.digest)
                size = await site.cache.blob_size(fill.digest)
                if size is not None and writer is not None:
                    # Readers follow our spool file already: the rest from the committed copy.
                    assert claim is not None
                    rest = site.cache.read_blob(fill.digest, writer.written, size)
                    if not await self._spool(site, fill, writer, rest, fetched=False):
                        claim.release()
                        return None
                    return _Claimed(claim, None, writer)
                if size is not None:
                    if claim is not None:
                        claim.release()
                    await self._committed(site, fill, size)
                    return None
                if claim is not None:
                    lease = await self.coordinator.claim(upstream, fill.digest)
                    if lease is not None:
                        if await site.cache.blob_size(fill.digest) is not None:
                            # Its last holder committed it between our look and the claim,
                            # then let go: serve that (no second download).
                            await lease.release()
                            continue
                        return _Claimed(claim, lease, writer)
                    holder = await self.coordinator.holder(upstream, fill.digest)
                    own = self.coordinator.advertise_url
                    if holder is not None and holder.url is not None and holder.url != own:
                        before = writer.written if writer is not None else -1
                        writer, complete = await self._follow(
                            site, fill, holder, writer, quiet=followed
                        )
                        followed = True
                        if fill.direct is not None:  # the cache cannot take it: degraded
                            claim.release()
                            return None
                        if complete and writer is not None:
                            return _Claimed(claim, None, writer)
                        if writer is not None and writer.written > before:
                            continue  # it was moving: ask again at once
                await self.timing.sleep(CLAIM_POLL_SECONDS)
        except BaseException:
            if writer is not None:
                await writer.abort()
            if claim is not None:
                claim.release()
            raise

    async def _committed(self, site: UpstreamSite, fill: BlobFill, size: int) -> None:
        """Serve the blob another worker or replica committed meanwhile."""
        await site.link(fill.repository, [fill.digest])
        path = site.cache.blob_path(fill.digest)
        if path is None:  # a store without a local file (an object store): read from it
            digest = fill.digest

            def stored(start: int, end: int | None) -> AsyncIterator[bytes]:
                return site.cache.read_blob(digest, start, size if end is None else end)

            fill.degrade(stored, size)
            return
        fill.begin(path, size, "cache")
        fill.progress(size)
        fill.finish(path)

    def _peers(self) -> httpx.AsyncClient:
        if self._peer_client is None:
            # A peer that stays silent for a lock TTL is followed again, or taken over.
            wait = max(self.coordinator.lock_ttl, PEER_CONNECT_TIMEOUT)
            self._peer_client = httpx.AsyncClient(
                transport=self._peer_transport,
                timeout=httpx.Timeout(wait, connect=PEER_CONNECT_TIMEOUT),
                trust_env=False,  # replicas reach each other directly, never via a proxy
                headers={"User-Agent": "mirrorrouter-peer"},
            )
        return self._peer_client

    async def _follow(
        self,
        site: UpstreamSite,
        fill: BlobFill,
        holder: Holder,
        writer: BlobWriter | None,
        *,
        quiet: bool = False,
    ) -> tuple[BlobWriter | None, bool]:
        """Stream the blob from the replica holding its lease into this replica's writer,
        from the byte this one has, so its readers get bytes as they land.

        Returns the writer (None if nothing arrived, or degraded) and whether it holds the
        whole blob; a refused or broken stream returns what arrived: a failing peer never
        fails the pull (``quiet``: it was logged already)."""
        assert holder.url is not None
        offset = writer.written if writer is not None else 0
        headers = {LEASE_HEADER: holder.token}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = peer_url(holder.url, site.settings.name, fill.digest)
        try:
            async with self._peers().stream("GET", url, headers=headers) as response:
                if response.status_code != (206 if offset else 200):
                    return writer, False
                size = blob_size_from_headers(response, offset)
                if writer is None:
                    writer = self._writer(site, fill, size)
                    if writer is None:
                        return None, False
                    fill.begin(writer.spool_path, size, f"peer {holder.url}")
                elif None not in (size, fill.size) and size != fill.size:
                    return writer, False
                if not await self._spool(site, fill, writer, response.aiter_bytes(), fetched=False):
                    return None, False
        except Exception as error:
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "following the download of %s on %s: %s",
                fill.digest,
                holder.url,
                error or type(error).__name__,
            )
            return writer, False
        return writer, fill.size is None or writer.written == fill.size

    async def _download(
        self, site: UpstreamSite, fill: BlobFill, writer: BlobWriter | None = None
    ) -> BlobWriter | None:
        """Stream the blob into a writer (``writer``: what a peer already sent); None when
        the cache could not take it (the fill is then degraded).

        A stream that breaks is resumed with Range at the byte reached, from the next pull
        mirror in turn (the one that broke goes to the back; ``_Resumes`` says how long),
        as one stream: the writer hashes every byte, and a mirror announcing another size
        than the first is that mirror's failure."""
        exclude = site.suspects.get(fill.digest, frozenset())
        names = frozenset(m.name for m in site.client.mirrors(Capability.PULL))
        if names <= exclude:
            exclude = frozenset()  # every mirror failed once: ask them all again
        resumes = _Resumes(names - exclude, site.settings.policy.retry_deadline, self.timing)
        broke: str | None = None  # the mirror whose stream broke last
        try:
            while True:
                offset = writer.written if writer is not None else 0
                try:
                    async with site.client.open_blob(
                        fill.repository, fill.digest, offset, exclude=exclude, after=broke
                    ) as stream:
                        if writer is None:
                            writer = self._writer(site, fill, stream.size)
                            if writer is None:
                                return None
                            fill.begin(writer.spool_path, stream.size, stream.mirror)
                        elif None not in (stream.size, fill.size) and stream.size != fill.size:
                            site.client.report_failure(stream.mirror)
                            raise UpstreamError(
                                f"blob size is {stream.size}, not {fill.size} as announced",
                                mirror=stream.mirror,
                                is_temporary=True,  # another mirror may have it right
                            )
                        # A digest mismatch blames the mirrors that sent bytes or ended it.
                        try:
                            spooled = await self._spool(site, fill, writer, stream.chunks())
                        except UpstreamError:
                            if writer.written > offset:
                                fill.mirrors.add(stream.mirror)
                            raise
                        fill.mirrors.add(stream.mirror)
                        if not spooled:
                            return None
                    return writer
                except UpstreamError as error:
                    if writer is None or not error.is_temporary:
                        raise
                    progressed = writer.written > offset
                    stop = resumes.stop(error.mirror, progressed=progressed)
                    if stop is not None:
                        log.warning("blob %s: %s; %s: giving up", fill.digest, error, stop)
                        raise
                    broke = error.mirror
                    self.metrics.resumes.labels(site.settings.name, error.mirror).inc()
                    log.warning(
                        "blob %s: %s; resuming at byte %d from the next mirror",
                        fill.digest,
                        error,
                        writer.written,
                    )
        except BaseException:
            if writer is not None:
                await writer.abort()
            raise

    async def _spool(
        self,
        site: UpstreamSite,
        fill: BlobFill,
        writer: BlobWriter,
        chunks: AsyncIterator[bytes],
        *,
        fetched: bool = True,
    ) -> bool:
        """Write the chunks, telling readers as bytes land; False when the cache could not
        take them (the writer is aborted and the fill degraded). ``fetched``: the chunks
        come from upstream (counted), not from a peer or the cache."""
        try:
            try:
                async for chunk in chunks:
                    await writer.write(chunk)  # readers hear of it through on_written
                    if fetched:
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
        del site.fills[fill.digest]
        if any(m.name not in bad for m in site.client.mirrors(Capability.PULL)):
            for name in fill.mirrors:
                self.metrics.failovers.labels(site.settings.name, name).inc()
            # Readers waiting for the verified blob (small ones) follow the new fill.
            fill.replaced_by = self._start(site, fill.repository, fill.digest)
        fill.fail(error)
