"""Streaming single-flight, with an upstream whose body is held at a gate mid-way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mirrorrouter.config import parse_settings
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.pull.singleflight import Coalescer, FillFailed
from mirrorrouter.reference import Digest
from tests.support.inprocess import until

pytestmark = pytest.mark.anyio

# The fill reads the upstream 1 MiB at a time, so the part before the gate is 1 MiB.
CHUNK = 1024 * 1024
PAYLOAD = bytes(range(256)) * (4 * CHUNK // 256)  # 4 MiB in four chunks
DIGEST = Digest.of(PAYLOAD)


class GatedBody(httpx.AsyncByteStream):
    """Sends the first chunk, then waits at the gate before the rest."""

    def __init__(self, data: bytes, gate: asyncio.Event) -> None:
        self.data = data
        self.gate = gate

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[:CHUNK]
        await self.gate.wait()
        for start in range(CHUNK, len(self.data), CHUNK):
            yield self.data[start : start + CHUNK]


class Upstream:
    def __init__(self, body: bytes = PAYLOAD, *, sized: bool = True) -> None:
        self.gate = asyncio.Event()
        self.body = body
        self.sized = sized  # False: chunked, no Content-Length
        self.blob_gets = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.blob_gets += 1
        headers = {"Content-Length": str(len(self.body))} if self.sized else {}
        return httpx.Response(200, headers=headers, stream=GatedBody(self.body, self.gate))


@pytest.fixture
def settings_text(tmp_path: Path) -> str:
    # PAYLOAD is a large blob here: it streams as it lands instead of waiting for its commit.
    return f"""
