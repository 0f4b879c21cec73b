"""The OCI distribution-spec conformance workflows (v1.1), replayed against a hosted set by
its own route and the same hosted set through a group with an upstream member.

The real suite is Go (opencontainers/distribution-spec, ``conformance/``) and needs module
downloads, so each test here replays one workflow file's requests and assertions in order,
step by step, named after the ``g.Specify`` it mirrors:

- ``01_pull_test.go``: setup pushes, blob and manifest HEAD/GET, the error-code envelope,
  teardown deletes;
- ``02_push_test.go``: streamed, monolithic and chunked blob uploads (416 for chunks out of
  order, ``Range`` on the upload status), cross-repository mounts (the exact ``Location``
  ``/v2/<name>/blobs/<digest>``), manifest uploads (also one with no layers);
- ``03_discovery_test.go``: ``tags/list`` with ``n`` and ``last``, referrers (``OCI-Subject``
  on every push of a manifest with a subject, also one whose subject is not pushed, the
  annotations, the ``artifactType`` filter, an empty index for an unknown digest);
- ``04_management_test.go``: deleting a tag, a manifest and blobs.

Each runs on the hosted set by its route (``/v2/team/...``), through a group whose
upstream member is asked for whatever the hosted member lacks (``/v2/dev/...``), and
through the same group as the default registry (``/v2/...``, the cross-mount namespace
then one path component, as the suite's default ``conformance-<uuid>``).

The test data is built as ``setup.go`` builds it (tab-indented JSON with fields registries
do not know, ``newUnspecifiedField``, ``data``). Where this suite asks more than the Go
tests (``Docker-Content-Digest`` and ``Content-Length`` on every manifest answer, which the
Go tests check only when present), the step says so. The in-process gateway runs each
workflow on a fresh repository; ``test_full_conformance_pass_against_the_real_gateway``
runs all four in sequence on one repository per target, as the suite does, against the
real gateway process with a real registry as the group's upstream member.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bcrypt
import httpx
import pytest

from tests.support.fakeregistry import FakeRegistry
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import gateway
from tests.support.registry import DistributionRegistry
from tests.support.seaweed import session_seaweed

pytestmark = pytest.mark.anyio

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCTETS = {"Content-Type": "application/octet-stream"}
TEST_TAG = "tagtest0"
EMPTY_LAYER_TAG = "emptylayer"
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
ANNOTATION = "org.opencontainers.conformance.test"
ARTIFACT_TYPE_A = "application/vnd.nhl.peanut.butter.bagel"
ARTIFACT_TYPE_B = "application/vnd.nba.strawberry.jam.croissant"
ARTIFACT_TYPE_INDEX = "application/vnd.food.stand"
# setup.go's errorCodes: a 400 must carry one of these.
ERROR_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
}
# setup.go's layer: a gzipped tarball of one text file.
LAYER = base64.b64decode(
    "H4sIAAAAAAAAA+3OQQrCMBCF4a49xXgBSUnaHMCTRBptQRNpp6i3t0UEV7oqIv7fYgbmzeJpHHSjVy0"
    "WZCa1c/MufWVe94N3RWlrZ72x3k/30nhbFWKWLPU0Dhp6keJ8im//PuU/6pZH2WVtYx8b0Sz7LjWSR5VLG6YRBumSzOlGtjkd+qD"
    "jMWiX07Befbs7AAAAAAAAAAAAAAAAAPyzO34MnqoAKAAA"
)


# ---------------------------------------------------------------------- setup.go's data


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def go_json(value: Any) -> bytes:
    """``json.MarshalIndent(v, "", "\\t")``, as setup.go writes every document."""
    return json.dumps(value, indent="\t").encode()


def descriptor(
    media_type: str, data: bytes, *, inline: bool = False, unspecified: bytes | None = None
) -> dict[str, Any]:
    """setup.go's descriptor: ``data`` (omitempty) and ``newUnspecifiedField`` (always
    written, ``null`` when empty: a field no spec knows, which registries must keep)."""
    out: dict[str, Any] = {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}
    if inline:
        out["data"] = base64.b64encode(data).decode()
    out["newUnspecifiedField"] = base64.b64encode(unspecified).decode() if unspecified else None
    return out


def config_descriptor(config: Blob) -> dict[str, Any]:
    """A manifest's config as setup.go writes it: its content inline (``data``) and an
    unknown field with content."""
    return descriptor(
        "application/vnd.oci.image.config.v1+json",
        config.content,
        inline=True,
        unspecified=b"hello world",
    )


@dataclass(frozen=True)
class Blob:
    content: bytes

    @property
    def digest(self) -> str:
        return digest_of(self.content)


@dataclass
class Data:
    """Everything setup.go's ``init`` builds, one config and manifest per workflow."""

    configs: list[Blob] = field(default_factory=list)
    manifests: list[Blob] = field(default_factory=list)
    layer: Blob = Blob(LAYER)
    empty_layer_manifest: Blob = Blob(b"")
    blob_a: Blob = Blob(b"")
    blob_b: Blob = Blob(b"")
    empty_json: Blob = Blob(b"{}")
    ref_blob_a: Blob = Blob(b"NHL Peanut Butter on my NHL bagel")
    ref_blob_b: Blob = Blob(b"NBA Strawberry Jam on my NBA croissant")
    refs: dict[str, Blob] = field(default_factory=dict)  # name in setup.go -> manifest
    annotations: dict[str, str] = field(default_factory=dict)  # digest -> annotation

    @property
    def chunks(self) -> tuple[bytes, bytes]:
        """setupChunkedBlob: the first half and one byte, then the rest."""
        split = len(self.blob_b.content) // 2 + 1
        return self.blob_b.content[:split], self.blob_b.content[split:]

    @property
    def chunk_ranges(self) -> tuple[str, str]:
        first, _ = self.chunks
        return f"0-{len(first) - 1}", f"{len(first)}-{len(self.blob_b.content) - 1}"


