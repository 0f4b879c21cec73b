"""manifests.py: the strict parse of pushed manifests (a table of valid and invalid
documents), the tolerant read of stored ones, the nesting scan, platform selection, the
child a client that takes no index types gets, and referrers indexes."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest

from mirrorrouter.cache import StoredManifest
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_BYTES,
    MAX_NESTING,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    PlatformSelector,
    as_referrer,
    child_for_client,
    filter_referrers,
    media_type_of,
    parse_strict,
    read_tolerant,
    referenced_digests,
    referrers_in,
    referrers_index,
)
from mirrorrouter.reference import Digest

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def digest(name: str) -> str:
    return str(Digest.of(name.encode()))


def descriptor(name: str, media_type: str = LAYER, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest(name), "size": len(name), **extra}


def image(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("config", CONFIG),
        "layers": [descriptor("one"), descriptor("two"), descriptor("three")],
    }
    document.update(changes)
    return document


def index(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor("amd64", OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
            descriptor(
                "arm64",
                OCI_MANIFEST,
                platform={"os": "linux", "architecture": "arm64", "variant": "v8"},
            ),
        ],
    }
    document.update(changes)
    return document


def edited(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``document`` with the value at ``path`` replaced."""
    result = copy.deepcopy(document)
    target = result
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return result


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


# ---------------------------------------------------------------------- strict: valid


def test_strict_parse_types_an_image_manifest() -> None:
    """An OCI image manifest becomes a Manifest with its config and layers in order."""
    parsed = parse_strict(encode(image()), OCI_MANIFEST)
    assert isinstance(parsed, Manifest)
    assert parsed.media_type == OCI_MANIFEST
    assert parsed.config is not None and parsed.config.digest == Digest.of(b"config")
    assert [d.digest for d in parsed.layers] == [Digest.of(n) for n in (b"one", b"two", b"three")]
    assert parsed.descriptors == (parsed.config, *parsed.layers)
    assert parsed.subject is None and parsed.layers[0].size == 3


def test_strict_parse_types_an_index_with_platforms() -> None:
    """An index becomes an Index whose children carry their platform."""
    parsed = parse_strict(encode(index()), OCI_INDEX)
    assert isinstance(parsed, Index)
    assert [c.platform for c in parsed.children] == [
        Platform("linux", "amd64"),
        Platform("linux", "arm64", "v8"),
    ]


@pytest.mark.parametrize(
    ("document", "content_type"),
    [
        pytest.param(image(), OCI_MANIFEST, id="oci-manifest"),
        pytest.param(image(), f"{OCI_MANIFEST}; charset=utf-8", id="content-type-parameters"),
        pytest.param(
            {k: v for k, v in image().items() if k != "mediaType"},
            OCI_MANIFEST,
            id="no-mediaType-field",
        ),
        pytest.param(image(), "", id="mediaType-field-only"),
        pytest.param(image(mediaType=DOCKER_MANIFEST), DOCKER_MANIFEST, id="docker-manifest"),
        pytest.param(image(layers=[]), OCI_MANIFEST, id="artifact-without-layers"),
        pytest.param(
            image(
                artifactType="application/vnd.example.sbom",
                subject=descriptor("subject", OCI_MANIFEST),
                annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
            ),
            OCI_MANIFEST,
            id="referrer",
        ),
        pytest.param(
            image(
                layers=[
                    descriptor(
                        "foreign",
                        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                        urls=["https://example.test/layer"],
                        annotations={"a": "b"},
                    )
                ]
            ),
            OCI_MANIFEST,
            id="foreign-layer",
        ),
        pytest.param(index(), OCI_INDEX, id="oci-index"),
        pytest.param(index(mediaType=DOCKER_MANIFEST_LIST), DOCKER_MANIFEST_LIST, id="docker-list"),
        pytest.param(index(manifests=[]), OCI_INDEX, id="empty-index"),
        pytest.param(
            edited(
                index(),
                ("manifests", 0, "platform"),
                {
                    "os": "windows",
                    "architecture": "amd64",
                    "os.version": "10.0.17763.1",
                    "os.features": ["win32k"],
                },
            ),
            OCI_INDEX,
            id="windows-platform",
        ),
        pytest.param(
            image(annotations={"note": "[[[[[[[[[[" * 20 + "{{{{" * 20}),
            OCI_MANIFEST,
            id="brackets-inside-strings-are-not-nesting",
        ),
    ],
)
def test_strict_parse_accepts(document: dict[str, Any], content_type: str) -> None:
    """Documents that follow the schema of their media type are accepted."""
    parsed = parse_strict(encode(document), content_type)
    assert parsed.media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)


