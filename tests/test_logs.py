"""Structured logs: JSON access lines with the request's story, and no secrets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from mirrorrouter.logs import ACCESS_LOGGER, HumanFormatter, JsonFormatter, log_config
from tests.access.test_access import basic, secured
from tests.support.fakeregistry import FakeRegistry, Image, sha256
from tests.support.inprocess import config, gateway

pytestmark = pytest.mark.anyio


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_access_lines_tell_what_happened(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """With access_log on, each request gets one line: route, upstream, mirror, cache, bytes."""
    capture = Capture()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    layer = sha256(b"layer-two")
    text = "[server]\naccess_log = true\n" + config(tmp_path)
    try:
        async with gateway(tmp_path, fake, text) as gw:
            await gw.client.get("/v2/library/alpine/manifests/3.19?ns=docker.io")
            await gw.client.get("/v2/library/alpine/manifests/3.19")  # the fast path
            await gw.client.get(f"/v2/hub/alpine/blobs/{layer}")
            await gw.client.get("/v2/library/nothing/manifests/1")
    finally:
        logger.removeHandler(capture)
    lines = [json.loads(JsonFormatter().format(r)) for r in capture.records]
    assert [(e["status"], e["route"], e["cache"]) for e in lines] == [
        (200, "ns", None),
        (200, "default", "HIT"),
        (200, "prefix hub", "MISS"),
        (404, "default", None),
    ]
    assert lines[0]["message"] == "GET /v2/library/alpine/manifests/3.19?ns=docker.io 200"
    assert lines[2]["bytes"] == len(b"layer-two") and lines[2]["mirror"] == "upstream.test"
    assert all(len(e["request_id"]) == 16 and e["duration_ms"] >= 0 for e in lines)
    assert len({e["request_id"] for e in lines}) == 4


async def test_refused_requests_name_the_client_and_the_user(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """Answers given before routing or admission (a path that does not parse, a forged Host,
    a 401 on /v2/ and at the token realm, a 403) get access lines naming the client address
    and the user, anonymous when none was established."""
    capture = Capture()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    text = "[server]\naccess_log = true\n" + secured(tmp_path)
    try:
        async with gateway(tmp_path, fake, text) as gw:
            await gw.client.get("/not/an/api/path")
            await gw.client.get("/v2/", headers={"Host": 'x",service="y'})
            await gw.client.get("/v2/")
            await gw.client.get("/auth/token", headers=basic("alice", "guess"))
            await gw.client.get("/v2/private/app/manifests/1", headers=basic("eve", "listening"))
            await gw.client.get("/v2/", headers=basic("alice", "wonderland"))
            await gw.client.get("/auth/token", headers=basic("alice", "wonderland"))
    finally:
        logger.removeHandler(capture)
    lines = [json.loads(JsonFormatter().format(r)) for r in capture.records]
    assert [(e["status"], e["user"]) for e in lines] == [
        (404, "anonymous"),
        (400, "anonymous"),
        (401, "anonymous"),
        (401, "anonymous"),
        (403, "eve"),
        (200, "alice"),
        (200, "alice"),
    ]
    assert {e["client"] for e in lines} == {"127.0.0.1:123"}  # httpx's ASGITransport
    assert lines[4]["route"] == "default" and lines[4]["upstream"] == "docker.io"


def test_formats_and_config() -> None:
    """JSON for machines, key=value for terminals; uvicorn's own access log is silenced."""
    record = logging.LogRecord("mirrorrouter.access", logging.INFO, "", 0, "GET / %s", (200,), None)
    record.fields = {"status": 200, "cache": "HIT", "mirror": None}
    line = json.loads(JsonFormatter().format(record))
    assert (line["cache"], line["pid"]) == ("HIT", os.getpid())  # which worker wrote it
    assert HumanFormatter().format(record).endswith("GET / 200  status=200 cache=HIT")
    assert log_config("info", json_lines=True)["formatters"]["main"]["()"].endswith("JsonFormatter")
    assert log_config("debug", json_lines=False)["loggers"]["uvicorn.access"]["handlers"] == []
