"""The conformance suite every cache backend must pass (see mirrorrouter/cache/base.py).

Each test runs once per backend named in ``HARNESSES``. Adding a backend is one entry
there: a factory that yields a ``Harness`` around a fresh, unopened instance plus the few
backend-specific probes the suite needs (a second instance over the same storage, a look
into the temp area, a way to plant a raw tag record). Tests of the filesystem layout
itself are at the bottom and use ``FilesystemCache`` directly.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import obstore
import pytest

from mirrorrouter.cache import CacheBackend, DigestMismatch, FilesystemCache, ObjectStoreCache
from mirrorrouter.cache.base import (
    ACCESS_RESOLUTION,
    Inventory,
    Removal,
    Removed,
    StoredManifest,
    StoredObject,
    TagRecord,
)
from mirrorrouter.cache.spool import (
    LOCK_NAME,
    STAGING_GRACE,
    STAGING_PREFIX,
    SpoolArea,
    locked_elsewhere,
)
from mirrorrouter.reference import Digest
from tests.support.seaweed import cache_settings, session_seaweed

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
# Deterministic, non-periodic bytes; 2.5 MiB spans several 1 MiB reads.
PAYLOAD = random.Random(0).randbytes(9 * MIB + 12_345)  # several reads of any backend
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ALGORITHMS = ["sha256", "sha512"]


@dataclass
class Harness:
    """A backend under test and the backend-specific probes the suite relies on."""

    cache: CacheBackend
    # A new, not yet opened instance over the same storage (a restart).
    reopen: Callable[[], CacheBackend]
    # Everything currently in the backend's area for writes in progress.
    leftovers: Callable[[], list[str]]
    # Store raw bytes as the tag record of (repository, tag), bypassing put_tag.
    plant_tag: Callable[[str, str, bytes], None]
    # The wall clock the backend dates accesses with; tests move it.
    clock: ManualClock


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def spool_leftovers(tmp: Path) -> list[str]:
    """Files in the local spool area ``tmp/`` of a backend (both keep one)."""
    if not tmp.exists():
        return []
    # Each open instance owns tmp/<owner>/ with a .lock; only files beside it are leftovers.
    files = (p for p in tmp.rglob("*") if p.is_file() and p.name != ".lock")
    return sorted(str(p.relative_to(tmp)) for p in files)


@asynccontextmanager
async def filesystem_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    root = tmp_path / "cache"
    clock = ManualClock()

    def leftovers() -> list[str]:
        return spool_leftovers(root / "tmp")

    def plant_tag(repository: str, tag: str, raw: bytes) -> None:
        path = root / "repositories" / repository / "_tags" / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)

    yield Harness(
        FilesystemCache(root, clock=clock),
        lambda: FilesystemCache(root, clock=clock),
        leftovers,
        plant_tag,
        clock,
    )


@asynccontextmanager
async def s3_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """An s3 cache in the session's SeaweedFS (tests/support/seaweed.py), under a prefix of
    its own."""
    server = session_seaweed()
    settings = cache_settings(server, tmp_path / "spool")
    assert settings.object_store is not None
    root = f"{settings.object_store.prefix}/{settings.key}"
    store = server.store()
    clock = ManualClock()

    def leftovers() -> list[str]:
        return spool_leftovers(settings.directory / "tmp")

    def plant_tag(repository: str, tag: str, raw: bytes) -> None:
        obstore.put(store, f"{root}/repositories/{repository}/_tags/{tag}", raw)

    cache = ObjectStoreCache(settings, clock=clock)
    yield Harness(
        cache, lambda: ObjectStoreCache(settings, clock=clock), leftovers, plant_tag, clock
    )
    await cache.close()


HARNESSES: dict[str, Callable[[Path], AbstractAsyncContextManager[Harness]]] = {
    "filesystem": filesystem_harness,
    "s3": s3_harness,
}


@pytest.fixture(params=sorted(HARNESSES))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with HARNESSES[request.param](tmp_path) as harness:
        await harness.cache.open()
        yield harness


# ---------------------------------------------------------------------- helpers


async def read_all(cache: CacheBackend, digest: Digest, start: int, end: int) -> list[bytes]:
    return [chunk async for chunk in cache.read_blob(digest, start, end)]


async def store_blob(
    cache: CacheBackend, data: bytes, algorithm: str = "sha256", chunk: int = 300_000
) -> Digest:
    digest = Digest.of(data, algorithm)
    writer = cache.blob_writer(digest, len(data))
    for offset in range(0, len(data), chunk):
        await writer.write(data[offset : offset + chunk])
    await writer.commit()
    return digest


async def assert_blob_absent(harness: Harness, digest: Digest) -> None:
    assert await harness.cache.blob_size(digest) is None
    assert harness.cache.blob_path(digest) is None
    assert harness.leftovers() == []


def record(data: bytes, checked_at: float = 1_700_000_000.25) -> TagRecord:
    return TagRecord(Digest.of(data), OCI_MANIFEST, len(data), checked_at)


# ---------------------------------------------------------------------- misses


async def test_empty_cache_misses_everything(backend: Harness) -> None:
    """A fresh backend reports every blob, manifest, tag and link as absent, not as an error."""
    cache = backend.cache
    digest = Digest.of(b"nothing here")
    assert await cache.blob_size(digest) is None
    assert cache.blob_path(digest) is None
    assert await cache.get_manifest(digest) is None
    assert await cache.get_tag("library/alpine", "latest") is None
    assert await cache.is_linked("library/alpine", digest) is False


# ---------------------------------------------------------------------- blobs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_committed_blob_reads_back(backend: Harness, algorithm: str) -> None:
    """A blob written in chunks and committed has its size, its bytes and a local file."""
    cache = backend.cache
    digest = await store_blob(cache, PAYLOAD, algorithm)
    assert await cache.blob_size(digest) == len(PAYLOAD)
    chunks = await read_all(cache, digest, 0, len(PAYLOAD))
    assert b"".join(chunks) == PAYLOAD
    assert len(chunks) > 1  # streamed, never read whole into memory
    assert all(chunks)
    path = cache.blob_path(digest)
    if path is not None:  # optional by the protocol; the filesystem test below insists
        assert path.read_bytes() == PAYLOAD
    assert backend.leftovers() == []


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 0),
        (0, 1),
        (0, MIB),
        (1, MIB + 1),
        (MIB - 10, MIB + 10),
        (MIB, 2 * MIB),
        (MIB - 1, 2 * MIB + 1),
        (123_456, len(PAYLOAD)),
        (len(PAYLOAD) - 1, len(PAYLOAD)),
        (len(PAYLOAD), len(PAYLOAD)),
    ],
)
async def test_read_blob_serves_byte_ranges(backend: Harness, start: int, end: int) -> None:
    """read_blob(start, end) yields exactly bytes [start, end), also across 1 MiB reads."""
    digest = await store_blob(backend.cache, PAYLOAD)
    chunks = await read_all(backend.cache, digest, start, end)
    assert b"".join(chunks) == PAYLOAD[start:end]
    assert all(chunks)


async def test_empty_blob_commits(backend: Harness) -> None:
    """A zero-byte blob (nothing written) commits and reads back as empty."""
    digest = await store_blob(backend.cache, b"")
    assert await backend.cache.blob_size(digest) == 0
    assert b"".join(await read_all(backend.cache, digest, 0, 0)) == b""


async def test_digest_mismatch_on_commit_leaves_nothing(backend: Harness) -> None:
    """Bytes that do not hash to the digest fail the commit and leave no trace."""
    digest = Digest.of(PAYLOAD)
    wrong = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1])
    writer = backend.cache.blob_writer(digest, len(wrong))
    await writer.write(wrong)
    with pytest.raises(DigestMismatch):
        await writer.commit()
    await assert_blob_absent(backend, digest)
    assert not writer.spool_path.exists()
    await writer.abort()  # the pull-through aborts after a failed commit: must be harmless
    await assert_blob_absent(backend, digest)


@pytest.mark.parametrize("delta", [-1, 1])
async def test_size_mismatch_on_commit_leaves_nothing(backend: Harness, delta: int) -> None:
    """Right bytes but a different announced size fail the commit and leave no trace."""
    digest = Digest.of(PAYLOAD)
    writer = backend.cache.blob_writer(digest, len(PAYLOAD) + delta)
    await writer.write(PAYLOAD)
    with pytest.raises(DigestMismatch):
        await writer.commit()
    await assert_blob_absent(backend, digest)
    await writer.abort()


async def test_failed_commit_keeps_earlier_good_copy(backend: Harness) -> None:
    """A bad write of a digest that is already committed does not disturb the good copy."""
    digest = await store_blob(backend.cache, PAYLOAD)
    writer = backend.cache.blob_writer(digest, len(PAYLOAD))
    await writer.write(b"x" * len(PAYLOAD))
    with pytest.raises(DigestMismatch):
        await writer.commit()
    assert await backend.cache.blob_size(digest) == len(PAYLOAD)
    assert b"".join(await read_all(backend.cache, digest, 0, len(PAYLOAD))) == PAYLOAD
    assert backend.leftovers() == []


async def test_abort_leaves_nothing(backend: Harness) -> None:
    """An aborted write is never visible and its spool file is gone."""
    digest = Digest.of(PAYLOAD)
    writer = backend.cache.blob_writer(digest, len(PAYLOAD))
    await writer.write(PAYLOAD[:MIB])
    await writer.abort()
    await assert_blob_absent(backend, digest)
    assert not writer.spool_path.exists()


async def test_spool_file_grows_with_writes(backend: Harness) -> None:
    """The spool file exists from the start and a follower reads each chunk as it lands."""
    digest = Digest.of(PAYLOAD)
    writer = backend.cache.blob_writer(digest, len(PAYLOAD))
    assert writer.spool_path.read_bytes() == b""  # followers may open it before any write
    fd = os.open(writer.spool_path, os.O_RDONLY)
    try:
        followed = b""
        # Small chunks too: a buffered writer would hold them back from followers.
        bounds = [0, 1, 1_001, 66_001, MIB + 66_001, len(PAYLOAD)]
        for offset, stop in itertools.pairwise(bounds):
            await writer.write(PAYLOAD[offset:stop])
            # Whatever ``written`` says is already in the spool file, flushed or not.
            assert os.pread(fd, writer.written, 0) == PAYLOAD[: writer.written]
            await writer.flush()
            assert writer.written == stop
            assert await backend.cache.blob_size(digest) is None  # not before commit
            followed += os.pread(fd, len(PAYLOAD), len(followed))
            assert followed == PAYLOAD[: writer.written]
        await writer.commit()
        # A follower that opened the spool file keeps reading the same bytes after commit.
        assert os.pread(fd, len(PAYLOAD), 0) == PAYLOAD
    finally:
        os.close(fd)
    assert await backend.cache.blob_size(digest) == len(PAYLOAD)


async def test_concurrent_writers_of_one_digest_both_commit(backend: Harness) -> None:
    """Two interleaved writers of the same digest both commit and the blob is correct."""
    digest = Digest.of(PAYLOAD)
    first = backend.cache.blob_writer(digest, len(PAYLOAD))
    second = backend.cache.blob_writer(digest, len(PAYLOAD))
    assert first.spool_path != second.spool_path

    async def fill(writer_index: int) -> Path:
        writer = (first, second)[writer_index]
        for offset in range(0, len(PAYLOAD), 200_000):
            await writer.write(PAYLOAD[offset : offset + 200_000])
            await asyncio.sleep(0)
        return await writer.commit()

    await asyncio.gather(fill(0), fill(1))
    assert await backend.cache.blob_size(digest) == len(PAYLOAD)
    assert b"".join(await read_all(backend.cache, digest, 0, len(PAYLOAD))) == PAYLOAD
    assert backend.leftovers() == []


async def test_sha256_and_sha512_of_same_bytes_are_distinct(backend: Harness) -> None:
    """The same bytes under sha256 and sha512 are two digests, stored independently."""
    sha512 = await store_blob(backend.cache, b"hello", "sha512")
    assert await backend.cache.blob_size(sha512) == 5
    assert await backend.cache.blob_size(Digest.of(b"hello", "sha256")) is None


# ---------------------------------------------------------------------- manifests


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    ("media_type", "data"),
    [
        (OCI_MANIFEST, b'{\n  "schemaVersion": 2,\n  "layers": []\n}\n'),
        (OCI_INDEX, b'{"schemaVersion":2,"manifests":[]}'),
        ("application/vnd.docker.distribution.manifest.v2+json", b"\r\n\n {} \n\n"),
    ],
)
async def test_manifest_round_trips_byte_exact(
    backend: Harness, algorithm: str, media_type: str, data: bytes
) -> None:
    """A stored manifest comes back with the same digest, media type and exact bytes."""
    digest = Digest.of(data, algorithm)
    await backend.cache.put_manifest(StoredManifest(digest, media_type, data))
    assert await backend.cache.get_manifest(digest) == StoredManifest(digest, media_type, data)
    assert backend.leftovers() == []


async def test_manifest_with_wrong_bytes_is_refused(backend: Harness) -> None:
    """put_manifest with bytes that do not hash to the digest raises and stores nothing."""
    digest = Digest.of(b'{"schemaVersion":2}')
    with pytest.raises(DigestMismatch):
        await backend.cache.put_manifest(StoredManifest(digest, OCI_MANIFEST, b'{"schema":1}'))
    assert await backend.cache.get_manifest(digest) is None
    assert backend.leftovers() == []


# ---------------------------------------------------------------------- tags


async def test_tag_round_trips_and_overwrites(backend: Harness) -> None:
    """A tag record reads back equal, and a later put replaces it."""
    cache = backend.cache
    old, new = record(b"old"), record(b"new", checked_at=1_700_000_060.5)
    await cache.put_tag("library/alpine", "3.20", old)
    assert await cache.get_tag("library/alpine", "3.20") == old
    await cache.put_tag("library/alpine", "3.20", new)
    assert await cache.get_tag("library/alpine", "3.20") == new
    assert backend.leftovers() == []


async def test_tags_are_per_repository(backend: Harness) -> None:
    """A tag put in one repository is not seen in another, nested names included."""
    cache = backend.cache
    await cache.put_tag("library/alpine", "latest", record(b"alpine"))
    assert await cache.get_tag("library/busybox", "latest") is None
    assert await cache.get_tag("library", "latest") is None
    assert await cache.get_tag("library/alpine/extra", "latest") is None
    assert await cache.get_tag("library/alpine", "other") is None


async def test_tags_are_listed_and_deleted(backend: Harness) -> None:
    """list_tags names one repository's tags, sorted; delete_tag forgets one whatever it names."""
    cache = backend.cache
    assert await cache.list_tags("team/app") == []
    for tag in ("v2", "latest", "v1"):
        await cache.put_tag("team/app", tag, record(tag.encode()))
    await cache.put_tag("team/app/sub", "other", record(b"sub"))
    await cache.put_tag("team/other", "v9", record(b"other"))
    assert await cache.list_tags("team/app") == ["latest", "v1", "v2"]
    assert await cache.delete_tag("team/app", "v1")
    assert not await cache.delete_tag("team/app", "v1")
    assert await cache.get_tag("team/app", "v1") is None
    assert await cache.list_tags("team/app") == ["latest", "v2"]
    assert await cache.list_tags("team/other") == ["v9"]
    assert backend.leftovers() == []