# ---------------------------------------------------------------------- strict: invalid


def deeply_nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


INVALID = [
    # (id, bytes, content type, the field the error names or None, words in the message)
    ("not-json", b"not json", OCI_MANIFEST, None, "not JSON"),
    ("json-array", b"[1, 2]", OCI_MANIFEST, None, "not a JSON object"),
    ("json-string", b'"manifest"', OCI_MANIFEST, None, "not a JSON object"),
    ("100k-deep", deeply_nested(100_000), OCI_MANIFEST, None, "nested deeper"),
    ("deep-object", b'{"a":' * 5000 + b"1" + b"}" * 5000, OCI_MANIFEST, None, "nested deeper"),
    (
        "deep-inside-a-manifest",
        encode(image(extra=json.loads(deeply_nested(MAX_NESTING)))),
        OCI_MANIFEST,
        None,
        "nested deeper",
    ),
    ("schema-1", encode(image(schemaVersion=1)), OCI_MANIFEST, "schemaVersion", "must be 2"),
    ("schema-string", encode(image(schemaVersion="2")), OCI_MANIFEST, "schemaVersion", "2"),
    ("schema-float", encode(image(schemaVersion=2.0)), OCI_MANIFEST, "schemaVersion", "2"),
    (
        "no-schema",
        encode({k: v for k, v in image().items() if k != "schemaVersion"}),
        OCI_MANIFEST,
        "schemaVersion",
        "2",
    ),
    ("layers-null", encode(image(layers=None)), OCI_MANIFEST, "layers", "list of descriptors"),
    (
        "layers-missing",
        encode({k: v for k, v in image().items() if k != "layers"}),
        OCI_MANIFEST,
        "layers",
        "list",
    ),
    (
        "layers-object",
        encode(image(layers={"digest": digest("x")})),
        OCI_MANIFEST,
        "layers",
        "list",
    ),
    (
        "layer-a-string",
        encode(image(layers=[digest("x")])),
        OCI_MANIFEST,
        "layers[0]",
        "descriptor",
    ),
    ("layer-null", encode(image(layers=[None])), OCI_MANIFEST, "layers[0]", "descriptor"),
    (
        "layer-bad-digest",
        encode(edited(image(), ("layers", 2, "digest"), "sha256:nothex")),
        OCI_MANIFEST,
        "layers[2].digest",
        "digest",
    ),
    (
        "layer-md5",
        encode(edited(image(), ("layers", 1, "digest"), "md5:" + "0" * 32)),
        OCI_MANIFEST,
        "layers[1].digest",
        "digest",
    ),
    (
        "layer-digest-number",
        encode(edited(image(), ("layers", 0, "digest"), 12)),
        OCI_MANIFEST,
        "layers[0].digest",
        "digest",
    ),
    (
        "size-negative",
        encode(edited(image(), ("layers", 0, "size"), -1)),
        OCI_MANIFEST,
        "layers[0].size",
        "non-negative integer",
    ),
    (
        "size-string",
        encode(edited(image(), ("layers", 0, "size"), "12")),
        OCI_MANIFEST,
        "layers[0].size",
        "integer",
    ),
    (
        "size-bool",
        encode(edited(image(), ("layers", 0, "size"), True)),
        OCI_MANIFEST,
        "layers[0].size",
        "integer",
    ),
    (
        "size-float",
        encode(edited(image(), ("layers", 0, "size"), 1.5)),
        OCI_MANIFEST,
        "layers[0].size",
        "integer",
    ),
    (
        "size-missing",
        encode(edited(image(), ("config", "size"), None)),
        OCI_MANIFEST,
        "config.size",
        "integer",
    ),
    (
        "mediaType-missing",
        encode(edited(image(), ("config", "mediaType"), None)),
        OCI_MANIFEST,
        "config.mediaType",
        "string",
    ),
    (
        "mediaType-number",
        encode(edited(image(), ("layers", 0, "mediaType"), 7)),
        OCI_MANIFEST,
        "layers[0].mediaType",
        "string",
    ),
    (
        "config-missing",
        encode({k: v for k, v in image().items() if k != "config"}),
        OCI_MANIFEST,
        "config",
        "descriptor",
    ),
    ("config-a-list", encode(image(config=[])), OCI_MANIFEST, "config", "descriptor"),
    (
        "urls-a-string",
        encode(edited(image(), ("layers", 0, "urls"), "http://x")),
        OCI_MANIFEST,
        "layers[0].urls",
        "list of strings",
    ),
    (
        "urls-numbers",
        encode(edited(image(), ("layers", 0, "urls"), [1])),
        OCI_MANIFEST,
        "layers[0].urls",
        "list of strings",
    ),
    (
        "layer-annotations-list",
        encode(edited(image(), ("layers", 0, "annotations"), ["a"])),
        OCI_MANIFEST,
        "layers[0].annotations",
        "object of strings",
    ),
    (
        "annotations-numbers",
        encode(image(annotations={"a": 1})),
        OCI_MANIFEST,
        "annotations",
        "object of strings",
    ),
    ("subject-a-string", encode(image(subject=digest("s"))), OCI_MANIFEST, "subject", "descriptor"),
    (
        "subject-without-digest",
        encode(image(subject={"mediaType": OCI_MANIFEST, "size": 1})),
        OCI_MANIFEST,
        "subject.digest",
        "digest",
    ),
    ("artifactType-number", encode(image(artifactType=5)), OCI_MANIFEST, "artifactType", "string"),
    ("mediaType-field-number", encode(image(mediaType=5)), OCI_MANIFEST, "mediaType", "string"),
    ("mediaType-mismatch", encode(image()), OCI_INDEX, "mediaType", "does not match"),
    (
        "unsupported-type",
        encode({k: v for k, v in image().items() if k != "mediaType"}),
        "text/plain",
        None,
        "unsupported manifest media type",
    ),
    (
        "manifests-null",
        encode(index(manifests=None)),
        OCI_INDEX,
        "manifests",
        "list of descriptors",
    ),
    (
        "manifests-missing",
        encode({"schemaVersion": 2, "mediaType": OCI_INDEX}),
        OCI_INDEX,
        "manifests",
        "list",
    ),
    (
        "platform-a-string",
        encode(edited(index(), ("manifests", 0, "platform"), "linux/amd64")),
        OCI_INDEX,
        "manifests[0].platform",
        "object",
    ),
    (
        "platform-without-os",
        encode(edited(index(), ("manifests", 1, "platform"), {"architecture": "arm64"})),
        OCI_INDEX,
        "manifests[1].platform.os",
        "string",
    ),
    (
        "platform-arch-number",
        encode(edited(index(), ("manifests", 0, "platform", "architecture"), 64)),
        OCI_INDEX,
        "manifests[0].platform.architecture",
        "string",
    ),
    (
        "platform-variant-number",
        encode(edited(index(), ("manifests", 0, "platform", "variant"), 8)),
        OCI_INDEX,
        "manifests[0].platform.variant",
        "string",
    ),
    (
        "platform-features-string",
        encode(edited(index(), ("manifests", 0, "platform", "os.features"), "x")),
        OCI_INDEX,
        "manifests[0].platform.os.features",
        "list of strings",
    ),
    ("index-child-a-number", encode(index(manifests=[1])), OCI_INDEX, "manifests[0]", "descriptor"),
]


