"""``mirrorrouter cache ls | du | prune | pin | unpin``: what they print and how they exit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mirrorrouter.cli.main import main
from mirrorrouter.config import load_settings
from mirrorrouter.reference import Digest
from tests.cache.test_eviction import Caches, image_of
from tests.support.fakeregistry import Image

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, cache: str = "", docker: str = "") -> str:
    path = tmp_path / "mirrors.toml"
    path.write_text(
        f"""
[cache]
directory = "cache"
{cache}
[upstreams."docker.io"]
mirrors = [{{ url = "http://upstream.test" }}]
{docker}
[upstreams."quay.io"]
mirrors = [{{ url = "http://quay.test" }}]
""",
        encoding="utf-8",
    )
    return str(path)


def fill(config: str) -> tuple[Caches, dict[str, Image]]:
    """docker.io: old (t), mid (t+100); quay.io: app (t+200); 10 KiB layers each."""

    async def run() -> tuple[Caches, dict[str, Image]]:
        caches = Caches(load_settings(config))
        t = 1_700_000_000.0
        images = {
            "old": await caches.add(image_of("old", 10 * 1024), "1.0", t),
            "mid": await caches.add(image_of("mid", 10 * 1024), "2.0", t + 100),
            "app": await caches.add(
                image_of("app", 10 * 1024, repository="team/app"), "v1", t + 200, "quay.io"
            ),
        }
        for cache in caches.backends.values():
            await cache.close()
        return caches, images

    return asyncio.run(run())


def short(image: Image) -> str:
    return image.digest[:19]


def cached(config: str, image: Image, upstream: str = "docker.io") -> bool:
    directory = load_settings(config).upstreams[upstream].cache.directory
    digest = Digest.parse(image.digest)
    return (directory / "manifests" / digest.algorithm / digest.hex).exists()


# ---------------------------------------------------------------------- ls


def test_ls_lists_repositories_tags_digests_sizes_access_and_pins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, cache='pins = ["docker.io/library/old:*"]')
    _, images = fill(config)
    assert main(["cache", "ls", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "UPSTREAM",
        "REPOSITORY",
        "TAG",
        "DIGEST",
        "SIZE",
        "LAST",
        "ACCESS",
        "CONTENT",
        "PINNED",
    ]
    rows = [line.split() for line in lines[1:4]]
    assert [r[:4] for r in rows] == [
        ["docker.io", "library/mid", "2.0", short(images["mid"])],
        ["docker.io", "library/old", "1.0", short(images["old"])],
        ["quay.io", "team/app", "v1", short(images["app"])],
    ]
    assert rows[1][4:6] == ["10.5", "KiB"]  # the layer, its config and the manifest
    assert rows[1][6:8] == ["2023-11-14", "22:13:20"]  # the last access, UTC
    assert rows[1][8:] == ["complete", "docker.io/library/old:*"]
    assert rows[0][8:] == ["complete", "-"]
    assert lines[4:] == ["pins:", "  docker.io/library/old:*  (mirrors.toml [cache] pins)"]


def test_ls_of_one_upstream_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    _, images = fill(config)
    assert main(["cache", "ls", "--upstream", "quay.io", "--json", "--config", config]) == 0
    document = json.loads(capsys.readouterr().out)
    [row] = document["images"]
    app = images["app"]
    assert row == {
        "upstream": "quay.io",
        "repository": "team/app",
        "tag": "v1",
        "digest": app.digest,
        "size": row["size"],
        "accessed": 1_700_000_200.0,
        "content": "complete",
        "pinned": None,
    }
    assert (
        row["size"]
        == len(app.manifest) + sum(map(len, app.blobs.values())) + len(app.media_type) + 1
    )  # the stored manifest file holds its media type line
    assert document["pins"] == [] and document["loose_blobs"] == {
        "quay.io": {"count": 0, "bytes": 0}
    }


def test_ls_of_an_unknown_upstream_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert main(["cache", "ls", "--upstream", "ghcr.io", "--config", config]) == 2
    assert "no cache for upstream 'ghcr.io'; caches: docker.io, quay.io" in capsys.readouterr().err


def test_ls_takes_an_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    fill(config)
    assert main(["cache", "ls", "--upstream", "index.docker.io", "--config", config]) == 0
    assert "library/old" in capsys.readouterr().out


def test_ls_of_an_empty_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing cached yet: says so, and creates nothing."""
    config = write_config(tmp_path)
    assert main(["cache", "ls", "--config", config]) == 0
    assert capsys.readouterr().out == "no cached images\n"
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------- du


