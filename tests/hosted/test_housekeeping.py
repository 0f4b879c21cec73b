"""Scheduled garbage collection of hosted sets (housekeeping.py's ``GcSchedule``), with an
injected clock and no sleeps: when a run is due, one worker at a time across processes
sharing a directory (their ``flock``) and across replicas (the coordinator's lease and
record), what is recorded, counted in ``/metrics`` and shown on the status page. The real
gateway with two workers doing it on its own is in test_real_hosted_housekeeping.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mirrorrouter.api.monitor import HostedStatus, StatusSnapshot
from mirrorrouter.api.statuspage import render_status
from mirrorrouter.config import ConfigError, Secret, parse_settings
from mirrorrouter.config.model import CoordinationSettings
from mirrorrouter.coordination import Coordinator, LocalCoordinator
from mirrorrouter.coordination.redisbacked import RedisCoordinator
from mirrorrouter.hosted.gc import GcReport
from mirrorrouter.hosted.schedule import GC_RETRY_AFTER_FAILURE, GcRun, GcSchedule
from mirrorrouter.hosted.sets import HostedSets
from mirrorrouter.hosted.store import HostedStore
from mirrorrouter.metrics import Metrics
from mirrorrouter.reference import Digest
from tests.api.test_statuspage import Page
from tests.hosted.test_hosted import hosted_config
from tests.support.fakeregistry import FakeRegistry
from tests.support.inprocess import Clock, gateway
from tests.support.redisserver import RedisServer

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def settings_text(tmp_path: Path, keys: str = 'gc_interval = "1h"\ngc_grace = "1m"') -> str:
    return hosted_config(tmp_path, hosted=keys)


def utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def blobs(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class Worker:
    """One worker process's view of the hosted set ``team``: its own store, coordinator
    and metrics over the shared directory."""

    def __init__(self, text: str, clock: Clock, coordinator: Coordinator | None = None) -> None:
        settings = parse_settings(text)
        self.store = HostedStore(settings.hosted["team"], clock=clock)
        self.metrics = Metrics()
        self.gc = GcSchedule(self.store, coordinator or LocalCoordinator(), metrics=self.metrics)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def workers(tmp_path: Path, clock: Clock) -> AsyncIterator[tuple[Worker, Worker]]:
    pair = (Worker(settings_text(tmp_path), clock), Worker(settings_text(tmp_path), clock))
    for worker in pair:
        await worker.store.open()
    yield pair
    for worker in pair:
        await worker.store.close()


def blocked_gc(worker: Worker) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the worker's garbage collection wait: (entered, release)."""
    entered, release = asyncio.Event(), asyncio.Event()
    collect = worker.store.collect_garbage

    async def slow(*, dry_run: bool = False) -> GcReport:
        entered.set()
        await release.wait()
        return await collect(dry_run=dry_run)

    worker.store.collect_garbage = slow  # type: ignore[method-assign]
    return entered, release


# -- scheduling -------------------------------------------------------------------------


async def test_gc_runs_when_due_and_not_again_within_the_interval(
    workers: tuple[Worker, Worker], clock: Clock
) -> None:
    """With no run recorded the first look runs it; then nothing until gc_interval after
    that run began, also for a worker started afresh (the record outlives restarts)."""
    worker, _ = workers
    assert worker.gc.interval == HOUR and worker.gc.check_interval == 60
    first = await worker.gc.tick()
    assert first is not None and first.outcome == "ok" and first.started == clock.now
    assert worker.gc.next_run(await worker.gc.last_run()) == clock.now + HOUR
    clock.now += HOUR - 1
    assert await worker.gc.tick() is None
    restarted = GcSchedule(worker.store, LocalCoordinator())  # the same directory, anew
    assert await restarted.tick() is None
    clock.now += 1
    second = await restarted.tick()
    assert second is not None and second.started == first.started + HOUR


async def test_one_worker_collects_while_the_other_skips_without_waiting(
    workers: tuple[Worker, Worker], clock: Clock
) -> None:
    """Two workers sharing the set's directory: while one collects, the other's look ends at
    once (the lock is taken without waiting); once it is done the other finds the run
    recorded; the next interval again gets exactly one run."""
    first, second = workers
    entered, release = blocked_gc(first)
    running = asyncio.create_task(first.gc.tick())
    await asyncio.wait_for(entered.wait(), 5)
    assert await asyncio.wait_for(second.gc.tick(), 5) is None  # busy: skipped, not waited
    release.set()
    assert (await running) is not None
    assert await second.gc.tick() is None  # the record says it just ran
    clock.now += HOUR
    runs = await asyncio.gather(first.gc.tick(), second.gc.tick(), first.gc.tick())
    assert sum(run is not None for run in runs) == 1
    counts = [w.sample("mirrorrouter_gc_runs_total", hosted="team", outcome="ok") for w in workers]
    assert sum(count or 0 for count in counts) == 2