def conformance_data(seed: int = 15) -> Data:
    rng = random.Random(seed)
    data = Data()
    letters = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
    # setup.go makes numWorkflows of each (1 << 4: the iota after the four flags); the
    # workflows use indexes 0 to 4.
    for _ in range(5):
        author = "".join(rng.choice(letters) for _ in range(16))  # a unique config each
        config = {
            "author": author,
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }
        data.configs.append(Blob(go_json(config)))
    layers = [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", LAYER)]
    for config in data.configs:
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_descriptor(config),
            "layers": layers,
        }
        data.manifests.append(Blob(go_json(manifest)))
    empty_layers = {"schemaVersion": 2, "config": config_descriptor(data.configs[1]), "layers": []}
    data.empty_layer_manifest = Blob(go_json(empty_layers))
    data.blob_a = Blob(rng.randbytes(42))
    data.blob_b = Blob(rng.randbytes(42))
    empty = descriptor("application/vnd.oci.empty.v1+json", data.empty_json.content)

    def subject(manifest: Blob) -> dict[str, Any]:
        return descriptor(OCI_MANIFEST, manifest.content)

    def artifact(
        name: str,
        *,
        artifact_type: str | None,
        config: dict[str, Any],
        layer: dict[str, Any],
        of: Blob,
        note: str | None,
    ) -> None:
        document: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
        if artifact_type:
            document["artifactType"] = artifact_type
        document.update(config=config, layers=[layer], subject=subject(of))
        if note:
            document["annotations"] = {ANNOTATION: note}
        blob = data.refs[name] = Blob(go_json(document))
        if note:
            data.annotations[blob.digest] = note

    m3, m4 = data.manifests[3], data.manifests[4]
    ref_a = descriptor(ARTIFACT_TYPE_A, data.ref_blob_a.content)
    ref_b = descriptor(ARTIFACT_TYPE_B, data.ref_blob_b.content)
    artifact("AConfig", artifact_type=None, config=ref_a, layer=empty, of=m4, note="test config a")
    artifact("BConfig", artifact_type=None, config=ref_b, layer=empty, of=m4, note="test config b")
    artifact(
        "ALayer",
        artifact_type=ARTIFACT_TYPE_A,
        config=empty,
        layer=ref_a,
        of=m4,
        note="test layer a",
    )
    artifact(
        "BLayer",
        artifact_type=ARTIFACT_TYPE_B,
        config=empty,
        layer=ref_b,
        of=m4,
        note="test layer b",
    )
    # The same as BLayer but about a subject that is never pushed.
    artifact("CLayer", artifact_type=ARTIFACT_TYPE_B, config=empty, layer=ref_b, of=m3, note=None)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": ARTIFACT_TYPE_INDEX,
        "manifests": [
            descriptor(OCI_MANIFEST, data.refs["AConfig"].content),
            descriptor(OCI_MANIFEST, data.refs["ALayer"].content),
        ],
        "subject": subject(m4),
        "annotations": {ANNOTATION: "test index"},
    }
    data.refs["Index"] = Blob(go_json(index))
    data.annotations[data.refs["Index"].digest] = "test index"
    return data


DUMMY_DIGEST = digest_of(b"hello world")


# ---------------------------------------------------------------------- the client


