"""The object store itself, below the cache's logic: the ``S3Store`` made from the settings,
its errors turned into ``CacheUnavailable`` for the client, the digest a key names, and the
bound on small requests in flight at once; ``Bucket``, one cache's root in the bucket.

Layout (``<root>`` is ``<prefix>/<key>``: the configured prefix and this cache's own
directory, the upstream's name; no leading slash when the prefix is empty)::

    <root>/blobs/<alg>/<hex>                          committed blob bytes
    <root>/manifests/<alg>/<hex>                      "<media type>\\n" + the manifest bytes
    <root>/repositories/<repo>/_tags/<tag>            JSON tag record (as filesystem.py)
    <root>/repositories/<repo>/_links/<alg>/<hex>     empty: the repository may see it
    <root>/access/<alg>/<hex>/<seconds>               empty: the last access of a digest

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

import obstore
from obstore.exceptions import BaseError as StoreError
from obstore.store import S3Store

from mirrorrouter.cache.base import CacheUnavailable
from mirrorrouter.config.model import ObjectStoreSettings
from mirrorrouter.reference import Digest, InvalidReference

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ClientConfig, S3Config

CONCURRENT_REQUESTS = 16  # small requests in flight at once (inventory, flush, remove)
LIST_CHUNK = 1000  # objects per page of a listing

T = TypeVar("T")
P = ParamSpec("P")


class _Located(Protocol):
    """What names the store in a message: the bucket and where it is, never a credential."""

    where: str


def translate_store_errors(cls: type[T]) -> type[T]:
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


class Bucket:
    """One cache's root in the bucket: the keys of its layout (see the module docstring) and
    the small requests on them (a GET, a HEAD, a LIST) that answer None for what is not
    there."""

    def __init__(self, settings: ObjectStoreSettings, key: str) -> None:
        parts = (settings.prefix.strip("/"), key.strip("/"))
        self.root = "/".join(p for p in parts if p)
        # For messages: the bucket and where it is, never a credential.
        self.where = f"s3://{settings.bucket} at {settings.endpoint or 'AWS'}"
        self.store = make_store(settings)
        # What instances over the same storage in this process share state by.
        self.identity = (settings.endpoint or "aws", settings.bucket, self.root)

    def key(self, *parts: str) -> str:
        return "/".join((self.root, *parts)) if self.root else "/".join(parts)

    def blob_key(self, digest: Digest) -> str:
        return self.key("blobs", digest.algorithm, digest.hex)

    def manifest_key(self, digest: Digest) -> str:
        return self.key("manifests", digest.algorithm, digest.hex)

    def access_prefix(self, digest: Digest) -> str:
        return self.key("access", digest.algorithm, digest.hex)

    def tag_key(self, repository: str, tag: str) -> str:
        return self.key("repositories", repository, "_tags", tag)

    def link_key(self, repository: str, digest: Digest) -> str:
        return self.key("repositories", repository, "_links", digest.algorithm, digest.hex)

    async def get(self, key: str) -> bytes | None:
        try:
            result = await obstore.get_async(self.store, key)
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None

    async def size(self, key: str) -> int | None:
        try:
            return (await obstore.head_async(self.store, key))["size"]
        except FileNotFoundError:
            return None

    async def listing(self, prefix: str) -> list[ObjectMeta]:
        """Every object under ``prefix`` (whole path segments), recursively."""
        stream = obstore.list(self.store, prefix or None, chunk_size=LIST_CHUNK)
        return list(await stream.collect_async())


def make_store(settings: ObjectStoreSettings) -> S3Store:
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


def parse_digest(parts: list[str]) -> Digest | None:
    """The digest named by ``[<alg>, <hex>]``; None for anything else (strays)."""
    if len(parts) != 2:
        return None
    try:
        return Digest.parse(f"{parts[0]}:{parts[1]}")
    except InvalidReference:
        return None


async def gather(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await them all, at most ``CONCURRENT_REQUESTS`` at once, results in order."""
    limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def one(awaitable: Awaitable[T]) -> T:
        async with limit:
            return await awaitable

    return list(await asyncio.gather(*(one(a) for a in awaitables)))
