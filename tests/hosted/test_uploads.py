"""Upload sessions and the limits of what clients store (uploads.py, limits.py,
housekeeping.py), in-process with an injected clock: one request at a time per session
without waiting, the sweep of abandoned sessions, ``max_blob_size``, ``quota`` and
``max_uploads``. The same attacks against the real gateway are in test_hostile_uploads.py.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from mirrorrouter.config import ConfigError, parse_settings
from mirrorrouter.config.model import DEFAULT_MAX_BLOB_SIZE
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.housekeeping import Chore, Housekeeper, sweep_interval
from mirrorrouter.hosted.store import HostedStore
from mirrorrouter.hosted.uploads import UploadSessions
from mirrorrouter.reference import Digest
from tests.hosted.test_hosted import hosted_config, push_image
from tests.support.fakeregistry import FakeRegistry, make_image, sha256
from tests.support.inprocess import Clock, gateway

pytestmark = pytest.mark.anyio

KIB = 1024


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def store_for(tmp_path: Path, keys: str = "", clock: Clock | None = None) -> HostedStore:
    settings = parse_settings(hosted_config(tmp_path, hosted=keys))
    return HostedStore(settings.hosted["team"], clock=clock or Clock())


@contextmanager
def held_elsewhere(path: Path) -> Iterator[None]:
    """Another process's hold on a session: an flock on its own open file description."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def files(directory: Path) -> list[Path]:
    """The files under ``directory``, relative to it (lock files left out)."""
    return sorted(
        p.relative_to(directory) for p in directory.rglob("*") if p.is_file() and p.name != ".lock"
    )


# -- one request at a time per session, never waiting ------------------------------------


async def test_second_request_for_a_busy_session_is_refused_at_once(tmp_path: Path) -> None:
    """While one PATCH streams into a session, another is refused at once with 416 and
    the current Range, and the first one's bytes all arrive."""
    store = store_for(tmp_path)
    await store.open()
    try:
        upload = await store.start_upload("app")
        arrived, release = asyncio.Event(), asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield b"a" * 100
            arrived.set()
            await release.wait()  # the body stops arriving, for now
            yield b"b" * 50

        holder = asyncio.create_task(store.append(upload, stalled()))
        await arrived.wait()
        for attempt in (store.append(upload, chunks(b"x")), store.cancel(upload)):
            with pytest.raises(RegistryError) as refused:
                await asyncio.wait_for(attempt, 1.0)  # answered, not waiting
            assert refused.value.code is ErrorCode.BLOB_UPLOAD_INVALID
            assert refused.value.status == 416
            assert refused.value.headers["Range"].startswith("0-")
        release.set()
        assert (await holder).size == 150
        assert (await store.append(upload, chunks(b"c"), 150)).size == 151
    finally:
        await store.close()


async def test_session_held_by_another_process_is_refused_at_once(tmp_path: Path) -> None:
    """A session another worker process holds (its flock) is refused with 416 at once,
    finishing included, and is usable as soon as that process lets go."""
    store = store_for(tmp_path)
    await store.open()
    try:
        upload = await store.start_upload("app")
        upload = await store.append(upload, chunks(b"abc"))
        with held_elsewhere(store.sessions.uploads / upload.id):
            with pytest.raises(RegistryError) as refused:
                await asyncio.wait_for(store.append(upload, chunks(b"d")), 1.0)
            assert (refused.value.status, refused.value.headers["Range"]) == (416, "0-2")
            with pytest.raises(RegistryError):
                await store.finish(upload, Digest.parse(sha256(b"abc")), chunks())
        assert await store.finish(upload, Digest.parse(sha256(b"abc")), chunks()) == 3
    finally:
        await store.close()


async def test_disconnect_mid_chunk_releases_the_session(tmp_path: Path) -> None:
    """A body that ends with a disconnect keeps what arrived and lets go of the session."""
    store = store_for(tmp_path)
    await store.open()
    try:
        upload = await store.start_upload("app")

        async def gone() -> AsyncIterator[bytes]:
            yield b"z" * 10
            raise RegistryError(ErrorCode.BLOB_UPLOAD_INVALID, "client gone", status=499)

        with pytest.raises(RegistryError):
            await store.append(upload, gone())
        assert (await store.append(upload, chunks(b"!"), 10)).size == 11
    finally:
        await store.close()


