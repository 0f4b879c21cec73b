"""The command line: resolve prints the reference table, check-config names bad keys."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mirrorrouter.cli.main import health_url, main
from mirrorrouter.config import load_settings
from tests.support.testca import issue
from tests.test_reference import REFERENCE_TABLE as TABLE

ROOT = Path(__file__).resolve().parents[2]
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


def tls_config(tmp_path: Path, cert: Path, key: Path) -> Path:
    path = tmp_path / "tls.toml"
    path.write_text(
        f'[server]\nport = 0\n[server.tls]\nport = 8443\ncertificate = "{cert}"\n'
        f'key = "{key}"\n[cache]\ndirectory = "{tmp_path / "cache"}"\n[upstreams."docker.io"]\n'
    )
    return path


def test_check_config_checks_the_tls_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config names a key that belongs to another certificate (exit 2), warns of one
    that expires soon, and shows the serial of a good one."""
    ca = issue(tmp_path, "ca")
    good = issue(tmp_path, "good", ca, lifetime=datetime.timedelta(days=90))
    soon = issue(tmp_path, "soon", ca, lifetime=datetime.timedelta(days=3))
    assert main(["check-config", str(tls_config(tmp_path, good.cert_path, soon.key_path))]) == 2
    err = capsys.readouterr().err
    assert f"server.tls.key: {soon.key_path}: does not belong to the certificate in" in err
    assert main(["check-config", str(tls_config(tmp_path, soon.cert_path, soon.key_path))]) == 0
    captured = capsys.readouterr()
    assert (
        "warning: server.tls.certificate:" in captured.err and "expires in 2 days" in captured.err
    )
    assert main(["check-config", str(tls_config(tmp_path, good.cert_path, good.key_path))]) == 0
    assert f"https on port 8443: serial {good.cert.serial_number:x}" in capsys.readouterr().out


def test_serve_refuses_a_pair_it_cannot_load_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve stops in the foreground, naming the file, when the workers could not load it."""
    ca = issue(tmp_path, "ca")
    one, other = issue(tmp_path, "one", ca), issue(tmp_path, "other", ca)
    assert (
        main(["serve", "--config", str(tls_config(tmp_path, one.cert_path, other.key_path))]) == 2
    )
    assert f"server.tls.key ({other.key_path}): does not belong" in capsys.readouterr().err


def test_health_url_is_https_on_the_tls_port_without_a_plain_one(tmp_path: Path) -> None:
    """With server.port = 0 the health check asks the HTTPS listener."""
    ca = issue(tmp_path, "ca")
    settings = load_settings(tls_config(tmp_path, ca.cert_path, ca.key_path))
    assert health_url(settings) == "https://127.0.0.1:8443/healthz"
