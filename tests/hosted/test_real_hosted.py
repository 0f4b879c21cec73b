"""Hosted repositories and groups with real clients: skopeo, podman and containerd's ctr push
to and pull from the real gateway process; a real distribution registry stands in for
docker.io behind the group.

One gateway (anonymous) serves most tests: the hosted set ``team`` and the group ``dev``
(``team`` first, then docker.io), routed by the prefix ``dev``, by the default registry and by
containerd's ``?ns=registry.dev.test`` (an alias of the group). Push permissions get a
gateway with ``[auth]``, garbage collection one of its own (stopped while collecting), and
pushes next to an upstream name (the shadowing guard, shared layers copied in) gateways
and an upstream registry of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from mirrorrouter.config import load_settings
from mirrorrouter.hosted.gc import GcReport
from mirrorrouter.hosted.store import HostedStore
from tests.support.clients import (
    ClientError,
    Containerd,
    Podman,
    Skopeo,
    ctr_content_digests,
    read_local_image,
    write_hosts_toml,
)
from tests.support.fakeregistry import Image, make_image
from tests.support.faultproxy import closed_port_url
from tests.support.gateway import HOSTED_FIRST_GROUP, GatewayProcess
from tests.support.images import (
    OCI_MANIFEST,
    BuiltImage,
    ImageFactory,
    PushedImage,
    session_factory,
    shared_base_image,
)
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real

PASSWORD = "correct horse battery staple"
MIB = 1024 * 1024
GROUP_REGISTRY = "registry.dev.test"  # a registry name the group answers to


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hosted_config(cache: Path, upstream: str, extra: str = "") -> str:
    """``team`` (hosted) and ``dev`` (group: team, then docker.io); the group is also the
    default registry, and the registry name ``registry.dev.test`` (containerd's ``?ns=``)."""
    return f"""
[server]
access_log = true
[cache]
directory = "{cache}"
[routing]
default_registry = "dev"
[upstreams."docker.io"]
mirrors = [{{ url = "{upstream}" }}]
[hosted."team"]
delete = true
[groups."dev"]
members = ["team", "docker.io"]
aliases = ["{GROUP_REGISTRY}"]
[[routes]]
prefix = "dev"
group = "dev"
[[routes]]
prefix = "team"
hosted = "team"
{extra}
"""


def access_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """The gateway's access-log entries (JSON lines of the ``mirrorrouter.access`` logger)."""
    entries = []
    for line in gateway.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "mirrorrouter.access":
            entries.append(entry)
    return entries


@dataclass
class World:
    hub: DistributionRegistry
    gateway: GatewayProcess
    factory: ImageFactory
    upstream_only: PushedImage


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hosted")
    factory = session_factory(tmp_path_factory)
    with DistributionRegistry(root / "hub") as hub:
        upstream_only = factory.push(factory.small("uponly", seed=51), hub, "library/uponly", "1")
        with GatewayProcess(root / "gw", hosted_config(root / "cache", hub.url)) as gateway:
            yield World(hub, gateway, factory, upstream_only)


def push_with_skopeo(image: BuiltImage, dest: str, **kwargs: Any) -> str:
    """``skopeo copy --all --preserve-digests oci:LAYOUT docker://DEST``: the digest pushed."""
    return Skopeo().copy(
        image.oci_reference,
        dest,
        all_platforms=True,
        extra=("--preserve-digests",),
        **kwargs,
    )


# -- 1. a multi-arch push through the group, pulled back by skopeo and ctr -----------------


def test_multiarch_push_through_group_pulls_back_byte_exact(world: World, tmp_path: Path) -> None:
    """skopeo pushes an OCI index (2 platforms) to dev/app:v1; skopeo (by tag and digest,
    through the prefix and the default registry) and ctr (ns) get every digest back."""
    gw = world.gateway
    image = world.factory.multiarch("hostedmulti", seed=52)
    assert image.is_index and len(image.images) == 2
    pushed = push_with_skopeo(image, f"{gw.host}/dev/app:v1")
    assert pushed == image.digest

    skopeo = Skopeo()
    children = set(image.manifest_digests)
    for repository in (
        f"{gw.host}/dev/app",  # the group's prefix
        f"{gw.host}/app",  # the default registry is the group
        f"{gw.host}/team/app",  # the hosted set itself
    ):
        for ref in (f"{repository}:v1", f"{repository}@{image.digest}"):
            assert skopeo.inspect_raw(ref) == image.manifest_bytes(), ref
        for child in children:
            assert skopeo.inspect_raw(f"{repository}@{child}") == image.manifest_bytes(child)
    local = skopeo.copy_to_local(f"{gw.host}/dev/app:v1", tmp_path / "dir", all_platforms=True)
    assert local.manifest_digest == image.digest
    assert set(local.manifest_digests) == {image.digest, *children}
    assert set(local.blob_digests) == {b.digest for b in image.blobs}
    oci = skopeo.copy_to_local(
        f"{gw.host}/dev/app@{image.digest}", tmp_path / "oci", layout="oci", all_platforms=True
    )
    assert oci.manifest_digest == image.digest
    assert set(oci.manifest_digests) == {image.digest, *children}

    # containerd: hosts.toml makes the gateway the mirror of registry.dev.test (?ns=), and
    # the gateway's own address is pulled as it is (the default registry: the group).
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, GROUP_REGISTRY, gw.url, server=None)
    write_hosts_toml(hosts, gw.host, gw.url, server=None)
    mark = len(access_lines(gw))
    with Containerd() as containerd:
        for ref in (
            f"{GROUP_REGISTRY}/app:v1",
            f"{GROUP_REGISTRY}/app@{image.digest}",
            f"{gw.host}/app:v1",
        ):
            assert containerd.ctr_pull(ref, hosts, all_platforms=True) == image.digest, ref
        content = ctr_content_digests(containerd)
        assert {image.digest, *children, *(b.digest for b in image.blobs)} <= content
    lines = access_lines(gw)[mark:]
    ns_lines = [e for e in lines if f"ns={GROUP_REGISTRY}" in e["message"]]
    assert {e["route"] for e in ns_lines} == {"ns"}
    assert {e["status"] for e in lines} == {200}
    # Index, both children and every blob came through the ns route from the hosted member.
    fetched = {e["message"].split()[1].split("?")[0].rsplit("/", 1)[1] for e in ns_lines}
    assert {image.digest, *children, *(b.digest for b in image.blobs)} <= fetched
    assert {e["upstream"] for e in ns_lines if "/blobs/" in e["message"]} == {"team"}


