"""Deterministic test images, built offline as OCI image layouts and pushed to a registry.

Every byte is a function of the builder's arguments: tar entries carry mtime 0 and uid/gid 0,
gzip headers carry mtime 0, JSON is written compactly in a fixed key order, random payloads come
from ``random.Random(seed)``. The same builder therefore yields the same digests on every run.

Pushing uses ``skopeo copy --all --preserve-digests`` from ``oci:LAYOUT:REF``. skopeo 1.9.3
keeps every byte here (uncompressed OCI layers included, manifests without ``mediaType``
included, Docker manifest lists referenced from an OCI layout included); ``--preserve-digests``
makes it fail rather than silently convert or recompress, and the digest it reports
(``--digestfile``) is checked against the built one. :func:`api_push` does the same through the
registry HTTP API with httpx, for callers that want no skopeo in the loop.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import platform as host_platform
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urljoin

import httpx
import pytest

from tests.support.service import LOOPBACK_ONLY_ENV

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)

SKOPEO_BINARY = "/usr/bin/skopeo"
CREATED = "2024-01-01T00:00:00Z"
MIB = 1024 * 1024
DEFAULT_LARGE_SIZE = 110 * MIB
CHUNK = MIB
BUILD_VERSION = 1  # bump when a builder changes its output, to invalidate on-disk caches

Format = Literal["oci", "docker"]
Compression = Literal["none", "gzip"]


class HasHost(Protocol):
    """Anything with a ``host`` (``127.0.0.1:PORT``), like ``DistributionRegistry``."""

    @property
    def host(self) -> str:
        """The registry authority."""
        ...


class PushError(RuntimeError):
    """A push failed or the registry stored a different digest than the one built."""


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: media type, digest and size of one blob or manifest."""

    media_type: str
    digest: str
    size: int

    def to_json(self, platform: str | None = None) -> dict[str, Any]:
        """Return the descriptor as manifest JSON, with a platform object if given."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if platform is not None:
            out["platform"] = platform_json(platform)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Descriptor:
        """Inverse of :meth:`to_json` (platform ignored)."""
        return cls(str(data["mediaType"]), str(data["digest"]), int(data["size"]))


@dataclass(frozen=True)
class PlatformImage:
    """One image manifest with its config and layers (one platform of an index)."""

    platform: str  # "linux/amd64", "linux/arm64/v8"
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config first, then the layers."""
        return (self.config, *self.layers)

    def to_json(self) -> dict[str, Any]:
        """Serialize for the on-disk build cache."""
        return {
            "platform": self.platform,
            "manifest": self.manifest.to_json(),
            "config": self.config.to_json(),
            "layers": [d.to_json() for d in self.layers],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlatformImage:
        """Inverse of :meth:`to_json`."""
        return cls(
            platform=str(data["platform"]),
            manifest=Descriptor.from_json(data["manifest"]),
            config=Descriptor.from_json(data["config"]),
            layers=tuple(Descriptor.from_json(d) for d in data["layers"]),
        )


@dataclass(frozen=True)
class BuiltImage:
    """An image written to an OCI layout, tagged ``ref_name`` inside the layout."""

    name: str
    layout: Path
    ref_name: str
    top: Descriptor  # the manifest or index a tag points to
    images: tuple[PlatformImage, ...]

    @property
    def digest(self) -> str:
        """Digest of the top manifest or index."""
        return self.top.digest

    @property
    def media_type(self) -> str:
        """Media type of the top manifest or index."""
        return self.top.media_type

    @property
    def is_index(self) -> bool:
        """Whether the top is an OCI index or a Docker manifest list."""
        return self.top.media_type in INDEX_TYPES

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Every config and layer blob, each once, in manifest order."""
        seen: dict[str, Descriptor] = {}
        for image in self.images:
            for blob in image.blobs:
                seen.setdefault(blob.digest, blob)
        return tuple(seen.values())

    @property
    def manifest_digests(self) -> tuple[str, ...]:
        """Digests of the image manifests (one per platform; the top itself if single)."""
        return tuple(image.manifest.digest for image in self.images)

    @property
    def platform_manifests(self) -> dict[str, str]:
        """Platform ("linux/arm64") -> image manifest digest."""
        return {image.platform: image.manifest.digest for image in self.images}

    @property
    def oci_reference(self) -> str:
        """The skopeo ``oci:LAYOUT:REF`` reference (OCI media types only, see below)."""
        return f"oci:{self.layout}:{self.ref_name}"

    @property
    def dir_path(self) -> Path:
        """The same image in skopeo's ``dir:`` transport layout (hard links to the blobs)."""
        return self.layout / "dir"

    @property
    def skopeo_source(self) -> str:
        """The skopeo source that keeps every byte: ``oci:`` for OCI, ``dir:`` for Docker.

        skopeo 1.9's ``oci:`` transport ignores ``index.json`` entries whose media type is not
        an OCI manifest or index ("no descriptor found for reference"), so Docker schema2
        manifests and lists go through ``dir:``, which takes any manifest verbatim.
        """
        if self.top.media_type in (OCI_MANIFEST, OCI_INDEX):
            return self.oci_reference
        return f"dir:{self.dir_path}"

    @property
    def total_blob_bytes(self) -> int:
        """Sum of the sizes of all distinct blobs."""
        return sum(b.size for b in self.blobs)

    def blob_path(self, digest: str) -> Path:
        """Path of a blob or manifest file inside the layout."""
        algorithm, _, hexdigest = digest.partition(":")
        return self.layout / "blobs" / algorithm / hexdigest

    def read_blob(self, digest: str) -> bytes:
        """Bytes of a blob or manifest (do not call on the large layer in a hot loop)."""
        return self.blob_path(digest).read_bytes()

    def manifest_bytes(self, digest: str | None = None) -> bytes:
        """Exact bytes of the top manifest/index, or of the manifest with ``digest``."""
        return self.read_blob(digest or self.digest)

    def to_json(self) -> dict[str, Any]:
        """Serialize for the on-disk build cache."""
        return {
            "name": self.name,
            "ref_name": self.ref_name,
            "top": self.top.to_json(),
            "images": [i.to_json() for i in self.images],
        }

    @classmethod
    def from_json(cls, layout: Path, data: Mapping[str, Any]) -> BuiltImage:
        """Inverse of :meth:`to_json`."""
        return cls(
            name=str(data["name"]),
            layout=layout,
            ref_name=str(data["ref_name"]),
            top=Descriptor.from_json(data["top"]),
            images=tuple(PlatformImage.from_json(i) for i in data["images"]),
        )


@dataclass(frozen=True)
class PushedImage:
    """A built image as stored in a registry under ``repository:tag``."""

    image: BuiltImage
    registry: str  # "127.0.0.1:PORT"
    repository: str
    tag: str

    @property
    def digest(self) -> str:
        """Digest of the top manifest or index (checked equal to the registry's)."""
        return self.image.digest

    @property
    def media_type(self) -> str:
        """Media type of the top manifest or index."""
        return self.image.media_type

    @property
    def size(self) -> int:
        """Size of the top manifest or index in bytes."""
        return self.image.top.size

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Every config and layer blob (digest, size, media type)."""
        return self.image.blobs

    @property
    def manifest_digests(self) -> tuple[str, ...]:
        """Per-platform image manifest digests."""
        return self.image.manifest_digests

    @property
    def platform_manifests(self) -> dict[str, str]:
        """Platform -> image manifest digest."""
        return self.image.platform_manifests

    @property
    def reference(self) -> str:
        """``HOST/REPO:TAG``."""
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def digest_reference(self) -> str:
        """``HOST/REPO@DIGEST``."""
        return f"{self.registry}/{self.repository}@{self.digest}"

    def path_reference(self, host: str) -> str:
        """The same repository and tag under another host (a mirror): ``HOST/REPO:TAG``."""
        return f"{host}/{self.repository}:{self.tag}"


# -- JSON, tar and layout primitives -------------------------------------------------------


def platform_json(platform: str) -> dict[str, str]:
    """``linux/arm64/v8`` -> ``{"architecture": "arm64", "os": "linux", "variant": "v8"}``."""
    parts = platform.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"platform must be os/arch[/variant], got {platform!r}")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def host_platform_name() -> str:
    """The platform of this machine, for runnable images (``linux/amd64``)."""
    machine = host_platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )
    return f"linux/{arch}"


def canonical_json(obj: Any) -> bytes:
    """Compact JSON in insertion order; the bytes that get hashed."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of some bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TarEntry:
    """One file, directory or symlink in a layer tar."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    kind: Literal["file", "dir", "symlink"] = "file"
    target: str = ""


def _tar_info(entry: TarEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = entry.mode
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
    else:
        info.size = len(entry.data)
    return info


def make_tar(entries: Iterable[TarEntry]) -> bytes:
    """A deterministic ustar archive of the entries, in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for entry in entries:
            info = _tar_info(entry)
            archive.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return buffer.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip (mtime 0, no file name)."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def seeded_bytes(seed: int | str, size: int) -> bytes:
    """``size`` pseudo-random bytes that depend only on ``seed``."""
    return random.Random(seed).randbytes(size)


def random_tar_stream(seed: int | str, size: int, path: str = "data/random.bin") -> Iterator[bytes]:
    """Yield a ustar archive holding one file of ``size`` seeded random bytes, in 1 MiB parts."""
    info = _tar_info(TarEntry(path, mode=0o644))
    info.size = size
    yield info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    rng = random.Random(seed)
    remaining = size
    while remaining:
        n = min(CHUNK, remaining)
        yield rng.randbytes(n)
        remaining -= n
    written = 512 + size + (-size % 512) + 2 * 512
    yield b"\0" * ((-size % 512) + 2 * 512 + (-written % tarfile.RECORDSIZE))


class OciLayout:
    """Writes blobs, ``index.json`` and ``oci-layout`` into a directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.blob_dir = self.path / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        """Store a blob and return its descriptor."""
        digest = sha256_digest(data)
        target = self.blob_dir / digest.partition(":")[2]
        if not target.exists() or target.stat().st_size != len(data):
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return Descriptor(media_type, digest, len(data))

    def add_stream(self, chunks: Iterable[bytes], media_type: str) -> Descriptor:
        """Store a blob from chunks, hashing as it goes (one chunk in memory at a time)."""
        hasher = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.blob_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    hasher.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
            digest = "sha256:" + hasher.hexdigest()
            os.replace(tmp_name, self.blob_dir / hasher.hexdigest())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return Descriptor(media_type, digest, size)

    def add_json(self, obj: Any, media_type: str) -> Descriptor:
        """Store a JSON document (manifest, index, config) as canonical bytes."""
        return self.add_bytes(canonical_json(obj), media_type)

    def write_index(self, tagged: Mapping[str, Descriptor]) -> None:
        """Write ``index.json``, naming each descriptor with a ``ref.name`` annotation."""
        manifests = []
        for ref_name, descriptor in tagged.items():
            entry = descriptor.to_json()
            entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
            manifests.append(entry)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        (self.path / "index.json").write_bytes(canonical_json(index))


def write_dir_view(image: BuiltImage) -> None:
    """Write ``image.dir_path`` in skopeo's ``dir:`` format, hard-linking the layout's blobs.

    ``dir:`` (Directory Transport Version 1.1) holds ``manifest.json`` (the top), one
    ``<hex>.manifest.json`` per instance of a list, and every blob as ``<hex>``.
    """
    target = image.dir_path
    target.mkdir(parents=True, exist_ok=True)
    (target / "version").write_text("Directory Transport Version: 1.1\n")
    _link(image.blob_path(image.digest), target / "manifest.json")
    if image.is_index:
        for platform_image in image.images:
            digest = platform_image.manifest.digest
            _link(image.blob_path(digest), target / f"{digest.partition(':')[2]}.manifest.json")
    for blob in image.blobs:
        _link(image.blob_path(blob.digest), target / blob.digest.partition(":")[2])


def _link(source: Path, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# -- image assembly -----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    """A layer already stored in a layout, with the digest of its uncompressed tar."""

    descriptor: Descriptor
    diff_id: str


def add_layer(
    layout: OciLayout, entries: Sequence[TarEntry], fmt: Format, compression: Compression
) -> LayerBlob:
    """Tar (and maybe gzip) the entries into the layout; return the layer and its diff ID."""
    tar = make_tar(entries)
    diff_id = sha256_digest(tar)
    if compression == "gzip":
        media_type = OCI_LAYER_GZIP if fmt == "oci" else DOCKER_LAYER_GZIP
        return LayerBlob(layout.add_bytes(gzip_bytes(tar), media_type), diff_id)
    media_type = OCI_LAYER if fmt == "oci" else DOCKER_LAYER
    return LayerBlob(layout.add_bytes(tar, media_type), diff_id)


def image_config(
    platform: str,
    diff_ids: Sequence[str],
    *,
    cmd: Sequence[str] = ("/bin/sh",),
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An image config document for the platform and layers."""
    plat = platform_json(platform)
    config: dict[str, Any] = {
        "created": CREATED,
        "architecture": plat["architecture"],
        "os": plat["os"],
    }
    if "variant" in plat:
        config["variant"] = plat["variant"]
    config["config"] = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": list(cmd),
        "Labels": dict(labels or {}),
    }
    config["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    config["history"] = [
        {"created": CREATED, "created_by": f"mirrorrouter test layer {i}"}
        for i in range(len(diff_ids))
    ]
    return config


