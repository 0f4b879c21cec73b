"""The object-store cache backend: content, tags and links in an S3-compatible bucket
(``ObjectStoreCache``, cache.py, which says how it lays them out and why)."""

from __future__ import annotations

from mirrorrouter.cache.objectstore.cache import ObjectStoreCache

__all__ = ["ObjectStoreCache"]
