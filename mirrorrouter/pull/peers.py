"""The internal endpoint through which replicas follow each other's downloads.

While one replica holds a blob's cluster-wide lease (coordination/) and downloads it,
the others stream it from that replica at ``GET <advertise_url>/_mirrorrouter/peer/
<upstream>/blobs/<digest>`` (fill.py is the client side). The request carries the lease's
token in ``X-Mirrorrouter-Lease`` (only a replica that read the lock from Redis knows it),
so the endpoint needs no client login and serves nothing but a download in progress; it
may carry ``Range: bytes=N-`` to resume.

The answer streams the download as it lands: 200 (``Content-Length`` when the size is
known) or 206 from byte N; the last byte only once the digest matched, and a download that
fails cuts the stream short. ``BLOB_UNKNOWN`` (404) when this replica is not downloading
that blob under that token (done, failed, or never), as an OCI JSON error like every other.

This module is the protocol both sides share; the endpoint is api/peer.py, and the fill
finds what it serves through ``Filler.leased`` (fill.py, the fills' one owner).
"""

from __future__ import annotations

from urllib.parse import quote

from mirrorrouter.reference import Digest

PEER_PATH = "/_mirrorrouter/peer/{upstream}/blobs/{digest}"
LEASE_HEADER = "X-Mirrorrouter-Lease"


def peer_url(base: str, upstream: str, digest: Digest) -> str:
    """Where a replica advertised as ``base`` serves its download of ``digest``."""
    path = PEER_PATH.format(upstream=quote(upstream, safe=":"), digest=digest)
    return base.rstrip("/") + path
