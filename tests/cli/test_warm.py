"""Warm-up, export and import against the in-process fake registry and gateway.

Each test warms (or imports) with a ``Pullthrough`` of its own over a cache directory, then
pulls through the in-process gateway on that directory with every upstream down.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from mirrorrouter.cli.exporter import ExportReport, export_images
from mirrorrouter.cli.importer import ImportReport, import_archive
from mirrorrouter.cli.layout import REF_NAME
from mirrorrouter.cli.main import main
from mirrorrouter.cli.warmer import (
    Warmer,
    WarmReport,
    read_image_list,
)
from mirrorrouter.config import Settings, parse_settings
from mirrorrouter.manifests import PlatformSelector
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.reference import Digest
from mirrorrouter.timing import Timing
from tests.support.fakeregistry import OCI_INDEX, FakeRegistry, Image, make_image, sha256
from tests.support.inprocess import Clock, config, gateway

pytestmark = pytest.mark.anyio


class DeadTransport(httpx.AsyncBaseTransport):
    """Every upstream down: each request is refused, and counted."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        raise httpx.ConnectError("connection refused", request=request)


async def no_sleep(seconds: float) -> None:
    return None


def settings_at(root: Path) -> Settings:
    """The in-process config with its cache under ``root`` (a fresh directory: empty)."""
    return parse_settings(config(root), env={"HUB_PASSWORD": "hunter2"})


def pullthrough(
    settings: Settings, fake: FakeRegistry | None, clock: Clock | None = None
) -> Pullthrough:
    clock = clock or Clock()
    transport: httpx.AsyncBaseTransport = (
        httpx.ASGITransport(app=fake.app) if fake is not None else DeadTransport()
    )
    return Pullthrough(
        settings, transport=transport, timing=Timing(wall=clock, monotonic=clock, sleep=no_sleep)
    )


async def warm(
    root: Path,
    fake: FakeRegistry | None,
    images: list[str],
    platforms: str = "linux/amd64",
) -> WarmReport:
    settings = settings_at(root)
    pull = pullthrough(settings, fake)
    try:
        warmer = Warmer(pull, settings, platforms=PlatformSelector.parse(platforms))
        return await warmer.run(images)
    finally:
        await pull.close()


async def export(
    root: Path,
    fake: FakeRegistry | None,
    images: list[str],
    output: Path,
    *,
    platforms: str = "linux/amd64",
    cached_only: bool = False,
) -> ExportReport:
    settings = settings_at(root)
    pull = pullthrough(settings, fake)
    try:
        return await export_images(
            pull,
            settings,
            images,
            output,
            platforms=PlatformSelector.parse(platforms),
            cached_only=cached_only,
        )
    finally:
        await pull.close()


async def import_into(root: Path, archive: Path) -> ImportReport:
    settings = settings_at(root)
    pull = pullthrough(settings, None)  # importing never needs an upstream
    try:
        return await import_archive(pull, settings, archive)
    finally:
        await pull.close()


def dead(_: httpx.ASGITransport) -> httpx.AsyncBaseTransport:
    return DeadTransport()


def stored_files(cache: Path) -> list[Path]:
    """Every committed object of a cache directory (blobs, manifests, tags, links)."""
    return [
        p
        for sub in ("blobs", "manifests", "repositories")
        for p in (cache / sub).rglob("*")
        if p.is_file()
    ]


@pytest.fixture
def multi(fake: FakeRegistry) -> tuple[str, list[Image]]:
    """library/multi:1, an index over linux/amd64, linux/arm64 and linux/s390x images."""
    children = [
        make_image("library/multi", [f"{arch} layer".encode() * 100, f"{arch} top".encode()])
        for arch in ("amd64", "arm64", "s390x")
    ]
    return fake.add_index("library/multi", children, "1"), children


# ---------------------------------------------------------------------- warm


