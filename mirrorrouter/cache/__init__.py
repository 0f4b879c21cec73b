"""Per-upstream caches behind the ``CacheBackend`` protocol (see base.py); ``Caches`` holds
the open ones (caches.py)."""

from __future__ import annotations

from mirrorrouter.cache.base import (
    BlobFile,
    BlobWriter,
    CacheBackend,
    Claim,
    DigestMismatch,
    StoredManifest,
    TagRecord,
)
from mirrorrouter.cache.caches import Caches, open_backend
from mirrorrouter.cache.filesystem import FilesystemCache
from mirrorrouter.cache.objectstore import ObjectStoreCache

__all__ = [
    "BlobFile",
    "BlobWriter",
    "CacheBackend",
    "Caches",
    "Claim",
    "DigestMismatch",
    "FilesystemCache",
    "ObjectStoreCache",
    "StoredManifest",
    "TagRecord",
    "open_backend",
]
