"""``check-config --connect`` against a real SeaweedFS and a real redis-server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorrouter.cli.main import main
from tests.support.redisserver import RedisServer
from tests.support.seaweed import session_seaweed


def shared_config(tmp_path: Path, redis_url: str, secret_env: str) -> Path:
    server = session_seaweed()
    path = tmp_path / "mirrors.toml"
    path.write_text(
        f"""
[cache]
backend = "s3"
directory = "{tmp_path / "spool"}"
[cache.s3]
bucket = "{server.bucket}"
endpoint = "{server.endpoint}"
prefix = "tests/connectivity"
access_key_id_env = "S3_KEY"
secret_access_key_env = "{secret_env}"
[upstreams."docker.io"]
[coordination]
backend = "redis"
redis_url = "{redis_url}"
"""
    )
    return path


def test_connect_reaches_the_store_and_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = session_seaweed()
    monkeypatch.setenv("S3_KEY", server.access_key)
    monkeypatch.setenv("S3_SECRET", server.secret_key)
    monkeypatch.setenv("S3_WRONG", "not-the-secret")
    with RedisServer(tmp_path / "redis") as redis:
        good = shared_config(tmp_path, redis.redis_url, "S3_SECRET")
        assert main(["check-config", str(good)]) == 0  # without --connect: no probing
        assert "FAILED" not in capsys.readouterr().out
        assert main(["check-config", str(good), "--connect"]) == 0
        out = capsys.readouterr().out
        assert f"s3 bucket {server.bucket} at {server.endpoint}: OK" in out
        assert f"redis at 127.0.0.1:{redis.port}: OK" in out
        bad = shared_config(tmp_path, "redis://127.0.0.1:9/0", "S3_WRONG")
        assert main(["check-config", str(bad), "--connect"]) == 1
        out = capsys.readouterr().out
        assert f"s3 bucket {server.bucket} at {server.endpoint}: FAILED" in out
        assert "redis at 127.0.0.1:9: FAILED" in out
        assert "not-the-secret" not in out and server.secret_key not in out
