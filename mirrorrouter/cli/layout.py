"""The OCI image layout tarball that ``mirrorrouter export`` writes and ``import`` reads,
for sites without a way upstream (exporter.py, importer.py)::

    oci-layout                {"imageLayoutVersion": "1.0.0"}
    index.json                one entry per image; its annotation
                              org.opencontainers.image.ref.name is the canonical reference
                              (docker.io/library/alpine:3.19), which import routes by
    blobs/<alg>/<hex>         manifests (the exact bytes the cache stores) and blobs
"""

from __future__ import annotations

from mirrorrouter.reference import Digest

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
COPY_CHUNK = 1024 * 1024


def blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"