async def test_an_unreferenced_blob_is_collected_once_and_counted(
    workers: tuple[Worker, Worker], clock: Clock
) -> None:
    """A blob no manifest names goes at the first run; what went is recorded for both
    workers and counted by the worker that ran it; later runs remove nothing."""
    first, second = workers
    data = b"pushed, but its manifest never came"
    digest = Digest.of(data)
    await first.store.put_blob("app", digest, blobs(data))
    clock.now += 120  # past gc_grace
    run = await first.gc.tick()
    assert run is not None and (run.blobs, run.manifests, run.freed) == (1, 0, len(data))
    assert await first.store.storage.blob_size(digest) is None
    assert await second.gc.last_run() == run
    assert first.sample("mirrorrouter_gc_removed_total", hosted="team", kind="blob") == 1
    assert first.sample("mirrorrouter_gc_freed_bytes_total", hosted="team") == len(data)
    # Every worker that reads the record reports when the last run began.
    assert second.sample("mirrorrouter_gc_last_run_timestamp_seconds", hosted="team") == run.started
    clock.now += HOUR
    again = await second.gc.tick()
    assert again is not None and again.blobs == 0 and again.freed == 0


async def test_a_failed_run_is_recorded_and_tried_again_sooner(
    workers: tuple[Worker, Worker], clock: Clock
) -> None:
    """A run that raises is logged, recorded as failed with its reason and counted; the next
    one is due GC_RETRY_AFTER_FAILURE later, not a whole interval."""
    worker, _ = workers

    async def broken(*, dry_run: bool = False) -> GcReport:
        raise OSError("the disk is on fire")

    worker.store.collect_garbage = broken  # type: ignore[method-assign]
    run = await worker.gc.tick()
    assert run is not None and run.outcome == "failed" and "on fire" in run.error
    assert worker.sample("mirrorrouter_gc_runs_total", hosted="team", outcome="failed") == 1
    assert worker.gc.next_run(run) == run.started + GC_RETRY_AFTER_FAILURE
    clock.now += GC_RETRY_AFTER_FAILURE - 1
    assert await worker.gc.tick() is None
    clock.now += 1
    assert await worker.gc.tick() is not None


async def test_gc_interval_off_never_runs(tmp_path: Path, clock: Clock) -> None:
    """``gc_interval = "off"``: no chore is scheduled and a look never runs anything."""
    worker = Worker(settings_text(tmp_path, 'gc_interval = "off"'), clock)
    await worker.store.open()
    try:
        assert worker.gc.interval == 0 and worker.gc.next_run(None) is None
        assert await worker.gc.tick() is None
    finally:
        await worker.store.close()
    sets = HostedSets(parse_settings(settings_text(tmp_path, 'gc_interval = "0"')))
    assert [chore.name for chore in sets.housekeeper.chores] == ["hosted team"]
    sets = HostedSets(parse_settings(settings_text(tmp_path)))
    assert [c.name for c in sets.housekeeper.chores] == ["hosted team", "gc of hosted team"]
    assert sets.housekeeper.chores[1].interval == 60


def test_a_record_that_does_not_parse_counts_as_none() -> None:
    """A damaged record is ignored (the next run rewrites it) rather than failing the chore."""
    run = GcRun(1.0, 2.0, "ok", 3, 4, 5, 6, "host:1")
    assert GcRun.decode(run.encode()) == run
    for raw in ("", "{", "[]", '{"started": "x", "finished": 1, "outcome": "ok"}', '{"a": 1}'):
        assert GcRun.decode(raw) is None