async def test_no_tags_are_listed_once_the_last_is_deleted(backend: Harness) -> None:
    """Deleting every tag leaves an empty list, also where the store keeps the emptied
    "directory" as an entry of its own (SeaweedFS lists ``.../_tags``)."""
    cache = backend.cache
    for tag in ("v1", "v2"):
        await cache.put_tag("team/app", tag, record(tag.encode()))
    for tag in ("v1", "v2"):
        assert await cache.delete_tag("team/app", tag)
    assert await cache.list_tags("team/app") == []
    await cache.put_tag("team/app", "v3", record(b"v3"))
    assert await cache.list_tags("team/app") == ["v3"]


VALID_TAG_FIELDS = {
    "digest": str(Digest.of(b"x")),
    "media_type": OCI_MANIFEST,
    "size": 1,
    "checked_at": 1.0,
}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"digest": "sha256:', id="truncated"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"null", id="null"),
        pytest.param(b"[1, 2]", id="list"),
        pytest.param(b'"sha256:abc"', id="string"),
        pytest.param(
            json.dumps({k: v for k, v in VALID_TAG_FIELDS.items() if k != "size"}).encode(),
            id="missing-field",
        ),
        pytest.param(
            json.dumps({**VALID_TAG_FIELDS, "digest": "sha256:nothex"}).encode(),
            id="bad-digest",
        ),
        pytest.param(
            json.dumps({**VALID_TAG_FIELDS, "digest": "md5:" + "0" * 32}).encode(),
            id="unsupported-algorithm",
        ),
        pytest.param(
            json.dumps({**VALID_TAG_FIELDS, "digest": None}).encode(),
            id="null-digest",
        ),
    ],
)
async def test_corrupt_tag_record_is_a_miss(backend: Harness, raw: bytes) -> None:
    """An unreadable tag record reads as a miss, never as an error."""
    backend.plant_tag("library/alpine", "latest", raw)
    assert await backend.cache.get_tag("library/alpine", "latest") is None