@pytest.mark.parametrize(
    ("data", "content_type", "path", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in INVALID],
)
def test_strict_parse_refuses_naming_the_field(
    data: bytes, content_type: str, path: str | None, words: str
) -> None:
    """A document off its media type's schema is MANIFEST_INVALID, naming the wrong field."""
    with pytest.raises(RegistryError) as caught:
        parse_strict(data, content_type)
    error = caught.value
    assert error.code is ErrorCode.MANIFEST_INVALID and error.status == 400
    assert words in error.message
    if path is None:
        assert error.detail is None
    else:
        assert error.detail == {"field": path}
        assert error.message.startswith(f"{path}: ")


def test_strict_parse_refuses_more_than_4_mib() -> None:
    """A manifest over 4 MiB is SIZE_INVALID (413) before anything is parsed."""
    with pytest.raises(RegistryError) as caught:
        parse_strict(b" " * (MAX_MANIFEST_BYTES + 1), OCI_MANIFEST)
    assert caught.value.code is ErrorCode.SIZE_INVALID and caught.value.status == 413


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(deeply_nested(2 * 1024 * 1024 - 1), id="4MiB-deep"),
        pytest.param(b"[" + b"[]," * 1_398_000 + b"[]]", id="4MiB-wide"),
        pytest.param(b'{"a":"' + b'[\\"' * 1_398_000 + b'"}', id="4MiB-of-escaped-strings"),
    ],
)
def test_nesting_scan_is_linear_for_4_mib(data: bytes) -> None:
    """The nesting check stays fast on hostile 4 MiB documents (deep, wide, all strings):
    a generous bound that only a quadratic scan or a parse per level would miss."""
    started = time.perf_counter()
    with pytest.raises(RegistryError) as caught:
        parse_strict(data, OCI_MANIFEST)
    assert caught.value.code is ErrorCode.MANIFEST_INVALID
    assert time.perf_counter() - started < 3.0