# -- 2. podman push ------------------------------------------------------------------------


def test_podman_push_then_skopeo_pull_through_group(world: World, tmp_path: Path) -> None:
    """podman pushes an image from its store into dev/podapp:v1; skopeo pulls the same
    digest back through the group, with every blob intact."""
    gw = world.gateway
    image = world.factory.small("podsrc", seed=53)
    with Podman() as podman:
        image_id = podman.run("pull", "--quiet", image.oci_reference).text.split()[-1]
        assert f"sha256:{image_id}" == image.images[0].config.digest
        pushed = podman.push(image_id, f"docker://{gw.host}/dev/podapp:v1")
    assert pushed.startswith("sha256:")
    skopeo = Skopeo()
    raw = skopeo.inspect_raw(f"{gw.host}/dev/podapp:v1")
    assert sha256(raw) == pushed
    assert skopeo.inspect_digest(f"{gw.host}/dev/podapp:v1") == pushed
    local = skopeo.copy_to_local(f"{gw.host}/dev/podapp@{pushed}", tmp_path / "back")
    assert local.manifest_digest == pushed
    manifest = json.loads(raw)
    assert manifest["config"]["digest"] == image.images[0].config.digest  # same image config
    assert set(local.blob_digests) == {
        manifest["config"]["digest"],
        *(layer["digest"] for layer in manifest["layers"]),
    }