def add_image(
    layout: OciLayout,
    platform: str,
    layers: Sequence[LayerBlob],
    *,
    fmt: Format = "oci",
    include_media_type: bool = True,
    cmd: Sequence[str] = ("/bin/sh",),
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> PlatformImage:
    """Store a config and an image manifest over already-stored layers."""
    config_type = OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG
    manifest_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    config = layout.add_json(
        image_config(platform, [layer.diff_id for layer in layers], cmd=cmd, labels=labels),
        config_type,
    )
    manifest: dict[str, Any] = {"schemaVersion": 2}
    if include_media_type or fmt == "docker":  # Docker schema2 requires the field
        manifest["mediaType"] = manifest_type
    manifest["config"] = config.to_json()
    manifest["layers"] = [layer.descriptor.to_json() for layer in layers]
    if annotations:
        manifest["annotations"] = dict(annotations)
    descriptor = layout.add_json(manifest, manifest_type)
    return PlatformImage(
        platform=platform,
        manifest=descriptor,
        config=config,
        layers=tuple(layer.descriptor for layer in layers),
    )


def add_index(layout: OciLayout, images: Sequence[PlatformImage], fmt: Format) -> Descriptor:
    """Store an OCI index or Docker manifest list over stored image manifests."""
    media_type = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [image.manifest.to_json(image.platform) for image in images],
    }
    return layout.add_json(index, media_type)