def test_nesting_exactly_at_the_limit_is_accepted() -> None:
    """An extension field nested right up to the limit passes the scan; one more does not."""
    within = image(extra=json.loads(deeply_nested(MAX_NESTING - 1)))
    assert isinstance(parse_strict(encode(within), OCI_MANIFEST), Manifest)
    with pytest.raises(RegistryError):
        parse_strict(encode(image(extra=json.loads(deeply_nested(MAX_NESTING)))), OCI_MANIFEST)


# ---------------------------------------------------------------------- tolerant


def test_tolerant_read_skips_malformed_descriptors() -> None:
    """Stored bytes are read whatever they hold: descriptors without a valid digest are
    skipped, wrong optional fields are dropped, good descriptors kept."""
    document = image(
        layers=[
            descriptor("good"),
            "sha256:not-a-descriptor",
            None,
            {"mediaType": LAYER, "size": 3},
            {"mediaType": LAYER, "digest": "sha256:short", "size": 3},
            {"digest": digest("odd"), "size": -1, "mediaType": 5, "urls": "x", "annotations": []},
        ],
        subject="not a descriptor",
        annotations={"a": 1},
    )
    parsed = read_tolerant(encode(document), OCI_MANIFEST)
    assert isinstance(parsed, Manifest)
    assert [d.digest for d in parsed.layers] == [Digest.of(b"good"), Digest.of(b"odd")]
    odd = parsed.layers[1]
    assert (odd.size, odd.media_type, odd.urls, dict(odd.annotations)) == (None, "", (), {})
    assert parsed.subject is None and dict(parsed.annotations) == {}


@pytest.mark.parametrize(
    ("data", "media_type", "digests"),
    [
        pytest.param(encode(image(layers=None)), OCI_MANIFEST, ["config"], id="layers-null"),
        pytest.param(encode(image(layers="x", config=7)), OCI_MANIFEST, [], id="wrong-types"),
        pytest.param(encode(index(manifests=None)), OCI_INDEX, [], id="manifests-null"),
        pytest.param(encode(index(manifests={"a": 1})), OCI_INDEX, [], id="manifests-object"),
        pytest.param(
            encode(edited(index(), ("manifests", 0, "platform"), "linux/amd64")),
            OCI_INDEX,
            ["amd64", "arm64"],
            id="platform-a-string",
        ),
        pytest.param(encode(index()), None, ["amd64", "arm64"], id="index-by-shape"),
        pytest.param(encode(image()), None, ["config", "one", "two", "three"], id="image-by-shape"),
    ],
)
def test_referenced_digests_of_malformed_stored_manifests(
    data: bytes, media_type: str | None, digests: list[str]
) -> None:
    """What a stored manifest references (gc, eviction, links) never raises."""
    stored = StoredManifest(Digest.of(data), media_type or "", data)
    assert referenced_digests(stored) == [Digest.of(d.encode()) for d in digests]


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b"null", b"\xff\xfe\x00", deeply_nested(100_000)],
    ids=["empty", "not-json", "array", "null", "binary", "100k-deep"],
)
def test_tolerant_read_of_what_is_no_manifest_is_none(data: bytes) -> None:
    """Bytes that are no JSON object at all read as None (never an exception)."""
    assert read_tolerant(data, OCI_MANIFEST) is None
    assert referenced_digests(StoredManifest(Digest.of(data), OCI_MANIFEST, data)) == []


def test_tolerant_platform_needs_os_and_architecture() -> None:
    """A platform that is not an object with os and architecture reads as no platform."""
    children = [
        descriptor("a", OCI_MANIFEST, platform="linux/amd64"),
        descriptor("b", OCI_MANIFEST, platform={"os": "linux"}),
        descriptor(
            "c", OCI_MANIFEST, platform={"os": "linux", "architecture": "arm", "variant": 7}
        ),
    ]
    parsed = read_tolerant(encode(index(manifests=children)), OCI_INDEX)
    assert isinstance(parsed, Index)
    assert [c.platform for c in parsed.children] == [None, None, Platform("linux", "arm")]