def test_podman_pushes_a_multiarch_list_pulled_back_through_the_group(
    world: World, tmp_path: Path
) -> None:
    """``podman manifest push --all`` of a two-platform image into dev/podmulti:v1: the list
    and each platform's manifest come back byte-exact through the group (skopeo)."""
    gw = world.gateway
    image = world.factory.multiarch("podmulti", seed=61)
    with Podman() as podman:
        pushed = podman.push_manifest_list(
            image.oci_reference, f"docker://{gw.host}/dev/podmulti:v1"
        )
    skopeo = Skopeo()
    raw = skopeo.inspect_raw(f"{gw.host}/dev/podmulti:v1")
    assert sha256(raw) == pushed
    listed = json.loads(raw)
    # podman writes its own manifests (its media types, its layer compression): the list
    # holds one per platform of the source, and each comes back as podman pushed it.
    platforms = {
        f"{e['platform']['os']}/{e['platform']['architecture']}" for e in listed["manifests"]
    }
    assert platforms == set(image.platform_manifests)
    blobs = set()
    for entry in listed["manifests"]:
        body = skopeo.inspect_raw(f"{gw.host}/podmulti@{entry['digest']}")  # via the group
        assert sha256(body) == entry["digest"]
        child = json.loads(body)
        blobs |= {child["config"]["digest"], *(layer["digest"] for layer in child["layers"])}
    local = skopeo.copy_to_local(
        f"{gw.host}/dev/podmulti@{pushed}", tmp_path / "all", all_platforms=True
    )
    assert local.manifest_digest == pushed
    assert blobs <= set(local.blob_digests)


# -- 3. a chunked upload interrupted and resumed -------------------------------------------


class Interrupted(Exception):
    """Raised by the request body generator: the connection drops mid-PATCH."""


def test_chunked_upload_resumes_after_a_dropped_connection(world: World) -> None:
    """POST, a PATCH whose connection drops mid-body, GET for the Range, PATCH the rest from
    there, PUT with the digest: the blob served back has the right sha256."""
    gw = world.gateway
    data = hashlib.sha256(b"seed").digest() * (3 * MIB // 32)  # 3 MiB
    digest = sha256(data)
    base = f"{gw.url}/v2/dev/chunky"
    with httpx.Client(timeout=30, trust_env=False) as client:
        started = client.post(f"{base}/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = httpx.URL(gw.url).join(started.headers["location"])
        assert started.headers["range"] == "0-0"
        sent = 0

        def stored() -> int:
            answer = client.get(location)
            assert answer.status_code == 204, answer.text
            return int(answer.headers["range"].split("-")[1]) + 1

        def body() -> Iterator[bytes]:
            nonlocal sent
            part = 256 * 1024
            while sent < int(1.5 * MIB):
                yield data[sent : sent + part]
                sent += part
            # Wait until the gateway wrote some of it to disk, then drop the connection.
            deadline = time.monotonic() + 10
            while stored() <= 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            raise Interrupted

        with (
            pytest.raises(Interrupted),
            httpx.Client(timeout=30, trust_env=False) as dropped,
        ):
            dropped.patch(location, content=body())
        # The upload holds a prefix of what was sent; resume from where it ends.
        for _ in range(20):
            offset = stored()
            time.sleep(0.05)
            if stored() == offset:
                break
        assert 0 < offset <= sent
        for _ in range(3):
            rest = client.patch(
                location,
                content=data[offset:-1000],
                headers={"Content-Range": f"{offset}-{len(data) - 1001}"},
            )
            if rest.status_code != 416:  # else the gateway was still writing: ask again
                break
            offset = int(rest.headers["range"].split("-")[1]) + 1
        assert rest.status_code == 202, rest.text
        assert rest.headers["range"] == f"0-{len(data) - 1001}"
        done = client.put(location, params={"digest": digest}, content=data[-1000:])
        assert done.status_code == 201, done.text
        assert done.headers["docker-content-digest"] == digest
        for url in (f"{base}/blobs/{digest}", f"{gw.url}/v2/team/chunky/blobs/{digest}"):
            blob = client.get(url)
            assert blob.status_code == 200
            assert sha256(blob.content) == digest and len(blob.content) == len(data)
        assert client.get(location).status_code == 404  # the session is over
    # The drop is an ordinary event of resumable uploads: no traceback, no 500.
    assert f"PATCH {httpx.URL(location).path} 500" not in gw.log()
    assert "ClientDisconnect" not in gw.log()


# -- 4. a manifest with a missing blob -----------------------------------------------------


def test_manifest_referencing_a_missing_blob_is_refused(world: World) -> None:
    """A manifest whose second layer was never pushed: 400 MANIFEST_BLOB_UNKNOWN (JSON), no
    tag created."""
    gw = world.gateway
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    present, absent = b"present layer" * 100, b"absent layer" * 100
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256(d),
                    "size": len(d),
                }
                for d in (present, absent)
            ],
        }
    ).encode()
    base = f"{gw.url}/v2/dev/incomplete"
    with httpx.Client(timeout=30, trust_env=False) as client:
        for blob in (config, present):
            answer = client.post(
                f"{base}/blobs/uploads/", params={"digest": sha256(blob)}, content=blob
            )
            assert answer.status_code == 201, answer.text
        refused = client.put(
            f"{base}/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
        )
        assert refused.status_code == 400, refused.text
        assert refused.headers["content-type"] == "application/json"
        error = refused.json()["errors"][0]
        assert error["code"] == "MANIFEST_BLOB_UNKNOWN"
        assert error["detail"]["digest"] == sha256(absent)
        for url in (f"{base}/manifests/v1", f"{gw.url}/v2/team/incomplete/manifests/v1"):
            assert client.get(url).status_code == 404
        by_digest = client.get(f"{gw.url}/v2/team/incomplete/manifests/{sha256(manifest)}")
        assert by_digest.status_code == 404
        tags = client.get(f"{gw.url}/v2/team/incomplete/tags/list")
        assert tags.status_code == 200 and tags.json()["tags"] == []