def small_layer_entries(seed: int | str, label: str, payload_size: int = 4096) -> list[TarEntry]:
    """A few small files: a text file naming the image and some seeded random bytes."""
    return [
        TarEntry("etc/", kind="dir", mode=0o755),
        TarEntry("etc/mirrorrouter/", kind="dir", mode=0o755),
        TarEntry(f"etc/mirrorrouter/{label}.txt", f"{label} seed={seed}\n".encode()),
        TarEntry(f"etc/mirrorrouter/{label}.bin", seeded_bytes(f"{seed}:{label}", payload_size)),
    ]


# -- the factory --------------------------------------------------------------------------


@dataclass
class ImageFactory:
    """Builds each named image once under ``root`` and pushes images to registries.

    Builds are cached in memory and on disk (``root/<name>/record.json`` is written last), so
    a session-scoped factory over ``tmp_path_factory.mktemp("images")`` builds every image
    once per test session, and a factory over a persistent directory once per machine.
    """

    root: Path
    _built: dict[str, tuple[str, BuiltImage]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- builders -----------------------------------------------------------------------

    def small(
        self,
        name: str = "small",
        *,
        seed: int = 1,
        layers: int = 2,
        compression: Compression = "none",
        platform: str = "linux/amd64",
    ) -> BuiltImage:
        """A single-platform OCI image: config plus ``layers`` small layers."""
        recipe = f"small seed={seed} layers={layers} compression={compression} {platform}"

        def build(layout: OciLayout) -> tuple[Descriptor, tuple[PlatformImage, ...]]:
            blobs = [
                add_layer(layout, small_layer_entries(seed, f"{name}-{i}"), "oci", compression)
                for i in range(layers)
            ]
            image = add_image(layout, platform, blobs, labels={"org.mirrorrouter.test": name})
            return image.manifest, (image,)

        return self._cached(name, recipe, build)

    def no_media_type(self, name: str = "nomediatype", *, seed: int = 2) -> BuiltImage:
        """An OCI image manifest WITHOUT the optional ``mediaType`` field, as umoci writes."""
        recipe = f"nomediatype seed={seed}"

        def build(layout: OciLayout) -> tuple[Descriptor, tuple[PlatformImage, ...]]:
            layer = add_layer(layout, small_layer_entries(seed, name), "oci", "none")
            image = add_image(layout, "linux/amd64", [layer], include_media_type=False)
            return image.manifest, (image,)

        return self._cached(name, recipe, build)

    def multiarch(
        self,
        name: str = "multiarch",
        *,
        seed: int = 3,
        platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
        compression: Compression = "none",
    ) -> BuiltImage:
        """An OCI image index over one OCI image manifest per platform."""
        return self._index(name, "oci", seed, platforms, compression)

    def docker_list(
        self,
        name: str = "dockerlist",
        *,
        seed: int = 4,
        platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
    ) -> BuiltImage:
        """A Docker schema2 manifest list over Docker schema2 manifests (gzip layers)."""
        return self._index(name, "docker", seed, platforms, "gzip")

    def docker_image(
        self, name: str = "dockerimage", *, seed: int = 5, platform: str = "linux/amd64"
    ) -> BuiltImage:
        """A single Docker schema2 manifest with one gzip layer."""
        recipe = f"dockerimage seed={seed} {platform}"

        def build(layout: OciLayout) -> tuple[Descriptor, tuple[PlatformImage, ...]]:
            layer = add_layer(layout, small_layer_entries(seed, name), "docker", "gzip")
            image = add_image(layout, platform, [layer], fmt="docker")
            return image.manifest, (image,)

        return self._cached(name, recipe, build)

    def large(
        self, name: str = "large", *, size: int = DEFAULT_LARGE_SIZE, seed: int = 6
    ) -> BuiltImage:
        """An OCI image with one uncompressed layer holding ``size`` seeded random bytes.

        The layer is streamed to disk in 1 MiB chunks while hashing: one chunk in memory.
        """
        recipe = f"large size={size} seed={seed}"

        def build(layout: OciLayout) -> tuple[Descriptor, tuple[PlatformImage, ...]]:
            descriptor = layout.add_stream(random_tar_stream(seed, size), OCI_LAYER)
            layer = LayerBlob(descriptor, descriptor.digest)  # uncompressed: diff ID = digest
            image = add_image(layout, "linux/amd64", [layer])
            return image.manifest, (image,)

        return self._cached(name, recipe, build)

    def runnable(self, name: str = "runnable", *, seed: int = 7) -> BuiltImage:
        """A host-platform image that runs: busybox-static as ``/bin/sh``, prints a greeting.

        Its ``Cmd`` is ``/bin/busybox cat /hello.txt``, which prints ``hello from <name>``.
        """
        busybox = Path("/bin/busybox")
        recipe = f"runnable seed={seed} busybox={_file_digest(busybox)}"

        def build(layout: OciLayout) -> tuple[Descriptor, tuple[PlatformImage, ...]]:
            base = add_layer(
                layout,
                [
                    TarEntry("bin/", kind="dir", mode=0o755),
                    TarEntry("bin/busybox", busybox.read_bytes(), mode=0o755),
                    TarEntry("bin/sh", kind="symlink", target="busybox", mode=0o777),
                    TarEntry("tmp/", kind="dir", mode=0o1777),
                ],
                "oci",
                "gzip",
            )
            top = add_layer(
                layout, [TarEntry("hello.txt", f"hello from {name}\n".encode())], "oci", "gzip"
            )
            image = add_image(
                layout,
                host_platform_name(),
                [base, top],
                cmd=("/bin/busybox", "cat", "/hello.txt"),
            )
            return image.manifest, (image,)

        return self._cached(name, recipe, build)

    def _index(
        self,
        name: str,
        fmt: Format,
        seed: int,
        platforms: Sequence[str],
        compression: Compression,
    ) -> BuiltImage:
        recipe = f"index fmt={fmt} seed={seed} platforms={','.join(platforms)} {compression}"

        def build(layout: OciLayout) -> tuple[Descriptor, tuple[PlatformImage, ...]]:
            images = []
            for plat in platforms:
                label = f"{name}-{plat.replace('/', '-')}"
                layer = add_layer(layout, small_layer_entries(seed, label), fmt, compression)
                images.append(add_image(layout, plat, [layer], fmt=fmt))
            return add_index(layout, images, fmt), tuple(images)

        return self._cached(name, recipe, build)

    def _cached(
        self,
        name: str,
        recipe: str,
        build: Callable[[OciLayout], tuple[Descriptor, tuple[PlatformImage, ...]]],
    ) -> BuiltImage:
        """Return the image built from ``recipe`` under ``root/name``, building it if needed."""
        full_recipe = f"v{BUILD_VERSION} {recipe}"
        cached = self._built.get(name)
        if cached is not None and cached[0] == full_recipe:
            return cached[1]
        path = self.root / name
        record_path = path / "record.json"
        if record_path.exists():
            record = json.loads(record_path.read_text())
            if record.get("recipe") == full_recipe:
                image = BuiltImage.from_json(path, record["image"])
                self._built[name] = (full_recipe, image)
                return image
            record_path.unlink()
        layout = OciLayout(path)
        top, images = build(layout)
        ref_name = "latest"
        layout.write_index({ref_name: top})
        image = BuiltImage(name=name, layout=path, ref_name=ref_name, top=top, images=images)
        write_dir_view(image)
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"recipe": full_recipe, "image": image.to_json()}, indent=1))
        os.replace(tmp, record_path)
        self._built[name] = (full_recipe, image)
        return image

    # -- pushing ------------------------------------------------------------------------

    def push(
        self,
        image: BuiltImage,
        registry: str | HasHost,
        repository: str,
        tag: str = "latest",
        *,
        creds: tuple[str, str] | None = None,
        method: Literal["skopeo", "api"] = "skopeo",
    ) -> PushedImage:
        """Push to ``registry`` (``127.0.0.1:PORT`` or an object with ``.host``), check digest."""
        host = registry if isinstance(registry, str) else registry.host
        if method == "api":
            return api_push(image, host, repository, tag, creds=creds)
        return skopeo_push(image, host, repository, tag, creds=creds, workdir=self.root)


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()[:16]


