"""Cache bounds: sizes in the config, LRU eviction of whole images, pins, in-use blobs, the
background task, and eviction beside the running gateway (tests/support/inprocess.py)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mirrorrouter.cache import FilesystemCache
from mirrorrouter.cache.base import StoredManifest, TagRecord
from mirrorrouter.cache.eviction import LOCK_FILE, Evictor
from mirrorrouter.cache.pins import PinsError, change_runtime_pins, load_pins
from mirrorrouter.config import ConfigError, Settings, parse_settings
from mirrorrouter.reference import Digest
from mirrorrouter.sizes import format_size, parse_size
from mirrorrouter.timing import Timing
from tests.support.fakeregistry import (
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
    Image,
    sha256,
)
from tests.support.inprocess import gateway

pytestmark = pytest.mark.anyio

KIB = 1024


# ---------------------------------------------------------------------- sizes and config


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        ("1234B", 1234),
        ("500MiB", 500 * 1024**2),
        ("20GiB", 20 * 1024**3),
        ("20 GiB", 20 * 1024**3),
        ("1TB", 10**12),
        ("1tb", 10**12),
        ("1.5GB", 1_500_000_000),
        ("1.5KiB", 1536),
        ("2kB", 2000),
        ("3PiB", 3 * 1024**5),
        (" 7MB ", 7_000_000),
    ],
)
def test_parse_size_accepts(value: object, expected: int) -> None:
    """Bytes, or a number with a decimal (kB..PB) or binary (KiB..PiB) unit."""
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value", [-1, True, 1.5, "", "GiB", "-1GiB", "1 GiBs", "1XB", "1K", "1e9", None, [], "1.GB"]
)
def test_parse_size_refuses(value: object) -> None:
    assert parse_size(value) is None


def settings_for(tmp_path: Path, cache: str = "", docker: str = "", quay: str = "") -> Settings:
    return parse_settings(
        f"""
[cache]
directory = "{tmp_path / "cache"}"
{cache}
[upstreams."docker.io"]
mirrors = [{{ url = "http://upstream.test" }}]
{docker}
[upstreams."quay.io"]
mirrors = [{{ url = "http://quay.test" }}]
{quay}
"""
    )


def test_config_reads_limits_and_pins(tmp_path: Path) -> None:
    """[cache] max_size and pins; an upstream's cache max_size; pins reach every upstream."""
    settings = settings_for(
        tmp_path,
        cache='max_size = "100GiB"\npins = ["docker.io/library/alpine:*", "gcr.io/distroless/*"]',
        docker='[upstreams."docker.io".cache]\nmax_size = "20GiB"',
    )
    assert settings.cache.max_size == 100 * 1024**3
    assert settings.cache.pins == ("docker.io/library/alpine:*", "gcr.io/distroless/*")
    docker, quay = settings.upstreams["docker.io"], settings.upstreams["quay.io"]
    assert docker.cache.max_size == 20 * 1024**3 and quay.cache.max_size is None
    assert docker.cache.pins == quay.cache.pins == settings.cache.pins
    assert docker.cache.directory == tmp_path / "cache" / "docker.io"


