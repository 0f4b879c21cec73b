"""``Caches``: the cache backends one process has open, one per storage.

An upstream's cache is read and written by the pull-through, inventoried by the monitor
and the evictor, and touched on every hit; all of them hold the one backend ``Caches``
made for that storage (an upstream's cache directory, or its bucket and local spool), so
what a backend keeps in memory (readers and writers in progress, accesses not yet
persisted) is one account. The app builds one ``Caches`` and closes it at shutdown; a
command builds its own.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from mirrorrouter.cache.base import CacheBackend
from mirrorrouter.cache.filesystem import FilesystemCache
from mirrorrouter.cache.objectstore import ObjectStoreCache
from mirrorrouter.config import CacheSettings


def open_backend(
    settings: CacheSettings, *, clock: Callable[[], float] = time.time
) -> CacheBackend:
    """The backend named by cache settings (``open()`` it before use); ``clock`` dates
    accesses and commits (tests inject one)."""
    if settings.backend == "filesystem":
        return FilesystemCache(settings.directory, clock=clock)
    if settings.backend == "s3":
        return ObjectStoreCache(settings, clock=clock)
    raise ValueError(f"unknown cache backend {settings.backend!r}")  # config validation stops this


class Caches:
    """The open cache backends of a process, by storage."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._backends: dict[tuple[str, str], CacheBackend] = {}
        self._opened: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()

    def get(self, settings: CacheSettings) -> CacheBackend:
        """The backend of this storage, made on first use; reading its inventory needs no
        ``open``, writing does (``opened``)."""
        key = _storage(settings)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = open_backend(settings, clock=self._clock)
        return backend

    async def opened(self, settings: CacheSettings) -> CacheBackend:
        """The backend of this storage, opened once (which sweeps interrupted writes)."""
        backend = self.get(settings)
        key = _storage(settings)
        async with self._lock:
            if key not in self._opened:
                await backend.open()
                self._opened.add(key)
        return backend

    async def close(self) -> None:
        """Close every backend that was opened."""
        for key in sorted(self._opened):
            await self._backends[key].close()
        self._opened.clear()


def _storage(settings: CacheSettings) -> tuple[str, str]:
    """What identifies a storage: its backend and its local directory (the cache itself,
    or the object store backend's spool beside its bucket prefix, one per upstream)."""
    return settings.backend, os.path.abspath(settings.directory)