# -- pushing with skopeo ------------------------------------------------------------------


def client_environment() -> dict[str, str]:
    """This process's environment, confined to loopback and without a stray auth file."""
    env = {k: v for k, v in os.environ.items() if k != "REGISTRY_AUTH_FILE"}
    env.update(LOOPBACK_ONLY_ENV)
    return env


def skopeo_push(
    image: BuiltImage,
    registry: str,
    repository: str,
    tag: str = "latest",
    *,
    creds: tuple[str, str] | None = None,
    workdir: Path | None = None,
    timeout: float = 300.0,
) -> PushedImage:
    """``skopeo copy --all --preserve-digests`` the layout to ``docker://REGISTRY/REPO:TAG``."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="push-") as tmp:
        digestfile = Path(tmp) / "digest"
        authfile = Path(tmp) / "auth.json"
        authfile.write_text('{"auths":{}}')  # never pick up the user's stored credentials
        command = [
            SKOPEO_BINARY,
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-authfile",
            str(authfile),
            "--digestfile",
            str(digestfile),
        ]
        if creds is not None:
            command += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
        command += [image.skopeo_source, f"docker://{registry}/{repository}:{tag}"]
        done = subprocess.run(
            command, env=client_environment(), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise PushError(
                f"skopeo copy {image.name} -> {registry}/{repository}:{tag} failed "
                f"({done.returncode}): {done.stderr.strip()}"
            )
        pushed = digestfile.read_text().strip()
    if pushed != image.digest:
        raise PushError(
            f"skopeo stored {image.name} as {pushed}, built as {image.digest}: the registry "
            "holds different bytes than the layout"
        )
    return PushedImage(image=image, registry=registry, repository=repository, tag=tag)


# -- pushing through the registry HTTP API ------------------------------------------------


class _RegistryAuth(httpx.Auth):
    """Answers Basic and Bearer challenges, fetching tokens from the realm with the creds."""

    requires_response_body = True

    def __init__(self, repository: str, creds: tuple[str, str] | None) -> None:
        self.repository = repository
        self.creds = creds
        self.header: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send; on a 401 challenge, obtain credentials for it and send again."""
        if self.header is not None:
            request.headers["Authorization"] = self.header
        response = yield request
        if response.status_code != 401:
            return
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.creds is None:
                return
            self.header = _basic_header(self.creds)
        elif scheme.lower() == "bearer":
            params = _parse_challenge(params_text)
            query: list[tuple[str, str | int | float | bool | None]] = []
            if "service" in params:
                query.append(("service", params["service"]))
            query.append(("scope", f"repository:{self.repository}:pull,push"))
            token_request = httpx.Request("GET", params["realm"], params=query)
            if self.creds is not None:
                token_request.headers["Authorization"] = _basic_header(self.creds)
            token_response = yield token_request
            if token_response.status_code != 200:
                return
            token_response.read()
            body = token_response.json()
            self.header = f"Bearer {body.get('token') or body.get('access_token')}"
        else:
            return
        request.headers["Authorization"] = self.header
        yield request


