"""The command line: resolve prints the reference table, check-config names bad keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mirrorrouter.cli.main import main
from tests.test_reference import REFERENCE_TABLE as TABLE

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = str(ROOT / "mirrors.toml")


def test_resolve_prints_the_reference_table(capsys: pytest.CaptureFixture[str]) -> None:
    """resolve prints each name, its canonical name, registry address and routing verdict."""
    assert main(["resolve", "--config", DEFAULT_CONFIG, *(row[0] for row in TABLE)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "IMAGE",
        "NAME",
        "CANONICAL",
        "NAME",
        "REGISTRY",
        "ADDRESS",
        "ROUTE",
    ]
    for line, (image, canonical, address) in zip(lines[1:], TABLE, strict=True):
        assert line.split()[:3] == [image, canonical, address]
    assert "upstream docker.io: https://registry-1.docker.io" in lines[1]
    assert "upstream gcr.io: https://gcr.io (also via prefix gcr)" in lines[2]
    assert "not routed: registry foo.org is not configured" in lines[3]


def test_resolve_json(capsys: pytest.CaptureFixture[str]) -> None:
    """resolve --json gives the same facts as data, with mirrors in failover order."""
    assert main(["resolve", "--json", "--config", DEFAULT_CONFIG, "alpine", "foo.org/x"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["canonical_name"] == "docker.io/library/alpine"
    assert data[0]["routed"] is True
    assert data[0]["mirrors"][0]["url"] == "https://registry-1.docker.io"
    assert data[1]["routed"] is False and "foo.org" in data[1]["error"]


def test_resolve_invalid_name_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """A name that does not parse makes resolve exit 1 and says why."""
    assert main(["resolve", "--config", DEFAULT_CONFIG, "Bad/Name"]) == 1
    assert "invalid name" in capsys.readouterr().out


def test_check_config_accepts_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config on the shipped mirrors.toml succeeds and shows the routing table."""
    assert main(["check-config", DEFAULT_CONFIG]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "route prefix gcr -> gcr.io" in out


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            '[upstreams."docker.io"]\ntag_tll = "5m"\n',
            2,
            'upstreams."docker.io".tag_tll: unknown key',
        ),
        (
            '[upstreams."docker.io"]\n[[routes]]\nprefix = "g"\nupstream = "gcr.io"\n',
            4,
            "routes[0].upstream: no upstream named 'gcr.io'",
        ),
        (
            '[upstreams."docker.io"]\ntag_ttl = "soon"\n',
            2,
            'upstreams."docker.io".tag_ttl: expected a duration',
        ),
    ],
)
def test_check_config_refuses_bad_files(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    """check-config exits non-zero and names the key path of each problem (as a real process)."""
    path = tmp_path / "mirrors.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "mirrorrouter", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert f"{path}:{line}: {fragment}" in result.stderr


def test_proxy_credentials_are_redacted_in_check_config_and_resolve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config and resolve (text and JSON) show an upstream's proxy without its password."""
    path = tmp_path / "mirrors.toml"
    path.write_text('[upstreams."docker.io"]\nproxy = "http://ops:s3cret@proxy.corp:3128"\n')
    assert main(["check-config", str(path)]) == 0
    assert main(["resolve", "--config", str(path), "alpine"]) == 0
    assert main(["resolve", "--json", "--config", str(path), "alpine"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "ops" not in out
    check, resolve = out.splitlines()[1], out.splitlines()[4]
    assert check.endswith("via proxy http://***@proxy.corp:3128")
    assert resolve.endswith("via proxy http://***@proxy.corp:3128")
    assert '"proxy": "http://***@proxy.corp:3128"' in out