# ---------------------------------------------------------------------- media types


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (f"{OCI_INDEX}; charset=utf-8", b"", OCI_INDEX),
        ("application/json", encode(image(mediaType=DOCKER_MANIFEST)), DOCKER_MANIFEST),
        (None, encode({"schemaVersion": 2, "manifests": []}), OCI_INDEX),
        (None, encode({k: v for k, v in image().items() if k != "mediaType"}), OCI_MANIFEST),
        ("application/vnd.example+json", b"{}", "application/vnd.example+json"),
        ("text/plain", b"hello", None),
        (None, deeply_nested(100_000), None),
    ],
)
def test_media_type_of_upstream_answers(
    content_type: str | None, body: bytes, expected: str | None
) -> None:
    """Content-Type first, then the mediaType field, then the shape (umoci omits the field)."""
    assert media_type_of(content_type, body) == expected


# ---------------------------------------------------------------------- platforms, clients


def test_platform_patterns_and_selectors() -> None:
    """A pattern without a variant matches every variant; ``all`` selects everything."""
    arm = Platform.parse("linux/arm64")
    assert arm.matches(Platform("linux", "arm64", "v8")) and not arm.matches(None)
    assert not Platform.parse("linux/arm64/v7").matches(Platform("linux", "arm64", "v8"))
    assert str(PlatformSelector.parse("linux/amd64, linux/arm/v7")) == "linux/amd64,linux/arm/v7"
    assert PlatformSelector.parse("all").selects(None)
    for text in ("linux", "linux/", "a/b/c/d", " , "):
        with pytest.raises(ValueError):
            PlatformSelector.parse(text)


def stored_index(children: list[Any]) -> StoredManifest:
    data = encode(index(manifests=children))
    return StoredManifest(Digest.of(data), OCI_INDEX, data)


def test_child_for_client_skips_malformed_entries() -> None:
    """A client that takes no index types gets the first well-formed linux/amd64 entry; an
    entry whose platform is a string is skipped."""
    children = [
        descriptor("string", OCI_MANIFEST, platform="linux/amd64"),
        "garbage",
        descriptor("good", OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
    ]
    assert child_for_client(stored_index(children), (OCI_MANIFEST,)) == Digest.of(b"good")
    assert child_for_client(stored_index(children), (OCI_INDEX,)) is None


def test_child_for_client_without_a_fitting_entry_is_manifest_unknown() -> None:
    """Only malformed or other-platform entries: MANIFEST_UNKNOWN, never an exception."""
    children = [
        descriptor("string", OCI_MANIFEST, platform="linux/amd64"),
        descriptor("arm", OCI_MANIFEST, platform={"os": "linux", "architecture": "arm64"}),
        descriptor("docker", DOCKER_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
    ]
    for stored in (stored_index(children), StoredManifest(Digest.of(b"x"), OCI_INDEX, b"x")):
        with pytest.raises(RegistryError) as caught:
            child_for_client(stored, (OCI_MANIFEST,))
        assert caught.value.code is ErrorCode.MANIFEST_UNKNOWN


# ---------------------------------------------------------------------- referrers


def test_referrers_filter_and_union_keep_descriptors_as_written() -> None:
    """Filtering an upstream's referrers index keeps the matching entries byte-for-byte
    (unknown fields too) and drops malformed ones."""
    sbom = descriptor("sbom", OCI_MANIFEST, artifactType="sbom", data="e30=", extra={"k": 1})
    sig = descriptor("sig", OCI_MANIFEST, artifactType="sig")
    data = encode(index(manifests=[sbom, "junk", {"artifactType": "sbom"}, sig]))
    assert json.loads(filter_referrers(data, "sbom"))["manifests"] == [sbom]
    assert [d.digest for d in referrers_in(data)] == [Digest.of(b"sbom"), Digest.of(b"sig")]
    for junk in (b"not json", b"[]", encode({"manifests": None})):
        assert json.loads(filter_referrers(junk, "sbom")) == {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [],
        }


def test_a_manifest_as_a_referrer() -> None:
    """A referrer is listed with its artifact type, else its config's media type, and its
    annotations."""
    signature = image(
        config=descriptor("cfg", "application/vnd.example.signature.config"),
        subject=descriptor("subject", OCI_MANIFEST),
        annotations={"signed-by": "ci"},
    )
    parsed = parse_strict(encode(signature), OCI_MANIFEST)
    listed = as_referrer(parsed, Digest.of(b"sig"), 123)
    assert listed.to_json() == {
        "mediaType": OCI_MANIFEST,
        "digest": str(Digest.of(b"sig")),
        "size": 123,
        "artifactType": "application/vnd.example.signature.config",
        "annotations": {"signed-by": "ci"},
    }
    index_data = referrers_index([listed])
    assert referrers_in(index_data) == (listed,)
    assert isinstance(referrers_in(index_data)[0], Descriptor)