# -- 5. push permissions -------------------------------------------------------------------


def test_push_needs_permission(world: World, tmp_path: Path) -> None:
    """push = ["alice"]: bob gets 403 DENIED, anonymous 401, alice pushes; anyone pulls."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    workdir = tmp_path / "gw"
    workdir.mkdir()
    (workdir / "htpasswd").write_text(f"alice:{hashed}\nbob:{hashed}\n")
    rules = """
[auth]
htpasswd = "htpasswd"
[[hosted."team".access]]
repositories = ["*"]
pull = ["anonymous"]
push = ["alice"]
"""
    image = world.factory.small("permitted", seed=54)
    dest = "{host}/dev/secure:v1"

    gateway = GatewayProcess(workdir, hosted_config(tmp_path / "cache", world.hub.url, rules))
    with gateway:
        target = dest.format(host=gateway.host)
        with pytest.raises(ClientError) as as_bob:
            push_with_skopeo(image, target, dest_creds=("bob", PASSWORD))
        assert "denied" in as_bob.value.stderr.lower(), as_bob.value.stderr
        with pytest.raises(ClientError) as anonymous:
            push_with_skopeo(image, target)
        assert "unauthorized" in anonymous.value.stderr.lower(), anonymous.value.stderr
        writes = [
            e for e in access_lines(gateway) if e["message"].startswith(("POST", "PUT", "PATCH"))
        ]
        assert {e["status"] for e in writes} == {401, 403}
        assert all("/v2/dev/secure/" in e["message"] for e in writes)
        with httpx.Client(timeout=30, trust_env=False) as client:
            # The same answers over plain HTTP: 403 DENIED for bob, 401 with a challenge for
            # nobody.
            upload = f"{gateway.url}/v2/dev/secure/blobs/uploads/"
            denied = client.post(upload, auth=("bob", PASSWORD))
            assert denied.status_code == 403
            assert denied.json()["errors"][0]["code"] == "DENIED"
            unauthorized = client.post(upload)
            assert unauthorized.status_code == 401
            assert unauthorized.json()["errors"][0]["code"] == "UNAUTHORIZED"
            assert "push" in unauthorized.headers["www-authenticate"]
            # Nothing was stored: the tag does not exist.
            assert client.get(f"{gateway.url}/v2/dev/secure/manifests/v1").status_code == 404
            assert client.post(upload, auth=("alice", PASSWORD)).status_code == 202
        assert push_with_skopeo(image, target, dest_creds=("alice", PASSWORD)) == image.digest
        assert Skopeo().inspect_digest(target) == image.digest  # anonymous pull
        local = Skopeo().copy_to_local(target, tmp_path / "pulled")
        assert set(local.blob_digests) == {b.digest for b in image.blobs}


# -- 6. an upstream-only image through the group -------------------------------------------


def test_upstream_only_image_through_group_is_cached(world: World, tmp_path: Path) -> None:
    """skopeo pulls library/uponly through the group: team misses, docker.io serves; a second
    pull makes no upstream request at all."""
    gw, hub, pushed = world.gateway, world.hub, world.upstream_only
    skopeo = Skopeo()
    ref = f"{gw.host}/dev/uponly:1"
    start = hub.mark()
    first = skopeo.copy_to_local(ref, tmp_path / "one")
    assert first.manifest_digest == pushed.digest
    assert first.blob_digests == {b.digest for b in pushed.blobs}
    cold = hub.requests(start)
    assert any(r.method == "GET" and "/v2/library/uponly/blobs/" in r.path for r in cold)
    for blob in pushed.blobs:  # the blobs were fetched (and cached) once
        assert sum(1 for r in cold if r.method == "GET" and blob.digest in r.path) == 1
    middle = hub.mark()
    second = skopeo.copy_to_local(ref, tmp_path / "two")
    assert second.manifest_digest == pushed.digest
    assert second.blob_digests == first.blob_digests
    assert hub.requests(middle) == []


# -- 7. garbage collection against the gateway's storage -----------------------------------


def gc_cli_available() -> bool:
    """Whether ``mirrorrouter gc`` exists yet (the CLI is being written alongside)."""
    done = subprocess.run(
        [sys.executable, "-m", "mirrorrouter", "gc", "--help"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def run_gc(config: Path, *, dry_run: bool = False) -> GcReport | str:
    """Collect garbage of hosted ``team``: with the CLI when it exists, else in-process."""
    if gc_cli_available():
        argv = [sys.executable, "-m", "mirrorrouter", "gc", "--config", str(config)]
        argv += ["--hosted", "team", *(["--dry-run"] if dry_run else [])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    async def collect() -> GcReport:
        store = HostedStore(load_settings(config).hosted["team"])
        await store.open()
        try:
            return await store.collect_garbage(dry_run=dry_run)
        finally:
            await store.close()

    return asyncio.run(collect())


def test_garbage_collection_keeps_the_live_image(world: World, tmp_path: Path) -> None:
    """Two pushed images share a layer; one is deleted by digest and GC runs: every blob of
    the kept image is still served (sha256 checked), the dropped image's own blobs are gone."""
    keep = shared_base_image(world.factory, "gckeep")
    drop = shared_base_image(world.factory, "gcdrop")
    shared = {b.digest for b in keep.blobs} & {b.digest for b in drop.blobs}
    assert len(shared) == 1
    dropped_only = {b.digest for b in drop.blobs} - shared
    assert len(dropped_only) == 2  # its config and its own layer

    config = hosted_config(tmp_path / "cache", world.hub.url)
    config = config.replace("delete = true", 'delete = true\ngc_grace = "0s"')
    gateway = GatewayProcess(tmp_path / "gw", config)
    with gateway:
        for image, tag in ((keep, "keep"), (drop, "drop")):
            assert push_with_skopeo(image, f"{gateway.host}/team/gcapp:{tag}") == image.digest
        with httpx.Client(timeout=30, trust_env=False) as client:
            base = f"{gateway.url}/v2/team/gcapp"
            deleted = client.delete(f"{base}/manifests/{drop.digest}")
            assert deleted.status_code == 202, deleted.text
            assert client.get(f"{base}/manifests/drop").status_code == 404
            # Deleting frees nothing yet: the blobs stay until collected.
            for digest in dropped_only:
                assert client.head(f"{base}/blobs/{digest}").status_code == 200

    storage = tmp_path / "cache"

    def stored_paths() -> list[str]:
        return [str(p.relative_to(storage)) for p in storage.rglob("*")]

    dry = run_gc(gateway.config_path, dry_run=True)
    if isinstance(dry, GcReport):
        assert (dry.blobs, dry.manifests) == (2, 1)
    for digest in dropped_only | {drop.digest}:  # a dry run removes nothing
        assert any(digest.removeprefix("sha256:") in path for path in stored_paths()), digest
    report = run_gc(gateway.config_path)
    if isinstance(report, GcReport):
        assert (report.blobs, report.manifests) == (2, 1)
        assert report.freed == sum(b.size for b in drop.blobs if b.digest in dropped_only) + (
            drop.top.size
        )

    with gateway:
        with httpx.Client(timeout=30, trust_env=False) as client:
            base = f"{gateway.url}/v2/team/gcapp"
            kept = client.get(f"{base}/manifests/keep", headers={"Accept": OCI_MANIFEST})
            assert kept.status_code == 200 and kept.content == keep.manifest_bytes()
            for blob in keep.blobs:
                answer = client.get(f"{base}/blobs/{blob.digest}")
                assert answer.status_code == 200, blob.digest
                assert sha256(answer.content) == blob.digest
            for digest in dropped_only:
                gone = client.get(f"{base}/blobs/{digest}")
                assert gone.status_code == 404, digest
                assert gone.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
            assert client.get(f"{base}/manifests/{drop.digest}").status_code == 404
        pulled = Skopeo().copy_to_local(f"{gateway.host}/dev/gcapp:keep", tmp_path / "kept")
        assert pulled.manifest_digest == keep.digest
    # The storage itself holds no file of the dropped image's own blobs.
    paths = stored_paths()
    assert any(keep.digest.removeprefix("sha256:") in path for path in paths)
    for digest in dropped_only | {drop.digest}:
        assert not any(digest.removeprefix("sha256:") in path for path in paths), digest
    assert read_local_image(tmp_path / "kept", "dir").blob_digests == {b.digest for b in keep.blobs}