def _basic_header(creds: tuple[str, str]) -> str:
    raw = f"{creds[0]}:{creds[1]}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _parse_challenge(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in _split_challenge(text):
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return params


def _split_challenge(text: str) -> Iterator[str]:
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            yield "".join(current)
            current = []
        else:
            current.append(char)
    if current:
        yield "".join(current)


def api_push(
    image: BuiltImage,
    registry: str,
    repository: str,
    tag: str = "latest",
    *,
    creds: tuple[str, str] | None = None,
    timeout: float = 300.0,
) -> PushedImage:
    """Push blobs (monolithic POST + PUT ?digest=) and manifests byte-exact over HTTP."""
    base = f"http://{registry}/v2/{repository}"
    auth = _RegistryAuth(repository, creds)
    with httpx.Client(auth=auth, timeout=timeout, trust_env=False) as client:
        for blob in image.blobs:
            _api_push_blob(client, base, image.blob_path(blob.digest), blob)
        for platform_image in image.images:
            if platform_image.manifest.digest != image.digest:
                _api_put_manifest(client, base, image, platform_image.manifest, None)
        stored = _api_put_manifest(client, base, image, image.top, tag)
    if stored != image.digest:
        raise PushError(f"registry stored {image.name} as {stored}, built as {image.digest}")
    return PushedImage(image=image, registry=registry, repository=repository, tag=tag)


