"""Per-upstream caches behind the ``CacheBackend`` protocol (see base.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from mirrorrouter.cache.base import (
    BlobFile,
    BlobWriter,
    CacheBackend,
    Claim,
    DigestMismatch,
    StoredManifest,
    TagRecord,
)
from mirrorrouter.cache.filesystem import FilesystemCache
from mirrorrouter.cache.s3 import ObjectStoreCache
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


__all__ = [
    "BlobFile",
    "BlobWriter",
    "CacheBackend",
    "Claim",
    "DigestMismatch",
    "FilesystemCache",
    "ObjectStoreCache",
    "StoredManifest",
    "TagRecord",
    "open_backend",
]
