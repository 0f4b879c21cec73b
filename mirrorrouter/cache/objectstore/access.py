"""The last access of a digest in the bucket: empty marker objects
``<root>/access/<alg>/<hex>/<seconds>``, whose name is the time.

**Access times** are stored as empty marker objects whose name is the time (a LIST gives
every access without a GET per object, and the inventory is one LIST of the whole cache).
Object metadata could not carry them (S3 cannot change an object's metadata in place) and a
single access object would be rewritten whole on every flush. A digest has one marker for
its blob and manifest together; persisting a newer access writes the new marker and deletes
the older ones (never moving an access back), at most once per ``ACCESS_RESOLUTION`` per
digest and process; ``touch`` records in memory only, and ``flush_access`` persists what
was recorded by any instance over the same storage in this process. Content without a
marker (an interrupted commit) counts as accessed when it was last modified.
"""

from __future__ import annotations

import contextlib
import logging

import obstore

from mirrorrouter.cache.objectstore.bucket import Bucket, gather
from mirrorrouter.cache.spool import SharedState
from mirrorrouter.reference import Digest

log = logging.getLogger("mirrorrouter.cache.s3")


async def record_access(
    bucket: Bucket, shared: SharedState, digest: Digest, when: float, *, stored: bool = False
) -> None:
    """Make ``when`` the stored last access of ``digest``, unless a later one is stored or
    the digest is not (``stored``: the caller just wrote it). Failures are logged: an
    access is a hint for eviction, never a reason to fail a request."""
    try:
        prefix = bucket.access_prefix(digest)
        markers: dict[str, float] = {}
        for meta in await bucket.listing(prefix):
            with contextlib.suppress(ValueError):
                markers[meta["path"]] = float(meta["path"].rpartition("/")[2])
        if not markers and not stored:
            sizes = await gather(
                [bucket.size(bucket.blob_key(digest)), bucket.size(bucket.manifest_key(digest))]
            )
            if sizes == [None, None]:
                return  # not stored: nothing to date
        latest = max(markers.values(), default=None)
        if latest is not None and latest >= when:
            keep = max(markers, key=markers.__getitem__)
            when = latest
        else:
            keep = f"{prefix}/{when!r}"
            await obstore.put_async(bucket.store, keep, b"")
        stale = [key for key in markers if key != keep]
        if stale:
            await obstore.delete_async(bucket.store, stale)
        shared.mark_persisted(digest, when)
    except Exception as error:
        log.warning("could not record the access of %s: %s", digest, error)