# -- the sweep of abandoned sessions -------------------------------------------------------


async def test_sweep_removes_idle_sessions_only(tmp_path: Path) -> None:
    """Sessions idle longer than upload_ttl go; a recent one stays, and so does an idle one
    that a request (here or in another process) holds."""
    clock = Clock()
    store = store_for(tmp_path, 'upload_ttl = "10m"', clock)
    await store.open()
    try:
        abandoned = await store.start_upload("app")
        await store.append(abandoned, chunks(b"x" * 1000))
        held = await store.start_upload("app")
        clock.now += 601
        recent = await store.start_upload("app")
        uploads = store.sessions.uploads
        with held_elsewhere(uploads / held.id):
            swept = await store.housekeep()
        assert (swept.sessions, swept.bytes) == (1, 1000)
        remaining = {p.name for p in uploads.iterdir()}
        assert remaining == {held.id, f"{held.id}.json", recent.id, f"{recent.id}.json"}
        with pytest.raises(RegistryError) as unknown:
            await store.upload("app", abandoned.id)
        assert unknown.value.code is ErrorCode.BLOB_UPLOAD_UNKNOWN
        # Sweeping is idempotent: another worker sweeping the same directory finds nothing
        # more, and the one that was held goes once it is let go.
        other = UploadSessions(uploads, clock=clock)
        assert (await asyncio.to_thread(other.sweep, clock.now - 600)).sessions == 1
        assert {p.name for p in uploads.iterdir()} == {recent.id, f"{recent.id}.json"}
    finally:
        await store.close()


async def test_sweep_removes_a_state_file_left_by_a_crash(tmp_path: Path) -> None:
    """A state file without its data file (a crash between the two) is swept too."""
    clock = Clock()
    store = store_for(tmp_path, 'upload_ttl = "1m"', clock)
    await store.open()
    try:
        upload = await store.start_upload("app")
        (store.sessions.uploads / upload.id).unlink()
        clock.now += 61
        assert (await store.housekeep()).sessions == 1
        assert list(store.sessions.uploads.iterdir()) == []
    finally:
        await store.close()


async def test_a_request_racing_the_sweep_finds_the_session_gone(tmp_path: Path) -> None:
    """A request that looked a session up just before the sweep removed it is told the
    upload is unknown, and writes nothing back."""
    clock = Clock()
    store = store_for(tmp_path, 'upload_ttl = "1m"', clock)
    await store.open()
    try:
        upload = await store.start_upload("app")
        found = await store.upload("app", upload.id)
        clock.now += 61
        await store.housekeep()
        with pytest.raises(RegistryError) as unknown:
            await store.append(found, chunks(b"late"))
        assert unknown.value.code is ErrorCode.BLOB_UPLOAD_UNKNOWN
        assert list(store.sessions.uploads.iterdir()) == []
    finally:
        await store.close()


async def test_housekeeper_runs_chores_and_survives_a_failing_round() -> None:
    """Each chore runs every interval; a round that raises is logged and the next runs."""
    rounds: list[str] = []
    waits: list[float] = []
    done = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    async def flaky() -> None:
        rounds.append("flaky")
        if len(rounds) == 1:
            raise OSError("disk trouble")
        if len(rounds) >= 3:
            done.set()

    keeper = Housekeeper([Chore("flaky", 42.0, flaky)], sleep=sleep)
    keeper.start()
    await asyncio.wait_for(done.wait(), 5)
    await keeper.stop()
    assert len(rounds) >= 3 and set(waits) == {42.0}
    assert sweep_interval(3600) == 60 and sweep_interval(8) == 2 and sweep_interval(0.1) == 1


async def test_gc_sweeps_uploads_by_upload_ttl(tmp_path: Path, fake: FakeRegistry) -> None:
    """``gc`` ends idle sessions after upload_ttl, while gc_grace still spares young blobs."""
    keys = 'upload_ttl = "5m"\ngc_grace = "2h"'
    async with gateway(tmp_path, fake, hosted_config(tmp_path, hosted=keys)) as gw:
        started = await gw.client.post("/v2/team/app/blobs/uploads/")
        assert started.status_code == 202
        store = gw.app.services.hosted.stores["team"]
        gw.clock.now += 301
        report = await store.collect_garbage()
        assert report.uploads == 1
        assert (await gw.client.get(started.headers["location"])).status_code == 404