@dataclass
class Registry:
    """The suite's client: ``name`` is OCI_NAMESPACE, ``cross`` OCI_CROSSMOUNT_NAMESPACE."""

    client: httpx.AsyncClient
    name: str
    cross: str
    data: Data = field(default_factory=conformance_data)

    def path(self, tail: str, name: str | None = None) -> str:
        return f"/v2/{name or self.name}/{tail}"

    async def request(
        self, method: str, url: str, *, name: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        if not url.startswith("/"):
            url = self.path(url, name)
        return await self.client.request(method, url, **kwargs)

    async def push_blob(self, blob: Blob, step: str) -> None:
        """Setup's way to store a blob: POST a session, PUT the whole blob to it."""
        started = await self.request("POST", "blobs/uploads/")
        done = await self.request(
            "PUT",
            relative(started),
            params={"digest": blob.digest},
            headers={**OCTETS, "Content-Length": str(len(blob.content))},
            content=blob.content,
        )
        expect_2xx(done, step)

    async def put_manifest(
        self, reference: str, manifest: Blob, step: str, media_type: str = OCI_MANIFEST
    ) -> httpx.Response:
        answer = await self.request(
            "PUT",
            f"manifests/{reference}",
            headers={"Content-Type": media_type},
            content=manifest.content,
        )
        expect_2xx(answer, step)
        return answer


def relative(response: httpx.Response) -> str:
    """reggie's ``GetRelativeLocation``: the Location's path and query."""
    location = response.headers.get("location", "")
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def describe(answer: httpx.Response) -> str:
    request = answer.request
    return f"{request.method} {request.url.path} -> {answer.status_code} {answer.text[:300]}"


def expect(answer: httpx.Response, statuses: set[int] | int, step: str) -> None:
    wanted = {statuses} if isinstance(statuses, int) else statuses
    assert answer.status_code in wanted, f"{step}: {describe(answer)}"


def expect_2xx(answer: httpx.Response, step: str) -> None:
    assert 200 <= answer.status_code < 300, f"{step}: {describe(answer)}"


def expect_deleted(answer: httpx.Response, step: str, *also: int) -> None:
    """Teardown deletes: 2xx, or 405 where deleting is not supported (and ``also``)."""
    ok = 200 <= answer.status_code < 300 or answer.status_code in {405, *also}
    assert ok, f"{step}: {describe(answer)}"


def expect_digest(answer: httpx.Response, digest: str, step: str, *, required: bool) -> None:
    """The Go tests check Docker-Content-Digest when present; ``required``: our own rule
    that every manifest answer carries it (containerd resolves tags by it)."""
    header = answer.headers.get("docker-content-digest")
    if required:
        assert header is not None, f"{step}: no Docker-Content-Digest"
    if header:
        assert header == digest, f"{step}: Docker-Content-Digest {header}, not {digest}"


def tags_of(answer: httpx.Response) -> list[str]:
    """getTagList: the tags, or none when the body does not parse."""
    try:
        tags = answer.json().get("tags") or []
    except ValueError:
        return []
    return list(tags)


# ---------------------------------------------------------------------- 01_pull_test.go


async def pull_workflow(reg: Registry, *, invalid_references: bool = True) -> None:
    """01_pull_test.go, in order. ``invalid_references``: also the steps that ask for a
    reference the grammar refuses (issue 14 item 10 makes those 404)."""
    d = reg.data
    m0, m1 = d.manifests[0], d.manifests[1]
    # Setup
    await reg.push_blob(d.configs[0], "Populate registry with test blob (configs[0])")
    await reg.push_blob(d.configs[1], "Populate registry with test blob (configs[1])")
    await reg.push_blob(d.layer, "Populate registry with test layer")
    await reg.put_manifest(TEST_TAG, m0, "Populate registry with test manifest (tag)")
    await reg.put_manifest(m1.digest, m1, "Populate registry with test manifest (digest)")
    tag = TEST_TAG
    # Pull blobs
    step = "HEAD request to nonexistent blob should result in 404 response"
    expect(await reg.request("HEAD", f"blobs/{DUMMY_DIGEST}"), 404, step)
    step = "HEAD request to existing blob should yield 200"
    answer = await reg.request("HEAD", f"blobs/{d.configs[0].digest}")
    expect(answer, 200, step)
    expect_digest(answer, d.configs[0].digest, step, required=True)
    assert answer.headers["content-length"] == str(len(d.configs[0].content)), step
    step = "GET nonexistent blob should result in 404 response"
    expect(await reg.request("GET", f"blobs/{DUMMY_DIGEST}"), 404, step)
    step = "GET request to existing blob URL should yield 200"
    answer = await reg.request("GET", f"blobs/{d.configs[0].digest}")
    expect(answer, 200, step)
    assert answer.content == d.configs[0].content, step
    # Pull manifests
    if invalid_references:
        step = "HEAD request to nonexistent manifest should return 404"
        expect(await reg.request("HEAD", f"manifests/{NONEXISTENT_MANIFEST}"), 404, step)
    accept = {"Accept": OCI_MANIFEST}
    for i, manifest in ((0, m0), (1, m1)):
        step = f"HEAD request to manifest[{i}] path (digest) should yield 200 response"
        answer = await reg.request("HEAD", f"manifests/{manifest.digest}", headers=accept)
        expect(answer, 200, step)
        expect_digest(answer, manifest.digest, step, required=True)
        assert answer.headers["content-length"] == str(len(manifest.content)), step
    step = "HEAD request to manifest path (tag) should yield 200 response"
    answer = await reg.request("HEAD", f"manifests/{tag}", headers=accept)
    expect(answer, 200, step)
    expect_digest(answer, m0.digest, step, required=True)
    assert answer.headers["content-length"] == str(len(m0.content)), step
    if invalid_references:
        step = "GET nonexistent manifest should return 404"
        expect(await reg.request("GET", f"manifests/{NONEXISTENT_MANIFEST}"), 404, step)
    for i, manifest in ((0, m0), (1, m1)):
        step = f"GET request to manifest[{i}] path (digest) should yield 200 response"
        answer = await reg.request("GET", f"manifests/{manifest.digest}", headers=accept)
        expect(answer, 200, step)
        assert answer.content == manifest.content, f"{step}: not the bytes pushed"
        expect_digest(answer, manifest.digest, step, required=True)
    step = "GET request to manifest path (tag) should yield 200 response"
    answer = await reg.request("GET", f"manifests/{tag}", headers=accept)
    expect(answer, 200, step)
    expect_digest(answer, m0.digest, step, required=True)
    # Error codes
    step = "400 response body should contain OCI-conforming JSON message"
    answer = await reg.request(
        "GET",
        "manifests/sha256:totallywrong",
        headers={"Content-Type": OCI_MANIFEST},
        content=b"blablabla",
    )
    expect(answer, {400, 404}, step)
    if answer.status_code == 400:
        errors = answer.json()["errors"]
        assert errors and errors[0]["code"] in ERROR_CODES, f"{step}: {errors}"
    # Teardown (deleteManifestBeforeBlobs)
    for i, manifest in ((0, m0), (1, m1)):
        step = f"Delete manifest[{i}] created in setup"
        expect_deleted(await reg.request("DELETE", f"manifests/{manifest.digest}"), step)
    for blob, what in (
        (d.configs[0], "config[0]"),
        (d.configs[1], "config[1]"),
        (d.layer, "layer"),
    ):
        step = f"Delete {what} blob created in setup"
        expect_deleted(await reg.request("DELETE", f"blobs/{blob.digest}"), step, 404)


# ---------------------------------------------------------------------- 02_push_test.go


async def push_workflow(reg: Registry) -> None:
    """02_push_test.go, in order."""
    d = reg.data
    config, m1 = d.configs[1], d.manifests[1]
    # Blob Upload Streamed
    step = "PATCH request with blob in body should yield 202 response"
    started = await reg.request("POST", "blobs/uploads/")
    assert started.headers.get("location"), f"{step}: {describe(started)}"
    last = await reg.request("PATCH", relative(started), headers=OCTETS, content=d.blob_a.content)
    expect(last, 202, step)
    step = "PUT request to session URL with digest should yield 201 response"
    answer = await reg.request(
        "PUT",
        relative(last),
        params={"digest": d.blob_a.digest},
        headers=OCTETS,
    )
    expect(answer, 201, step)
    assert answer.headers.get("location"), step
    # Blob Upload Monolithic
    step = "GET nonexistent blob should result in 404 response"
    expect(await reg.request("GET", f"blobs/{DUMMY_DIGEST}"), 404, step)
    step = "POST request with digest and blob should yield a 201 or 202"
    last = await reg.request(
        "POST",
        "blobs/uploads/",
        params={"digest": config.digest},
        headers={**OCTETS, "Content-Length": str(len(config.content))},
        content=config.content,
    )
    assert last.headers.get("location"), f"{step}: {describe(last)}"
    expect(last, {201, 202}, step)
    step = (
        "GET request to blob URL from prior request should yield 200 or 404 based on response code"
    )
    answer = await reg.request("GET", f"blobs/{config.digest}")
    expect(answer, 404 if last.status_code == 202 else 200, step)
    step = "POST request should yield a session ID"
    last = await reg.request("POST", "blobs/uploads/")
    expect(last, 202, step)
    step = "PUT upload of a blob should yield a 201 Response"
    answer = await reg.request(
        "PUT",
        relative(last),
        params={"digest": config.digest},
        headers={**OCTETS, "Content-Length": str(len(config.content))},
        content=config.content,
    )
    expect(answer, 201, step)
    assert answer.headers.get("location"), step
    step = "GET request to existing blob should yield 200 response"
    expect(await reg.request("GET", f"blobs/{config.digest}"), 200, step)
    step = "PUT upload of a layer blob should yield a 201 Response"
    started = await reg.request("POST", "blobs/uploads/")
    answer = await reg.request(
        "PUT",
        relative(started),
        params={"digest": d.layer.digest},
        headers={**OCTETS, "Content-Length": str(len(d.layer.content))},
        content=d.layer.content,
    )
    expect(answer, 201, step)
    assert answer.headers.get("location"), step
    step = "GET request to existing layer should yield 200 response"
    expect(await reg.request("GET", f"blobs/{d.layer.digest}"), 200, step)
    # Blob Upload Chunked
    (chunk1, chunk2), (range1, range2) = d.chunks, d.chunk_ranges
    step = "Out-of-order blob upload should return 416"
    started = await reg.request("POST", "blobs/uploads/", headers={"Content-Length": "0"})
    assert started.headers.get("location"), f"{step}: {describe(started)}"
    answer = await reg.request(
        "PATCH",
        relative(started),
        headers={**OCTETS, "Content-Range": range2},
        content=chunk2,
    )
    expect(answer, 416, step)
    step = "PATCH request with first chunk should return 202"
    previous = await reg.request("POST", "blobs/uploads/", headers={"Content-Length": "0"})
    assert previous.headers.get("location"), f"{step}: {describe(previous)}"
    last = await reg.request(
        "PATCH", relative(previous), headers={**OCTETS, "Content-Range": range1}, content=chunk1
    )
    expect(last, 202, step)
    assert last.headers.get("range") == range1, f"{step}: Range {last.headers.get('range')}"
    step = "Retry previous blob chunk should return 416"
    answer = await reg.request(
        "PATCH", relative(previous), headers={**OCTETS, "Content-Range": range1}, content=chunk1
    )
    expect(answer, 416, step)
    step = "Get on stale blob upload should return 204 with a range and location"
    last = await reg.request("GET", relative(previous))
    expect(last, 204, step)
    assert last.headers.get("location"), step
    assert last.headers.get("range") == range1, f"{step}: Range {last.headers.get('range')}"
    step = "PATCH request with second chunk should return 202"
    last = await reg.request(
        "PATCH", relative(last), headers={**OCTETS, "Content-Range": range2}, content=chunk2
    )
    expect(last, 202, step)
    assert last.headers.get("location"), step
    step = "PUT request with digest should return 201"
    answer = await reg.request(
        "PUT",
        relative(last),
        params={"digest": d.blob_b.digest},
        headers={**OCTETS, "Content-Length": "0"},
    )
    expect(answer, 201, step)
    assert answer.headers.get("location"), step
    # Cross-Repository Blob Mount
    step = "Cross-mounting of a blob without the from argument should yield session id"
    answer = await reg.request(
        "POST", "blobs/uploads/", name=reg.cross, params={"mount": DUMMY_DIGEST}
    )
    expect(answer, 202, step)
    assert answer.headers.get("location"), step
    step = "POST request to mount another repository's blob should return 201 or 202"
    last = await reg.request(
        "POST",
        "blobs/uploads/",
        name=reg.cross,
        params={"mount": d.blob_a.digest, "from": reg.name},
    )
    expect(last, {201, 202}, step)
    if last.status_code == 201:
        step = "GET request to test digest within cross-mount namespace should return 200"
        assert relative(last) == f"/v2/{reg.cross}/blobs/{d.blob_a.digest}", step
        answer = await reg.request("GET", relative(last))
        expect(answer, 200, step)
    else:
        step = "Cross-mounting of nonexistent blob should yield session id"
        assert relative(last).startswith(f"/v2/{reg.cross}/blobs/uploads/"), step
    # Manifest Upload
    step = "GET nonexistent manifest should return 404"
    answer = await reg.request("GET", "manifests/does-not-exist")  # the Go test's is invalid
    expect(answer, 404, step)
    step = "PUT should accept a manifest upload"
    for i in range(4):
        answer = await reg.request(
            "PUT",
            f"manifests/test{i}",
            headers={"Content-Type": OCI_MANIFEST},
            content=m1.content,
        )
        assert answer.headers.get("location"), f"{step}: {describe(answer)}"
        expect(answer, 201, step)
        expect_digest(answer, m1.digest, step, required=True)
    step = "Registry should accept a manifest upload with no layers"
    answer = await reg.request(
        "PUT",
        f"manifests/{EMPTY_LAYER_TAG}",
        headers={"Content-Type": OCI_MANIFEST},
        content=d.empty_layer_manifest.content,
    )
    expect(answer, 201, step)  # the Go test only warns; we support it
    assert answer.headers.get("location"), step
    step = "GET request to manifest URL (digest) should yield 200 response"
    answer = await reg.request("GET", f"manifests/{m1.digest}", headers={"Accept": OCI_MANIFEST})
    expect(answer, 200, step)
    expect_digest(answer, m1.digest, step, required=True)
    # Teardown (deleteManifestBeforeBlobs)
    step = "Delete manifest created in tests"
    expect_deleted(await reg.request("DELETE", f"manifests/{m1.digest}"), step)
    digest = d.empty_layer_manifest.digest
    expect_deleted(await reg.request("DELETE", f"manifests/{digest}"), step)
    for blob, what in ((config, "config"), (d.layer, "layer")):
        step = f"Delete {what} blob created in tests"
        expect_deleted(await reg.request("DELETE", f"blobs/{blob.digest}"), step, 404)


async def nonexistent_manifest_with_invalid_reference(reg: Registry) -> None:
    """02_push_test.go's "GET nonexistent manifest should return 404" as written: its
    reference, ``.INVALID_MANIFEST_NAME``, is no valid tag."""
    answer = await reg.request("GET", f"manifests/{NONEXISTENT_MANIFEST}")
    expect(answer, 404, "GET nonexistent manifest should return 404")


# ---------------------------------------------------------------------- 03_discovery_test.go


async def discovery_workflow(reg: Registry) -> None:
    """03_discovery_test.go, in order."""
    d = reg.data
    m3, m4 = d.manifests[3], d.manifests[4]
    refs = d.refs
    # Setup
    await reg.push_blob(d.configs[2], "Populate registry with test blob")
    await reg.push_blob(d.layer, "Populate registry with test layer")
    for i in range(4):
        await reg.put_manifest(f"test{i}", d.manifests[2], "Populate registry with test tags")
    tag_list = tags_of(await reg.request("GET", "tags/list"))
    step = "References setup"
    await reg.push_blob(d.empty_json, f"{step}: empty JSON blob")
    await reg.push_blob(d.ref_blob_a, f"{step}: reference blob A")

    async def put_referrer(name: str, subject: Blob, media_type: str = OCI_MANIFEST) -> None:
        blob = refs[name]
        answer = await reg.put_manifest(blob.digest, blob, f"{step}: {name}", media_type)
        assert answer.headers.get("oci-subject") == subject.digest, (
            f"{step}: {name}: OCI-Subject {answer.headers.get('oci-subject')}"
        )

    await put_referrer("AConfig", m4)
    await put_referrer("ALayer", m4)
    await put_referrer("Index", m4, OCI_INDEX)
    await reg.push_blob(d.configs[4], f"{step}: test blob")
    await reg.push_blob(d.layer, f"{step}: test layer")
    await reg.put_manifest(TEST_TAG, m4, f"{step}: test manifest")
    await reg.push_blob(d.ref_blob_b, f"{step}: reference blob B")
    await put_referrer("BConfig", m4)
    await put_referrer("BLayer", m4)
    await put_referrer("CLayer", m3)  # a subject that was never pushed
    # Test content discovery endpoints (listing tags)
    step = "GET request to list tags should yield 200 response"
    answer = await reg.request("GET", "tags/list")
    expect(answer, 200, step)
    tag_list = tags_of(answer)
    assert set(tag_list) >= {"test0", "test1", "test2", "test3", TEST_TAG}, step
    num_tags = len(tag_list)
    step = "GET number of tags should be limitable by `n` query parameter"
    half = num_tags // 2
    answer = await reg.request("GET", "tags/list", params={"n": str(half)})
    expect(answer, 200, step)
    tag_list = tags_of(answer)
    assert len(tag_list) == half, f"{step}: {tag_list}"
    step = "GET start of tag is set by `last` query parameter"
    tag_list = tags_of(await reg.request("GET", "tags/list", params={"n": str(half)}))
    answer = await reg.request(
        "GET", "tags/list", params={"n": str(half), "last": tag_list[half - 1]}
    )
    expect(answer, 200, step)
    assert len(tag_list) <= half and tag_list[half - 1] in tag_list, step
    following = tags_of(answer)  # ours: the page after ``last``, without it
    assert 0 < len(following) <= half and tag_list[half - 1] not in following, step
    assert all(tag > tag_list[half - 1] for tag in following), step
    # Test content discovery endpoints (listing references)
    step = "GET request to nonexistent blob should result in empty 200 response"
    answer = await reg.request("GET", f"referrers/{DUMMY_DIGEST}")
    expect(answer, 200, step)
    assert answer.headers["content-type"] == OCI_INDEX, step
    assert answer.json()["manifests"] == [], step
    step = "GET request to existing blob should yield 200"
    answer = await reg.request("GET", f"referrers/{m4.digest}")
    expect(answer, 200, step)
    assert answer.headers["content-type"] == OCI_INDEX, step
    manifests = answer.json()["manifests"]
    assert len(manifests) == 5, f"{step}: {manifests}"
    assert len({m["digest"] for m in manifests}) == 5, step
    for entry in manifests:
        assert entry.get("annotations") == {ANNOTATION: d.annotations[entry["digest"]]}, step
    step = "GET request to existing blob with filter should yield 200"
    answer = await reg.request(
        "GET", f"referrers/{m4.digest}", params={"artifactType": ARTIFACT_TYPE_A}
    )
    expect(answer, 200, step)
    assert answer.headers["content-type"] == OCI_INDEX, step
    manifests = answer.json()["manifests"]
    assert answer.headers.get("oci-filters-applied") == "artifactType", step  # we filter
    assert len(manifests) == 2, f"{step}: {manifests}"
    assert {m["digest"] for m in manifests} == {refs["AConfig"].digest, refs["ALayer"].digest}
    for entry in manifests:
        assert entry.get("annotations") == {ANNOTATION: d.annotations[entry["digest"]]}, step
    step = "GET request to missing manifest should yield 200"
    answer = await reg.request("GET", f"referrers/{m3.digest}")
    expect(answer, 200, step)
    assert answer.headers["content-type"] == OCI_INDEX, step
    manifests = answer.json()["manifests"]
    assert [m["digest"] for m in manifests] == [refs["CLayer"].digest], step
    # Teardown (deleteManifestBeforeBlobs)
    step = "Delete created manifest & associated tags"
    for reference in (
        refs["Index"].digest,
        d.manifests[2].digest,
        m4.digest,
        refs["AConfig"].digest,
        refs["ALayer"].digest,
        TEST_TAG,  # the Go test deletes it by "digest" path: a tag here
        refs["BConfig"].digest,
        refs["BLayer"].digest,
        refs["CLayer"].digest,
    ):
        answer = await reg.request("DELETE", f"manifests/{reference}")
        expect_deleted(answer, f"{step}: {reference}", 404)
    for blob, what in ((d.configs[2], "config"), (d.layer, "layer")):
        step = f"Delete {what} blob created in tests"
        expect_deleted(await reg.request("DELETE", f"blobs/{blob.digest}"), step)
    step = "References teardown"
    for blob in (d.configs[4], d.ref_blob_a, d.ref_blob_b, d.empty_json):
        expect_deleted(await reg.request("DELETE", f"blobs/{blob.digest}"), step, 404)


# ---------------------------------------------------------------------- 04_management_test.go


async def management_workflow(reg: Registry) -> None:
    """04_management_test.go, in order."""
    d = reg.data
    m3 = d.manifests[3]
    # Setup
    await reg.push_blob(d.configs[3], "Populate registry with test config blob")
    await reg.push_blob(d.layer, "Populate registry with test layer")
    await reg.put_manifest(TEST_TAG, m3, "Populate registry with test tag")
    step = "Check how many tags there are before anything gets deleted"
    answer = await reg.request("GET", "tags/list")
    expect(answer, 200, step)
    num_tags = len(tags_of(answer))
    # Manifest delete
    step = (
        "DELETE request to manifest tag should return 202, "
        "unless tag deletion is disallowed (400/405)"
    )
    answer = await reg.request("DELETE", f"manifests/{TEST_TAG}")
    expect(answer, {400, 202, 405}, step)
    if answer.status_code == 400:
        assert answer.json()["errors"][0]["code"] == "UNSUPPORTED", step
    step = "DELETE request to manifest (digest) should yield 202 response unless already deleted"
    expect(await reg.request("DELETE", f"manifests/{m3.digest}"), {202, 404}, step)
    step = (
        "GET request to deleted manifest URL should yield 404 response, unless delete is disallowed"
    )
    answer = await reg.request("GET", f"manifests/{m3.digest}")
    expect(answer, 404, step)  # deleting is allowed here: gone
    step = "GET request to tags list should reflect manifest deletion"
    answer = await reg.request("GET", "tags/list")
    expect(answer, 200, step)
    assert len(tags_of(answer)) < num_tags, f"{step}: {answer.text}"
    # Blob delete
    step = "DELETE request to blob URL should yield 202 response"
    config = await reg.request("DELETE", f"blobs/{d.configs[3].digest}")
    expect(config, {202, 404, 405}, step)
    layer = await reg.request("DELETE", f"blobs/{d.layer.digest}")
    expect(layer, {202, 404, 405}, step)
    if layer.status_code != 405:
        step = "GET request to deleted blob URL should yield 404 response"
        expect(await reg.request("GET", f"blobs/{d.configs[3].digest}"), 404, step)


# ---------------------------------------------------------------------- the targets


def conformance_config(cache: Path, upstream: str, storage: str = "") -> str:
    """``team`` (hosted, deletes allowed) by its route, and the group ``dev``: ``team``,
    then docker.io (``upstream``), by its route and as the default registry (where
    docker's registry-mirrors and Kind send bare names). ``storage``: more ``[cache]``
    keys (another backend)."""
    return f"""
[cache]
directory = "{cache}"
{storage}
[routing]
default_registry = "dev"
[upstreams."docker.io"]
mirrors = [{{ url = "{upstream}" }}]
[hosted."team"]
delete = true
[groups."dev"]
members = ["team", "docker.io"]
[[routes]]
prefix = "team"
hosted = "team"
[[routes]]
prefix = "dev"
group = "dev"
"""


TARGETS = {
    "hosted-route": ("team/conformance/test", "team/conformance/cross"),
    "through-group": ("dev/conformance/test", "dev/conformance/cross"),
    "group-as-default-registry": ("conformance/test", "conformance-cross"),
}


@pytest.fixture(params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> tuple[str, str]:
    name, cross = TARGETS[request.param]
    return name, cross


@asynccontextmanager
async def in_process(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str], *, delete: bool = True
) -> AsyncIterator[Registry]:
    text = conformance_config(tmp_path / "cache", "http://upstream.test")
    if not delete:
        text = text.replace("delete = true", "delete = false")
    async with gateway(tmp_path, fake, text) as gw:
        yield Registry(gw.client, *target)


async def test_01_pull(tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]) -> None:
    """01_pull_test.go passes: pushed blobs and manifests pull by tag and digest with their
    digests, missing ones are 404, deletes tear down."""
    async with in_process(tmp_path, fake, target) as reg:
        await pull_workflow(reg, invalid_references=False)