def test_du_shows_bytes_and_entries_against_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path,
        cache='max_size = "1MiB"',
        docker='[upstreams."docker.io".cache]\nmax_size = "20KiB"',
    )
    fill(config)
    assert main(["cache", "du", "--json", "--config", config]) == 0
    document = json.loads(capsys.readouterr().out)
    docker, quay = document["upstreams"]
    assert (docker["upstream"], docker["images"], docker["manifests"]) == ("docker.io", 2, 2)
    assert (docker["blobs"], docker["tags"], docker["limit"]) == (4, 2, 20 * 1024)
    assert (quay["upstream"], quay["images"], quay["limit"]) == ("quay.io", 1, None)
    total = document["total"]
    assert total["bytes"] == docker["bytes"] + quay["bytes"] and total["limit"] == 1024**2
    assert total["blobs"] == 6

    assert main(["cache", "du", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "UPSTREAM",
        "IMAGES",
        "MANIFESTS",
        "BLOBS",
        "TAGS",
        "IN",
        "FLIGHT",
        "SIZE",
        "BYTES",
        "LIMIT",
        "USE",
    ]
    assert lines[1].split()[:5] == ["docker.io", "2", "2", "4", "2"]
    assert lines[1].split()[-4:] == ["20.0", "KiB", "105%", "OVER"]
    assert str(docker["bytes"]) in lines[1].split()
    assert lines[2].split()[-2:] == ["-", "-"]
    assert lines[3].split()[0] == "total" and lines[3].split()[-3:] == ["1.0", "MiB", "3%"]


# ---------------------------------------------------------------------- prune


def test_prune_dry_run_then_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Over the docker.io limit: the dry run names the oldest image and removes nothing;
    prune removes it and reports what is left."""
    config = write_config(tmp_path, docker='[upstreams."docker.io".cache]\nmax_size = "15KiB"')
    _, images = fill(config)
    assert main(["cache", "prune", "--dry-run", "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"would evict docker.io library/old:1.0 {short(images['old'])} ")
    assert "(last access 2023-11-14 22:13:20)" in out
    assert "would free 10.5 KiB" in out
    assert cached(config, images["old"])

    assert main(["cache", "prune", "--config", config]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"evicted docker.io library/old:1.0 {short(images['old'])} 10.5 KiB")
    assert out[1].startswith("docker.io: 10.5 KiB of 15.0 KiB")
    assert out[-1] == "freed 10.5 KiB"
    assert not cached(config, images["old"]) and cached(config, images["mid"])

    assert main(["cache", "prune", "--config", config]) == 0
    assert capsys.readouterr().out.startswith("nothing to evict\n")


def test_prune_to_a_size_for_one_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)  # no limits at all
    _, images = fill(config)
    args = ["cache", "prune", "--upstream", "quay.io", "--to", "1KiB", "--config", config]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("evicted quay.io team/app:v1")
    assert not cached(config, images["app"], "quay.io")
    assert cached(config, images["old"]) and cached(config, images["mid"])


def test_prune_without_limits_has_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    _, images = fill(config)
    assert main(["cache", "prune", "--config", config]) == 0
    assert "no limits are configured" in capsys.readouterr().out
    assert cached(config, images["old"])


def test_prune_that_cannot_reach_its_limit_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pinned images stay; prune says what is over and exits 1."""
    config = write_config(tmp_path, cache='pins = ["docker.io/*"]')
    _, images = fill(config)
    assert main(["cache", "prune", "--to", "1", "--config", config]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("evicted quay.io team/app:v1")
    assert "mirrorrouter: cache prune: total still holds 21.0 KiB, over 1 B" in captured.err
    assert "pinned or in use" in captured.err
    assert cached(config, images["old"]) and cached(config, images["mid"])


def test_prune_refuses_a_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["cache", "prune", "--to", "lots", "--config", config])
    assert exited.value.code == 2
    assert "expected a size such as 500MiB" in capsys.readouterr().err


def test_prune_of_an_unknown_upstream_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert main(["cache", "prune", "--upstream", "nowhere.io", "--to", "1", "--config", config])
    assert "no cache for upstream 'nowhere.io'" in capsys.readouterr().err


# ---------------------------------------------------------------------- pin, unpin


def test_pin_and_unpin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pin is stored in <cache>/pins.json in canonical form, shown by ls, honoured by
    prune, and removed by unpin."""
    config = write_config(tmp_path)
    _, images = fill(config)
    assert main(["cache", "pin", "old:1.0", "--config", config]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "pinned docker.io/library/old:1.0",
        "it pins 1 cached tag: docker.io/library/old:1.0",
    ]
    pins_file = tmp_path / "cache" / "pins.json"
    assert json.loads(pins_file.read_text()) == {"pins": ["docker.io/library/old:1.0"]}
    assert main(["cache", "pin", "docker.io/library/old:1.0", "--config", config]) == 0
    assert capsys.readouterr().out == "docker.io/library/old:1.0 is already pinned\n"

    assert main(["cache", "ls", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "library/old  1.0" in out and "docker.io/library/old:1.0\n" in out
    assert f"  docker.io/library/old:1.0  ({pins_file})" in out

    assert main(["cache", "prune", "--upstream", "docker.io", "--to", "1", "--config", config]) == 1
    assert cached(config, images["old"]) and not cached(config, images["mid"])
    capsys.readouterr()

    assert main(["cache", "unpin", "alpine", "--config", config]) == 1
    assert (
        "docker.io/library/alpine:latest is not pinned; runtime pins: docker.io/library/old:1.0"
        in capsys.readouterr().err
    )
    assert main(["cache", "unpin", "docker.io/library/old:1.0", "--config", config]) == 0
    assert capsys.readouterr().out == "unpinned docker.io/library/old:1.0\n"
    assert json.loads(pins_file.read_text()) == {"pins": []}


def test_pin_a_pattern_that_matches_nothing_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert main(["cache", "pin", "gcr.io/distroless/*", "--config", config]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "pinned gcr.io/distroless/*",
        "it matches no cached tag yet; images are kept once pulled",
    ]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("alpine:*", "registry first"),
        ("Bad Name", "not an image name or pattern"),
        ("docker.io/library/alpine:*bad pattern", "without spaces"),
    ],
)
def test_pin_refuses_bad_patterns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pattern: str, message: str
) -> None:
    config = write_config(tmp_path)
    assert main(["cache", "pin", pattern, "--config", config]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache" / "pins.json").exists()


def test_config_pins_are_not_unpinned_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, cache='pins = ["docker.io/library/old:*"]')
    assert main(["cache", "pin", "docker.io/library/old:*", "--config", config]) == 0
    assert "already pinned in the config" in capsys.readouterr().out
    assert main(["cache", "unpin", "docker.io/library/old:*", "--config", config]) == 1
    assert f"is pinned in {config} ([cache] pins): remove it there" in capsys.readouterr().err


def test_broken_pins_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, cache='max_size = "1KiB"')
    _, images = fill(config)
    (tmp_path / "cache" / "pins.json").write_text("[oops")
    assert main(["cache", "prune", "--config", config]) == 1
    assert "cannot read the runtime pins" in capsys.readouterr().err
    assert cached(config, images["old"])
    assert main(["cache", "ls", "--config", config]) == 1


def test_cache_commands_run_from_the_command_line(tmp_path: Path) -> None:
    """The installed entry point has the cache commands (cli.py registers them)."""
    config = write_config(tmp_path)
    fill(config)
    result = subprocess.run(
        [sys.executable, "-m", "mirrorrouter", "cache", "du", "--config", config],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:4] == ["docker.io", "2", "2", "4"]
    missing = subprocess.run(
        [sys.executable, "-m", "mirrorrouter", "cache"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert missing.returncode == 2 and "ls,du,prune,pin,unpin" in missing.stderr.replace(" ", "")
