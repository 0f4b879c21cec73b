"""The gateway app in-process, in front of a fake registry, with injected time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from mirrorrouter.app import Gateway as GatewayApp
from mirrorrouter.app import create_app
from mirrorrouter.config import ServerSettings, parse_settings
from mirrorrouter.server.running import ServerConfig
from mirrorrouter.timing import Timing
from tests.support.fakeregistry import FakeRegistry


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` until it holds (blob writers run on threads), failing after
    ``within`` seconds of real time."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.002)


class Clock:
    """A settable clock: tests move ``now`` instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Gateway:
    client: httpx.AsyncClient
    fake: FakeRegistry
    clock: Clock
    cache_dir: Path
    app: GatewayApp


def config(
    tmp_path: Path, extra: str = "", mirrors: str = '[{ url = "http://upstream.test" }]'
) -> str:
    """A config with docker.io on the fake registry (``extra`` goes in its table)."""
    return f"""
[cache]
directory = "{tmp_path / "cache"}"
[upstreams."docker.io"]
tag_ttl = "60s"
mirrors = {mirrors}
{extra}
[upstreams."quay.io"]
mirrors = [{{ url = "http://quay.test" }}]
[[routes]]
prefix = "hub"
upstream = "docker.io"
"""


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    fake: FakeRegistry,
    text: str | None = None,
    *,
    sleeps: list[float] | None = None,
    wrap: Callable[[httpx.ASGITransport], httpx.AsyncBaseTransport] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Gateway]:
    """The gateway app with its lifespan running; retries wait for nothing (and are
    recorded in ``sleeps``); ``wrap`` may put a faulty transport around the fake; ``env``
    is the environment the config reads (secrets)."""
    clock = Clock()

    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    settings = parse_settings(
        text or config(tmp_path), env={"HUB_PASSWORD": "hunter2", **(env or {})}
    )
    upstream: httpx.AsyncBaseTransport = httpx.ASGITransport(app=fake.app)
    if wrap is not None:
        upstream = wrap(httpx.ASGITransport(app=fake.app))
    timing = Timing(wall=clock, monotonic=clock, sleep=sleep)
    app = create_app(settings, transport=upstream, timing=timing)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror") as client:
            yield Gateway(client, fake, clock, tmp_path / "cache", app)


@asynccontextmanager
async def uvicorn_in_loop(config: uvicorn.Config) -> AsyncIterator[uvicorn.Server]:
    """A uvicorn server for ``config`` running in this event loop while the block runs."""
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "the server did not start"
    try:
        yield server
    finally:
        server.should_exit = True
        await task


def loopback_server_config(
    app: object, settings: ServerSettings, port: int, **options: object
) -> ServerConfig:
    """The gateway's own server (GatewayProtocol) for ``app`` on ``127.0.0.1:port``, quiet,
    without lifespan, shut down within a second: how the server tests run it in-process."""
    return ServerConfig(
        app,  # type: ignore[arg-type]
        settings,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=1,
        **options,
    )