async def test_warmed_image_pulls_with_every_upstream_down(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """After warm, the gateway on the same cache serves the tag and every blob from cache
    while every upstream refuses connections."""
    report = await warm(tmp_path, fake, ["alpine:3.19"])
    assert report.ok, report.summary()
    transport = DeadTransport()
    async with gateway(tmp_path, fake, wrap=lambda _: transport) as gw:
        manifest = await gw.client.get("/v2/library/alpine/manifests/3.19")
        assert manifest.status_code == 200 and manifest.headers["x-cache"] == "HIT"
        assert manifest.content == image.manifest
        assert manifest.headers["docker-content-digest"] == image.digest
        for digest, data in image.blobs.items():
            blob = await gw.client.get(f"/v2/library/alpine/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data
            assert blob.headers["x-cache"] == "HIT"
    assert transport.requests == 0


async def test_default_platform_takes_only_linux_amd64(
    tmp_path: Path, fake: FakeRegistry, multi: tuple[str, list[Image]]
) -> None:
    """By default only the linux/amd64 child manifest of an index and its blobs are fetched."""
    index_digest, (amd64, arm64, s390x) = multi
    report = await warm(tmp_path, fake, ["docker.io/library/multi:1"])
    assert report.ok, report.summary()
    [result] = report.results
    assert result.platforms == ["linux/amd64"]
    assert [str(m.digest) for m in result.manifests] == [index_digest, amd64.digest]
    assert fake.count("GET", f"/manifests/{amd64.digest}") == 1
    for other in (arm64, s390x):
        assert fake.count("GET", f"/manifests/{other.digest}") == 0
    fetched = {p for _, p in fake.requests if "/blobs/" in p}
    assert fetched == {f"/v2/library/multi/blobs/{d}" for d in amd64.blobs}


async def test_platform_all_takes_every_entry(
    tmp_path: Path, fake: FakeRegistry, multi: tuple[str, list[Image]]
) -> None:
    """--platform all fetches every child manifest and every blob they name."""
    _, children = multi
    report = await warm(tmp_path, fake, ["library/multi:1"], platforms="all")
    assert report.ok, report.summary()
    assert report.results[0].platforms == ["linux/amd64", "linux/arm64", "linux/s390x"]
    for child in children:
        assert fake.count("GET", f"/manifests/{child.digest}") == 1
    every = {d for child in children for d in child.blobs}
    assert {p.rsplit("/", 1)[1] for _, p in fake.requests if "/blobs/" in p} == every


async def test_listed_platforms_and_a_missing_one(
    tmp_path: Path, fake: FakeRegistry, multi: tuple[str, list[Image]]
) -> None:
    """A platform list takes those entries; a platform the index lacks fails the image and
    says what the index offers."""
    _, (amd64, arm64, s390x) = multi
    report = await warm(tmp_path, fake, ["library/multi:1"], platforms="linux/arm64,linux/s390x")
    assert report.results[0].platforms == ["linux/arm64", "linux/s390x"]
    assert fake.count("GET", f"/manifests/{amd64.digest}") == 0
    assert fake.count("GET", f"/manifests/{arm64.digest}") == 1
    assert fake.count("GET", f"/manifests/{s390x.digest}") == 1
    missing = await warm(tmp_path / "other", fake, ["library/multi:1"], platforms="linux/riscv64")
    assert not missing.ok
    assert "no manifest for linux/riscv64" in (missing.results[0].error or "")
    assert "linux/amd64, linux/arm64, linux/s390x" in (missing.results[0].error or "")


async def test_summary_counts_fetched_and_cached(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """The counts: blobs shared by two images are fetched once; a second run finds all
    cached; a failed image is named with its reason and makes the run fail."""
    other = fake.add(
        make_image("library/other", [b"layer-one" * 1000, b"other top layer"]), "2"
    )  # shares its config and the first layer with alpine:3.19
    first = await warm(tmp_path, fake, ["alpine:3.19", "other:2", "library/absent:1"])
    unique = {**image.blobs, **other.blobs}
    assert not first.ok
    assert [r.ok for r in first.results] == [True, True, False]
    assert first.total("blobs_fetched") == len(unique) == 4
    assert first.total("blobs_fetched") + first.total("blobs_cached") == 6
    assert first.total("bytes_fetched") == sum(len(b) for b in unique.values())
    assert first.total("manifests_fetched") == 2
    assert fake.count("GET", "/blobs/") == 4
    assert "MANIFEST_UNKNOWN" in (first.results[2].error or "") or "not found" in (
        first.results[2].error or ""
    )
    lines = first.summary()
    assert lines[0] == "warmed 2 of 3 images, 1 failed"
    assert lines[1] == "  manifests: 2 fetched, 0 already cached"
    assert lines[2].startswith("  blobs (layers and configs): 4 fetched")
    assert lines[-1].startswith("FAILED  docker.io/library/absent:1")

    again = await warm(tmp_path, fake, ["alpine:3.19", "other:2"])
    assert again.ok
    assert (again.total("blobs_fetched"), again.total("blobs_cached")) == (0, 6)
    assert (again.total("manifests_fetched"), again.total("manifests_cached")) == (0, 2)
    assert again.total("bytes_cached") == sum(
        len(b) for b in [*image.blobs.values(), *other.blobs.values()]
    )
    assert fake.count("GET", "/blobs/") == 4  # nothing more was downloaded
    assert again.summary()[0] == "warmed 2 of 2 images"


async def test_invalid_and_unrouted_names_fail_without_a_request(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    report = await warm(tmp_path, fake, ["Bad/Name", "foo.org/x/y:1"])
    assert [r.ok for r in report.results] == [False, False]
    assert "invalid name" in (report.results[0].error or "")
    assert "not configured" in (report.results[1].error or "")
    assert fake.requests == []


class ByHost(httpx.AsyncBaseTransport):
    """Each mirror host on a fake registry of its own."""

    def __init__(self, fakes: dict[str, FakeRegistry]) -> None:
        self.transports = {h: httpx.ASGITransport(app=f.app) for h, f in fakes.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transports[request.url.host].handle_async_request(request)


async def test_blob_from_a_corrupting_mirror_is_fetched_again_from_the_next(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """The first mirror flips a byte of a layer: the fill fails verification, warm joins the
    fill that starts over from the next mirror, and only the good bytes are cached."""
    bad = FakeRegistry(host="bad.test")
    bad.add(image, "3.19")
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    bad.corrupt.add(layer)
    mirrors = '[{ url = "http://bad.test" }, { url = "http://upstream.test" }]'
    settings = parse_settings(config(tmp_path, mirrors=mirrors), env={"HUB_PASSWORD": "x"})
    clock = Clock()
    pull = Pullthrough(
        settings,
        transport=ByHost({"bad.test": bad, "upstream.test": fake}),
        timing=Timing(wall=clock, monotonic=clock, sleep=no_sleep),
    )
    try:
        report = await Warmer(pull, settings).run(["alpine:3.19"])
    finally:
        await pull.close()
    assert report.ok, report.summary()
    assert report.total("blobs_fetched") == len(image.blobs)
    assert bad.count("GET", f"/blobs/{layer}") == 1
    assert fake.count("GET", f"/blobs/{layer}") == 1
    stored = tmp_path / "cache" / "docker.io" / "blobs" / "sha256" / layer[7:9] / layer[7:]
    assert stored.read_bytes() == image.blobs[layer]


def test_image_list_file_skips_comments(tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("# base images\nalpine:3.19\n\n  quay.io/a/b:1   # pinned\n#x\n")
    assert read_image_list(listing) == ["alpine:3.19", "quay.io/a/b:1"]


def test_cli_warm_exit_status_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command: names from arguments and --file, a summary on stdout, exit 1 when an
    image failed, 2 for bad arguments."""
    config_file = tmp_path / "mirrors.toml"
    config_file.write_text(config(tmp_path))
    listing = tmp_path / "list.txt"
    listing.write_text("# not routed\nfoo.org/x/y:1\n")
    args = ["warm", "--config", str(config_file), "Bad/Name", "--file", str(listing)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "warmed 0 of 2 images, 2 failed"
    assert "FAILED  Bad/Name  invalid name" in captured.out
    assert "FAILED  foo.org/x/y:1  registry foo.org is not configured" in captured.out
    assert "FAILED" in captured.err  # plain progress lines: stderr is not a terminal
    assert main(["warm", "--config", str(config_file), "--platform", "linux", "alpine"]) == 2
    assert "--platform" in capsys.readouterr().err
    assert main(["warm", "--config", str(config_file)]) == 2
    assert "name at least one image" in capsys.readouterr().err
    assert main(["import", "--config", str(config_file), str(listing)]) == 1
    assert "nothing was imported" in capsys.readouterr().out


# ---------------------------------------------------------------------- export and import


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


async def test_export_import_pulls_with_every_upstream_down(
    tmp_path: Path, fake: FakeRegistry, image: Image, multi: tuple[str, list[Image]]
) -> None:
    """Export from one cache, import into an EMPTY one, then pull through a gateway on the
    second with every upstream down: same bytes, same digests."""
    index_digest, (amd64, arm64, _) = multi
    archive = tmp_path / "images.tar"
    exported = await export(tmp_path / "a", fake, ["alpine:3.19", "library/multi:1"], archive)
    assert exported.ok, exported.summary(False)
    files = read_tar(archive)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert [
        (m["digest"], m["mediaType"], m["annotations"][REF_NAME]) for m in index["manifests"]
    ] == [
        (image.digest, image.media_type, "docker.io/library/alpine:3.19"),
        (index_digest, OCI_INDEX, "docker.io/library/multi:1"),
    ]
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert sha256(data) == "sha256:" + name.rsplit("/", 1)[1]
    assert f"blobs/sha256/{image.digest[7:]}" in files  # the manifest, byte for byte
    assert files[f"blobs/sha256/{image.digest[7:]}"] == image.manifest
    assert f"blobs/sha256/{arm64.digest[7:]}" not in files  # only the chosen platform

    cache = tmp_path / "b" / "cache"
    assert not cache.exists()
    imported = await import_into(tmp_path / "b", archive)
    assert imported.ok, imported.summary()
    assert imported.images == ["docker.io/library/alpine:3.19", "docker.io/library/multi:1"]
    assert imported.upstreams == ["docker.io"]
    assert imported.blobs_written == len({**image.blobs, **amd64.blobs})
    assert (imported.manifests_written, imported.tags) == (3, 2)

    transport = DeadTransport()
    text = config(tmp_path / "b")
    async with gateway(tmp_path, fake, text, wrap=lambda _: transport) as gw:
        for path, expected in [
            ("library/alpine/manifests/3.19", image.manifest),
            (f"library/multi/manifests/{amd64.digest}", amd64.manifest),
        ]:
            answer = await gw.client.get(f"/v2/{path}")
            assert answer.status_code == 200 and answer.content == expected
            assert answer.headers["docker-content-digest"] == sha256(expected)
        top = await gw.client.get("/v2/library/multi/manifests/1", headers={"Accept": OCI_INDEX})
        assert top.headers["docker-content-digest"] == index_digest
        assert top.headers["content-type"] == OCI_INDEX
        for repository, blobs in [("library/alpine", image.blobs), ("library/multi", amd64.blobs)]:
            for digest, data in blobs.items():
                blob = await gw.client.get(f"/v2/{repository}/blobs/{digest}")
                assert blob.status_code == 200 and blob.content == data
        not_exported = await gw.client.get(f"/v2/library/multi/manifests/{arm64.digest}")
        assert not_exported.status_code >= 400
    assert transport.requests > 0  # only for the platform that was not exported

    again = await import_into(tmp_path / "b", archive)
    assert again.ok
    assert (again.blobs_written, again.blobs_cached) == (0, imported.blobs_written)
    assert (again.manifests_written, again.manifests_cached) == (0, 3)

    compressed = tmp_path / "images.tar.gz"
    compressed.write_bytes(gzip.compress(archive.read_bytes()))
    from_gzip = await import_into(tmp_path / "c", compressed)
    assert from_gzip.ok and from_gzip.blobs_written == imported.blobs_written


def rewrite(source: Path, target: Path, change: dict[str, bytes]) -> None:
    """A copy of a tarball with some members' bytes replaced (same size)."""
    with tarfile.open(source) as original, tarfile.open(target, "w") as copy:
        for member in original.getmembers():
            handle = original.extractfile(member) if member.isfile() else None
            data = handle.read() if handle is not None else None
            if member.name in change:
                data = change[member.name]
            copy.addfile(member, io.BytesIO(data) if data is not None else None)


async def test_corrupted_blob_is_refused_and_nothing_is_committed(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A flipped byte in one layer of the tarball: the import is refused, naming the blob,
    and the target cache holds no blob, manifest, tag or link afterwards."""
    archive, bad = tmp_path / "images.tar", tmp_path / "bad.tar"
    assert (await export(tmp_path / "a", fake, ["alpine:3.19"], archive)).ok
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    name = f"blobs/sha256/{layer[7:]}"
    data = image.blobs[layer]
    rewrite(archive, bad, {name: bytes([data[0] ^ 0xFF]) + data[1:]})
    report = await import_into(tmp_path / "b", bad)
    assert not report.ok and not report.committed
    assert any(layer in p and "corrupt" in p for p in report.problems), report.problems
    assert report.summary()[0].startswith("refused")
    assert stored_files(tmp_path / "b" / "cache") == []


async def test_incomplete_or_unroutable_archives_are_refused(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """A missing blob, or a reference no upstream serves, refuses the whole import."""
    archive = tmp_path / "images.tar"
    assert (await export(tmp_path / "a", fake, ["alpine:3.19"], archive)).ok
    files = read_tar(archive)
    layer = next(iter(d for d in image.blobs if f"blobs/sha256/{d[7:]}" in files))
    missing = tmp_path / "missing.tar"
    with tarfile.open(archive) as original, tarfile.open(missing, "w") as copy:
        for member in original.getmembers():
            if member.name != f"blobs/sha256/{layer[7:]}":
                copy.addfile(member, original.extractfile(member) if member.isfile() else None)
    report = await import_into(tmp_path / "b", missing)
    assert not report.committed and any("missing" in p for p in report.problems)

    index = json.loads(files["index.json"])
    index["manifests"][0]["annotations"][REF_NAME] = "foo.org/x/y:1"
    unroutable = tmp_path / "unroutable.tar"
    rewrite_index = json.dumps(index).encode()
    with tarfile.open(archive) as original, tarfile.open(unroutable, "w") as copy:
        for member in original.getmembers():
            handle = original.extractfile(member) if member.isfile() else None
            if member.name == "index.json":
                member.size = len(rewrite_index)
                handle = io.BytesIO(rewrite_index)  # type: ignore[assignment]
            copy.addfile(member, handle)
    report = await import_into(tmp_path / "b", unroutable)
    assert not report.committed and any("not configured" in p for p in report.problems)
    assert stored_files(tmp_path / "b" / "cache") == []


async def test_export_cached_only_never_asks_upstream(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """--cached-only exports what warm left in the cache with upstream down, and refuses
    (writing nothing) an image the cache does not hold."""
    assert (await warm(tmp_path, fake, ["alpine:3.19"])).ok
    archive = tmp_path / "out.tar"
    report = await export(tmp_path, None, ["alpine:3.19"], archive, cached_only=True)
    assert report.ok, report.summary(True)
    assert report.warm.total("blobs_cached") == len(image.blobs)
    assert archive.exists()
    absent = tmp_path / "absent.tar"
    refused = await export(tmp_path, None, ["alpine:3.19", "alpine:9"], absent, cached_only=True)
    assert not refused.ok and not absent.exists()
    assert "not in the cache" in (refused.warm.results[1].error or "")
    assert refused.summary(True)[0].startswith(f"did not write {absent}")


async def test_export_and_import_of_malformed_upstream_manifests(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Upstream manifests with malformed parts (layers null, an index entry whose platform
    is a string) are warmed, exported and imported by their well-formed parts; a manifest
    that is not JSON fails its image with a reason, never an exception."""
    base = make_image("library/odd", [b"odd layer"])
    fake.add(base)
    document = json.loads(base.manifest)
    nulls = json.dumps({**document, "layers": None}).encode()
    entry = {"mediaType": base.media_type, "digest": base.digest, "size": len(base.manifest)}
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {**entry, "platform": "linux/amd64"},
                "junk",
                {**entry, "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }
    ).encode()
    for tag, data, media_type in [
        ("nulls", nulls, base.media_type),
        ("index", index, OCI_INDEX),
        ("junk", b"{not json", base.media_type),
    ]:
        fake.manifests[("library/odd", tag)] = (data, media_type)
    archive = tmp_path / "odd.tar"
    exported = await export(tmp_path / "a", fake, ["odd:nulls", "odd:index"], archive)
    assert exported.ok, exported.summary(False)
    nulls_result, index_result = exported.warm.results
    assert set(nulls_result.blobs) == {Digest.parse(document["config"]["digest"])}
    assert index_result.platforms == ["linux/amd64"]
    assert [str(m.digest) for m in index_result.manifests] == [sha256(index), base.digest]

    imported = await import_into(tmp_path / "b", archive)
    assert imported.ok, imported.summary()
    async with gateway(tmp_path, fake, config(tmp_path / "b"), wrap=dead) as gw:
        for tag, data in (("nulls", nulls), ("index", index)):
            answer = await gw.client.get(
                f"/v2/library/odd/manifests/{tag}",
                headers={"Accept": f"{OCI_INDEX}, {base.media_type}"},
            )
            assert answer.status_code == 200 and answer.content == data

    failed = await export(tmp_path / "c", fake, ["odd:junk"], tmp_path / "junk.tar")
    assert not failed.ok and not (tmp_path / "junk.tar").exists()
    assert "not a JSON object" in (failed.warm.results[0].error or "")