[cache]
directory = "{tmp_path}"
[upstreams."docker.io"]
mirrors = [{{ url = "http://up.test" }}]
verify_before_send = "1MiB"
"""


async def open_pullthrough(text: str, upstream: Upstream) -> Pullthrough:
    pull = Pullthrough(
        parse_settings(text, env={}), transport=httpx.MockTransport(upstream.handler)
    )
    await pull.start()
    return pull


def committed(tmp_path: Path) -> Path:
    return tmp_path / "docker.io" / "blobs" / "sha256" / DIGEST.hex[:2] / DIGEST.hex


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_followers_stream_bytes_before_the_download_completes(
    settings_text: str, tmp_path: Path
) -> None:
    """Readers get the first bytes while the upstream body is still held at the gate."""
    upstream = Upstream()
    pull = await open_pullthrough(settings_text, upstream)
    hub = pull.settings.upstreams["docker.io"]
    try:
        first = await pull.blob(hub, "library/a", DIGEST)
        second = await pull.blob(hub, "library/a", DIGEST)
        readers = [first.stream(0, None), second.stream(0, None)]
        heads = [await anext(reader) for reader in readers]
        assert all(len(h) > 0 and PAYLOAD.startswith(h) for h in heads)
        assert not committed(tmp_path).exists()  # still filling
        upstream.gate.set()
        bodies = [h + await collect(r) for h, r in zip(heads, readers, strict=True)]
        assert bodies == [PAYLOAD, PAYLOAD]
        assert upstream.blob_gets == 1
        assert committed(tmp_path).read_bytes() == PAYLOAD
    finally:
        await pull.close()


async def test_fill_goes_on_when_the_first_client_leaves(
    settings_text: str, tmp_path: Path
) -> None:
    """The first client disconnecting mid-blob does not stop the fill; it is committed."""
    upstream = Upstream()
    pull = await open_pullthrough(settings_text, upstream)
    hub = pull.settings.upstreams["docker.io"]
    try:
        answer = await pull.blob(hub, "library/a", DIGEST)
        reader = answer.stream(0, None)
        await anext(reader)
        await reader.aclose()  # type: ignore[attr-defined]
        upstream.gate.set()
        await asyncio.gather(*pull.filler.tasks)
        assert committed(tmp_path).read_bytes() == PAYLOAD
        again = await pull.blob(hub, "library/a", DIGEST)
        assert again.cache == "HIT" and upstream.blob_gets == 1
    finally:
        await pull.close()


async def test_verification_failure_reaches_every_reader(
    settings_text: str, tmp_path: Path
) -> None:
    """Bytes that do not hash to the digest fail every reader; no reader gets them whole."""
    upstream = Upstream(body=PAYLOAD[:-1] + b"X")
    pull = await open_pullthrough(settings_text, upstream)
    hub = pull.settings.upstreams["docker.io"]
    try:
        answers = [await pull.blob(hub, "library/a", DIGEST) for _ in range(3)]
        upstream.gate.set()
        received: list[int] = []
        for answer in answers:
            got = 0
            with pytest.raises(FillFailed):
                async for chunk in answer.stream(0, None):
                    got += len(chunk)
            received.append(got)
        assert all(n < len(PAYLOAD) for n in received)
        assert not committed(tmp_path).exists()
        assert spool_files(tmp_path / "docker.io") == []
    finally:
        await pull.close()


async def test_range_of_a_blob_being_filled(settings_text: str) -> None:
    """A range of a blob still filling is served from the spool file once its bytes land."""
    upstream = Upstream()
    pull = await open_pullthrough(settings_text, upstream)
    hub = pull.settings.upstreams["docker.io"]
    try:
        answer = await pull.blob(hub, "library/a", DIGEST)
        upstream.gate.set()
        start, end = CHUNK + 5, 3 * CHUNK + 7
        assert await collect(answer.stream(start, end)) == PAYLOAD[start:end]
    finally:
        await pull.close()


async def test_small_blob_is_answered_once_verified_and_head_does_not_wait(
    settings_text: str, tmp_path: Path
) -> None:
    """A blob within verify_before_send is answered only once committed, to every waiting
    client from one download; a HEAD is answered as soon as the upstream's headers came."""
    upstream = Upstream()
    pull = await open_pullthrough(settings_text.replace('"1MiB"', '"4MiB"'), upstream)
    hub = pull.settings.upstreams["docker.io"]
    try:
        head = await pull.blob(hub, "library/a", DIGEST, body=False)
        assert head.size == len(PAYLOAD) and not committed(tmp_path).exists()
        waiting = [asyncio.create_task(pull.blob(hub, "library/a", DIGEST)) for _ in range(3)]
        fill = (await pull.site(hub)).fills[DIGEST]
        await until(lambda: fill.followers == 3 and fill.written == CHUNK)  # held mid-blob
        assert not any(task.done() for task in waiting)
        upstream.gate.set()
        answers = await asyncio.gather(*waiting)
        assert committed(tmp_path).read_bytes() == PAYLOAD  # before the first byte went out
        assert [await collect(a.stream(0, None)) for a in answers] == [PAYLOAD] * 3
        assert upstream.blob_gets == 1
    finally:
        await pull.close()


async def test_small_blob_of_unknown_size_streams_as_it_lands(
    settings_text: str, tmp_path: Path
) -> None:
    """A blob the upstream sends without a size is treated as large: bytes flow at once."""
    upstream = Upstream(sized=False)
    pull = await open_pullthrough(settings_text.replace('"1MiB"', '"4MiB"'), upstream)
    hub = pull.settings.upstreams["docker.io"]
    try:
        answer = await pull.blob(hub, "library/a", DIGEST)
        reader = answer.stream(0, None)
        first = await anext(reader)
        assert answer.size is None and PAYLOAD.startswith(first)
        assert not committed(tmp_path).exists()
        upstream.gate.set()
        assert first + await collect(reader) == PAYLOAD
    finally:
        await pull.close()


async def test_coalescer_shares_one_call() -> None:
    """Concurrent calls with one key share one execution and its result or error."""
    coalescer = Coalescer()
    calls = 0
    gate = asyncio.Event()

    async def work() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "done"

    tasks = [asyncio.create_task(coalescer.run("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == ["done"] * 5
    assert calls == 1

    async def fail() -> str:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await coalescer.run("k", fail)


def spool_files(cache: Path) -> list[Path]:
    """Files under a cache's temp area other than the owner locks: interrupted writes."""
    return [p for p in (cache / "tmp").rglob("*") if p.is_file() and p.name != ".lock"]
