"""Manifests and indexes: the one place their JSON is read, with one notion of valid.

It owns the manifest media types and size limit, the typed values (``Descriptor``,
``Manifest``, ``Index``, ``Platform``), platform selection, which manifest a client that
takes no index types is served, and referrers indexes. Two entry points read manifests:

- ``parse_strict``, for what clients push (and archives bring): the document must follow
  the schema of its media type, or ``MANIFEST_INVALID`` names the first wrong field
  (``layers[2].digest``). Nesting is bounded before the JSON is parsed, so a hostile
  ``[[[[...]]]]`` costs a scan, not the stack.
- ``read_tolerant``, for bytes already stored or fetched upstream (gc, eviction, export,
  warm, referrers, pull-through): it never raises. Older versions stored whatever clients
  pushed, and upstreams are not ours to fix, so what is malformed is skipped: a descriptor
  without a valid digest, a ``platform`` that is not an object, a field of the wrong type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, NamedTuple, Protocol, TypeAlias

from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.reference import Digest, InvalidReference

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
PUSHABLE_MEDIA_TYPES = frozenset(MANIFEST_ACCEPT)
MANIFEST_MEDIA_TYPES = frozenset({*MANIFEST_ACCEPT, DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_NESTING = 32  # JSON depth a pushed manifest may have; real ones stay under 6
MAX_INDEX_DEPTH = 2  # an index of indexes is followed; deeper is refused
# A manifest larger than this is parsed off the event loop: a hostile 4 MiB document of a
# million empty lists takes half a second of CPU.
INLINE_PARSE_BYTES = 64 * 1024


class ManifestContent(Protocol):
    """Manifest bytes with their media type (a cache's ``StoredManifest``)."""

    @property
    def media_type(self) -> str: ...

    @property
    def data(self) -> bytes: ...


# ---------------------------------------------------------------------- typed values


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/architecture[/variant]``; as a pattern, no variant matches every variant."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {text!r} is not os/architecture[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, platform: Platform | None) -> bool:
        """Whether a descriptor's platform fits this pattern (no platform fits none)."""
        if platform is None or platform.os != self.os or platform.architecture != self.architecture:
            return False
        return self.variant in (None, platform.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# What the distribution registry serves a client that takes no index types (old Docker).
DEFAULT_PLATFORM = Platform("linux", "amd64")


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

    def selects(self, platform: Platform | None) -> bool:
        if self.platforms is None:
            return True
        return any(p.matches(platform) for p in self.platforms)

    def __str__(self) -> str:
        if self.platforms is None:
            return "all"
        return ",".join(str(p) for p in self.platforms)


def platform_text(platform: Platform | None) -> str:
    return str(platform) if platform is not None else "unknown"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A reference to content by digest: a config, a layer, an index entry, a subject."""

    media_type: str  # "" when a tolerant read found none
    digest: Digest
    size: int | None  # None when a tolerant read found no valid size
    platform: Platform | None = None
    artifact_type: str | None = None
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)
    written: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def external(self) -> bool:
        """A layer a registry need not hold (foreign, non-distributable, or with URLs)."""
        return bool(self.urls) or any(
            word in self.media_type for word in ("foreign", "nondistributable")
        )

    def to_json(self) -> dict[str, Any]:
        """The descriptor as written when it was read (unknown fields kept), else built."""
        if self.written is not None:
            return dict(self.written)
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2): a config and its layers."""

    media_type: str
    config: Descriptor | None  # None only from a tolerant read
    layers: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def descriptors(self) -> tuple[Descriptor, ...]:
        """What it references: the config, then the layers."""
        return self.layers if self.config is None else (self.config, *self.layers)

    @property
    def referrer_type(self) -> str | None:
        """Its artifact type in a referrers index: the config's media type when it declares
        none (the distribution spec's rule)."""
        return self.artifact_type or (self.config.media_type if self.config else None) or None


@dataclass(frozen=True, slots=True)
class Index:
    """An image index (OCI) or manifest list (Docker): manifests, usually one per platform."""

    media_type: str
    children: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def descriptors(self) -> tuple[Descriptor, ...]:
        return self.children

    @property
    def referrer_type(self) -> str | None:
        return self.artifact_type


Parsed: TypeAlias = Manifest | Index


def as_referrer(parsed: Parsed, digest: Digest, size: int) -> Descriptor:
    """How a referrers index lists a manifest."""
    return Descriptor(
        parsed.media_type, digest, size, None, parsed.referrer_type, (), parsed.annotations
    )


# ---------------------------------------------------------------------- the two entry points


def parse_strict(data: bytes, content_type: str) -> Parsed:
    """A pushed manifest, checked against the schema of its media type; raises
    ``MANIFEST_INVALID`` naming the first wrong field (``SIZE_INVALID`` over 4 MiB)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise RegistryError(
            ErrorCode.SIZE_INVALID,
            f"manifest of {len(data)} bytes is over the {MAX_MANIFEST_BYTES} byte limit",
            status=413,
        )
    if not _nesting_within(data, MAX_NESTING):
        raise _invalid("", f"JSON nested deeper than {MAX_NESTING} levels")
    try:
        document = json.loads(data)
    except RecursionError:  # unreachable after the scan; kept as the last line of defence
        raise _invalid("", f"JSON nested deeper than {MAX_NESTING} levels") from None
    except ValueError as exc:
        raise _invalid("", f"the manifest is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise _invalid("", "the manifest is not a JSON object")
    media_type = _pushed_media_type(document, content_type)
    version = document.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise _invalid("schemaVersion", "must be 2")
    return _Reader(strict=True).document(document, media_type in INDEX_MEDIA_TYPES, media_type)


def read_tolerant(data: bytes, media_type: str | None = None) -> Parsed | None:
    """What stored or upstream manifest bytes name, skipping what is malformed; None for
    what is not a JSON object at all. Never raises."""
    document = _load(data)
    if document is None:
        return None
    media_type = media_type or ""
    # The media type decides; an upstream's Content-Type can be wrong, so the shape of an
    # index (manifests, no layers) makes one too.
    is_index = media_type in INDEX_MEDIA_TYPES or (
        "manifests" in document and "layers" not in document
    )
    return _Reader(strict=False).document(document, is_index, media_type)


def referenced_digests(manifest: ManifestContent) -> list[Digest]:
    """The digests a stored manifest references: config and layers, or an index's
    manifests (none when it is unreadable)."""
    parsed = read_tolerant(manifest.data, manifest.media_type)
    return [] if parsed is None else [d.digest for d in parsed.descriptors]


def media_type_of(content_type: str | None, body: bytes) -> str | None:
    """The media type of a manifest: its Content-Type, else its ``mediaType`` field, else
    its shape (umoci writes OCI manifests without the optional ``mediaType``)."""
    declared = content_type.split(";", 1)[0].strip().lower() if content_type else None
    if declared in MANIFEST_MEDIA_TYPES:
        return declared
    document = _load(body)
    if document is None:
        return None
    field_type = document.get("mediaType")
    if isinstance(field_type, str) and field_type:
        return field_type
    if "manifests" in document:
        return OCI_INDEX
    if "config" in document and "layers" in document:
        return OCI_MANIFEST
    return declared if declared and declared.startswith("application/vnd.") else None


def _load(data: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        return None
    return document if isinstance(document, dict) else None


def _pushed_media_type(document: dict[str, Any], content_type: str) -> str:
    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType", "must be a string")
    content_type = content_type.split(";", 1)[0].strip()
    if declared and content_type and declared != content_type:
        raise _invalid("mediaType", f"{declared} does not match the Content-Type {content_type}")
    media_type = content_type or declared or ""
    if media_type not in PUSHABLE_MEDIA_TYPES:
        raise RegistryError(
            ErrorCode.MANIFEST_INVALID,
            f"unsupported manifest media type {media_type or '(none)'}; expected one of "
            + ", ".join(sorted(PUSHABLE_MEDIA_TYPES)),
        )
    return media_type


def _invalid(path: str, problem: str) -> RegistryError:
    return RegistryError(
        ErrorCode.MANIFEST_INVALID,
        f"{path}: {problem}" if path else problem,
        detail={"field": path} if path else None,
    )


# A JSON string, escapes included: brackets inside strings are not structure.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1
_SCAN_CHUNK = 65536


def _nesting_within(data: bytes, limit: int) -> bool:
    """Whether JSON ``data`` nests at most ``limit`` deep, found without parsing it: the
    brackets outside strings, counted in C-speed chunks that stop at the first too deep."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return True
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for start in range(0, len(brackets), _SCAN_CHUNK):
        chunk = brackets[start : start + _SCAN_CHUNK]
        depths = list(accumulate(map(_STEP.__getitem__, chunk), initial=depth))
        if max(depths) > limit:
            return False
        depth = depths[-1]
    return True


# ---------------------------------------------------------------------- the schema


class _Type(NamedTuple):
    """A JSON type a field must have, and how an error says it."""

    valid: Callable[[Any], bool]
    expected: str


def _is_digest(value: Any) -> bool:
    try:
        Digest.parse(value)
    except InvalidReference:
        return False
    return True


_STR = _Type(lambda v: isinstance(v, str), "a string")
_STRS = _Type(
    lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"
)
_STR_MAP = _Type(
    lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    "an object of strings",
)
_OBJECT = _Type(lambda v: isinstance(v, dict), "an object")
_DESCRIPTOR = _Type(lambda v: isinstance(v, dict), "a descriptor object")
_DESCRIPTORS = _Type(lambda v: isinstance(v, list), "a list of descriptors")
_SIZE = _Type(lambda v: type(v) is int and v >= 0, "a non-negative integer")  # not a bool
_DIGEST = _Type(lambda v: isinstance(v, str) and _is_digest(v), "a digest such as sha256:<64 hex>")


class _Reader:
    """Turns a manifest's JSON into typed values. Strict, it raises ``MANIFEST_INVALID``
    at the first field that does not follow the schema; tolerant, it drops that field (a
    descriptor without a valid digest is dropped whole)."""

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict

    def check(self, value: Any, path: str, kind: _Type, *, required: bool = False) -> Any:
        """``value`` when it is valid; None when it is absent (and may be) or wrong."""
        if value is None and not required:
            return None
        if kind.valid(value):
            return value
        if self.strict:
            raise _invalid(path, f"expected {kind.expected}")
        return None

    def take(
        self, obj: Mapping[str, Any], key: str, at: str, kind: _Type, *, required: bool = False
    ) -> Any:
        """The field ``key`` of the object at path ``at``, checked."""
        path = f"{at}.{key}" if at else key
        return self.check(obj.get(key), path, kind, required=required)

    def document(self, document: dict[str, Any], is_index: bool, media_type: str) -> Parsed:
        subject = self.descriptor(document.get("subject"), "subject")
        artifact_type = self.take(document, "artifactType", "", _STR)
        annotations = self.take(document, "annotations", "", _STR_MAP) or {}
        if is_index:
            children = self.descriptors(document, "manifests")
            return Index(media_type, children, subject, artifact_type, annotations)
        config = self.descriptor(document.get("config"), "config", required=True)
        layers = self.descriptors(document, "layers")
        return Manifest(media_type, config, layers, subject, artifact_type, annotations)

    def descriptors(self, document: Mapping[str, Any], key: str) -> tuple[Descriptor, ...]:
        """A required list of descriptors (``"layers": null`` is not one)."""
        items = self.take(document, key, "", _DESCRIPTORS, required=True) or ()
        found = (self.descriptor(v, f"{key}[{i}]", required=True) for i, v in enumerate(items))
        return tuple(d for d in found if d is not None)

    def descriptor(self, value: Any, at: str, *, required: bool = False) -> Descriptor | None:
        value = self.check(value, at, _DESCRIPTOR, required=required)
        digest = None if value is None else self.take(value, "digest", at, _DIGEST, required=True)
        if digest is None:
            return None  # tolerant: without its digest a descriptor names nothing
        return Descriptor(
            self.take(value, "mediaType", at, _STR, required=True) or "",
            Digest.parse(digest),
            self.take(value, "size", at, _SIZE, required=True),
            self.platform(value, at),
            self.take(value, "artifactType", at, _STR),
            tuple(self.take(value, "urls", at, _STRS) or ()),
            self.take(value, "annotations", at, _STR_MAP) or {},
            value,
        )

    def platform(self, descriptor: Mapping[str, Any], at: str) -> Platform | None:
        value = self.take(descriptor, "platform", at, _OBJECT)
        if value is None:
            return None
        at = f"{at}.platform"
        os_name = self.take(value, "os", at, _STR, required=True)
        architecture = self.take(value, "architecture", at, _STR, required=True)
        variant = self.take(value, "variant", at, _STR)
        self.take(value, "os.version", at, _STR)
        self.take(value, "os.features", at, _STRS)
        if os_name is None or architecture is None:
            return None
        return Platform(os_name, architecture, variant)


# ---------------------------------------------------------------------- what clients get


def accepts(accept: tuple[str, ...], media_type: str) -> bool:
    """Whether a client's Accept list admits a media type (no Accept admits anything)."""
    if not accept:
        return True
    family = media_type.split("/", 1)[0] + "/*"
    return any(a in ("*/*", family, media_type) for a in accept)


def child_for_client(manifest: ManifestContent, accept: tuple[str, ...]) -> Digest | None:
    """None when the client accepts the manifest as it is; else the index child to serve
    instead (its linux/amd64 manifest, as the distribution registry does for old Docker
    clients); MANIFEST_UNKNOWN when there is none. The one rule for upstreams and hosted
    repositories alike."""
    if accepts(accept, manifest.media_type):
        return None
    if manifest.media_type in INDEX_MEDIA_TYPES:
        index = read_tolerant(manifest.data, manifest.media_type)
        for child in index.children if isinstance(index, Index) else ():
            if DEFAULT_PLATFORM.matches(child.platform) and accepts(accept, child.media_type):
                return child.digest
    raise RegistryError(
        ErrorCode.MANIFEST_UNKNOWN,
        f"the manifest is {manifest.media_type}, which this client does not accept",
        detail={"accept": list(accept)},
    )


# ---------------------------------------------------------------------- referrers


def referrers_index(descriptors: Iterable[Descriptor]) -> bytes:
    """The OCI index a referrers request answers with."""
    manifests = [d.to_json() for d in descriptors]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


def referrers_in(data: bytes) -> tuple[Descriptor, ...]:
    """The entries of a referrers index from elsewhere (an upstream, a group member)."""
    index = read_tolerant(data, OCI_INDEX)
    return index.children if isinstance(index, Index) else ()


def filter_referrers(data: bytes, artifact_type: str) -> bytes:
    """A referrers index cut down to one artifact type (for an upstream that ignored it)."""
    return referrers_index(d for d in referrers_in(data) if d.artifact_type == artifact_type)