async def test_planted_valid_tag_record_reads(backend: Harness) -> None:
    """The plant_tag probe writes what put_tag writes (so the corrupt cases test parsing)."""
    backend.plant_tag("library/alpine", "latest", json.dumps(VALID_TAG_FIELDS).encode())
    assert await backend.cache.get_tag("library/alpine", "latest") == TagRecord(
        Digest.of(b"x"), OCI_MANIFEST, 1, 1.0
    )


# ---------------------------------------------------------------------- links


async def test_links_are_per_repository(backend: Harness) -> None:
    """Linking digests in one repository makes them visible there and nowhere else."""
    cache = backend.cache
    blob, manifest = Digest.of(b"blob"), Digest.of(b"manifest", "sha512")
    await cache.link("team/a", [blob, manifest])
    assert await cache.is_linked("team/a", blob)
    assert await cache.is_linked("team/a", manifest)
    assert not await cache.is_linked("team/b", blob)
    assert not await cache.is_linked("team", blob)
    assert not await cache.is_linked("team/a/sub", blob)
    assert not await cache.is_linked("team/a", Digest.of(b"blob", "sha512"))
    await cache.link("team/a", [blob])  # idempotent
    await cache.link("team/a", [])
    assert await cache.is_linked("team/a", blob)
    assert await cache.linked("team/a") == {blob, manifest}
    assert await cache.linked("team/a/sub") == frozenset()
    assert await cache.linked("team/b") == frozenset()