# -- limits ----------------------------------------------------------------------------


async def test_oversized_blobs_are_refused_as_they_stream(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Over max_blob_size: a monolithic POST, a PATCH and a final PUT get 413 SIZE_INVALID,
    and nothing of them is kept (no blob, the session cut back to where the chunk began)."""
    keys = 'max_blob_size = "64KiB"'
    async with gateway(tmp_path, fake, hosted_config(tmp_path, hosted=keys)) as gw:
        big = os.urandom(64 * KIB + 1)
        # Streamed (chunked: measured as it arrives), then with a Content-Length that
        # already says too much (refused before reading).
        for content in (chunks_of(big, 8 * KIB), big):
            posted = await gw.client.post(
                "/v2/team/app/blobs/uploads/", params={"digest": sha256(big)}, content=content
            )
            assert posted.status_code == 413, posted.text
            assert posted.json()["errors"][0]["code"] == "SIZE_INVALID"
        hosted = tmp_path / "cache" / "_hosted" / "team"
        assert [p for p in files(hosted) if "blobs" in p.parts or "tmp" in p.parts] == []

        started = await gw.client.post("/v2/team/app/blobs/uploads/")
        location = started.headers["location"]
        first = await gw.client.patch(location, content=big[: 60 * KIB])
        assert first.status_code == 202
        over = await gw.client.patch(location, content=chunks_of(big[60 * KIB :]))
        assert over.status_code == 413
        status = await gw.client.get(location)
        assert status.headers["range"] == f"0-{60 * KIB - 1}"  # the refused chunk is gone
        last = await gw.client.put(
            location, params={"digest": sha256(big)}, content=big[60 * KIB :]
        )
        assert last.status_code == 413
        assert (await gw.client.get(location)).headers["range"] == f"0-{60 * KIB - 1}"
        fits = big[: 64 * KIB]
        done = await gw.client.put(
            location, params={"digest": sha256(fits)}, content=fits[60 * KIB :]
        )
        assert done.status_code == 201, done.text


def chunks_of(data: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    return chunks(*(data[i : i + size] for i in range(0, len(data), size)))


async def test_quota_refuses_pushes_naming_the_set(tmp_path: Path, fake: FakeRegistry) -> None:
    """A push that would take the set over its quota gets 403 DENIED naming the set, for
    blobs, session chunks and manifests alike; gc frees room again."""
    keys = 'quota = "100KiB"\ngc_grace = "1m"'
    async with gateway(tmp_path, fake, hosted_config(tmp_path, hosted=keys)) as gw:
        image = make_image("app", [os.urandom(60 * KIB)])
        assert (await push_image(gw.client, "/v2/team/app", image, "v1")).status_code == 201
        store = gw.app.services.hosted.stores["team"]
        used = store.usage.total
        assert used == sum(len(b) for b in image.blobs.values()) + len(image.manifest)

        extra = os.urandom(50 * KIB)
        denied = await gw.client.post(
            "/v2/team/app/blobs/uploads/", params={"digest": sha256(extra)}, content=extra
        )
        assert denied.status_code == 403
        error = denied.json()["errors"][0]
        assert error["code"] == "DENIED" and "'team'" in error["message"]
        started = await gw.client.post("/v2/team/app/blobs/uploads/")
        location = started.headers["location"]
        assert (await gw.client.patch(location, content=chunks_of(extra))).status_code == 403
        assert (await gw.client.get(location)).headers["range"] == "0-0"
        assert store.usage.total == used  # nothing refused was counted, or kept

        # Room for the next image's blobs but not its manifest: the manifest is refused.
        other = make_image("app", [b"tiny layer"])
        room = 100 * KIB - used
        filler = os.urandom(room - len(b"tiny layer") - (len(other.manifest) - 1))
        assert (await gw.client.patch(location, content=filler)).status_code == 202
        for data in other.blobs.values():
            posted = await gw.client.post(
                "/v2/team/app/blobs/uploads/", params={"digest": sha256(data)}, content=data
            )
            assert posted.status_code == 201
        manifest = await gw.client.put(
            "/v2/team/app/manifests/v2",
            content=other.manifest,
            headers={"Content-Type": other.media_type},
        )
        assert manifest.status_code == 403, manifest.text

        assert (await gw.client.delete(location)).status_code == 204
        await gw.client.delete(f"/v2/team/app/manifests/{image.digest}")
        gw.clock.now += 3600
        await store.collect_garbage()
        assert store.usage.total < 1 * KIB
        assert (await push_blob_status(gw.client, extra)) == 201


async def push_blob_status(client: httpx.AsyncClient, data: bytes) -> int:
    answer = await client.post(
        "/v2/team/app/blobs/uploads/", params={"digest": sha256(data)}, content=data
    )
    return answer.status_code


async def test_usage_is_counted_from_storage_at_start(tmp_path: Path, fake: FakeRegistry) -> None:
    """A restarted gateway knows what the set holds (blobs, manifests, open uploads) before
    its first push, and housekeeping counts again what other workers stored."""
    keys = 'quota = "1MiB"'
    async with gateway(tmp_path, fake, hosted_config(tmp_path, hosted=keys)) as gw:
        image = make_image("app", [b"layer" * 100])
        await push_image(gw.client, "/v2/team/app", image, "v1")
        started = await gw.client.post("/v2/team/app/blobs/uploads/")
        await gw.client.patch(started.headers["location"], content=b"p" * 777)
        before = gw.app.services.hosted.stores["team"].usage.total
    async with gateway(tmp_path, fake, hosted_config(tmp_path, hosted=keys)) as gw:
        store = gw.app.services.hosted.stores["team"]
        # As stored, a manifest also carries its media type: a few bytes more.
        assert before <= store.usage.total < before + 100
        before = store.usage.total
        other = store_for(tmp_path, keys)  # another worker over the same directory
        await other.open()
        try:
            await other.put_blob("app", Digest.parse(sha256(b"elsewhere")), chunks(b"elsewhere"))
        finally:
            await other.close()
        assert store.usage.total == before
        await store.housekeep()
        assert store.usage.total == before + len(b"elsewhere")


async def test_max_uploads_refuses_one_more_session(tmp_path: Path, fake: FakeRegistry) -> None:
    """With max_uploads open sessions, one more gets 429 TOOMANYREQUESTS with Retry-After;
    finishing or cancelling one makes room."""
    keys = 'max_uploads = 2\nupload_ttl = "10m"'
    async with gateway(tmp_path, fake, hosted_config(tmp_path, hosted=keys)) as gw:
        sessions = [await gw.client.post("/v2/team/app/blobs/uploads/") for _ in range(2)]
        assert [s.status_code for s in sessions] == [202, 202]
        refused = await gw.client.post("/v2/team/app/blobs/uploads/")
        assert refused.status_code == 429
        assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert refused.headers["retry-after"] == str(round(sweep_interval(600)))
        # A monolithic upload needs no session.
        data = b"monolithic"
        assert await push_blob_status(gw.client, data) == 201
        assert (await gw.client.delete(sessions[0].headers["location"])).status_code == 204
        assert (await gw.client.post("/v2/team/app/blobs/uploads/")).status_code == 202


def test_limits_config_defaults_and_errors(tmp_path: Path) -> None:
    """The limits have their documented defaults, "none" lifts a size limit, and a bad
    value is an error naming its key."""
    team = parse_settings(hosted_config(tmp_path)).hosted["team"]
    assert (team.max_blob_size, team.quota, team.max_uploads, team.upload_ttl) == (
        DEFAULT_MAX_BLOB_SIZE,
        None,
        1000,
        3600.0,
    )
    keys = 'max_blob_size = "none"\nquota = "2GiB"\nmax_uploads = 5\nupload_ttl = "30m"'
    team = parse_settings(hosted_config(tmp_path, hosted=keys)).hosted["team"]
    assert (team.max_blob_size, team.quota, team.max_uploads, team.upload_ttl) == (
        None,
        2 * 1024**3,
        5,
        1800.0,
    )
    cases = {
        'max_blob_size = "huge"': "hosted.team.max_blob_size",
        "quota = 0": "hosted.team.quota",
        "max_uploads = 0": "hosted.team.max_uploads",
        'max_uploads = "many"': "hosted.team.max_uploads",
        "upload_ttl = 0": "hosted.team.upload_ttl",
    }
    for text, key in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_settings(hosted_config(tmp_path, hosted=text))
        assert key in str(caught.value), (text, str(caught.value))
