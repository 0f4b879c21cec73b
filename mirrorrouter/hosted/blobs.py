"""Blob content entering a hosted set's storage, verified and metered.

``write_blob`` is the one way a blob gets in: streamed through the storage's blob writer,
which verifies the digest and commits atomically (``DIGEST_INVALID`` otherwise, leaving
nothing behind). A monolithic upload, a finished upload session (store.py) and a copy-in
all go through it.

**Copy-in.** A pushed manifest may name blobs the repository lacks that the pusher may pull
from elsewhere (shadowing.py finds them: the same repository on an upstream member of the
set's groups, a ``BlobFinder``). ``copy_in`` copies them in, one after another, each within
``max_blob_size`` and all within the quota (limits.py), verified by digest and size against
the manifest's descriptor, and links them into the repository.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from mirrorrouter.cache import CacheBackend, DigestMismatch
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.limits import Meter, Usage
from mirrorrouter.manifests import Descriptor
from mirrorrouter.reference import Digest


@dataclass(frozen=True, slots=True)
class FoundBlob:
    """A blob a pushed manifest names, found where the pusher may pull it."""

    origin: str  # where it comes from (an upstream's name), for messages
    size: int | None  # None while a download of unknown size is in progress
    stream: Callable[[int, int | None], AsyncIterator[bytes]]


# Finds a blob the set lacks where the pusher may pull it; None when no source has it.
BlobFinder = Callable[[Digest], Awaitable[FoundBlob | None]]


async def write_blob(
    storage: CacheBackend,
    digest: Digest,
    body: AsyncIterator[bytes],
    expected_size: int | None = None,
) -> int:
    """Store a blob as it streams in (``expected_size``: what its descriptor says), verified
    by digest (``DIGEST_INVALID``) and committed atomically; its size."""
    writer = storage.blob_writer(digest, expected_size)
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


async def copy_in(
    settings: HostedSettings,
    storage: CacheBackend,
    usage: Usage,
    repository: str,
    missing: list[Descriptor],
    copy_from: BlobFinder,
) -> None:
    """Copy the blobs a manifest names and the repository lacks from where the pusher
    may pull them, one after another (streamed, off the event loop's thread for the
    writing), each within ``max_blob_size`` and all within the quota; a blob no source
    has stays missing."""
    absent = [d for d in missing if await storage.blob_size(d.digest) is None]
    for descriptor in absent:
        Meter(settings, usage).declare(descriptor.size)
    usage.check(sum(d.size or 0 for d in absent))  # refused before any byte moves
    for descriptor in missing:
        digest = descriptor.digest
        found = await copy_from(digest)
        if found is None:
            continue
        if await storage.blob_size(digest) is None:
            meter = Meter(settings, usage)
            meter.declare(found.size)
            try:
                size = await write_blob(
                    storage, digest, meter.wrap(found.stream(0, None)), descriptor.size
                )
            except RegistryError as error:
                if error.code is not ErrorCode.DIGEST_INVALID:
                    raise
                raise RegistryError(
                    ErrorCode.MANIFEST_INVALID,
                    f"{digest} as {found.origin} has it does not match the manifest's "
                    f"descriptor: {error.message}",
                    detail={"digest": str(digest)},
                ) from error
            finally:
                meter.settle(kept=False)
            usage.add(size)
        # Already stored for another repository: the source vouched for it here.
        await storage.link(repository, [digest])
