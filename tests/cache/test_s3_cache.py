"""What the s3 cache backend does beyond the conformance suite (test_cache_conformance.py
runs that against it too), on the session's real SeaweedFS (tests/support/seaweed.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import random
import threading
from pathlib import Path

import httpx
import obstore
import pytest
from obstore.exceptions import GenericError

from mirrorrouter.cache import DigestMismatch, ObjectStoreCache, open_backend
from mirrorrouter.cache.base import CacheUnavailable, Removal, StoredManifest, TagRecord
from mirrorrouter.cache.objectstore import reads as s3_module
from mirrorrouter.cache.objectstore.cache import UPLOAD_PART
from mirrorrouter.cache.objectstore.reads import PART_ATTEMPTS, READ_AHEAD, READ_PART
from mirrorrouter.cache.spool import IN_FLIGHT, SpoolWriter
from mirrorrouter.config import CacheSettings
from mirrorrouter.config.model import ObjectStoreSettings, Secret
from mirrorrouter.reference import Digest
from tests.support.seaweed import SeaweedS3, cache_settings, session_seaweed

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NOW = 1_700_000_000.25


def s3_settings(tmp_path: Path, *, redirect: bool = False) -> CacheSettings:
    return cache_settings(session_seaweed(), tmp_path / "spool", redirect=redirect)


def spool_files(settings: CacheSettings) -> list[Path]:
    """Spool files of writes in progress (beside each owner's .lock)."""
    tmp = settings.directory / "tmp"
    return [p for p in tmp.rglob("*") if p.is_file() and p.name != ".lock"]


@pytest.fixture
def seaweed() -> SeaweedS3:
    return session_seaweed()


def bucket_keys(server: SeaweedS3, settings: CacheSettings) -> list[str]:
    """Every key under the cache's prefix, as the server lists them."""
    assert settings.object_store is not None
    listed = obstore.list(server.store(), settings.object_store.prefix).collect()
    return sorted(meta["path"] for meta in listed)


def with_secret(settings: CacheSettings, secret: str) -> CacheSettings:
    assert settings.object_store is not None
    store = dataclasses.replace(settings.object_store, secret_access_key=Secret(secret))
    return dataclasses.replace(settings, object_store=store)


async def store_blob(cache: ObjectStoreCache, data: bytes, chunk: int = 1_000_000) -> Digest:
    digest = Digest.of(data)
    writer = cache.blob_writer(digest, len(data))
    for offset in range(0, len(data), chunk):
        await writer.write(data[offset : offset + chunk])
    await writer.commit()
    return digest


async def read(cache: ObjectStoreCache, digest: Digest, start: int, end: int) -> list[bytes]:
    return [chunk async for chunk in cache.read_blob(digest, start, end)]


async def test_keys_live_under_prefix_and_cache_key(seaweed: SeaweedS3, tmp_path: Path) -> None:
    """The documented layout: <prefix>/<key>/blobs|manifests|repositories|access/..."""
    settings = s3_settings(tmp_path)
    assert settings.object_store is not None
    assert isinstance(open_backend(settings), ObjectStoreCache)
    cache = ObjectStoreCache(settings, clock=lambda: NOW)
    await cache.open()
    blob = await store_blob(cache, b"layer")
    data = b'{"schemaVersion":2}'
    manifest = StoredManifest(Digest.of(data), OCI_MANIFEST, data)
    await cache.put_manifest(manifest)
    await cache.put_tag("library/alpine", "3.20", TagRecord(manifest.digest, OCI_MANIFEST, 19, 1.5))
    await cache.link("library/alpine", [blob])
    root = f"{settings.object_store.prefix}/docker.io"
    assert bucket_keys(seaweed, settings) == sorted(
        [
            f"{root}/blobs/sha256/{blob.hex}",
            f"{root}/manifests/sha256/{manifest.digest.hex}",
            f"{root}/repositories/library/alpine/_tags/3.20",
            f"{root}/repositories/library/alpine/_links/sha256/{blob.hex}",
            f"{root}/access/sha256/{blob.hex}/{NOW!r}",
            f"{root}/access/sha256/{manifest.digest.hex}/{NOW!r}",
        ]
    )
    stored = seaweed.store().get(f"{root}/manifests/sha256/{manifest.digest.hex}").bytes()
    assert bytes(stored) == OCI_MANIFEST.encode() + b"\n" + data
    assert await cache.list_tags("library/alpine") == ["3.20"]
    assert await cache.delete_tag("library/alpine", "3.20")
    assert not await cache.delete_tag("library/alpine", "3.20")
    await cache.close()


def test_empty_prefix_has_no_leading_slash(tmp_path: Path) -> None:
    settings = CacheSettings(
        "s3", tmp_path, object_store=ObjectStoreSettings(bucket="b"), key="docker.io"
    )
    assert ObjectStoreCache(settings).root == "docker.io"


async def test_large_blob_round_trips_in_multipart_and_ranged_reads(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    """A blob of many upload parts is stored as one multipart object and reads back
    byte-exact, whole and in ranges across part boundaries, from the bucket."""
    payload = random.Random(7).randbytes(110 * MIB + 4321)
    settings = s3_settings(tmp_path)
    writer_cache = ObjectStoreCache(settings)
    await writer_cache.open()
    digest = await store_blob(writer_cache, payload, chunk=4 * MIB)
    assert settings.object_store is not None
    key = f"{settings.object_store.prefix}/docker.io/blobs/sha256/{digest.hex}"
    meta = seaweed.store().head(key)
    assert meta["size"] == len(payload)
    parts = math.ceil(len(payload) / UPLOAD_PART)
    assert parts > 10 and (meta["e_tag"] or "").endswith(f'-{parts}"')  # S3's multipart ETag

    reader = ObjectStoreCache(settings)  # a fresh instance has no local copy: ranged GETs
    await reader.open()
    assert reader.blob_path(digest) is None
    chunks = await read(reader, digest, 0, len(payload))
    assert all(len(c) == READ_PART for c in chunks[:-1])
    assert b"".join(chunks) == payload
    for start, end in [
        (READ_PART - 1, 3 * READ_PART + 1),
        (UPLOAD_PART - 7, UPLOAD_PART + 7),
        (len(payload) - 5, len(payload)),
    ]:
        assert b"".join(await read(reader, digest, start, end)) == payload[start:end]
    await reader.close()
    await writer_cache.close()


async def test_presigned_url_serves_the_blob(seaweed: SeaweedS3, tmp_path: Path) -> None:
    """With redirect on, presigned_url is a URL any HTTP client fetches the blob from."""
    payload = random.Random(3).randbytes(3 * MIB + 17)
    cache = ObjectStoreCache(s3_settings(tmp_path, redirect=True))
    await cache.open()
    digest = await store_blob(cache, payload)
    url = await cache.presigned_url(digest, 60)
    assert url is not None and url.startswith(seaweed.endpoint)
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(url)
        assert response.status_code == 200
        assert response.content == payload
        tampered = url.replace("X-Amz-Expires=60", "X-Amz-Expires=6000")
        assert (await client.get(tampered)).status_code == 403
    plain = ObjectStoreCache(s3_settings(tmp_path))
    assert await plain.presigned_url(digest, 60) is None
    await cache.close()


async def test_wrong_secret_is_refused(seaweed: SeaweedS3, tmp_path: Path) -> None:
    """Credentials are checked: a wrong secret can neither read nor write."""
    settings = s3_settings(tmp_path)
    good = ObjectStoreCache(settings)
    await good.open()
    blob = await store_blob(good, b"secret layer")
    bad = ObjectStoreCache(with_secret(settings, "not-the-secret"))
    with pytest.raises(CacheUnavailable, match="s3://"):
        await bad.blob_size(blob)
    with pytest.raises(CacheUnavailable, match="s3://"):
        await bad.put_tag("app", "v1", TagRecord(blob, OCI_MANIFEST, 12, 1.0))
    assert await good.get_tag("app", "v1") is None
    await good.close()


async def test_aborted_and_failed_writes_leave_nothing_in_the_bucket(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    """An aborted write, a digest mismatch, and an upload the server refuses all leave no
    object in the bucket and no spool file."""
    settings = s3_settings(tmp_path)
    payload = random.Random(5).randbytes(20 * MIB)
    digest = Digest.of(payload)
    cache = ObjectStoreCache(settings)
    await cache.open()

    writer = cache.blob_writer(digest, len(payload))
    await writer.write(payload[: 12 * MIB])
    await writer.abort()

    writer = cache.blob_writer(digest, len(payload))
    await writer.write(payload[:-1] + b"x")
    with pytest.raises(DigestMismatch):
        await writer.commit()

    refused = ObjectStoreCache(with_secret(settings, "not-the-secret"))
    await refused.open()
    writer = refused.blob_writer(digest, len(payload))
    await writer.write(payload)  # several upload parts: the upload is refused
    with pytest.raises(CacheUnavailable, match="s3://"):
        await writer.commit()
    assert not writer.spool_path.exists()
    assert not refused.in_use(digest)

    assert bucket_keys(seaweed, settings) == []
    assert seaweed.pending_uploads() == []
    assert spool_files(settings) == []
    assert await cache.blob_size(digest) is None
    await refused.close()
    await cache.close()


async def test_cancelled_commit_leaves_no_upload_behind(seaweed: SeaweedS3, tmp_path: Path) -> None:
    """A commit cancelled in the middle of its multipart upload (a shutdown) lets the upload
    finish rather than strand it; close() waits for it."""
    payload = random.Random(9).randbytes(64 * MIB)
    settings = s3_settings(tmp_path)
    cache = ObjectStoreCache(settings)
    await cache.open()
    writer = cache.blob_writer(Digest.of(payload), len(payload))
    await writer.write(payload)
    commit = asyncio.ensure_future(writer.commit())
    for _ in range(500):  # until the upload has begun
        if seaweed.pending_uploads() or commit.done():
            break
        await asyncio.sleep(0.005)
    assert not commit.done()  # cancelled mid-upload
    commit.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await commit
    await cache.close()
    assert seaweed.pending_uploads() == []
    assert await cache.blob_size(Digest.of(payload)) == len(payload)
    assert spool_files(settings) == []


async def test_local_copies_are_bounded(seaweed: SeaweedS3, tmp_path: Path) -> None:
    """Committed blobs keep local copies up to a byte bound, the newest always; the others
    are read from the bucket."""
    cache = ObjectStoreCache(s3_settings(tmp_path), local_copy_bytes=2 * MIB)
    await cache.open()
    blobs = [random.Random(n).randbytes(MIB + n) for n in range(3)]
    digests = [await store_blob(cache, blob) for blob in blobs]
    paths = [cache.blob_path(d) for d in digests]
    assert paths[0] is None and paths[1] is None  # over the bound: evicted, oldest first
    assert paths[2] is not None and paths[2].read_bytes() == blobs[2]
    for digest, blob in zip(digests, blobs, strict=True):
        assert b"".join(await read(cache, digest, 0, len(blob))) == blob
    await cache.remove(Removal(frozenset({digests[2]})))
    assert cache.blob_path(digests[2]) is None
    assert await cache.blob_size(digests[2]) is None
    await cache.close()


async def test_a_blob_already_in_the_bucket_is_not_uploaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas commit the same blob (a follower keeps its verified copy too): the
    second commit finds the object and skips the upload; a third with other bytes under
    the same size is impossible (the digest is the key), so size is the check."""
    settings = s3_settings(tmp_path)
    first = ObjectStoreCache(settings)
    second = ObjectStoreCache(dataclasses.replace(settings, directory=tmp_path / "other"))
    await first.open()
    await second.open()
    uploads: list[Digest] = []
    upload = second._upload

    async def counted(spool: Path, digest: Digest) -> None:
        uploads.append(digest)
        await upload(spool, digest)

    monkeypatch.setattr(second, "_upload", counted)
    try:
        data = random.Random(5).randbytes(300_000)
        digest = await store_blob(first, data)
        assert await store_blob(second, data) == digest
        assert uploads == []
        assert b"".join(await read(second, digest, 0, len(data))) == data
        other = await store_blob(second, data[:1000])  # not in the bucket yet: uploaded
        assert uploads == [other]
    finally:
        await first.close()
        await second.close()


class PartGets:
    """Counts the ranged GETs of blob parts (``obstore.get_range_async`` as s3.py calls it),
    the most in flight at once, and injects faults into chosen parts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked: list[tuple[int, int]] = []
        self.in_flight = 0
        self.most = 0
        self.fail: dict[int, int] = {}  # part start -> failures left to inject
        self.short: set[int] = set()  # part starts answered one byte short
        real = obstore.get_range_async

        async def get_range(store: object, key: str, *, start: int, end: int) -> object:
            self.asked.append((start, end))
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                await asyncio.sleep(0.005)  # let the reader ask ahead
                if self.fail.get(start, 0) > 0:
                    self.fail[start] -= 1
                    raise GenericError(f"connection reset reading bytes {start}-{end}")
                got = await real(store, key, start=start, end=end)  # type: ignore[arg-type]
                return bytes(got)[:-1] if start in self.short else got
            finally:
                self.in_flight -= 1

        monkeypatch.setattr(s3_module.obstore, "get_range_async", get_range)


async def bucket_reader(tmp_path: Path, payload: bytes, name: str = "reader") -> ObjectStoreCache:
    """An instance over a bucket holding ``payload`` that has no local copy of it."""
    settings = s3_settings(tmp_path)
    writer = ObjectStoreCache(settings)
    await writer.open()
    await store_blob(writer, payload, chunk=4 * MIB)
    await writer.close()
    reader = ObjectStoreCache(dataclasses.replace(settings, directory=tmp_path / name))
    await reader.open()
    return reader


async def test_bucket_reads_keep_several_parts_in_flight_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranges of a blob read from the bucket (first byte, across part boundaries, last
    byte, the whole) come back byte-exact and in order with READ_AHEAD parts in flight;
    however slowly the client reads, no more parts than that are asked ahead of it."""
    payload = random.Random(11).randbytes(9 * READ_PART + 777)
    reader = await bucket_reader(tmp_path, payload)
    digest = Digest.of(payload)
    gets = PartGets(monkeypatch)
    for start, end in [
        (0, 1),
        (READ_PART - 3, 3 * READ_PART + 3),
        (len(payload) - 1, len(payload)),
    ]:
        assert b"".join(await read(reader, digest, start, end)) == payload[start:end]
    assert reader.blob_path(digest) is None  # ranges leave no local copy
    gets.asked.clear()
    got = b""
    async for chunk in reader.read_blob(digest, 0, len(payload)):
        assert len(gets.asked) <= len(got) // READ_PART + 1 + READ_AHEAD  # memory bound
        got += chunk
        await asyncio.sleep(0.02)  # a slow client: the read-ahead waits for it
    assert got == payload
    assert gets.most == READ_AHEAD
    assert sorted(gets.asked) == gets.asked  # asked in order, each part once
    assert len(gets.asked) == math.ceil(len(payload) / READ_PART)
    await reader.close()


async def test_a_part_that_fails_is_asked_again_or_the_read_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part whose GET fails once is asked again and the bytes are exact; one that fails
    every time ends the read with CacheUnavailable after a correct prefix; a part that
    comes back short ends the read there. Never a wrong or misplaced byte, never a copy."""
    payload = random.Random(12).randbytes(6 * READ_PART + 5)
    reader = await bucket_reader(tmp_path, payload)
    digest = Digest.of(payload)
    gets = PartGets(monkeypatch)
    gets.fail[2 * READ_PART] = 1
    assert b"".join(await read(reader, digest, READ_PART, len(payload))) == payload[READ_PART:]
    assert gets.asked.count((2 * READ_PART, 3 * READ_PART)) == 2

    for fault in ("fail", "short"):
        if fault == "fail":
            gets.fail[3 * READ_PART] = PART_ATTEMPTS
        else:
            gets.short.add(3 * READ_PART)
        got = b""
        with contextlib.suppress(CacheUnavailable):
            async for chunk in reader.read_blob(digest, 0, len(payload)):
                got += chunk
        assert got == payload[: len(got)]
        assert 3 * READ_PART <= len(got) < len(payload)
        assert reader.blob_path(digest) is None  # an incomplete read keeps no copy
    await reader.close()


async def test_a_whole_read_from_the_bucket_leaves_a_local_copy_for_the_next_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that reads a blob whole from the bucket keeps it as a verified local copy:
    the next read asks the bucket nothing and open_blob (zero-copy sending) has a file;
    without a copy open_blob has none."""
    payload = random.Random(13).randbytes(3 * READ_PART + 99)
    reader = await bucket_reader(tmp_path, payload)
    digest = Digest.of(payload)
    gets = PartGets(monkeypatch)
    async with reader.open_blob(digest) as fd:
        assert fd is None
    assert b"".join(await read(reader, digest, 0, len(payload))) == payload
    copy = reader.blob_path(digest)
    assert copy is not None and copy.read_bytes() == payload
    assert spool_files(s3_settings(tmp_path)) == []
    gets.asked.clear()
    assert b"".join(await read(reader, digest, 0, len(payload))) == payload
    assert gets.asked == []
    async with reader.open_blob(digest) as fd:
        assert fd is not None and os.fstat(fd).st_size == len(payload)
    await reader.close()


async def test_a_local_copy_is_only_kept_when_it_hashes_to_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes from the bucket that do not hash to the digest (a corrupt object) are never
    kept as a local copy, so they are not served again from disk."""
    payload = random.Random(14).randbytes(2 * READ_PART + 3)
    reader = await bucket_reader(tmp_path, payload)
    digest = Digest.of(payload)
    real = obstore.get_range_async

    async def corrupt(store: object, key: str, *, start: int, end: int) -> bytes:
        got = bytearray(await real(store, key, start=start, end=end))  # type: ignore[arg-type]
        got[0] ^= 0xFF
        return bytes(got)

    monkeypatch.setattr(s3_module.obstore, "get_range_async", corrupt)
    await read(reader, digest, 0, len(payload))
    assert reader.blob_path(digest) is None
    await reader.close()


async def test_a_local_copy_that_falls_behind_is_dropped_and_never_slows_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a disk that takes nothing (its writes blocked), a whole read from the bucket
    still completes byte-exact: the copy is dropped once IN_FLIGHT chunks wait for it."""
    payload = random.Random(15).randbytes((IN_FLIGHT + 3) * READ_PART)
    reader = await bucket_reader(tmp_path, payload)
    digest = Digest.of(payload)
    disk = threading.Event()
    write_sync = SpoolWriter._write_sync

    def stuck(self: SpoolWriter, chunk: bytes) -> None:
        disk.wait(30)
        write_sync(self, chunk)

    monkeypatch.setattr(SpoolWriter, "_write_sync", stuck)
    got = b""
    async for chunk in reader.read_blob(digest, 0, len(payload)):
        got += chunk
        if len(got) == len(payload):
            disk.set()  # the read is over: let the dropped copy's writes end
    assert got == payload
    assert reader.blob_path(digest) is None
    await reader.close()  # waits for the dropped copy's removal
    spooled = [p for p in (tmp_path / "reader").rglob("*") if "tmp" in p.parts and p.is_file()]
    assert [p.name for p in spooled] == [".lock"]  # only the (released) area's lock file
