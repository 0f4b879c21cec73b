"""Hosted repositories: images pushed to mirrorrouter and served from it.

A ``HostedStore`` is one hosted repository set (``[hosted."team"]``) on the same storage
layer as the caches (a ``CacheBackend``), which it uses as the only copy:

- **blobs** arrive monolithically (``POST ?digest=``) or in an upload session (uploads.py:
  a local file chunks are appended to, resumable, one request at a time). Finishing one
  streams the file through the backend's blob writer, which verifies the digest and commits
  atomically; a blob is then linked into the repository it was pushed to. Every body is
  metered as it streams against the set's limits (limits.py: ``max_blob_size``, ``quota``;
  ``max_uploads`` for new sessions);
- **manifests** are stored byte-exact and accepted only when every blob or child manifest
  they reference is already in the repository (``MANIFEST_BLOB_UNKNOWN`` otherwise);
  a tag is an authoritative tag record (hosted tags never expire);
- **referrers** are the repository's manifests whose ``subject`` names a digest;
- **garbage collection** keeps every manifest linked into a repository, and everything
  those reference, transitively; it removes the rest once older than ``gc_grace`` (so a
  blob pushed just before its manifest is never collected in between);
- **housekeeping** (``housekeep``, run by the server every ``sweep_interval``): upload
  sessions idle longer than ``upload_ttl`` are swept, and the quota's running total is
  counted afresh from the storage.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from mirrorrouter.cache import CacheBackend, DigestMismatch, StoredManifest, TagRecord, open_backend
from mirrorrouter.cache.base import Removal
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.housekeeping import sweep_interval
from mirrorrouter.limits import LimitExceeded, Meter, Usage, too_many_uploads
from mirrorrouter.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from mirrorrouter.pullthrough import referenced_digests
from mirrorrouter.reference import Digest, ReferenceError
from mirrorrouter.uploads import HeldSession, Swept, Upload, UploadSessions

PUSHABLE_MEDIA_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})


@dataclass(frozen=True, slots=True)
class StoredBlob:
    size: int
    stream: Callable[[int, int | None], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class PushedManifest:
    digest: Digest
    subject: Digest | None  # the manifest's ``subject``: answered as ``OCI-Subject``


@dataclass(frozen=True, slots=True)
class GcReport:
    blobs: int  # removed
    manifests: int
    freed: int  # bytes
    uploads: int  # abandoned upload sessions removed
    kept: int  # blobs and manifests still referenced (or too young)


@dataclass(frozen=True, slots=True)
class _Summary:
    """What a manifest is, as a referrers descriptor needs it."""

    media_type: str
    size: int
    artifact_type: str | None
    subject: Digest | None
    annotations: dict[str, Any] | None


class HostedStore:
    """One hosted repository set: push, pull, delete, garbage collection."""

    def __init__(
        self,
        settings: HostedSettings,
        *,
        clock: Callable[[], float] = time.time,
        storage: CacheBackend | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage or open_backend(settings.storage, clock=clock)
        self.sessions = UploadSessions(settings.storage.directory / "uploads", clock=clock)
        self.clock = clock
        self.usage = Usage(settings.name, settings.quota)
        self._summaries: LRUCache[Digest, _Summary | None] = LRUCache(maxsize=10_000)

    async def open(self) -> None:
        await self.storage.open()
        await self.sessions.open()
        await self.count_usage()

    async def close(self) -> None:
        await self.storage.close()

    # ------------------------------------------------------------------ pull

    async def manifest(
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

        return StoredBlob(size, stream)

    async def tags(self, repository: str) -> list[str]:
        tags = await self.storage.list_tags(repository)
        if not tags and not await self.storage.linked(repository):
            raise RegistryError(ErrorCode.NAME_UNKNOWN, f"repository {repository} is not known")
        return tags

    async def referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> bytes:
        """The OCI index of the repository's manifests whose subject is ``digest``."""
        descriptors = []
        for candidate in sorted(await self.storage.linked(repository), key=str):
            summary = await self._summary(candidate)
            if summary is None or summary.subject != digest:
                continue
            if artifact_type and summary.artifact_type != artifact_type:
                continue
            descriptor: dict[str, Any] = {
                "mediaType": summary.media_type,
                "digest": str(candidate),
                "size": summary.size,
            }
            if summary.artifact_type:
                descriptor["artifactType"] = summary.artifact_type
            if summary.annotations:
                descriptor["annotations"] = summary.annotations
            descriptors.append(descriptor)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        return json.dumps(index).encode()

    async def _summary(self, digest: Digest) -> _Summary | None:
        if digest in self._summaries:
            return self._summaries[digest]
        stored = await self.storage.peek_manifest(digest)
        summary = None
        if stored is not None:
            document = _json_object(stored.data)
            config = document.get("config")
            artifact_type = document.get("artifactType") or (
                config.get("mediaType") if isinstance(config, dict) else None
            )
            summary = _Summary(
                stored.media_type,
                len(stored.data),
                artifact_type if isinstance(artifact_type, str) else None,
                _descriptor_digest(document.get("subject")),
                document.get("annotations")
                if isinstance(document.get("annotations"), dict)
                else None,
            )
        self._summaries[digest] = summary
        return summary

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
            size = await self._store(digest, meter.wrap(body))
        finally:
            meter.settle(kept=False)
        if not known:
            self.usage.add(size)
        await self.storage.link(repository, [digest])
        return size

    async def mount(self, repository: str, digest: Digest, source: str) -> bool:
        """Link a blob of ``source`` (same hosted set) into ``repository``; False when the
        source does not have it (the client then uploads it)."""
        if await self.storage.blob_size(digest) is None:
            return False
        if not await self.storage.is_linked(source, digest):
            return False
        await self.storage.link(repository, [digest])
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
                size = await self._store(digest, session.read())
            finally:
                await session.remove()
                self.usage.remove(upload.size)
            if not known:
                self.usage.add(size)
        await self.storage.link(upload.repository, [digest])
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

    async def _store(self, digest: Digest, body: AsyncIterator[bytes]) -> int:
        writer = self.storage.blob_writer(digest)
        try:
            async for chunk in body:
                await writer.write(chunk)
            await writer.flush()
            size = writer.written
            await writer.commit()
        except DigestMismatch as exc:
            raise RegistryError(ErrorCode.DIGEST_INVALID, str(exc)) from exc
        except BaseException:
            await writer.abort()
            raise
        return size

    # ------------------------------------------------------------------ manifests

    async def put_manifest(
        self,
        repository: str,
        tag: str | None,
        digest: Digest | None,
        content_type: str,
        data: bytes,
    ) -> PushedManifest:
        """Store a pushed manifest, byte-exact, once everything it references is here."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise RegistryError(
                ErrorCode.SIZE_INVALID,
                f"manifest of {len(data)} bytes is over the {MAX_MANIFEST_BYTES} byte limit",
                status=413,
            )
        document = _json_object(data)
        if not document:
            raise RegistryError(ErrorCode.MANIFEST_INVALID, "the manifest is not a JSON object")
        media_type = _media_type(document, content_type)
        if document.get("schemaVersion") != 2:
            raise RegistryError(ErrorCode.MANIFEST_INVALID, "schemaVersion must be 2")
        actual = Digest.of(data, digest.algorithm if digest else "sha256")
        if digest is not None and actual != digest:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID, f"the manifest hashes to {actual}, not {digest}"
            )
        await self._check_references(repository, media_type, document)
        new = await self.storage.peek_manifest(actual) is None
        if new:
            self.usage.check(len(data))  # the set's quota (limits.py)
        await self.storage.put_manifest(StoredManifest(actual, media_type, data))
        if new:
            self.usage.add(len(data))
        await self.storage.link(repository, [actual])
        if tag is not None:
            record = TagRecord(actual, media_type, len(data), self.clock())
            await self.storage.put_tag(repository, tag, record)
        return PushedManifest(actual, _descriptor_digest(document.get("subject")))

    async def _check_references(
        self, repository: str, media_type: str, document: dict[str, Any]
    ) -> None:
        if media_type in INDEX_MEDIA_TYPES:
            wanted = [("manifests", d) for d in _list(document.get("manifests"))]
        else:
            config = document.get("config")
            wanted = [("config", config), *(("layers", d) for d in _list(document.get("layers")))]
        for field, descriptor in wanted:
            if isinstance(descriptor, dict) and descriptor.get("urls"):
                continue  # a foreign layer: clients fetch it from its URLs
            target = _descriptor_digest(descriptor)
            if target is None:
                raise RegistryError(
                    ErrorCode.MANIFEST_INVALID, f"a descriptor in {field} has no valid digest"
                )
            if field == "manifests":
                present = await self.storage.peek_manifest(target) is not None
            else:
                present = await self.storage.blob_size(target) is not None
            if not present or not await self.storage.is_linked(repository, target):
                raise RegistryError(
                    ErrorCode.MANIFEST_BLOB_UNKNOWN,
                    f"the manifest references {target} ({field}), which is not in {repository}: "
                    "push it first",
                    detail={"digest": str(target)},
                )

    async def delete(self, repository: str, tag: str | None, digest: Digest | None) -> None:
        """Delete a tag, or a manifest (and the repository's tags naming it); garbage
        collection frees the content later."""
        if digest is None:
            if not await self.storage.delete_tag(repository, tag or ""):
                raise _manifest_unknown(repository, tag or "")
            return
        if not await self.storage.is_linked(repository, digest) or (
            await self.storage.peek_manifest(digest) is None
        ):
            raise _manifest_unknown(repository, str(digest))
        for name in await self.storage.list_tags(repository):
            record = await self.storage.get_tag(repository, name)
            if record is not None and record.digest == digest:
                await self.storage.delete_tag(repository, name)
        await self.storage.remove(Removal(frozenset(), links=((repository, digest),)))

    # ------------------------------------------------------------------ garbage collection

    async def collect_garbage(self, *, dry_run: bool = False) -> GcReport:
        """Remove blobs and manifests no linked manifest reaches, older than ``gc_grace``,
        and upload sessions idle longer than ``upload_ttl`` that no request holds."""
        inventory = await self.storage.inventory()
        manifests = inventory.manifests
        live: set[Digest] = set()
        pending = [d for linked in inventory.links.values() for d in linked if d in manifests]
        while pending:
            digest = pending.pop()
            if digest in live:
                continue
            live.add(digest)
            stored = await self.storage.peek_manifest(digest)
            if stored is None:
                continue
            for child in referenced_digests(stored.data):
                if child in manifests:
                    pending.append(child)
                else:
                    live.add(child)
        horizon = self.clock() - self.settings.gc_grace
        dead = {
            digest: obj
            for table in (inventory.blobs, manifests)
            for digest, obj in table.items()
            if digest not in live and obj.accessed < horizon
        }
        kept = len(inventory.blobs) + len(manifests) - len(dead)
        idle = self.clock() - self.settings.upload_ttl
        swept = await asyncio.to_thread(self.sessions.sweep, idle, dry_run=dry_run)
        sessions = swept.sessions
        if dry_run:
            blobs = sum(1 for d in dead if d in inventory.blobs)
            freed = sum(o.size for o in dead.values())
            return GcReport(blobs, len(dead) - blobs, freed, sessions, kept)
        links = tuple(
            (repository, digest)
            for repository, linked in inventory.links.items()
            for digest in linked
            if digest in dead
        )
        removed = await self.storage.remove(Removal(frozenset(dead), links=links))
        if removed.in_use:  # all or nothing: collect the rest, leave the busy ones for later
            rest = frozenset(dead) - removed.in_use
            links = tuple(link for link in links if link[1] in rest)
            removed = await self.storage.remove(Removal(rest, links=links))
        await self.count_usage()
        blobs = sum(1 for d in removed.removed if d in inventory.blobs)
        return GcReport(
            blobs,
            len(removed.removed) - blobs,
            removed.freed,
            sessions,
            kept + len(dead) - len(removed.removed),
        )


def _media_type(document: dict[str, Any], content_type: str) -> str:
    declared = document.get("mediaType")
    content_type = content_type.split(";", 1)[0].strip()
    if isinstance(declared, str) and content_type and declared != content_type:
        raise RegistryError(
            ErrorCode.MANIFEST_INVALID,
            f"Content-Type {content_type} does not match the manifest's mediaType {declared}",
        )
    media_type = content_type or (declared if isinstance(declared, str) else "")
    if media_type not in PUSHABLE_MEDIA_TYPES:
        raise RegistryError(
            ErrorCode.MANIFEST_INVALID,
            f"unsupported manifest media type {media_type or '(none)'}; expected one of "
            + ", ".join(sorted(PUSHABLE_MEDIA_TYPES)),
        )
    return media_type


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _descriptor_digest(descriptor: Any) -> Digest | None:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        return None
    try:
        return Digest.parse(descriptor["digest"])
    except ReferenceError:
        return None


def _manifest_unknown(repository: str, reference: str) -> RegistryError:
    return RegistryError(
        ErrorCode.MANIFEST_UNKNOWN, f"manifest {reference} is not in repository {repository}"
    )
