"""Hosted repositories: images pushed to mirrorrouter and served from it.

A ``HostedStore`` is one hosted repository set (``[hosted."team"]``) on the same storage
layer as the caches (a ``CacheBackend``), which it uses as the only copy. Its verbs, push,
pull, delete and the chores, share three rules: content is linked into the repository it
was pushed to and read only from there; every byte stored counts against the set's
limits (limits.py: ``max_blob_size``, ``quota``; ``max_uploads`` for new sessions), a
blob's as it streams; every change a pull can see bumps the set's generation
(coordination/generation.py) once stored.

- **blobs** arrive monolithically (``POST ?digest=``) or in an upload session (uploads.py:
  a local file chunks are appended to, resumable, one request at a time). Either is
  written through the backend's blob writer, which verifies the digest and commits
  atomically (blobs.py), and then linked into the repository;
- **manifests** are stored byte-exact and accepted only when every blob or child manifest
  they reference is already in the repository (``MANIFEST_BLOB_UNKNOWN`` otherwise);
  a tag is an authoritative tag record (hosted tags never expire). A blob the repository
  lacks may be **copied in** from where the pusher may pull it (blobs.py, with the
  ``BlobFinder`` shadowing.py gives), under the same limits as an upload;
- **pulls** read manifests through the set's **memory with a generation** (memory.py: what
  a pull read is answered from, with no I/O, only while the generation has not moved),
  blobs, tags, and **referrers**, the manifests whose ``subject`` names a digest
  (referrers.py);
- **garbage collection** keeps every manifest linked into a repository, and everything
  those reference, transitively; it removes the rest once older than ``gc_grace`` (gc.py).
  The server runs it every ``gc_interval``, once across its workers and replicas
  (schedule.py's ``GcSchedule``), and ``mirrorrouter gc`` runs it on demand;
- **housekeeping** (``housekeep``, run by the server every ``sweep_interval``): upload
  sessions idle longer than ``upload_ttl`` are swept, and the quota's running total is
  counted afresh from the storage.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mirrorrouter.cache import (
    BlobFile,
    CacheBackend,
    StoredManifest,
    TagRecord,
    open_backend,
)
from mirrorrouter.cache.base import Removal
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.coordination import Coordinator
from mirrorrouter.coordination.generation import Generation
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.blobs import BlobFinder, copy_in, write_blob
from mirrorrouter.hosted.gc import GarbageCollector, GcReport
from mirrorrouter.hosted.housekeeping import sweep_interval
from mirrorrouter.hosted.limits import LimitExceeded, Meter, Usage, too_many_uploads
from mirrorrouter.hosted.memory import KnownManifest, ManifestMemory
from mirrorrouter.hosted.referrers import ReferrerIndex
from mirrorrouter.hosted.uploads import HeldSession, Swept, Upload, UploadSessions
from mirrorrouter.manifests import (
    INLINE_PARSE_BYTES,
    Descriptor,
    Index,
    Parsed,
    parse_strict,
)
from mirrorrouter.reference import Digest


@dataclass(frozen=True, slots=True)
class StoredBlob:
    size: int
    stream: Callable[[int, int | None], AsyncIterator[bytes]]
    file: BlobFile  # its local file, for zero-copy sending


@dataclass(frozen=True, slots=True)
class PushedManifest:
    digest: Digest
    subject: Digest | None  # the manifest's ``subject``: answered as ``OCI-Subject``


class HostedStore:
    """One hosted repository set: push, pull, delete, garbage collection."""

    def __init__(
        self,
        settings: HostedSettings,
        *,
        clock: Callable[[], float] = time.time,
        storage: CacheBackend | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        """``coordinator`` shares the set's generation with other replicas (None: this
        machine's counter only)."""
        self.settings = settings
        self.storage = storage or open_backend(settings.storage, clock=clock)
        self.sessions = UploadSessions(settings.storage.directory / "uploads", clock=clock)
        self.clock = clock
        self.usage = Usage(settings.name, settings.quota)
        self._referrer_index = ReferrerIndex(self.storage)
        self.generation = Generation(
            settings.name,
            settings.storage.directory,
            shared_storage=settings.storage.backend != "filesystem",
            coordinator=coordinator,
        )
        self._collector = GarbageCollector(
            settings,
            self.storage,
            self.sessions,
            self.generation,
            clock=clock,
            recount=self.count_usage,
        )
        self._memory = ManifestMemory(self.generation)

    async def open(self) -> None:
        await self.storage.open()
        await self.sessions.open()
        await asyncio.to_thread(self.generation.open)
        await self.count_usage()

    async def close(self) -> None:
        await self.storage.close()
        self.generation.close()

    # ------------------------------------------------------------------ pull

    async def manifest(
        self, repository: str, tag: str | None, digest: Digest | None
    ) -> StoredManifest:
        """The manifest a tag or digest names in the repository (MANIFEST_UNKNOWN when it has
        none); what was found, or not, is remembered under the generation (``known_manifest``)."""
        return await self._memory.read(
            repository,
            digest or tag or "",
            lambda: self._read_manifest(repository, tag, digest),
        )

    def known_manifest(self, repository: str, reference: Digest | str) -> KnownManifest | None:
        """What memory knows for certain of a tag or digest in the repository: its manifest,
        or that there is none (``manifest`` None); None when memory cannot say (never read,
        or the set changed since). The hot path of group pulls: no I/O (memory.py)."""
        return self._memory.recall(repository, reference)

    async def _read_manifest(
        self, repository: str, tag: str | None, digest: Digest | None
    ) -> StoredManifest:
        if digest is None:
            record = await self.storage.get_tag(repository, tag or "")
            if record is None:
                raise _manifest_unknown(repository, tag or "")
            digest = record.digest
        elif not await self.storage.is_linked(repository, digest):
            raise _manifest_unknown(repository, str(digest))
        stored = await self.storage.get_manifest(digest)
        if stored is None:
            raise _manifest_unknown(repository, str(digest))
        return stored

    async def blob(self, repository: str, digest: Digest) -> StoredBlob:
        size = await self.storage.blob_size(digest)
        if size is None or not await self.storage.is_linked(repository, digest):
            raise RegistryError(
                ErrorCode.BLOB_UNKNOWN, f"blob {digest} is not in repository {repository}"
            )
        storage = self.storage

        def stream(start: int, end: int | None) -> AsyncIterator[bytes]:
            return storage.read_blob(digest, start, size if end is None else end)

        return StoredBlob(size, stream, functools.partial(storage.open_blob, digest))

    async def tags(self, repository: str) -> list[str]:
        tags = await self.storage.list_tags(repository)
        if not tags and not await self.storage.linked(repository):
            raise RegistryError(ErrorCode.NAME_UNKNOWN, f"repository {repository} is not known")
        return tags

    async def repositories(self) -> list[str]:
        """Every repository holding tags or content (the operator commands list them)."""
        inventory = await self.storage.inventory()
        return sorted({*inventory.links, *(repository for repository, _ in inventory.tags)})

    async def referrers(
        self, repository: str, digest: Digest, artifact_type: str | None
    ) -> list[Descriptor]:
        """The repository's manifests whose subject is ``digest``, as an OCI index lists them
        (referrers.py)."""
        return await self._referrer_index.referrers(repository, digest, artifact_type)

    # ------------------------------------------------------------------ blob uploads

    async def put_blob(
        self,
        repository: str,
        digest: Digest,
        body: AsyncIterator[bytes],
        declared: int | None = None,
    ) -> int:
        """A monolithic upload: the whole blob in one request (``declared``: its
        ``Content-Length``), metered and verified as it is stored."""
        meter = Meter(self.settings, self.usage)
        meter.declare(declared)
        known = await self.storage.blob_size(digest) is not None
        try:
            size = await write_blob(self.storage, digest, meter.wrap(body))
        finally:
            meter.settle(kept=False)
        if not known:
            self.usage.add(size)
        await self.storage.link(repository, [digest])
        await self.generation.bump()
        return size

    async def mount(self, repository: str, digest: Digest, source: str) -> bool:
        """Link a blob of ``source`` (same hosted set) into ``repository``; False when the
        source does not have it (the client then uploads it)."""
        if await self.storage.blob_size(digest) is None:
            return False
        if not await self.storage.is_linked(source, digest):
            return False
        await self.storage.link(repository, [digest])
        await self.generation.bump()
        return True

    async def start_upload(self, repository: str) -> Upload:
        """A new upload session, unless ``max_uploads`` are open (429)."""
        open_sessions = await asyncio.to_thread(self.sessions.count)
        too_many_uploads(self.settings, open_sessions, sweep_interval(self.settings.upload_ttl))
        return await self.sessions.start(repository)

    async def upload(self, repository: str, upload_id: str) -> Upload:
        """The state of an upload session of ``repository``; BLOB_UPLOAD_UNKNOWN otherwise."""
        return await self.sessions.get(repository, upload_id)

    async def append(
        self,
        upload: Upload,
        body: AsyncIterator[bytes],
        start: int | None = None,
        declared: int | None = None,
    ) -> Upload:
        """Append a chunk (at ``start`` when the client says where; ``declared``: its
        ``Content-Length``). Refused at once while another request holds the session."""
        async with self.sessions.hold(upload) as session:
            return await self._append(session, body, start, declared)

    async def _append(
        self,
        session: HeldSession,
        body: AsyncIterator[bytes],
        start: int | None = None,
        declared: int | None = None,
    ) -> Upload:
        """Append under the set's limits: a chunk over one leaves nothing (uploads.py)."""
        meter = Meter(self.settings, self.usage, session.size)
        meter.declare(declared)
        kept = True  # also what arrived before a disconnect stays in the session
        try:
            return await session.append(meter.wrap(body), start)
        except LimitExceeded:
            kept = False
            raise
        finally:
            meter.settle(kept=kept)

    async def finish(
        self,
        upload: Upload,
        digest: Digest,
        body: AsyncIterator[bytes],
        declared: int | None = None,
    ) -> int:
        """Append the last chunk, then verify and commit the blob; the session ends either
        way (a digest mismatch leaves nothing behind)."""
        async with self.sessions.hold(upload) as session:
            upload = await self._append(session, body, None, declared)
            known = await self.storage.blob_size(digest) is not None
            try:
                size = await write_blob(self.storage, digest, session.read())
            finally:
                await session.remove()
                self.usage.remove(upload.size)
            if not known:
                self.usage.add(size)
        await self.storage.link(upload.repository, [digest])
        await self.generation.bump()
        return size

    async def cancel(self, upload: Upload) -> None:
        async with self.sessions.hold(upload) as session:
            await session.remove()
        self.usage.remove(session.upload.size)

    # ------------------------------------------------------------------ housekeeping

    async def housekeep(self) -> Swept:
        """Sweep upload sessions idle longer than ``upload_ttl``, and count the set's
        bytes afresh for its quota (the server runs this every ``sweep_interval``)."""
        horizon = self.clock() - self.settings.upload_ttl
        swept = await asyncio.to_thread(self.sessions.sweep, horizon)
        self.usage.remove(swept.bytes)
        await self.count_usage()
        return swept

    async def count_usage(self) -> None:
        """Count the bytes the set holds (stored blobs and manifests, open uploads) for its
        quota; nothing to count without one."""
        if self.settings.quota is None:
            return
        inventory = await self.storage.inventory()
        stored = sum(o.size for o in inventory.blobs.values())
        stored += sum(o.size for o in inventory.manifests.values())
        self.usage.reset(stored + await asyncio.to_thread(self.sessions.held_bytes))

    # ------------------------------------------------------------------ manifests

    async def put_manifest(
        self,
        repository: str,
        tag: str | None,
        digest: Digest | None,
        content_type: str,
        data: bytes,
        copy_from: BlobFinder | None = None,
    ) -> PushedManifest:
        """Store a pushed manifest, byte-exact, once it follows the schema of its media type
        and everything it references is here; ``copy_from`` may supply the blobs (config,
        layers) the repository lacks."""
        if len(data) > INLINE_PARSE_BYTES:
            parsed = await asyncio.to_thread(parse_strict, data, content_type)
        else:
            parsed = parse_strict(data, content_type)
        media_type = parsed.media_type
        actual = Digest.of(data, digest.algorithm if digest else "sha256")
        if digest is not None and actual != digest:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID, f"the manifest hashes to {actual}, not {digest}"
            )
        await self._check_references(repository, parsed, copy_from)
        new = await self.storage.peek_manifest(actual) is None
        if new:
            self.usage.check(len(data))  # the set's quota (limits.py)
        await self.storage.put_manifest(StoredManifest(actual, media_type, data))
        if new:
            self.usage.add(len(data))
        try:
            await self.storage.link(repository, [actual])
            if tag is not None:
                record = TagRecord(actual, media_type, len(data), self.clock())
                await self.storage.put_tag(repository, tag, record)
        finally:
            await self.generation.bump()  # also when the tag failed: the link is there
        subject = parsed.subject.digest if parsed.subject is not None else None
        return PushedManifest(actual, subject)

    async def _check_references(
        self, repository: str, parsed: Parsed, copy_from: BlobFinder | None
    ) -> None:
        is_index = isinstance(parsed, Index)
        missing: dict[Digest, Descriptor] = {}
        for descriptor in parsed.descriptors:
            if descriptor.external:
                continue  # a foreign layer: clients fetch it from its URLs
            target = descriptor.digest
            if is_index:
                present = await self.storage.peek_manifest(target) is not None
            else:
                present = await self.storage.blob_size(target) is not None
            if not present or not await self.storage.is_linked(repository, target):
                missing.setdefault(target, descriptor)
        if missing and copy_from is not None and not is_index:
            await copy_in(
                self.settings,
                self.storage,
                self.usage,
                repository,
                list(missing.values()),
                copy_from,
            )
            missing = {d: m for d, m in missing.items() if not await self._holds(repository, d)}
        for target in missing:
            what = "manifests" if is_index else "config or layers"
            raise RegistryError(
                ErrorCode.MANIFEST_BLOB_UNKNOWN,
                f"the manifest references {target} ({what}), which is not in {repository}: "
                "push it first",
                detail={"digest": str(target)},
            )

    async def _holds(self, repository: str, digest: Digest) -> bool:
        return await self.storage.blob_size(digest) is not None and (
            await self.storage.is_linked(repository, digest)
        )

    async def delete(self, repository: str, tag: str | None, digest: Digest | None) -> None:
        """Delete a tag, or a manifest (and the repository's tags naming it); garbage
        collection frees the content later."""
        if digest is None:
            if not await self.storage.delete_tag(repository, tag or ""):
                raise _manifest_unknown(repository, tag or "")
            await self.generation.bump()
            return
        if not await self.storage.is_linked(repository, digest) or (
            await self.storage.peek_manifest(digest) is None
        ):
            raise _manifest_unknown(repository, str(digest))
        try:
            for name in await self.storage.list_tags(repository):
                record = await self.storage.get_tag(repository, name)
                if record is not None and record.digest == digest:
                    await self.storage.delete_tag(repository, name)
            await self.storage.remove(Removal(frozenset(), links=((repository, digest),)))
        finally:
            await self.generation.bump()  # also when it failed half-way: a tag may be gone

    # ------------------------------------------------------------------ garbage collection

    async def collect_garbage(self, *, dry_run: bool = False) -> GcReport:
        """Remove blobs and manifests no linked manifest reaches, older than ``gc_grace``,
        and upload sessions idle longer than ``upload_ttl`` that no request holds (gc.py)."""
        return await self._collector.collect(dry_run=dry_run)


def _manifest_unknown(repository: str, reference: str) -> RegistryError:
    return RegistryError(
        ErrorCode.MANIFEST_UNKNOWN, f"manifest {reference} is not in repository {repository}"
    )