def test_config_defaults_are_unbounded(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert settings.cache.max_size is None and settings.cache.pins == ()
    assert settings.upstreams["docker.io"].cache.max_size is None


@pytest.mark.parametrize(
    ("cache", "docker", "message"),
    [
        ('max_size = "lots"', "", "cache.max_size: expected a size such as 500MiB"),
        ("max_size = 0", "", "cache.max_size: expected a size"),
        ("max_size = -5", "", "cache.max_size: expected a size"),
        (
            "",
            '[upstreams."docker.io".cache]\nmax_size = "20 parsecs"',
            'upstreams."docker.io".cache.max_size: expected a size',
        ),
        ('pins = "docker.io/*"', "", "cache.pins: expected a list"),
        ("pins = [1]", "", "cache.pins: expected a list of strings"),
        ('pins = ["alpine:*"]', "", "registry first"),
        ('pins = ["docker.io/library/alpine"]', "", "for every tag"),
        ('pins = ["docker.io/library/alpine :1"]', "", "without spaces"),
        ('max_sise = "1GiB"', "", "cache.max_sise: unknown key"),
    ],
)
def test_config_problems_name_the_key(
    tmp_path: Path, cache: str, docker: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_for(tmp_path, cache=cache, docker=docker)
    assert message in str(caught.value)


def test_config_accepts_pin_patterns(tmp_path: Path) -> None:
    pins = [
        "docker.io/library/alpine:3.19",
        "*/library/*:latest",
        "registry.corp:5000/team/*",
        "localhost/app:*",
        f"docker.io/library/alpine@{sha256(b'x')}",
    ]
    assert settings_for(tmp_path, cache=f"pins = {json.dumps(pins)}").cache.pins == tuple(pins)


# ---------------------------------------------------------------------- a cache to evict from


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Caches:
    """Upstream caches filled directly, at chosen times."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clock = Clock()
        self.backends: dict[str, FilesystemCache] = {}

    async def backend(self, upstream: str) -> FilesystemCache:
        if upstream not in self.backends:
            cache = FilesystemCache(
                self.settings.upstreams[upstream].cache.directory, clock=self.clock
            )
            await cache.open()
            self.backends[upstream] = cache
        return self.backends[upstream]

    async def add(self, image: Image, tag: str, at: float, upstream: str = "docker.io") -> Image:
        """Cache an image as a pull would: blobs, manifest, tag record, links."""
        cache = await self.backend(upstream)
        self.clock.now = at
        for digest, data in image.blobs.items():
            if await cache.blob_size(Digest.parse(digest)) is None:
                writer = cache.blob_writer(Digest.parse(digest), len(data))
                await writer.write(data)
                await writer.commit()
        await self.put_manifest(cache, image.manifest, image.media_type)
        manifest = Digest.parse(image.digest)
        record = TagRecord(manifest, image.media_type, len(image.manifest), at)
        await cache.put_tag(image.repository, tag, record)
        await cache.link(image.repository, [manifest, *map(Digest.parse, image.blobs)])
        return image

    @staticmethod
    async def put_manifest(cache: FilesystemCache, data: bytes, media_type: str) -> None:
        await cache.put_manifest(StoredManifest(Digest.of(data), media_type, data))

    async def stored(self, image: Image, upstream: str = "docker.io") -> set[str]:
        """Which of the image's manifest and blobs are still cached."""
        inventory = await (await self.backend(upstream)).inventory()
        present = {*map(str, inventory.blobs), *map(str, inventory.manifests)}
        return {d for d in (image.digest, *image.blobs) if d in present}

    @staticmethod
    def whole(image: Image) -> set[str]:
        return {image.digest, *image.blobs}

    async def usage(self, upstream: str = "docker.io") -> int:
        inventory = await (await self.backend(upstream)).inventory()
        return inventory.stored_bytes + inventory.in_flight


def image_of(name: str, *sizes: int, repository: str | None = None) -> Image:
    """An image with its own config and layers of distinct bytes of the given sizes."""
    layers = [(f"{name}-{i}-".encode() * size)[:size] for i, size in enumerate(sizes)]
    return image_with(name, layers, repository)


def image_with(name: str, layers: list[bytes], repository: str | None = None) -> Image:
    """An image with its own config (make_image's configs are all alike) and these layers."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "name": name}).encode()
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256(b),
                "size": len(b),
            }
            for b in layers
        ],
    }
    blobs = {sha256(config): config, **{sha256(b): b for b in layers}}
    return Image(
        repository or f"library/{name}", json.dumps(document).encode(), OCI_MANIFEST, blobs
    )


async def image_bytes(caches: Caches, *images: Image) -> int:
    """What the images take in the cache (each digest once)."""
    inventory = await (await caches.backend("docker.io")).inventory()
    digests = {d for i in images for d in (i.digest, *i.blobs)}
    objects = {**inventory.blobs, **inventory.manifests}
    return sum(objects[Digest.parse(d)].size for d in digests)


@pytest.fixture
async def three(tmp_path: Path) -> AsyncIterator[tuple[Caches, list[Image]]]:
    """Unbounded settings and three 10 KiB images cached at t, t+100, t+200 (oldest first)."""
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    images = [
        await caches.add(image_of(name, 10 * KIB), "1", t + 100 * i)
        for i, name in enumerate(["old", "mid", "new"])
    ]
    yield caches, images


def bounded(caches: Caches, tmp_path: Path, **keys: str) -> Evictor:
    """An evictor over the same directories with [cache] keys (max_size, pins)."""
    lines = "\n".join(f"{k} = {v}" for k, v in keys.items())
    caches.settings = settings_for(tmp_path, cache=lines)
    return Evictor(caches.settings)


# ---------------------------------------------------------------------- eviction


async def test_least_recently_accessed_image_goes_whole(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """Over the limit, the oldest image goes: manifest, tag, links and blobs, nothing else."""
    caches, (old, mid, new) = three
    limit = await image_bytes(caches, mid, new) + 100
    report = await bounded(caches, tmp_path, max_size=str(limit)).enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(old.digest)]
    assert report.evicted[0].image.tags == (("library/old", "1"),)
    assert report.ok and report.usage["docker.io"] <= limit
    assert await caches.stored(old) == set()
    assert await caches.stored(mid) == caches.whole(mid)
    assert await caches.stored(new) == caches.whole(new)
    cache = await caches.backend("docker.io")
    assert await cache.get_tag("library/old", "1") is None
    assert not await cache.is_linked("library/old", Digest.parse(old.digest))
    assert await caches.usage() <= limit
    again = await Evictor(caches.settings).enforce()
    assert again.evicted == [] and again.ok  # under the limit: nothing more goes


async def test_under_the_limit_nothing_goes(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    caches, images = three
    report = await bounded(caches, tmp_path, max_size='"1GiB"').enforce()
    assert report.evicted == [] and report.ok
    assert all([await caches.stored(i) == caches.whole(i) for i in images])


async def test_without_limits_enforce_does_nothing(three: tuple[Caches, list[Image]]) -> None:
    caches, images = three
    report = await Evictor(caches.settings).enforce()
    assert report.evicted == [] and report.usage == {}
    assert all([await caches.stored(i) == caches.whole(i) for i in images])


async def test_an_access_makes_an_image_recent(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """A manifest served from memory (touch, persisted by the round) keeps its image."""
    caches, (old, mid, new) = three
    cache = await caches.backend("docker.io")
    caches.clock.now += 1000
    cache.touch(Digest.parse(old.digest))  # the hot path records, in memory only
    limit = await image_bytes(caches, old, new) + 100
    report = await bounded(caches, tmp_path, max_size=str(limit)).enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(mid.digest)]
    assert await caches.stored(old) == caches.whole(old)


async def test_a_blob_read_makes_an_image_recent(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    caches, (old, mid, new) = three
    cache = await caches.backend("docker.io")
    caches.clock.now += 1000
    layer = Digest.parse(next(iter(old.blobs)))
    _ = [chunk async for chunk in cache.read_blob(layer, 0, 10)]
    limit = await image_bytes(caches, old, new) + 100
    report = await bounded(caches, tmp_path, max_size=str(limit)).enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(mid.digest)]


async def test_shared_layers_stay_while_an_image_needs_them(tmp_path: Path) -> None:
    """Evicting an image keeps the base layer another image shares; a shared layer read by
    the busy image does not make the idle one recent."""
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    base = b"base layer " * 2000
    idle = await caches.add(image_with("idle", [base, b"idle" * 2000]), "1", t)
    busy = await caches.add(image_with("busy", [base, b"busy" * 2000]), "1", t + 100)
    cache = await caches.backend("docker.io")
    caches.clock.now = t + 1000
    _ = [c async for c in cache.read_blob(Digest.of(base), 0, 10)]  # busy's pulls read it
    limit = await image_bytes(caches, busy) + 100
    report = await bounded(caches, tmp_path, max_size=str(limit)).enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(idle.digest)]
    assert await caches.stored(busy) == caches.whole(busy)  # still complete
    assert await caches.stored(idle) == {sha256(base)}


async def test_an_index_goes_with_its_children(tmp_path: Path) -> None:
    """An index, its platform manifests and their blobs are one image."""
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    fake = FakeRegistry()
    amd64, arm64 = (
        image_of("amd64", 4 * KIB, repository="library/multi"),
        image_of("arm64", 5 * KIB, repository="library/multi"),
    )
    index = fake.add_index("library/multi", [amd64, arm64], "1")
    await caches.add(amd64, "amd64", t)
    await caches.add(arm64, "arm64", t)
    cache = await caches.backend("docker.io")
    data, _ = fake.manifests[("library/multi", index)]
    await caches.put_manifest(cache, data, OCI_INDEX)
    await cache.put_tag("library/multi", "1", TagRecord(Digest.parse(index), OCI_INDEX, 1, t))
    newer = await caches.add(image_of("newer", 4 * KIB), "1", t + 100)
    limit = await image_bytes(caches, newer) + 100
    report = await bounded(caches, tmp_path, max_size=str(limit)).enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(index)]
    assert report.evicted[0].image.tags == (
        ("library/multi", "1"),
    )  # the children are members, not images of their own
    assert await caches.stored(amd64) == set() and await caches.stored(arm64) == set()
    assert await cache.get_tag("library/multi", "amd64") is None


async def test_loose_blobs_are_evicted_by_their_own_access(tmp_path: Path) -> None:
    """A blob no cached manifest references is an image of its own."""
    caches = Caches(settings_for(tmp_path))
    cache = await caches.backend("docker.io")
    caches.clock.now = 1000.0
    loose = Digest.of(b"loose" * 1000)
    writer = cache.blob_writer(loose, 5000)
    await writer.write(b"loose" * 1000)
    await writer.commit()
    image = await caches.add(image_of("img", 4 * KIB), "1", 2000.0)
    limit = await image_bytes(caches, image) + 100
    report = await bounded(caches, tmp_path, max_size=str(limit)).enforce()
    assert [(e.image.root, e.image.is_manifest) for e in report.evicted] == [(loose, False)]
    assert await cache.blob_size(loose) is None


async def test_malformed_manifests_in_the_cache_are_evicted_like_any(tmp_path: Path) -> None:
    """Malformed manifests on disk (layers null, a string platform, not JSON, 100k deep):
    the survey arranges them without an exception, each is an image of what its
    well-formed parts reference, and they go oldest first like any other."""
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    cache = await caches.backend("docker.io")
    kept = image_of("kept", 4 * KIB)
    document = json.loads(kept.manifest)
    broken = [
        json.dumps({**document, "layers": None}).encode(),
        json.dumps(
            {"schemaVersion": 2, "manifests": [{"digest": sha256(b"gone"), "platform": "linux"}, 7]}
        ).encode(),
        b"\x00 not json",
        b"[" * 100_000,
    ]
    caches.clock.now = t
    for data in broken:
        await caches.put_manifest(cache, data, OCI_INDEX if b"manifests" in data else OCI_MANIFEST)
    newest = await caches.add(kept, "1", t + 100)
    [survey] = await Evictor(caches.settings).survey("docker.io")
    roots = {image.root for image in survey.images}
    assert {Digest.of(d) for d in broken[2:]} <= roots  # unreadable: images of their own
    assert Digest.of(broken[0]) in roots  # layers null: it still reaches its config
    assert Digest.parse(newest.digest) in roots
    report = await bounded(
        caches, tmp_path, max_size=str(await image_bytes(caches, kept))
    ).enforce()
    assert report.ok
    assert {e.image.root for e in report.evicted} == {Digest.of(d) for d in broken}
    assert await caches.stored(kept) == caches.whole(kept)


async def test_global_limit_spans_upstreams(tmp_path: Path) -> None:
    """[cache] max_size counts every upstream's cache; the oldest image anywhere goes."""
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    quay_old = await caches.add(image_of("q", 8 * KIB), "1", t, upstream="quay.io")
    docker_mid = await caches.add(image_of("d", 8 * KIB), "1", t + 100)
    quay_new = await caches.add(image_of("q2", 8 * KIB), "1", t + 200, upstream="quay.io")
    total = await caches.usage() + await caches.usage("quay.io")
    limit = total - 100  # one image must go
    report = await bounded(caches, tmp_path, max_size=str(limit)).enforce()
    assert [(e.upstream, e.image.root) for e in report.evicted] == [
        ("quay.io", Digest.parse(quay_old.digest))
    ]
    assert report.total <= limit
    assert await caches.stored(docker_mid) == caches.whole(docker_mid)
    assert await caches.stored(quay_new, "quay.io") == caches.whole(quay_new)


async def test_an_upstream_limit_evicts_from_that_upstream_only(tmp_path: Path) -> None:
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    quay_old = await caches.add(image_of("q", 8 * KIB), "1", t, upstream="quay.io")
    docker_old = await caches.add(image_of("d", 8 * KIB), "1", t + 100)
    docker_new = await caches.add(image_of("d2", 8 * KIB), "1", t + 200)
    limit = await image_bytes(caches, docker_new) + 100
    caches.settings = settings_for(
        tmp_path, docker=f'[upstreams."docker.io".cache]\nmax_size = {limit}'
    )
    report = await Evictor(caches.settings).enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(docker_old.digest)]
    assert report.limits == {"docker.io": limit, "quay.io": None}
    assert await caches.stored(quay_old, "quay.io") == caches.whole(quay_old)


async def test_prune_to_a_size_for_one_upstream(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """``to`` replaces the limit (unbounded config); ``upstream`` picks the cache."""
    caches, (old, mid, new) = three
    limit = await image_bytes(caches, new) + 100
    evictor = Evictor(caches.settings)
    assert not evictor.bounded
    quay = await evictor.enforce(upstream="quay.io", to=1)
    assert quay.evicted == [] and quay.ok  # an empty cache is within any size
    report = await evictor.enforce(upstream="docker.io", to=limit)
    assert [e.image.root for e in report.evicted] == [
        Digest.parse(old.digest),
        Digest.parse(mid.digest),
    ]
    assert report.freed == (report.evicted[0].image.size + report.evicted[1].image.size)


async def test_dry_run_removes_nothing(tmp_path: Path, three: tuple[Caches, list[Image]]) -> None:
    caches, (old, mid, new) = three
    limit = await image_bytes(caches, new) + 100
    evictor = bounded(caches, tmp_path, max_size=str(limit))
    plan = await evictor.enforce(dry_run=True)
    assert plan.dry_run and plan.ok
    assert [e.image.root for e in plan.evicted] == [
        Digest.parse(old.digest),
        Digest.parse(mid.digest),
    ]
    assert all([await caches.stored(i) == caches.whole(i) for i in (old, mid, new)])
    done = await evictor.enforce()
    assert [e.image.root for e in done.evicted] == [e.image.root for e in plan.evicted]
    assert [e.freed for e in done.evicted] == [e.freed for e in plan.evicted]


# ---------------------------------------------------------------------- pins


async def test_pinned_image_is_never_evicted(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """The oldest image is pinned by the config: the next oldest goes instead."""
    caches, (old, mid, new) = three
    limit = await image_bytes(caches, old, new) + 100
    evictor = bounded(caches, tmp_path, max_size=str(limit), pins='["docker.io/library/old:*"]')
    report = await evictor.enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(mid.digest)]
    assert await caches.stored(old) == caches.whole(old)


async def test_pins_win_over_the_limit(tmp_path: Path, three: tuple[Caches, list[Image]]) -> None:
    """When pins alone exceed the limit, they stay and the round says so."""
    caches, images = three
    evictor = bounded(caches, tmp_path, max_size="1", pins='["docker.io/library/*"]')
    report = await evictor.enforce()
    assert report.evicted == [] and not report.ok
    assert [(s.scope, s.limit) for s in report.shortfalls] == [("total", 1)]
    assert all([await caches.stored(i) == caches.whole(i) for i in images])


async def test_runtime_pins_are_kept_in_the_cache_directory(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    caches, (old, mid, new) = three
    evictor = bounded(caches, tmp_path, max_size=str(await image_bytes(caches, old, new) + 100))
    assert change_runtime_pins(caches.settings, add="docker.io/library/old:1")
    assert not change_runtime_pins(caches.settings, add="docker.io/library/old:1")
    assert load_pins(caches.settings).runtime == ("docker.io/library/old:1",)
    assert json.loads((tmp_path / "cache" / "pins.json").read_text()) == {
        "pins": ["docker.io/library/old:1"]
    }
    report = await evictor.enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(mid.digest)]
    assert await caches.stored(old) == caches.whole(old)
    assert change_runtime_pins(caches.settings, remove="docker.io/library/old:1")
    assert not change_runtime_pins(caches.settings, remove="docker.io/library/old:1")
    await caches.add(image_of("newest", 10 * KIB), "1", caches.clock.now + 1000)
    report = await evictor.enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(old.digest)]


async def test_a_pin_keeps_what_an_unpinned_image_shares(tmp_path: Path) -> None:
    """Evicting an image never takes a blob a pinned image reaches."""
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    base = b"base layer " * 2000
    idle = await caches.add(image_with("idle", [base, b"idle" * 2000]), "1", t)
    pinned = await caches.add(image_with("keep", [base, b"keep" * 2000]), "1", t + 100)
    evictor = bounded(caches, tmp_path, max_size="1", pins='["docker.io/library/keep:1"]')
    report = await evictor.enforce()
    assert [e.image.root for e in report.evicted] == [Digest.parse(idle.digest)]
    assert await caches.stored(pinned) == caches.whole(pinned)


async def test_a_pinned_index_keeps_every_platform(tmp_path: Path) -> None:
    caches = Caches(settings_for(tmp_path))
    t = caches.clock.now
    fake = FakeRegistry()
    amd64, arm64 = (
        image_of("amd64", 4 * KIB, repository="library/multi"),
        image_of("arm64", 5 * KIB, repository="library/multi"),
    )
    index = fake.add_index("library/multi", [amd64, arm64], "1")
    cache = await caches.backend("docker.io")
    for child in (amd64, arm64):
        await caches.add(child, "x", t)
    data, _ = fake.manifests[("library/multi", index)]
    await caches.put_manifest(cache, data, OCI_INDEX)
    await cache.put_tag("library/multi", "1", TagRecord(Digest.parse(index), OCI_INDEX, 1, t))
    await caches.add(image_of("other", 4 * KIB), "1", t + 100)
    evictor = bounded(caches, tmp_path, max_size="1", pins='["docker.io/library/multi:1"]')
    report = await evictor.enforce()
    assert [e.image.tags for e in report.evicted] == [(("library/other", "1"),)]
    assert await caches.stored(amd64) == caches.whole(amd64)
    assert await caches.stored(arm64) == caches.whole(arm64)
    assert Digest.parse(index) in (await cache.inventory()).manifests


async def test_pin_by_digest(tmp_path: Path, three: tuple[Caches, list[Image]]) -> None:
    caches, (old, mid, _) = three
    evictor = bounded(
        caches, tmp_path, max_size="1", pins=json.dumps([f"docker.io/library/old@{old.digest}"])
    )
    await evictor.enforce()
    assert await caches.stored(old) == caches.whole(old)
    assert await caches.stored(mid) == set()


async def test_unreadable_runtime_pins_stop_eviction(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """A broken pins.json could un-pin anything: nothing is evicted until it is fixed."""
    caches, images = three
    evictor = bounded(caches, tmp_path, max_size="1")
    (tmp_path / "cache" / "pins.json").write_text("{not json")
    with pytest.raises(PinsError, match=r"pins\.json"):
        await evictor.enforce()
    (tmp_path / "cache" / "pins.json").write_text('{"pins": "x"}')
    with pytest.raises(PinsError):
        await evictor.enforce()
    assert all([await caches.stored(i) == caches.whole(i) for i in images])


# ---------------------------------------------------------------------- in use


async def test_an_image_being_served_is_skipped(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """The oldest image's layer is being read: it is skipped whole, the next one goes; once
    the reader is done it can go."""
    caches, (old, mid, new) = three
    cache = await caches.backend("docker.io")
    layer = Digest.parse(next(d for d, b in old.blobs.items() if len(b) == 10 * KIB))
    caches.clock.now = (await cache.inventory()).blobs[layer].accessed  # a long download
    reader = cache.read_blob(layer, 0, 10 * KIB)
    first = await anext(reader)
    limit = await image_bytes(caches, old, new) + 100
    evictor = bounded(caches, tmp_path, max_size=str(limit))
    plan = await evictor.enforce(dry_run=True)
    assert [e.image.root for e in plan.evicted] == [Digest.parse(mid.digest)]
    report = await evictor.enforce()
    assert [i.root for _, i in report.in_use] == [Digest.parse(old.digest)]
    assert [e.image.root for e in report.evicted] == [Digest.parse(mid.digest)]
    assert first + b"".join([c async for c in reader]) == old.blobs[str(layer)]
    assert await caches.stored(old) == caches.whole(old)
    report = await bounded(caches, tmp_path, max_size="1").enforce()
    assert {e.image.root for e in report.evicted} == {
        Digest.parse(old.digest),
        Digest.parse(new.digest),
    }


async def test_a_reader_in_another_process_is_respected(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    caches, (old, mid, new) = three
    cache = await caches.backend("docker.io")
    path = cache.blob_path(Digest.parse(next(iter(old.blobs))))
    assert path is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what read_blob in another worker holds
        report = await bounded(caches, tmp_path, max_size="1").enforce()
    finally:
        os.close(fd)
    assert [i.root for _, i in report.in_use] == [Digest.parse(old.digest)]
    assert await caches.stored(old) == caches.whole(old)
    assert await caches.stored(mid) == set() and await caches.stored(new) == set()


async def test_one_process_evicts_at_a_time(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """While another process holds the eviction lock, a round is skipped (busy)."""
    caches, images = three
    evictor = bounded(caches, tmp_path, max_size="1")
    fd = os.open(tmp_path / "cache" / LOCK_FILE, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        report = await evictor.enforce()
    finally:
        os.close(fd)
    assert report.busy and not report.ok and report.evicted == []
    assert all([await caches.stored(i) == caches.whole(i) for i in images])
    assert (await evictor.enforce()).evicted != []


# ---------------------------------------------------------------------- the background task


async def test_run_enforces_every_interval(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    """start() runs a round at once and then one per interval, until stop()."""
    caches, (old, mid, new) = three
    sleeps: list[float] = []
    first_round = asyncio.Event()
    second_round = asyncio.Event()
    forever = asyncio.Event()

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        first_round.set()
        if len(sleeps) == 1:
            await second_round.wait()  # the test adds an image, then lets the loop go on
        else:
            forever.set()
            await asyncio.Event().wait()

    limit = await image_bytes(caches, mid, new) + 100
    caches.settings = settings_for(tmp_path, cache=f"max_size = {limit}")
    evictor = Evictor(caches.settings, timing=Timing(sleep=sleep))
    evictor.start(interval=30.0)
    await first_round.wait()
    assert await caches.stored(old) == set()
    latest = await caches.add(image_of("latest", 10 * KIB), "1", caches.clock.now + 1000)
    second_round.set()
    await forever.wait()
    await evictor.stop()
    assert sleeps == [30.0, 30.0]
    assert await caches.stored(mid) == set()
    assert await caches.stored(latest) == caches.whole(latest)


async def test_committed_starts_a_round_when_over_the_limit(
    tmp_path: Path, three: tuple[Caches, list[Image]]
) -> None:
    caches, (old, mid, new) = three
    limit = await image_bytes(caches, old, mid, new) + 100
    evictor = bounded(caches, tmp_path, max_size=str(limit))
    await evictor.enforce()  # measured: within the limit
    evictor.committed("docker.io", 10)
    await evictor.wait_idle()
    assert await caches.stored(old) == caches.whole(old)  # 10 bytes more still fit
    extra = await caches.add(image_of("extra", 10 * KIB), "1", caches.clock.now + 1000)
    evictor.committed("docker.io", await image_bytes(caches, extra))
    evictor.committed("docker.io", 0)  # while a round is on: one more, not one each
    await evictor.wait_idle()
    assert await caches.stored(old) == set()
    assert await caches.stored(extra) == caches.whole(extra)
    await evictor.stop()


async def test_committed_is_free_without_limits(three: tuple[Caches, list[Image]]) -> None:
    caches, _ = three
    evictor = Evictor(caches.settings)
    evictor.committed("docker.io", 10**12)
    await evictor.wait_idle()
    await evictor.stop()


# ---------------------------------------------------------------------- beside the gateway


class PausedBlob(httpx.AsyncBaseTransport):
    """Delivers one blob's body only when released: its download stays in flight."""

    def __init__(self, inner: httpx.AsyncBaseTransport, digest: str) -> None:
        self.inner = inner
        self.digest = digest
        self.paused = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not (request.method == "GET" and request.url.path.endswith(self.digest)):
            return response
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Held(self, body)
        )


class _Held(httpx.AsyncByteStream):
    def __init__(self, paused: PausedBlob, body: bytes) -> None:
        self.paused = paused
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.paused.paused.set()
        await self.paused.release.wait()
        yield self.body


async def pull(client: httpx.AsyncClient, image: Image, tag: str) -> None:
    """Pull an image through the gateway and check every byte."""
    name = image.repository
    manifest = await client.get(f"/v2/{name}/manifests/{tag}")
    assert manifest.status_code == 200 and manifest.content == image.manifest
    for digest, data in image.blobs.items():
        blob = await client.get(f"/v2/{name}/blobs/{digest}")
        assert blob.status_code == 200 and blob.content == data


def set_access(directory: Path, image: Image, when: float) -> None:
    """Date every cached object of an image (the gateway's caches run on real time)."""
    for text in (image.digest, *image.blobs):
        digest = Digest.parse(text)
        for path in (
            directory / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex,
            directory / "manifests" / digest.algorithm / digest.hex,
        ):
            if path.exists():
                os.utime(path, (when, when))


def gateway_config(tmp_path: Path, cache: str = "", docker: str = "") -> str:
    return f"""
[cache]
directory = "{tmp_path / "cache"}"
{cache}
[upstreams."docker.io"]
tag_ttl = "60s"
mirrors = [{{ url = "http://upstream.test" }}]
{docker}
"""


async def test_eviction_beside_a_pull_in_flight(tmp_path: Path, fake: FakeRegistry) -> None:
    """With a small limit and a pull in flight, a round keeps the cache (the download
    counted) under the limit by evicting the oldest image; the download completes whole,
    and the evicted image is fetched again, correct, on its next pull."""
    old = fake.add(image_of("old", 100 * KIB), "1")
    mid = fake.add(image_of("mid", 100 * KIB), "1")
    new = fake.add(image_of("new", 300 * KIB), "1")
    big = next(d for d, b in new.blobs.items() if len(b) == 300 * KIB)
    limit = 450 * KIB
    text = gateway_config(tmp_path, docker=f'[upstreams."docker.io".cache]\nmax_size = {limit}')
    held: list[PausedBlob] = []

    def wrap(transport: httpx.ASGITransport) -> httpx.AsyncBaseTransport:
        held.append(PausedBlob(transport, big))
        return held[0]

    directory = tmp_path / "cache" / "docker.io"
    async with gateway(tmp_path, fake, text, wrap=wrap) as gw:
        await pull(gw.client, old, "1")
        await pull(gw.client, mid, "1")
        set_access(directory, old, 1000.0)
        set_access(directory, mid, 2000.0)
        manifest = await gw.client.get("/v2/library/new/manifests/1")
        assert manifest.status_code == 200
        download = asyncio.get_running_loop().create_task(
            gw.client.get(f"/v2/library/new/blobs/{big}")
        )
        await held[0].paused.wait()

        evictor = gw.app.services.evictor  # the gateway's own, so rounds never overlap
        await evictor.wait_idle()
        report = await evictor.enforce()
        assert [e.image.root for e in report.evicted] == [Digest.parse(old.digest)]
        inventory = await FilesystemCache(directory).inventory()
        assert inventory.in_flight == 300 * KIB  # the download counts at its full size
        assert inventory.stored_bytes + inventory.in_flight <= limit
        assert report.ok and report.usage["docker.io"] <= limit
        assert not (set(map(str, inventory.blobs)) & set(old.blobs))

        held[0].release.set()
        response = await download
        assert response.status_code == 200 and response.content == new.blobs[big]
        assert (await evictor.enforce()).evicted == []  # committed: still within the limit

        fetched = fake.count("GET", "/blobs/")
        await pull(gw.client, old, "1")  # manifest from memory, blobs fetched again
        assert fake.count("GET", "/blobs/") == fetched + len(old.blobs)
        inventory = await FilesystemCache(directory).inventory()
        assert set(old.blobs) <= set(map(str, inventory.blobs))
        set_access(directory, old, 3000.0)
        # Over the limit again, mid now the oldest: the round the commit woke, or this one,
        # removes it; either way it is gone and the cache fits.
        await evictor.wait_idle()
        await evictor.enforce()
        inventory = await FilesystemCache(directory).inventory()
        assert not (set(map(str, inventory.blobs)) & (set(mid.blobs) - set(old.blobs)))
        assert inventory.stored_bytes <= limit
        await pull(gw.client, old, "1")
        await pull(gw.client, mid, "1")  # evicted twice over, served right every time


async def test_gateway_pins_survive_a_round(tmp_path: Path, fake: FakeRegistry) -> None:
    """The oldest image is pinned: the round evicts the next one, and the pinned image
    is still served from the cache, complete, with no upstream request."""
    old = fake.add(image_of("old", 50 * KIB), "1")
    mid = fake.add(image_of("mid", 50 * KIB), "1")
    text = gateway_config(tmp_path, cache='max_size = "60KiB"\npins = ["docker.io/library/old:*"]')
    directory = tmp_path / "cache" / "docker.io"
    async with gateway(tmp_path, fake, text) as gw:
        await pull(gw.client, old, "1")
        await pull(gw.client, mid, "1")
        set_access(directory, old, 1000.0)
        set_access(directory, mid, 2000.0)
        # The round (or the one mid's commit woke) evicts: never the pinned old, so mid goes.
        evictor = gw.app.services.evictor
        await evictor.wait_idle()
        await evictor.enforce()
        inventory = await FilesystemCache(directory).inventory()
        stored = set(map(str, inventory.blobs))
        assert set(old.blobs) <= stored and not (set(mid.blobs) - set(old.blobs)) & stored
        before = len(fake.requests)
        await pull(gw.client, old, "1")
        assert len(fake.requests) == before  # all of it from the cache


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1023, 1536, 20 * 1024**3, 3 * 1024**5)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "20.0 GiB",
        "3072.0 TiB",
    ]