async def test_01_pull_invalid_references(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]
) -> None:
    """01_pull_test.go's steps with references the grammar refuses (``.INVALID_MANIFEST_NAME``,
    ``sha256:totallywrong``) answer 404 (or a 400 with a spec error code)."""
    async with in_process(tmp_path, fake, target) as reg:
        await pull_workflow(reg, invalid_references=True)


async def test_02_push(tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]) -> None:
    """02_push_test.go passes: streamed, monolithic and chunked uploads, mounts with the
    exact Location, manifest uploads."""
    async with in_process(tmp_path, fake, target) as reg:
        await push_workflow(reg)


async def test_02_push_nonexistent_manifest_invalid_reference(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]
) -> None:
    """02_push_test.go's "GET nonexistent manifest should return 404", with its reference
    ``.INVALID_MANIFEST_NAME`` as written."""
    async with in_process(tmp_path, fake, target) as reg:
        await nonexistent_manifest_with_invalid_reference(reg)


async def test_03_content_discovery(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]
) -> None:
    """03_discovery_test.go passes: tag pagination, referrers with OCI-Subject, annotations
    and the artifactType filter, also for a subject never pushed."""
    async with in_process(tmp_path, fake, target) as reg:
        await discovery_workflow(reg)


async def test_04_content_management(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]
) -> None:
    """04_management_test.go passes: a tag and a manifest are deleted and gone from the
    tag list; blob deletes are answered as the spec allows."""
    async with in_process(tmp_path, fake, target) as reg:
        await management_workflow(reg)


