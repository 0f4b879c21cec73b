"""``check-config --connect``: can this machine reach the shared services the config names?

Each distinct object store (bucket, endpoint, credentials) gets a ranged read of a key that
does not exist, which needs working credentials but writes nothing; Redis gets a ``PING``.
The answer is one line per service; secrets never appear in it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import redis.asyncio as aioredis

from mirrorrouter.cache import open_backend
from mirrorrouter.config import CacheSettings, Settings
from mirrorrouter.reference import Digest

PROBE_TIMEOUT = 10.0
_PROBE = Digest.of(b"mirrorrouter connectivity probe")


@dataclass(frozen=True, slots=True)
class Probe:
    service: str  # what was asked, without secrets
    ok: bool
    detail: str


async def probe_all(settings: Settings) -> list[Probe]:
    caches = [u.cache for u in settings.upstreams.values()]
    caches += [h.storage for h in settings.hosted.values()]
    stores: dict[tuple[str, str | None, str], CacheSettings] = {}
    for cache in caches:
        store = cache.object_store
        if cache.backend == "s3" and store is not None:
            stores.setdefault((store.bucket, store.endpoint, store.prefix), cache)
    probes = [await _probe_store(cache) for cache in stores.values()]
    coordination = settings.coordination
    if coordination.backend == "redis" and coordination.redis_url is not None:
        probes.append(await _probe_redis(coordination.redis_url.value))
    return probes


async def _probe_store(cache: CacheSettings) -> Probe:
    store = cache.object_store
    assert store is not None
    where = f"s3 bucket {store.bucket} at {store.endpoint or 'AWS'}"
    backend = open_backend(replace(cache, key="", directory=cache.directory / ".probe"))
    try:
        await asyncio.wait_for(backend.blob_size(_PROBE), PROBE_TIMEOUT)
    except Exception as exc:  # any failure is the answer: say which
        return Probe(where, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return Probe(where, True, "reachable, credentials accepted")


async def _probe_redis(url: str) -> Probe:
    client = aioredis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT)
    where = f"redis at {client.connection_pool.connection_kwargs.get('host', '?')}:" + str(
        client.connection_pool.connection_kwargs.get("port", "?")
    )
    try:
        await asyncio.wait_for(client.ping(), PROBE_TIMEOUT)
    except Exception as exc:  # any failure is the answer: say which
        return Probe(where, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    finally:
        await client.aclose()
    return Probe(where, True, "PING answered")