# ---------------------------------------------------------------------- restarts


async def test_committed_state_survives_a_restart(backend: Harness) -> None:
    """A new instance over the same storage sees committed blobs, manifests, tags and links."""
    cache = backend.cache
    blob = await store_blob(cache, PAYLOAD)
    data = b'{"schemaVersion":2}'
    manifest = StoredManifest(Digest.of(data), OCI_MANIFEST, data)
    await cache.put_manifest(manifest)
    await cache.put_tag("app", "v1", record(data))
    await cache.link("app", [blob, manifest.digest])

    fresh = backend.reopen()
    await fresh.open()
    assert await fresh.blob_size(blob) == len(PAYLOAD)
    assert b"".join(await read_all(fresh, blob, 0, len(PAYLOAD))) == PAYLOAD
    assert await fresh.get_manifest(manifest.digest) == manifest
    assert await fresh.get_tag("app", "v1") == record(data)
    assert await fresh.is_linked("app", blob)


async def test_open_sweeps_interrupted_writes(backend: Harness) -> None:
    """open() removes the spool of a write that never committed; nothing of it is visible."""
    digest = Digest.of(PAYLOAD)
    writer = backend.cache.blob_writer(digest, len(PAYLOAD))
    await writer.write(PAYLOAD[: 3 * MIB // 2])
    assert backend.leftovers() != []
    try:
        await backend.cache.close()  # as a killed process would: its lock is gone, files stay
        fresh = backend.reopen()  # the next start
        await fresh.open()
        assert not writer.spool_path.exists()
        assert backend.leftovers() == []
        assert await fresh.blob_size(digest) is None
        assert fresh.blob_path(digest) is None
    finally:
        await writer.abort()  # release the dead writer's handle


async def test_claims_are_exclusive_until_released(backend: Harness) -> None:
    """One holder at a time may claim a digest's download, across instances (processes)."""
    digest = Digest.of(b"claimed")
    other = backend.reopen()
    await other.open()
    claim = backend.cache.try_claim(digest)
    assert claim is not None
    assert other.try_claim(digest) is None
    assert backend.cache.try_claim(Digest.of(b"another")) is not None
    claim.release()
    again = other.try_claim(digest)
    assert again is not None
    again.release()
    await other.close()


async def test_open_leaves_live_writers_alone(backend: Harness) -> None:
    """open() of a second instance (another worker) never sweeps a write still in progress."""
    digest = Digest.of(PAYLOAD)
    writer = backend.cache.blob_writer(digest, len(PAYLOAD))
    await writer.write(PAYLOAD[:MIB])
    second = backend.reopen()
    await second.open()
    await writer.write(PAYLOAD[MIB:])
    await writer.commit()
    assert await second.blob_size(digest) == len(PAYLOAD)
    await second.close()


# ---------------------------------------------------------------------- bounds: inventory


async def store_manifest(cache: CacheBackend, data: bytes) -> StoredManifest:
    manifest = StoredManifest(Digest.of(data), OCI_MANIFEST, data)
    await cache.put_manifest(manifest)
    return manifest


async def accessed(harness: Harness, digest: Digest) -> float:
    inventory = await harness.cache.inventory()
    stored = inventory.blobs.get(digest) or inventory.manifests.get(digest)
    assert stored is not None
    return stored.accessed


async def test_inventory_of_an_empty_cache_is_empty(backend: Harness) -> None:
    """A fresh cache has nothing stored and nothing in flight."""
    inventory = await backend.cache.inventory()
    assert inventory == Inventory()
    assert inventory.stored_bytes == 0


async def test_inventory_lists_everything_stored(backend: Harness) -> None:
    """Blobs and manifests with size and access (commit time), tags, links per repository."""
    cache, clock = backend.cache, backend.clock
    blob = await store_blob(cache, PAYLOAD)
    clock.now += 5
    manifest = await store_manifest(cache, b'{"schemaVersion":2,"layers":[]}')
    await cache.put_tag("team/app", "v1", record(manifest.data))
    await cache.link("team/app", [blob, manifest.digest])
    await cache.link("team/other", [blob])

    inventory = await backend.reopen().inventory()  # works without open(): no writes
    assert inventory.blobs == {blob: StoredObject(blob, len(PAYLOAD), clock.now - 5)}
    assert set(inventory.manifests) == {manifest.digest}
    assert inventory.manifests[manifest.digest].accessed == clock.now
    assert inventory.manifests[manifest.digest].size >= len(manifest.data)
    assert inventory.tags == {("team/app", "v1"): record(manifest.data)}
    assert inventory.links == {
        "team/app": frozenset({blob, manifest.digest}),
        "team/other": frozenset({blob}),
    }
    assert inventory.in_flight == 0
    assert inventory.stored_bytes == len(PAYLOAD) + inventory.manifests[manifest.digest].size


async def test_reads_record_access_at_most_once_per_resolution(backend: Harness) -> None:
    """A read from storage persists its access, but not again within ACCESS_RESOLUTION."""
    cache, clock = backend.cache, backend.clock
    blob = await store_blob(cache, b"layer")
    committed = clock.now
    clock.now += ACCESS_RESOLUTION / 2
    await read_all(cache, blob, 0, 5)
    assert await accessed(backend, blob) == committed  # within the resolution: no write
    clock.now += ACCESS_RESOLUTION
    await read_all(cache, blob, 0, 5)
    assert await accessed(backend, blob) == clock.now


async def test_manifest_reads_record_access_but_peeks_do_not(backend: Harness) -> None:
    """get_manifest is an access; peek_manifest (eviction looking) is not."""
    cache, clock = backend.cache, backend.clock
    manifest = await store_manifest(cache, b'{"schemaVersion":2}')
    stored_at = clock.now
    clock.now += 2 * ACCESS_RESOLUTION
    assert await cache.peek_manifest(manifest.digest) == manifest
    assert await accessed(backend, manifest.digest) == stored_at
    assert await cache.get_manifest(manifest.digest) == manifest
    assert await accessed(backend, manifest.digest) == clock.now
    assert await cache.peek_manifest(Digest.of(b"absent")) is None


async def test_touch_is_persisted_by_flush_access(backend: Harness) -> None:
    """touch records in memory only (the hot path); flush_access writes it down, for any
    instance over the same storage, never moving an access back."""
    cache, clock = backend.cache, backend.clock
    blob = await store_blob(cache, b"layer")
    manifest = await store_manifest(cache, b'{"schemaVersion":2}')
    stored_at = clock.now
    clock.now += 2 * ACCESS_RESOLUTION
    cache.touch(blob)
    cache.touch(manifest.digest)
    cache.touch(Digest.of(b"not stored"))  # harmless
    assert await accessed(backend, blob) == stored_at
    touched_at = clock.now
    clock.now += 1
    other = backend.reopen()  # the evictor's own instance
    await other.flush_access()
    assert await accessed(backend, blob) == touched_at
    assert await accessed(backend, manifest.digest) == touched_at
    await other.flush_access()  # nothing left to do
    assert await accessed(backend, blob) == touched_at


# ---------------------------------------------------------------------- bounds: in use


async def test_reader_marks_its_blob_in_use(backend: Harness) -> None:
    """A blob being read is in use (also seen by another instance) and is not removed."""
    cache = backend.cache
    blob = await store_blob(cache, PAYLOAD)
    assert not cache.in_use(blob)
    reader = cache.read_blob(blob, 0, len(PAYLOAD))
    first = await anext(reader)
    assert cache.in_use(blob)
    assert backend.reopen().in_use(blob)
    refused = await backend.reopen().remove(Removal(frozenset({blob})))
    assert refused == Removed(frozenset(), 0, frozenset({blob}))
    rest = b"".join([chunk async for chunk in reader])
    assert first + rest == PAYLOAD  # served whole
    assert not cache.in_use(blob)
    assert (await cache.remove(Removal(frozenset({blob})))).removed == {blob}


async def test_open_blob_is_a_read_of_the_committed_file(backend: Harness) -> None:
    """open_blob gives a descriptor of the committed bytes (zero-copy sending reads it with
    sendfile) or None; while it is open the blob is in use and cannot be removed, its
    access is recorded like a read's, and it is released at the end of the block."""
    cache, clock = backend.cache, backend.clock
    blob = await store_blob(cache, PAYLOAD)
    clock.now += 2 * ACCESS_RESOLUTION
    async with cache.open_blob(blob) as fd:
        if fd is None:  # optional by the protocol: the filesystem test below insists
            assert not cache.in_use(blob)
            return
        assert os.pread(fd, len(PAYLOAD) + 1, 0) == PAYLOAD
        assert cache.in_use(blob)
        refused = await backend.reopen().remove(Removal(frozenset({blob})))
        assert refused.in_use == {blob}
    assert not cache.in_use(blob)
    assert await accessed(backend, blob) == clock.now
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the block


async def test_abandoned_reader_releases_its_blob(backend: Harness) -> None:
    """A client that goes away closes the reader; the blob is no longer in use."""
    blob = await store_blob(backend.cache, PAYLOAD)
    reader = backend.cache.read_blob(blob, 0, len(PAYLOAD))
    await anext(reader)
    await reader.aclose()
    assert not backend.cache.in_use(blob)


async def test_writer_is_in_use_and_in_flight(backend: Harness) -> None:
    """A download in progress counts at its announced size and its digest is in use."""
    cache = backend.cache
    digest = Digest.of(PAYLOAD)
    writer = cache.blob_writer(digest, len(PAYLOAD))
    await writer.write(PAYLOAD[:MIB])
    await writer.flush()
    assert cache.in_use(digest)
    assert (await cache.inventory()).in_flight == len(PAYLOAD)
    await writer.write(PAYLOAD[MIB:])
    await writer.commit()
    assert not cache.in_use(digest)
    inventory = await cache.inventory()
    assert inventory.in_flight == 0 and inventory.blobs[digest].size == len(PAYLOAD)


async def test_aborted_writer_is_no_longer_in_use(backend: Harness) -> None:
    digest = Digest.of(PAYLOAD)
    writer = backend.cache.blob_writer(digest)
    await writer.write(PAYLOAD[:1000])
    await writer.flush()
    assert (await backend.cache.inventory()).in_flight == 1000  # no announced size: bytes
    await writer.abort()
    await writer.abort()
    assert not backend.cache.in_use(digest)
    assert (await backend.cache.inventory()).in_flight == 0


async def test_held_blob_is_in_use(backend: Harness) -> None:
    """hold() marks a blob in use for a reader the backend does not see (a fill follower)."""
    blob = await store_blob(backend.cache, b"layer")
    with backend.cache.hold(blob), backend.cache.hold(blob):
        assert backend.cache.in_use(blob)
    assert not backend.cache.in_use(blob)


# ---------------------------------------------------------------------- bounds: removal


async def test_remove_deletes_content_with_its_tags_and_links(backend: Harness) -> None:
    """remove deletes blobs and manifests, the tag records naming them and the links given;
    everything else stays."""
    cache = backend.cache
    gone_blob, kept_blob = await store_blob(cache, b"gone"), await store_blob(cache, b"kept")
    gone = await store_manifest(cache, b'{"gone":1}')
    kept = await store_manifest(cache, b'{"kept":1}')
    await cache.put_tag("app", "old", record(gone.data))
    await cache.put_tag("app", "moved", record(kept.data))  # listed, but names kept content
    await cache.put_tag("app", "new", record(kept.data))
    await cache.link("app", [gone_blob, kept_blob, gone.digest, kept.digest])
    before = await cache.inventory()

    result = await cache.remove(
        Removal(
            frozenset({gone_blob, gone.digest, Digest.of(b"never stored")}),
            tags=(("app", "old"), ("app", "moved")),
            links=(("app", gone_blob), ("app", gone.digest)),
        )
    )
    assert result.removed == {gone_blob, gone.digest} and not result.in_use
    assert result.freed == before.blobs[gone_blob].size + before.manifests[gone.digest].size
    assert await cache.blob_size(gone_blob) is None
    assert await cache.get_manifest(gone.digest) is None
    assert await cache.get_tag("app", "old") is None
    assert await cache.get_tag("app", "moved") == record(kept.data)
    assert not await cache.is_linked("app", gone_blob)
    assert await cache.blob_size(kept_blob) == 4
    assert await cache.get_manifest(kept.digest) == kept
    assert await cache.is_linked("app", kept.digest)
    after = await cache.inventory()
    assert set(after.blobs) == {kept_blob} and set(after.manifests) == {kept.digest}
    assert backend.leftovers() == []


async def test_remove_is_all_or_nothing(backend: Harness) -> None:
    """When one blob of a removal is in use, nothing of it is removed."""
    cache = backend.cache
    free, busy = await store_blob(cache, b"free"), await store_blob(cache, b"busy")
    manifest = await store_manifest(cache, b'{"m":1}')
    with cache.hold(busy):
        result = await cache.remove(Removal(frozenset({free, busy, manifest.digest})))
    assert result == Removed(frozenset(), 0, frozenset({busy}))
    assert await cache.blob_size(free) == 4
    assert await cache.get_manifest(manifest.digest) == manifest


async def test_removed_blob_is_written_again(backend: Harness) -> None:
    """After removal a blob is a miss, and a new download commits it as before."""
    blob = await store_blob(backend.cache, PAYLOAD)
    await backend.cache.remove(Removal(frozenset({blob})))
    assert await backend.cache.blob_size(blob) is None
    await store_blob(backend.cache, PAYLOAD)
    assert b"".join(await read_all(backend.cache, blob, 0, len(PAYLOAD))) == PAYLOAD


# ---------------------------------------------------------------------- filesystem layout


async def test_filesystem_blob_path_is_the_committed_file(tmp_path: Path) -> None:
    """The filesystem backend keeps every committed blob as a local file at its layout path."""
    cache = FilesystemCache(tmp_path)
    await cache.open()
    digest = await store_blob(cache, b"layer bytes", "sha512")
    path = cache.blob_path(digest)
    assert path == tmp_path / "blobs" / "sha512" / digest.hex[:2] / digest.hex
    assert path.read_bytes() == b"layer bytes"


async def test_filesystem_open_blob_is_the_committed_file(tmp_path: Path) -> None:
    """The filesystem backend always has a local file to open, and a missing blob raises
    FileNotFoundError as read_blob does."""
    cache = FilesystemCache(tmp_path)
    await cache.open()
    blob = await store_blob(cache, PAYLOAD)
    async with cache.open_blob(blob) as fd:
        assert fd is not None and os.fstat(fd).st_size == len(PAYLOAD)
    with pytest.raises(FileNotFoundError):
        async with cache.open_blob(Digest.of(b"absent")):
            pass


async def test_filesystem_corrupt_tag_file_is_a_miss(tmp_path: Path) -> None:
    """A tag file truncated on disk after a good put_tag reads as a miss."""
    cache = FilesystemCache(tmp_path)
    await cache.open()
    await cache.put_tag("library/alpine", "latest", record(b"alpine"))
    path = tmp_path / "repositories" / "library" / "alpine" / "_tags" / "latest"
    path.write_bytes(path.read_bytes()[:10])
    assert await cache.get_tag("library/alpine", "latest") is None


async def test_filesystem_access_is_the_mtime(tmp_path: Path) -> None:
    """The last access is the file's mtime: set on commit, moved by reads, never by atime."""
    clock = ManualClock()
    cache = FilesystemCache(tmp_path, clock=clock)
    await cache.open()
    digest = await store_blob(cache, b"layer")
    path = cache.blob_path(digest)
    assert path is not None and path.stat().st_mtime == clock.now
    clock.now += ACCESS_RESOLUTION
    await read_all(cache, digest, 0, 5)
    assert path.stat().st_mtime == clock.now


async def test_filesystem_readers_of_other_processes_are_seen(tmp_path: Path) -> None:
    """A reader in another process holds a shared flock on the blob file: in use, kept."""
    cache = FilesystemCache(tmp_path)
    await cache.open()
    digest = await store_blob(cache, b"layer")
    path = cache.blob_path(digest)
    assert path is not None
    fd = os.open(path, os.O_RDONLY)  # a separate open file description, like another process
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert cache.in_use(digest)
        assert (await cache.remove(Removal(frozenset({digest})))).in_use == {digest}
    finally:
        os.close(fd)
    assert not cache.in_use(digest)
    assert (await cache.remove(Removal(frozenset({digest})))).removed == {digest}


async def test_filesystem_download_claimed_elsewhere_is_in_use(tmp_path: Path) -> None:
    """A digest whose download another process claimed is in use."""
    cache = FilesystemCache(tmp_path)
    await cache.open()
    digest = Digest.of(b"coming")
    assert not cache.in_use(digest)
    claim = FilesystemCache(tmp_path).try_claim(digest)
    assert claim is not None
    assert cache.in_use(digest)
    claim.release()
    assert not cache.in_use(digest)


async def test_filesystem_inventory_of_a_missing_directory_creates_nothing(
    tmp_path: Path,
) -> None:
    """An operator command looking at a cache that was never used changes nothing."""
    cache = FilesystemCache(tmp_path / "never")
    assert await cache.inventory() == Inventory()
    await cache.flush_access()
    assert not (tmp_path / "never").exists()


async def test_filesystem_inventory_skips_strays(tmp_path: Path) -> None:
    """Files that are not named by a digest (strays, editor backups) are not content."""
    cache = FilesystemCache(tmp_path)
    await cache.open()
    digest = await store_blob(cache, b"layer")
    (tmp_path / "blobs" / "sha256" / digest.hex[:2] / "notadigest").write_bytes(b"x")
    (tmp_path / "manifests" / "md5").mkdir(parents=True)
    (tmp_path / "manifests" / "md5" / ("0" * 32)).write_bytes(b"x")
    inventory = await cache.inventory()
    assert set(inventory.blobs) == {digest} and inventory.manifests == {}


def test_spool_area_being_made_is_never_swept(tmp_path: Path) -> None:
    """An instance's spool area appears already locked, so another process's sweep never
    takes one being made for a dead owner's; a leftover of a crash while making one goes
    once it is old."""
    first = SpoolArea(tmp_path)
    first.open()
    making = tmp_path / "tmp" / f"{STAGING_PREFIX}{'a' * 32}"  # another process, mid-open
    making.mkdir()
    (making / LOCK_NAME).touch()
    crashed = tmp_path / "tmp" / f"{STAGING_PREFIX}{'b' * 32}"
    crashed.mkdir()
    old = time.time() - 2 * STAGING_GRACE
    os.utime(crashed, (old, old))
    second = SpoolArea(tmp_path)
    second.open()
    try:
        assert making.exists() and not crashed.exists()
        assert first.tmp.is_dir() and second.tmp.is_dir()
        assert locked_elsewhere(first.tmp / LOCK_NAME) and locked_elsewhere(second.tmp / LOCK_NAME)
    finally:
        first.close()
        second.close()