# -- 8. pushing next to an upstream name: the shadowing guard and shared layers -------------


def test_push_next_to_an_upstream_name_reuses_its_layers(
    factory: ImageFactory, upstream: DistributionRegistry, tmp_path: Path
) -> None:
    """docker.io (a real registry) has library/alpine:3.19. With allow_shadow, skopeo
    pushes an image built on it as dev/library/alpine:patched: it finds the shared base
    layer through the group and skips it, the gateway copies it in (fetched from docker.io
    once), and a gateway with a cold upstream cache serves the image by tag and digest from
    team alone. Without allow_shadow the same push is refused, DENIED naming docker.io,
    while a brand-new name goes through."""
    alpine = factory.push(
        shared_base_image(factory, "upalpine", base="alpine"), upstream, "library/alpine", "3.19"
    )
    mine = shared_base_image(factory, "patchedalpine", base="alpine")
    [shared] = {b.digest for b in mine.blobs} & {b.digest for b in alpine.blobs}
    allowed = hosted_config(tmp_path / "cache", upstream.url).replace(
        "delete = true", 'delete = true\nallow_shadow = ["library/alpine"]'
    )
    target = "{host}/dev/library/alpine:patched"

    gateway = GatewayProcess(tmp_path / "gw", allowed)
    with gateway:
        start = upstream.mark()
        assert push_with_skopeo(mine, target.format(host=gateway.host)) == mine.digest
        lines = [e["message"] for e in access_lines(gateway)]
        assert f"HEAD /v2/dev/library/alpine/blobs/{shared} 200" in " ".join(lines), lines
        uploads = [m for m in lines if m.startswith(("POST", "PUT")) and shared in m]
        assert uploads == []  # skopeo never sent the shared layer
        assert sum(1 for r in upstream.blob_gets(start) if shared in r.path) == 1
        report = subprocess.run(
            [
                sys.executable,
                "-m",
                "mirrorrouter",
                "gc",
                "--config",
                str(gateway.config_path),
                "--dry-run",
                "--ask-upstreams",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert (
            "hosted team: library/alpine shadows docker.io library/alpine for group dev "
            "(known from this mirror's cache of it; allowed by allow_shadow 'library/alpine')"
        ) in report.stdout, report.stdout

    shutil.rmtree(tmp_path / "cache" / "docker.io")  # the upstream cache goes cold
    with gateway:
        start = upstream.mark()
        skopeo = Skopeo()
        for ref, name in (
            (target.format(host=gateway.host), "tag"),
            (f"{gateway.host}/dev/library/alpine@{mine.digest}", "digest"),
        ):
            local = skopeo.copy_to_local(ref, tmp_path / name)
            assert local.manifest_digest == mine.digest
            assert local.blob_digests == {b.digest for b in mine.blobs}
        assert upstream.requests(start) == []  # all of it from team
        old = skopeo.inspect_digest(f"{gateway.host}/dev/library/alpine:3.19")
        assert old == alpine.digest  # docker.io's tag still answers through the group

    guarded = GatewayProcess(tmp_path / "guarded", hosted_config(tmp_path / "c2", upstream.url))
    with guarded:
        with pytest.raises(ClientError) as refused:
            push_with_skopeo(mine, target.format(host=guarded.host))
        assert "denied" in refused.value.stderr.lower(), refused.value.stderr
        assert "docker.io has library/alpine" in refused.value.stderr, refused.value.stderr
        with httpx.Client(timeout=30, trust_env=False) as client:
            answer = client.post(f"{guarded.url}/v2/dev/library/alpine/blobs/uploads/")
            assert answer.status_code == 403
            error = answer.json()["errors"][0]
            assert error["code"] == "DENIED" and error["detail"]["upstream"] == "docker.io"
            tags = client.get(f"{guarded.url}/v2/team/library/alpine/tags/list")
            assert tags.status_code == 404  # nothing was stored
        fresh = f"{guarded.host}/dev/patchedalpine:1"
        assert push_with_skopeo(mine, fresh) == mine.digest
        assert Skopeo().inspect_digest(fresh) == mine.digest


# -- group pulls from memory across worker processes ------------------------------------


def memory_answers(gateway: GatewayProcess, path: str) -> dict[int, int]:
    """How many GETs of ``path`` each worker process answered from memory (the access line
    of the in-memory fast path carries the cache result, HOSTED for a hosted member)."""
    counts: dict[int, int] = {}
    for entry in gateway.access_lines():
        if entry.get("message") == f"GET {path} 200" and entry.get("cache") == "HOSTED":
            counts[entry["pid"]] = counts.get(entry["pid"], 0) + 1
    return counts


def test_push_through_one_worker_is_never_stale_through_the_other(tmp_path: Path) -> None:
    """Two worker processes both answer a group's tag from memory; after the tag moves
    through one connection, GETs over many new connections, answered by both workers, all
    get the new digest: never the one their memory held."""
    config = f"""
[server]
workers = 2
access_log = true
[cache]
directory = "{tmp_path / "cache"}"
[upstreams."docker.io"]
mirrors = [{{ url = "{closed_port_url()}" }}]
{HOSTED_FIRST_GROUP}"""
    old, new = make_image("app", [b"old layer"]), make_image("app", [b"new layer"])
    path = "/v2/dev/app/manifests/v1"

    async def get_all(base: str, count: int) -> list[str]:
        """``count`` concurrent GETs, each over a new connection: the digests answered."""

        async def one() -> str:
            async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as client:
                answer = await client.get(path)
                assert answer.status_code == 200, answer.text
                return answer.headers["docker-content-digest"]

        return await asyncio.gather(*(one() for _ in range(count)))

    def until_both_workers_remember(gateway: GatewayProcess, digest: str) -> None:
        deadline = time.monotonic() + 60
        while len(memory_answers(gateway, path)) < 2:
            assert time.monotonic() < deadline, memory_answers(gateway, path)
            assert set(asyncio.run(get_all(gateway.url, 16))) == {digest}

    with GatewayProcess(tmp_path / "gateway", config) as gateway:
        with httpx.Client(base_url=gateway.url, trust_env=False, timeout=30) as client:
            push_raw(client, "/v2/dev/app", old)
            until_both_workers_remember(gateway, old.digest)
            before = memory_answers(gateway, path)
            push_raw(client, "/v2/dev/app", new)  # the same connection: one worker
        # Both workers answer again, from memory again, and never the old digest.
        deadline = time.monotonic() + 60
        while True:
            assert set(asyncio.run(get_all(gateway.url, 16))) == {new.digest}
            after = memory_answers(gateway, path)
            if len(after) == 2 and all(after[pid] > before.get(pid, 0) for pid in after):
                break
            assert time.monotonic() < deadline, (before, after)


def push_raw(client: httpx.Client, base: str, image: Image) -> None:
    """Push a fake-registry image's blobs (monolithic) and its manifest as tag v1."""
    for digest, data in image.blobs.items():
        posted = client.post(f"{base}/blobs/uploads/", params={"digest": digest}, content=data)
        assert posted.status_code == 201, posted.text
    put = client.put(
        f"{base}/manifests/v1", content=image.manifest, headers={"Content-Type": image.media_type}
    )
    assert put.status_code == 201, put.text