async def test_pull_push_and_discovery_with_deletes_off(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]
) -> None:
    """With ``delete = false`` (the default) the pull, push and discovery workflows still
    pass: their teardowns take 405 UNSUPPORTED. (Content management needs deletes.)"""
    async with in_process(tmp_path, fake, target, delete=False) as reg:
        await pull_workflow(reg, invalid_references=False)
        await push_workflow(reg)
        await discovery_workflow(reg)


class ReggieAuth(httpx.Auth):
    """What the suite's client (reggie) does with OCI_USERNAME and OCI_PASSWORD: on a 401
    with a Bearer challenge it asks the realm for a token of the challenge's scope, with
    the credentials, and sends the request again with it."""

    requires_response_body = True

    def __init__(self, user: str, password: str) -> None:
        self.basic = httpx.BasicAuth(user, password)

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        answer = yield request
        challenge = answer.headers.get("www-authenticate", "")
        if answer.status_code != 401 or not challenge.startswith("Bearer "):
            return
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        params = {k: v for k, v in fields.items() if k in ("service", "scope")}
        token_request = httpx.Request("GET", fields["realm"], params=params)
        granted = yield next(self.basic.auth_flow(token_request))
        request.headers["Authorization"] = f"Bearer {granted.json()['token']}"
        yield request