def _api_push_blob(client: httpx.Client, base: str, path: Path, blob: Descriptor) -> None:
    head = client.head(f"{base}/blobs/{blob.digest}")
    if head.status_code == 200:
        return
    started = client.post(f"{base}/blobs/uploads/")
    if started.status_code != 202:
        raise PushError(f"upload start for {blob.digest}: HTTP {started.status_code}")
    location = urljoin(f"{base}/", started.headers["Location"])
    separator = "&" if "?" in location else "?"
    with path.open("rb") as handle:
        done = client.put(
            f"{location}{separator}digest={blob.digest}",
            content=_file_chunks(handle),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(blob.size),
            },
        )
    if done.status_code != 201:
        raise PushError(f"upload of {blob.digest}: HTTP {done.status_code} {done.text[:300]}")


def _file_chunks(handle: io.BufferedReader) -> Iterator[bytes]:
    while chunk := handle.read(CHUNK):
        yield chunk


def _api_put_manifest(
    client: httpx.Client,
    base: str,
    image: BuiltImage,
    descriptor: Descriptor,
    tag: str | None,
) -> str:
    response = client.put(
        f"{base}/manifests/{tag or descriptor.digest}",
        content=image.read_blob(descriptor.digest),
        headers={"Content-Type": descriptor.media_type},
    )
    if response.status_code != 201:
        raise PushError(
            f"manifest PUT {descriptor.digest}: HTTP {response.status_code} {response.text[:300]}"
        )
    return str(response.headers.get("Docker-Content-Digest", ""))


def session_factory(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
    """An :class:`ImageFactory` under the session's base temp dir (one build per session).

    Use from a session-scoped fixture::

        @pytest.fixture(scope="session")
        def images(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
            return session_factory(tmp_path_factory)
    """
    return ImageFactory(tmp_path_factory.getbasetemp() / "mirrorrouter-images")


def shared_base_image(
    factory: ImageFactory, name: str, *, base: str = "base", seed: int = 31
) -> BuiltImage:
    """A single-platform OCI image: a base layer shared by every image built with the same
    ``base`` and ``seed``, then a layer of its own (uncompressed, for byte-exact pushes)."""
    recipe = f"sharedbase base={base} seed={seed}"

    def build(layout: OciLayout) -> tuple[Descriptor, tuple[PlatformImage, ...]]:
        shared = add_layer(layout, small_layer_entries(seed, base), "oci", "none")
        own = add_layer(layout, small_layer_entries(seed, name), "oci", "none")
        image = add_image(
            layout, "linux/amd64", [shared, own], labels={"org.mirrorrouter.test": name}
        )
        return image.manifest, (image,)

    return factory._cached(name, recipe, build)
