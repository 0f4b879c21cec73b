"""Hostile manifest pushes against the real gateway process (``mirrorrouter serve``) with a
hosted set: each is refused with 400 MANIFEST_INVALID in the OCI JSON envelope, the gateway
keeps answering, and ``mirrorrouter gc`` (the CLI) still succeeds afterwards, also over a
malformed manifest that an older version stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirrorrouter.cache import StoredManifest, TagRecord
from mirrorrouter.config import load_settings
from mirrorrouter.hosted.store import HostedStore
from mirrorrouter.reference import Digest
from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.real

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MIB = 1024 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gateway_config(cache: Path) -> str:
    """A hosted set ``team`` (collected at once) and an upstream nobody answers for."""
    return f"""
[cache]
directory = "{cache}"
[upstreams."docker.io"]
mirrors = [{{ url = "http://127.0.0.1:9" }}]
[hosted."team"]
gc_grace = "0s"
[[routes]]
prefix = "team"
hosted = "team"
"""


CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
LAYER = b"a layer of the hostile-manifests test" * 100


def descriptor(data: bytes, media_type: str) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


def manifest(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(CONFIG, "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor(LAYER, "application/vnd.oci.image.layer.v1.tar")],
    }
    document.update(changes)
    return document


def hostile() -> list[tuple[str, bytes, str, str | None]]:
    """(what, body, Content-Type, the field the error must name)."""
    good = manifest()
    layer = good["layers"][0]
    string_platform = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**descriptor(b"child", OCI_MANIFEST), "platform": "linux/amd64"}],
    }
    deep = 100_000
    return [
        ("layers null", json.dumps(manifest(layers=None)).encode(), OCI_MANIFEST, "layers"),
        (
            "platform a string",
            json.dumps(string_platform).encode(),
            OCI_INDEX,
            "manifests[0].platform",
        ),
        ("100k-deep nesting", b"[" * deep + b"]" * deep, OCI_MANIFEST, None),
        ("4 MiB of nesting", b"[" * (2 * MIB - 1) + b"]" * (2 * MIB - 1), OCI_MANIFEST, None),
        ("4 MiB of empty lists", b"[" + b"[]," * 1_398_000 + b"[]]", OCI_MANIFEST, None),
        ("layers an object", json.dumps(manifest(layers=layer)).encode(), OCI_MANIFEST, "layers"),
        (
            "a layer a string",
            json.dumps(manifest(layers=[sha256(LAYER)])).encode(),
            OCI_MANIFEST,
            "layers[0]",
        ),
        ("config a list", json.dumps(manifest(config=[layer])).encode(), OCI_MANIFEST, "config"),
        (
            "digest a number",
            json.dumps(manifest(layers=[{**layer, "digest": 5}])).encode(),
            OCI_MANIFEST,
            "layers[0].digest",
        ),
        (
            "size -1",
            json.dumps(manifest(layers=[{**layer, "size": -1}])).encode(),
            OCI_MANIFEST,
            "layers[0].size",
        ),
        (
            "size a string",
            json.dumps(manifest(layers=[{**layer, "size": "9"}])).encode(),
            OCI_MANIFEST,
            "layers[0].size",
        ),
        (
            "annotations of numbers",
            json.dumps(manifest(annotations={"a": 1})).encode(),
            OCI_MANIFEST,
            "annotations",
        ),
        (
            "subject a string",
            json.dumps(manifest(subject="sha256:x")).encode(),
            OCI_MANIFEST,
            "subject",
        ),
        ("non-JSON", b"\x00\xff not json {", OCI_MANIFEST, None),
        ("a JSON array", b'[{"schemaVersion": 2}]', OCI_MANIFEST, None),
    ]


def run_gc(config: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mirrorrouter", "gc", "--config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


async def store_as_an_older_version_did(config: Path, data: bytes, tag: str) -> None:
    """Write a manifest straight into the hosted set's storage, unchecked, linked and tagged."""
    store = HostedStore(load_settings(config).hosted["team"])
    await store.open()
    try:
        digest = Digest.of(data)
        await store.storage.put_manifest(StoredManifest(digest, OCI_MANIFEST, data))
        await store.storage.link("app", [digest])
        await store.storage.put_tag("app", tag, TagRecord(digest, OCI_MANIFEST, len(data), 0.0))
    finally:
        await store.close()


def test_hostile_manifest_pushes_are_400_and_gc_survives(tmp_path: Path) -> None:
    """Each hostile manifest push answers 400 MANIFEST_INVALID (JSON envelope, the field
    named), /v2/ keeps answering between them, a good push still works, and the gc CLI
    succeeds afterwards, also over a "layers": null manifest already on disk."""
    gateway = GatewayProcess(tmp_path / "gw", gateway_config(tmp_path / "cache"))
    good = json.dumps(manifest()).encode()
    with gateway, httpx.Client(timeout=60, trust_env=False) as client:
        base = f"{gateway.url}/v2/team/app"
        for blob in (CONFIG, LAYER):
            pushed = client.post(
                f"{base}/blobs/uploads/", params={"digest": sha256(blob)}, content=blob
            )
            assert pushed.status_code == 201, pushed.text
        for what, body, content_type, field in hostile():
            answer = client.put(
                f"{base}/manifests/v1", content=body, headers={"Content-Type": content_type}
            )
            assert answer.status_code == 400, (what, answer.status_code, answer.text[:300])
            assert answer.headers["content-type"] == "application/json", what
            [error] = answer.json()["errors"]
            assert error["code"] == "MANIFEST_INVALID", (what, error)
            if field is not None:
                assert error["detail"]["field"] == field, (what, error)
            assert client.get(f"{gateway.url}/v2/").status_code == 200, what
        assert client.get(f"{base}/manifests/v1").status_code == 404  # nothing was tagged
        put = client.put(
            f"{base}/manifests/v1", content=good, headers={"Content-Type": OCI_MANIFEST}
        )
        assert put.status_code == 201, put.text
    assert "Traceback" not in gateway.log()

    null_layers = json.dumps(manifest(layers=None)).encode()
    asyncio.run(store_as_an_older_version_did(gateway.config_path, null_layers, "old"))
    collected = run_gc(gateway.config_path)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "hosted team: removed" in collected.stdout
    again = run_gc(gateway.config_path)  # and on every later run
    assert again.returncode == 0, again.stdout + again.stderr

    with gateway, httpx.Client(timeout=60, trust_env=False) as client:
        base = f"{gateway.url}/v2/team/app"
        pulled = client.get(f"{base}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert pulled.status_code == 200 and pulled.content == good
        for blob in (CONFIG, LAYER):
            answer = client.get(f"{base}/blobs/{sha256(blob)}")
            assert answer.status_code == 200 and answer.content == blob
        old = client.get(f"{base}/manifests/old", headers={"Accept": OCI_MANIFEST})
        assert old.status_code == 200 and old.content == null_layers