async def test_all_workflows_with_logins(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]
) -> None:
    """With ``[auth]`` on and a push rule for the user, the four workflows pass for a client
    that logs in as the suite does (tokens for each challenge's scope)."""
    user, password = "builder", "correct horse"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    (tmp_path / "htpasswd").write_text(f"{user}:{hashed}\n")
    rules = f"""
[auth]
htpasswd = "{tmp_path / "htpasswd"}"
secret_file = "{tmp_path / "secret"}"
[[hosted."team".access]]
repositories = ["*"]
pull = ["authenticated"]
push = ["{user}"]
"""
    text = conformance_config(tmp_path / "cache", "http://upstream.test") + rules
    async with gateway(tmp_path, fake, text) as gw:
        gw.client.auth = ReggieAuth(user, password)
        reg = Registry(gw.client, *target)
        await pull_workflow(reg, invalid_references=False)
        await push_workflow(reg)
        await discovery_workflow(reg)
        await management_workflow(reg)


async def test_all_workflows_on_the_s3_backend(
    tmp_path: Path, fake: FakeRegistry, target: tuple[str, str]
) -> None:
    """The same four workflows, in sequence on one repository, with the hosted set in an
    object store (a real SeaweedFS): one conformance suite for every backend."""
    server = session_seaweed()
    store = f"""backend = "s3"
[cache.s3]
bucket = "{server.bucket}"
endpoint = "{server.endpoint}"
prefix = "conformance/{uuid.uuid4().hex}"
access_key_id_env = "S3_KEY"
secret_access_key_env = "S3_SECRET"
"""
    text = conformance_config(tmp_path / "spool", "http://upstream.test", store)
    env = {"S3_KEY": server.access_key, "S3_SECRET": server.secret_key}
    async with gateway(tmp_path, fake, text, env=env) as gw:
        reg = Registry(gw.client, *target)
        await pull_workflow(reg, invalid_references=False)
        await push_workflow(reg)
        await discovery_workflow(reg)
        await management_workflow(reg)


# ---------------------------------------------------------------------- the real gateway


@pytest.fixture(scope="module")
def real_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("conformance")
    with (
        DistributionRegistry(root / "hub") as hub,
        GatewayProcess(root / "gw", conformance_config(root / "cache", hub.url)) as process,
    ):
        yield process


@pytest.mark.real
async def test_full_conformance_pass_against_the_real_gateway(
    real_gateway: GatewayProcess, target: tuple[str, str]
) -> None:
    """All four workflows in sequence on one repository, as the suite runs them, against the
    real gateway process with two workers (a real registry as the group's upstream
    member)."""
    async with httpx.AsyncClient(base_url=real_gateway.url, timeout=30) as client:
        reg = Registry(client, *target)
        await pull_workflow(reg, invalid_references=False)
        await push_workflow(reg)
        await discovery_workflow(reg)
        await management_workflow(reg)