# -- replicas ---------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def test_replicas_share_the_lease_and_the_record(
    tmp_path: Path, clock: Clock, redis_server: RedisServer
) -> None:
    """Two replicas, each with its own local directory, sharing Redis: while one collects
    the other skips (the lease), and afterwards it finds the run in Redis and skips too."""

    def replica(name: str) -> tuple[Worker, RedisCoordinator]:
        coordination = CoordinationSettings(
            backend="redis",
            redis_url=Secret(redis_server.redis_url),
            key_prefix="hk",
            advertise_url=f"http://{name}",
        )
        coordinator = RedisCoordinator(coordination)
        return Worker(settings_text(tmp_path / name), clock, coordinator), coordinator

    (first, one), (second, two) = replica("a"), replica("b")
    for worker in (first, second):
        await worker.store.open()
    try:
        entered, release = blocked_gc(first)
        running = asyncio.create_task(first.gc.tick())
        await asyncio.wait_for(entered.wait(), 5)
        assert await second.gc.tick() is None  # the lease is held by replica a
        release.set()
        run = await running
        assert run is not None and run.by == "http://a"
        assert await second.gc.last_run() == run  # from Redis: b's own directory has none
        assert await second.gc.tick() is None
        clock.now += HOUR
        assert await second.gc.tick() is not None
        assert (await first.gc.last_run() or run).by == "http://b"
    finally:
        for worker, coordinator in ((first, one), (second, two)):
            await worker.store.close()
            await coordinator.close()


# -- what operators see -----------------------------------------------------------------


async def test_metrics_and_status_page_show_the_last_run(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """After a scheduled run, /metrics has its counters and timestamp, and the status page
    its time, outcome, what it removed and freed, and when the next is due."""
    async with gateway(tmp_path, fake, settings_text(tmp_path)) as gw:
        data = b"an orphan layer"
        pushed = await gw.client.post(
            "/v2/team/app/blobs/uploads/", params={"digest": str(Digest.of(data))}, content=data
        )
        assert pushed.status_code == 201
        page = Page((await gw.client.get("/_/")).text).visible
        assert "team | 1h 0m | never" in page
        gw.clock.now += 120  # past gc_grace
        run = await gw.app.services.hosted.gc["team"].tick()
        assert run is not None and run.blobs == 1
        metrics = (await gw.client.get("/metrics")).text
        assert 'mirrorrouter_gc_runs_total{hosted="team",outcome="ok"} 1.0' in metrics
        assert 'mirrorrouter_gc_removed_total{hosted="team",kind="blob"} 1.0' in metrics
        assert f'mirrorrouter_gc_freed_bytes_total{{hosted="team"}} {float(len(data))}' in metrics
        registry = gw.app.services.metrics.registry
        last = registry.get_sample_value(
            "mirrorrouter_gc_last_run_timestamp_seconds", {"hosted": "team"}
        )
        assert last == run.started
        page = Page((await gw.client.get("/_/")).text).visible
        assert "1 blob · 0 manifests · 0 uploads" in page
        assert f"{len(data)} B" in page and "| ok |" in page
        assert utc(run.started) in page


def test_status_page_renders_gc_states() -> None:
    """Off, never run, a failure (its reason in a title) and a success with the next run."""
    started = 1_717_243_200.0
    failed = GcRun(started, started + 2, "failed", by="host:1", error='<b>"boom"</b>')
    done = GcRun(started, started + 2, "ok", 2, 1, 0, 3 * 1024**2, by="host:2")
    hosted = (
        HostedStatus("quiet", 0.0, None, None),
        HostedStatus("fresh", 86400.0, None, started),
        HostedStatus("broken", 86400.0, failed, started + 900),
        HostedStatus("team", 86400.0, done, started + 86400),
    )
    out = render_status(StatusSnapshot("0.1", started, (), (), hosted), now=started + 60)
    page = Page(out)
    text = page.visible
    assert "quiet | off | never" in text
    assert "fresh | 1d 0h | never" in text and "due now" in text
    assert "| failed |" in text and "<b>" not in out
    assert "2 blobs · 1 manifest · 0 uploads | 3.0 MiB | 2024-06-02 12:00:00" in text


def test_gc_interval_config(tmp_path: Path) -> None:
    """``gc_interval``: a day by default, a duration, or "off"/"0"; anything else is an
    error naming the key."""
    base = hosted_config(tmp_path)
    assert parse_settings(base).hosted["team"].gc_interval == 86400
    for value, seconds in (('"12h"', 43200), ('"off"', 0), ('"0"', 0), ("0", 0), ("90", 90)):
        text = hosted_config(tmp_path, hosted=f"gc_interval = {value}")
        assert parse_settings(text).hosted["team"].gc_interval == seconds
    with pytest.raises(ConfigError, match=r"hosted\.team\.gc_interval"):
        parse_settings(hosted_config(tmp_path, hosted='gc_interval = "soon"'))
