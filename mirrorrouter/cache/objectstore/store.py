"""The object store itself, below the cache's logic: the ``S3Store`` made from the settings,
its errors turned into ``CacheUnavailable`` for the client, the digest a key names, and the
bound on small requests in flight at once.

**Why obstore**: an async API over a Rust core (``object_store``: the HTTP client, retries,
request signing run outside the GIL), uploads from a file or async iterator that become
multipart uploads on their own (and are aborted on failure), ranged reads, presigned URLs
for redirects, and typed stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

from obstore.exceptions import BaseError as StoreError
from obstore.store import S3Store

from mirrorrouter.cache.base import CacheUnavailable
from mirrorrouter.config.model import ObjectStoreSettings
from mirrorrouter.reference import Digest, InvalidReference

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

CONCURRENT_REQUESTS = 16  # small requests in flight at once (inventory, flush, remove)
LIST_CHUNK = 1000  # objects per page of a listing

T = TypeVar("T")
P = ParamSpec("P")


class _Located(Protocol):
    """What names the store in a message: the bucket and where it is, never a credential."""

    where: str


def _store_errors(cls: type[T]) -> type[T]:
    """Turn the object store's errors, raised by any public method, into
    ``CacheUnavailable`` (a 503 for the client), naming the store and what failed."""

    def describe(self: _Located, exc: StoreError) -> CacheUnavailable:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CacheUnavailable(f"object store {self.where}: {first[:300]}")

    def coroutine(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[object, object, T]]:
        @functools.wraps(method)
        async def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await method(*args, **kwargs)
            except StoreError as exc:
                raise describe(args[0], exc) from exc  # type: ignore[arg-type]

        return wrapped

    def generator(method: Callable[P, AsyncIterator[T]]) -> Callable[P, AsyncIterator[T]]:
        @functools.wraps(method)
        async def wrapped(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
            try:
                # aclosing: a reader closed early closes the inner one at once (in-use counts)
                async with contextlib.aclosing(method(*args, **kwargs)) as inner:  # type: ignore[type-var]
                    async for item in inner:
                        yield item
            except StoreError as exc:
                raise describe(args[0], exc) from exc  # type: ignore[arg-type]

        return wrapped

    for name, member in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if inspect.isasyncgenfunction(member):
            setattr(cls, name, generator(member))
        elif inspect.iscoroutinefunction(member):
            setattr(cls, name, coroutine(member))
    return cls


def _make_store(settings: ObjectStoreSettings) -> S3Store:
    config: S3Config = {"region": settings.region}
    client: ClientConfig = {}
    if settings.endpoint:
        config["endpoint"] = settings.endpoint.rstrip("/")
        client["allow_http"] = settings.endpoint.startswith("http://")
    if settings.access_key_id is not None:
        config["access_key_id"] = settings.access_key_id.value
    if settings.secret_access_key is not None:
        config["secret_access_key"] = settings.secret_access_key.value
    return S3Store(settings.bucket, config=config, client_options=client)


def _digest(parts: list[str]) -> Digest | None:
    """The digest named by ``[<alg>, <hex>]``; None for anything else (strays)."""
    if len(parts) != 2:
        return None
    try:
        return Digest.parse(f"{parts[0]}:{parts[1]}")
    except InvalidReference:
        return None


async def _gather(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await them all, at most ``CONCURRENT_REQUESTS`` at once, results in order."""
    limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def one(awaitable: Awaitable[T]) -> T:
        async with limit:
            return await awaitable

    return list(await asyncio.gather(*(one(a) for a in awaitables)))
