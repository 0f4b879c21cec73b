"""Manifests and indexes: their media types, the reading of their JSON, platform selection,
and which of them a client is served.

Every other module asks this one what a manifest names, rather than reading its JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirrorrouter.cache import StoredManifest
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.reference import Digest, ReferenceError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# Asked of every upstream: without the list types a registry silently answers with one
# platform's manifest (another digest); without the OCI index it may answer 404.
MANIFEST_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({*MANIFEST_ACCEPT, DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})

MAX_MANIFEST_BYTES = 4 * 1024 * 1024


# ---------------------------------------------------------------------- platforms


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/architecture[/variant]``; without a variant it matches every variant."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {text!r} is not os/architecture[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, platform: Mapping[str, Any]) -> bool:
        if (platform.get("os"), platform.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or platform.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class PlatformSelector:
    """Which entries of an index to take: the listed platforms, or every entry (``all``)."""

    platforms: tuple[Platform, ...] | None  # None: every entry

    @classmethod
    def parse(cls, text: str) -> PlatformSelector:
        """``all``, or a comma-separated list such as ``linux/amd64,linux/arm64``."""
        if text.strip() == "all":
            return cls(None)
        platforms = tuple(Platform.parse(p) for p in text.split(",") if p.strip())
        if not platforms:
            raise ValueError("name at least one platform, or all")
        return cls(platforms)

    def selects(self, platform: Mapping[str, Any] | None) -> bool:
        if self.platforms is None:
            return True
        return any(p.matches(platform or {}) for p in self.platforms)

    def __str__(self) -> str:
        if self.platforms is None:
            return "all"
        return ",".join(str(p) for p in self.platforms)


def platform_text(platform: Mapping[str, Any] | None) -> str:
    if not platform:
        return "unknown"
    parts = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
    return "/".join(str(p) for p in parts if p)


# ---------------------------------------------------------------------- reading


def media_type_of(content_type: str | None, body: bytes) -> str | None:
    """The media type of a manifest: its Content-Type, else its ``mediaType`` field, else
    its shape (umoci writes OCI manifests without the optional ``mediaType``)."""
    declared = content_type.split(";", 1)[0].strip().lower() if content_type else None
    if declared in MANIFEST_MEDIA_TYPES:
        return declared
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    field_type = document.get("mediaType")
    if isinstance(field_type, str) and field_type:
        return field_type
    if "manifests" in document:
        return OCI_INDEX
    if "config" in document and "layers" in document:
        return OCI_MANIFEST
    return declared if declared and declared.startswith("application/vnd.") else None


def referenced_digests(data: bytes) -> list[Digest]:
    """The digests a manifest names: config and layers, or an index's manifests."""
    try:
        document = json.loads(data)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    descriptors = [
        document.get("config"),
        *document.get("layers", []),
        *document.get("manifests", []),
    ]
    digests = []
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            try:
                digests.append(Digest.parse(descriptor["digest"]))
            except ReferenceError:
                continue
    return digests


# ---------------------------------------------------------------------- what clients get


def accepts(accept: tuple[str, ...], media_type: str) -> bool:
    """Whether a client's Accept list admits a media type (no Accept admits anything)."""
    if not accept:
        return True
    family = media_type.split("/", 1)[0] + "/*"
    return any(a in ("*/*", family, media_type) for a in accept)


def child_for_client(manifest: StoredManifest, accept: tuple[str, ...]) -> Digest | None:
    """None when the client accepts the manifest as it is; else the index child to serve
    instead (its linux/amd64 manifest, as the distribution registry does for old Docker
    clients); MANIFEST_UNKNOWN when there is none. The one rule for upstreams and hosted
    repositories alike."""
    if accepts(accept, manifest.media_type):
        return None
    if manifest.media_type in INDEX_MEDIA_TYPES:
        child = default_platform_child(manifest.data, accept)
        if child is not None:
            return child
    raise RegistryError(
        ErrorCode.MANIFEST_UNKNOWN,
        f"the manifest is {manifest.media_type}, which this client does not accept",
        detail={"accept": list(accept)},
    )


def default_platform_child(data: bytes, accept: tuple[str, ...]) -> Digest | None:
    """The linux/amd64 entry of an index whose media type the client accepts."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    for entry in document.get("manifests", []):
        platform = entry.get("platform") or {}
        if (platform.get("os"), platform.get("architecture")) != ("linux", "amd64"):
            continue
        if accepts(accept, entry.get("mediaType", "")):
            try:
                return Digest.parse(entry["digest"])
            except (KeyError, ReferenceError):
                return None
    return None


# ---------------------------------------------------------------------- referrers


def empty_index() -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
        }
    ).encode()


def filter_referrers(data: bytes, artifact_type: str) -> bytes:
    try:
        document = json.loads(data)
    except ValueError:
        return empty_index()
    manifests = [
        m
        for m in document.get("manifests", [])
        if isinstance(m, dict) and m.get("artifactType") == artifact_type
    ]
    return json.dumps({**document, "manifests": manifests}).encode()
