"""The object-storage cache: content, tags and links in an S3-compatible bucket
(``ObjectStoreCache``), composed of the bucket and its key layout (bucket.py), the ranged
reader (reads.py), the local writers and warm copies (writers.py), the access markers
(access.py) and the per-process state (shared.py).

The bucket's layout is ``Bucket``'s (bucket.py): blobs, manifests, tag records, links and
access markers under ``<prefix>/<key>``; and on the local disk (``settings.directory``)::

    tmp/<owner>/        spool files of writes in progress, held by tmp/<owner>/.lock
    copies/<owner>/     recently committed blobs of the same owner (bounded, see below)

**Atomicity.** A blob is streamed into a local spool file first (followers read it while it
grows, exactly as with the filesystem backend, see spool.py), verified, and then uploaded:
one PUT, or a multipart upload for a large file, and S3 makes an object visible only when
its PUT or CompleteMultipartUpload succeeded, so a reader sees the whole blob or nothing.
A failed multipart upload is aborted by obstore; one interrupted by a killed process stays
invisible and is best removed by the bucket's AbortIncompleteMultipartUpload lifecycle rule.
Manifests, tag records and links are single PUTs, atomic the same way.

**Local copies.** ``commit`` returns a local file with the blob (what the followers of a fill
switch to): the spool file, moved to ``copies/<owner>/``. The copies are an LRU bounded by
total bytes (the newest always stays); an evicted copy is unlinked, which readers that have
it open do not notice (Linux keeps the inode). ``blob_path`` returns a copy while there is
one and ``read_blob`` reads it instead of the bucket (``open_blob`` hands it to zero-copy
sending); everything else is read from the bucket, in ranged GETs of ``READ_PART`` bytes,
``READ_AHEAD`` of them in flight and reassembled in order (a single GET at a time reads at
about half the store's own speed), so no single request lives as long as a slow client and
a reader holds a bounded number of parts. A whole read from the bucket is also teed into a
spool file and, once it hashes to its digest, kept as a local copy like a commit's: the
next client of this replica reads it from disk.

**Access times** are empty marker objects, one per digest, written and read by access.py;
``touch`` records in memory only, and ``flush_access`` persists what was recorded by any
instance over the same storage in this process.

**Per process**, in memory: claims (``try_claim``; the claim across replicas is the
coordinator's business, not this backend's), what is in use (readers, writers, holds), and
accesses not yet persisted, shared by every instance over the same endpoint, bucket and root
in this process. ``remove`` refuses digests in use here; it cannot see readers of another
process, which at worst fail mid-read like readers of a removed object anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import obstore

from mirrorrouter.cache.base import (
    Inventory,
    Removal,
    Removed,
    StoredManifest,
    StoredObject,
    TagRecord,
    decode_manifest,
    encode_manifest,
    encode_tag_record,
    parse_tag_record,
)
from mirrorrouter.cache.copies import LocalCopies
from mirrorrouter.cache.objectstore.access import record_access
from mirrorrouter.cache.objectstore.bucket import (
    Bucket,
    gather,
    parse_digest,
    translate_store_errors,
)
from mirrorrouter.cache.objectstore.reads import READ_PART, read_file, read_ranges
from mirrorrouter.cache.objectstore.shared import SHARED, MemoryClaim, SharedBucketState
from mirrorrouter.cache.objectstore.writers import CopyWriter, ObjectBlobWriter, WarmCopy
from mirrorrouter.cache.spool import SpoolArea
from mirrorrouter.config import CacheSettings
from mirrorrouter.reference import Digest

if TYPE_CHECKING:
    from obstore import ObjectMeta

log = logging.getLogger("mirrorrouter.cache.s3")

UPLOAD_PART = 8 * 1024 * 1024  # multipart part size; a smaller blob is one PUT
UPLOAD_CONCURRENCY = 4  # parts of one upload in flight at once
LOCAL_COPY_BYTES = 1024 * 1024 * 1024  # local copies of committed blobs kept, in total


@translate_store_errors
class ObjectStoreCache:
    """``CacheBackend`` over an S3-compatible bucket (see the module docstring)."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.time,
        local_copy_bytes: int = LOCAL_COPY_BYTES,
    ) -> None:
        store_settings = settings.object_store
        if store_settings is None:
            raise ValueError("the s3 cache backend needs object_store settings")
        self._settings = store_settings
        self._clock = clock
        self._bucket = Bucket(store_settings, settings.key)
        self.root = self._bucket.root
        self.where = self._bucket.where
        self._store = self._bucket.store
        self._shared = SHARED.setdefault(self._bucket.identity, SharedBucketState())
        self._spool = SpoolArea(settings.directory, companions=("copies",))
        self._copies = LocalCopies(self._spool.companion("copies"), local_copy_bytes, self.in_use)
        self._background: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Prepare the local spool area, sweeping the spool files of owners that are gone."""
        await asyncio.to_thread(self._spool.open)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._spool.close()

    # ------------------------------------------------------------------ blobs

    async def blob_size(self, digest: Digest) -> int | None:
        return await self._bucket.size(self._bucket.blob_key(digest))

    def blob_path(self, digest: Digest) -> Path | None:
        """The local copy of a blob committed here recently, if it is still kept."""
        return self._copies.get(digest)

    async def read_blob(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        async with self._reading(digest):
            local = self._copies.open(digest)
            if local is not None:
                try:
                    async for chunk in read_file(local, start, end):
                        yield chunk
                finally:
                    os.close(local)
            else:
                parts = read_ranges(self._store, self._bucket.blob_key(digest), start, end)
                copy = self._warming(digest, start, end)
                async with contextlib.aclosing(parts):  # its read-ahead ends with this reader
                    try:
                        async for chunk in parts:
                            if copy is not None:
                                await copy.write(chunk)
                            yield chunk
                    finally:
                        if copy is not None:
                            await copy.finish()

    def _warming(self, digest: Digest, start: int, end: int) -> WarmCopy | None:
        """A local copy made of a whole read from the bucket, for the next client: for a
        read from the first byte (kept only if it hashes to the digest, so a range is
        dropped at its end), one per blob at a time in this process; not for reads
        within one part (a probe of the first byte; a config blob is one GET anyway)."""
        if start != 0 or end < READ_PART or digest in self._shared.warming:
            return None
        writer = CopyWriter(self._shared, self._spool.temp_path(), digest, end, self._copies)
        return WarmCopy(writer, end, self._shared.warming, self._in_background)

    @contextlib.asynccontextmanager
    async def open_blob(self, digest: Digest) -> AsyncIterator[int | None]:
        """The local copy, when this replica keeps one; None otherwise (no read counted)."""
        local = self._copies.open(digest)
        if local is None:
            yield None
            return
        try:
            async with self._reading(digest):
                yield local
        finally:
            os.close(local)

    @contextlib.asynccontextmanager
    async def _reading(self, digest: Digest) -> AsyncIterator[None]:
        """A read of a blob: in use while it lasts, its access persisted in the background
        and awaited at the end of a read that completed."""
        self._shared.acquire(digest)
        access = self._access_started(digest)
        completed = False
        try:
            yield
            completed = True
        finally:
            self._shared.release(digest)
            if access is not None and completed:
                with contextlib.suppress(Exception):
                    await access  # persisted before the read is over (tests rely on it)

    def blob_writer(
        self,
        digest: Digest,
        expected_size: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> ObjectBlobWriter:
        return ObjectBlobWriter(
            self._shared,
            self._spool.temp_path(),
            digest,
            expected_size,
            on_written,
            self._upload_and_keep,
            self.where,
        )

    async def _upload_and_keep(self, spool: Path, digest: Digest, size: int) -> Path:
        """Publish a verified spool file (the commit of a ``blob_writer``): upload it, date
        it, keep it as a local copy."""
        # Content-addressed: an object already under this digest's key with this size was
        # verified when it was committed (by another replica that fetched the same blob, or
        # a follower of it): the same bytes, so the upload is skipped.
        if await self._bucket.size(self._bucket.blob_key(digest)) != size:
            await self._upload(spool, digest)
        await self._record_access(digest, self._clock(), stored=True)
        # Moved on the event loop thread (no await from here on), so that readers which look
        # up the spool path and the returned path never see neither.
        return self._copies.keep(spool, digest, size)

    async def _upload(self, spool: Path, digest: Digest) -> None:
        """Put a verified spool file as the blob: one PUT, or multipart when it is large.

        The upload is shielded from the caller's cancellation: a multipart upload whose
        future is dropped is never completed nor aborted (it would linger invisibly in the
        bucket), so a cancelled commit lets it finish (the content is verified; obstore
        holds the file open) and ``close()`` waits for it."""

        async def put() -> None:
            await obstore.put_async(
                self._store,
                self._bucket.blob_key(digest),
                spool,
                chunk_size=UPLOAD_PART,
                max_concurrency=UPLOAD_CONCURRENCY,
            )

        await asyncio.shield(self._in_background(put()))

    def _in_background(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        """A task that ``close()`` waits for."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Raised to whoever still awaits it; logged in case nobody does any more.
            log.debug("background request failed: %s", task.exception())

    def try_claim(self, digest: Digest) -> MemoryClaim | None:
        """Claim the download of ``digest`` within this process (see the module docstring)."""
        claims = self._shared.claims
        if digest in claims:
            return None
        claims.add(digest)
        return MemoryClaim(claims, digest)

    async def presigned_url(self, digest: Digest, expires: float) -> str | None:
        """A URL that serves the blob to whoever has it, for ``expires`` seconds; None unless
        the settings ask for redirects."""
        if not self._settings.redirect:
            return None
        return await obstore.sign_async(
            self._store, "GET", self._bucket.blob_key(digest), timedelta(seconds=expires)
        )

    # ------------------------------------------------------------------ manifests

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        access = self._access_started(digest)
        stored = await self.peek_manifest(digest)
        if access is not None:
            with contextlib.suppress(Exception):
                await access
        return stored

    async def peek_manifest(self, digest: Digest) -> StoredManifest | None:
        raw = await self._bucket.get(self._bucket.manifest_key(digest))
        return None if raw is None else decode_manifest(digest, raw)

    async def put_manifest(self, manifest: StoredManifest) -> None:
        raw = encode_manifest(manifest)
        await obstore.put_async(self._store, self._bucket.manifest_key(manifest.digest), raw)
        await self._record_access(manifest.digest, self._clock(), stored=True)

    # ------------------------------------------------------------------ tags and links

    async def get_tag(self, repository: str, tag: str) -> TagRecord | None:
        raw = await self._bucket.get(self._bucket.tag_key(repository, tag))
        return None if raw is None else parse_tag_record(raw)

    async def put_tag(self, repository: str, tag: str, record: TagRecord) -> None:
        await obstore.put_async(
            self._store, self._bucket.tag_key(repository, tag), encode_tag_record(record)
        )

    async def list_tags(self, repository: str) -> list[str]:
        prefix = self._bucket.key("repositories", repository, "_tags") + "/"
        listed = await obstore.list_with_delimiter_async(self._store, prefix)
        # Only the objects under the prefix: SeaweedFS lists an emptied directory as an
        # object named like the prefix itself (".../_tags"), which is no tag.
        paths = (meta["path"] for meta in listed["objects"])
        return sorted(
            path[len(prefix) :]
            for path in paths
            if path.startswith(prefix) and len(path) > len(prefix)
        )

    async def delete_tag(self, repository: str, tag: str) -> bool:
        key = self._bucket.tag_key(repository, tag)
        if await self._bucket.size(key) is None:
            return False
        await obstore.delete_async(self._store, key)
        return True

    async def is_linked(self, repository: str, digest: Digest) -> bool:
        return await self._bucket.size(self._bucket.link_key(repository, digest)) is not None

    async def link(self, repository: str, digests: list[Digest]) -> None:
        keys = {self._bucket.link_key(repository, digest) for digest in digests}
        await gather(obstore.put_async(self._store, key, b"") for key in keys)

    async def linked(self, repository: str) -> frozenset[Digest]:
        prefix = self._bucket.key("repositories", repository, "_links")
        found = set()
        for meta in await self._bucket.listing(prefix):
            digest = parse_digest(meta["path"][len(prefix) + 1 :].split("/"))
            if digest is not None:
                found.add(digest)
        return frozenset(found)

    # ------------------------------------------------------------------ access

    def touch(self, digest: Digest) -> None:
        """Record an access in memory; ``flush_access`` (or a later read) persists it."""
        self._shared.touch(digest, self._clock())

    async def flush_access(self) -> None:
        batch = self._shared.take_pending()
        await gather(self._record_access(digest, when) for digest, when in batch)

    def _access_started(self, digest: Digest) -> asyncio.Task[None] | None:
        """A read from storage: persist its access (in the background of the read), unless
        one was persisted within the resolution."""
        now = self._clock()
        if self._shared.persisted_recently(digest, now):
            return None
        return self._in_background(self._record_access(digest, now))

    async def _record_access(self, digest: Digest, when: float, *, stored: bool = False) -> None:
        await record_access(self._bucket, self._shared, digest, when, stored=stored)

    # ------------------------------------------------------------------ in use

    def hold(self, digest: Digest) -> AbstractContextManager[None]:
        return self._shared.hold(digest)

    def in_use(self, digest: Digest) -> bool:
        """Read, written, held or claimed in this process."""
        return bool(self._shared.in_use.get(digest)) or digest in self._shared.claims

    # ------------------------------------------------------------------ inventory, removal

    async def inventory(self) -> Inventory:
        content: dict[str, dict[Digest, ObjectMeta]] = {"blobs": {}, "manifests": {}}
        accessed: dict[Digest, float] = {}
        tag_keys: dict[tuple[str, str], str] = {}
        links: dict[str, set[Digest]] = {}
        start = len(self.root) + 1 if self.root else 0
        for meta in await self._bucket.listing(self.root):
            parts = meta["path"][start:].split("/")
            if parts[0] in content and len(parts) == 3:
                digest = parse_digest(parts[1:])
                if digest is not None:
                    content[parts[0]][digest] = meta
            elif parts[0] == "access" and len(parts) == 4:
                digest = parse_digest(parts[1:3])
                with contextlib.suppress(ValueError):
                    when = float(parts[3])
                    if digest is not None and when > accessed.get(digest, when - 1):
                        accessed[digest] = when
            elif parts[0] == "repositories" and len(parts) > 3:
                rest = "/".join(parts[1:])
                repository, _, tag = rest.rpartition("/_tags/")
                if repository and tag and "/" not in tag:
                    tag_keys[(repository, tag)] = meta["path"]
                    continue
                repository, _, linked = rest.rpartition("/_links/")
                digest = parse_digest(linked.split("/"))
                if repository and digest is not None:
                    links.setdefault(repository, set()).add(digest)
        raws = await gather(self._bucket.get(key) for key in tag_keys.values())
        tags = {}
        for name, raw in zip(tag_keys, raws, strict=True):
            record = None if raw is None else parse_tag_record(raw)
            if record is not None:
                tags[name] = record

        def objects(found: dict[Digest, ObjectMeta]) -> dict[Digest, StoredObject]:
            return {
                digest: StoredObject(
                    digest,
                    meta["size"],
                    accessed.get(digest, meta["last_modified"].timestamp()),
                )
                for digest, meta in found.items()
            }

        return Inventory(
            blobs=objects(content["blobs"]),
            manifests=objects(content["manifests"]),
            tags=tags,
            links={repository: frozenset(digests) for repository, digests in links.items()},
            in_flight=await asyncio.to_thread(self._spool.in_flight, self._shared.writers),
        )

    async def remove(self, removal: Removal) -> Removed:
        busy = frozenset(d for d in removal.digests if self.in_use(d))
        if busy:
            return Removed(frozenset(), 0, busy)
        digests = sorted(removal.digests, key=str)
        bucket = self._bucket
        keys = [key for d in digests for key in (bucket.blob_key(d), bucket.manifest_key(d))]
        sizes = await gather(bucket.size(key) for key in keys)
        removed: set[Digest] = set()
        freed = 0
        for index, size in enumerate(sizes):
            if size is not None:
                removed.add(digests[index // 2])
                freed += size
        markers = await gather(bucket.listing(bucket.access_prefix(d)) for d in digests)
        doomed = [key for key, size in zip(keys, sizes, strict=True) if size is not None]
        doomed += [meta["path"] for listed in markers for meta in listed]
        for digest in digests:
            self._copies.drop(digest)
            self._shared.persisted.pop(digest, None)
        tag_keys = [bucket.tag_key(repository, tag) for repository, tag in removal.tags]
        for key, raw in zip(tag_keys, await gather(bucket.get(k) for k in tag_keys), strict=True):
            if raw is None:
                continue
            record = parse_tag_record(raw)
            # Only while it still names what went: it may have moved on meanwhile.
            if record is None or record.digest in removal.digests:
                doomed.append(key)
        doomed += [bucket.link_key(repository, digest) for repository, digest in removal.links]
        if doomed:
            await obstore.delete_async(self._store, doomed)
        return Removed(frozenset(removed), freed)
