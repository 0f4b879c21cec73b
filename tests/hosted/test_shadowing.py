"""The shadowing guard and the copy-in of shared blobs, in-process (shadowing.py).

The group ``dev`` asks the hosted set ``team`` first, then docker.io, then quay.io (both on
the fake registry, tests/support/fakeregistry.py), as in test_hosted.py. Real clients
pushing next to an upstream name are in test_real_hosted.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirrorrouter.cli.main import main
from mirrorrouter.cli.shadows import shadowing_report
from mirrorrouter.config import parse_settings
from mirrorrouter.hosted.store import HostedStore
from mirrorrouter.timing import Timing
from tests.access.test_access import basic, secured
from tests.hosted.test_hosted import OCI_MANIFEST, _store_raw, hosted_config, push_blob, push_image
from tests.support.fakeregistry import FakeRegistry, Image, make_image, sha256
from tests.support.inprocess import gateway

pytestmark = pytest.mark.anyio

BASE = b"alpine base layer " * 500  # what docker.io's alpine and the pushed image share


def error_of(answer: httpx.Response) -> dict[str, Any]:
    """The one error of an OCI error answer."""
    [error] = answer.json()["errors"]
    assert isinstance(error, dict)
    return error


def secured_group(tmp_path: Path, pushers: list[str], hosted: str = "") -> str:
    """[auth] on (tests/access/test_access.py's users), team (``hosted`` keys added; anyone pulls,
    ``pushers`` push) first in the group dev with docker.io; prefixes dev and team."""
    return secured(
        tmp_path,
        f"""[hosted."team"]
{hosted}
[[hosted."team".access]]
repositories = ["*"]
pull = ["anonymous"]
push = {json.dumps(pushers)}
[groups."dev"]
members = ["team", "docker.io"]
[[routes]]
prefix = "dev"
group = "dev"
[[routes]]
prefix = "team"
hosted = "team"
""",
    )


async def test_push_into_a_name_a_later_upstream_has_is_denied(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """docker.io has library/alpine: a push into alpine (through the group, or straight to
    team, as alpine or library/alpine) is refused with 403 DENIED naming docker.io at the
    upload's start and at the manifest PUT, and nothing is stored."""
    mine = make_image("alpine", [b"my alpine"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        for base in ("/v2/alpine", "/v2/library/alpine", "/v2/team/alpine", "/team/v2/alpine"):
            started = await gw.client.post(f"{base}/blobs/uploads/")
            assert started.status_code == 403, (base, started.text)
            error = error_of(started)
            assert error["code"] == "DENIED"
            assert str(error["message"]).startswith("docker.io has library/alpine")
            detail = {k: v for k, v in error["detail"].items() if k != "route"}
            assert detail == {
                "upstream": "docker.io",
                "repository": "library/alpine",
                "group": "dev",
                "hosted": "team",
            }
            monolithic = await push_blob(gw.client, base, b"my alpine")
            assert monolithic.status_code == 403
        put = await gw.client.put(
            "/v2/alpine/manifests/3.19",
            content=mine.manifest,
            headers={"Content-Type": mine.media_type},
        )
        assert put.status_code == 403 and error_of(put)["code"] == "DENIED"
        assert (await gw.client.get("/v2/team/alpine/tags/list")).status_code == 404
        pulled = await gw.client.get("/v2/alpine/manifests/3.19")
        assert pulled.content == image.manifest  # still docker.io's
        store = gw.app.services.hosted.stores["team"]
        assert (await store.storage.inventory()).blobs == {}


async def test_the_guard_applies_with_auth_to_users_allowed_to_push(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """With [auth], alice may push to team, but not into a name docker.io has: 403 DENIED
    naming docker.io (a push rule is no permission to shadow); anonymous still gets the
    login challenge first, and alice's push into a new name goes through."""
    text = secured_group(tmp_path, ["alice"])
    async with gateway(tmp_path, fake, text) as gw:
        anonymous = await gw.client.post("/v2/dev/alpine/blobs/uploads/")
        assert anonymous.status_code == 401
        alice = basic("alice", "wonderland")
        for base in ("/v2/dev/alpine", "/v2/team/alpine"):
            denied = await gw.client.post(f"{base}/blobs/uploads/", headers=alice)
            assert denied.status_code == 403, denied.text
            assert str(error_of(denied)["message"]).startswith("docker.io has library/alpine")
        gw.client.headers.update(alice)
        put = await push_image(gw.client, "/v2/dev/fresh", make_image("fresh", [b"new"]))
        assert put.status_code == 201, put.text


async def test_an_upstream_that_cannot_be_asked_refuses_the_push(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """docker.io answers 503 (then its circuit opens): a push that could shadow it is
    refused with 503 UNAVAILABLE naming docker.io; the failure is not remembered, so the
    push goes through once docker.io answers again."""
    fake.faults["/v2/library/app/tags/list"] = [503] * 50
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        for _ in range(2):
            refused = await gw.client.post("/v2/app/blobs/uploads/")
            assert refused.status_code == 503, refused.text
            error = error_of(refused)
            assert error["code"] == "UNAVAILABLE"
            assert str(error["message"]).startswith("cannot tell whether docker.io has library/app")
            assert error["detail"]["upstream"] == "docker.io"
        fake.faults.clear()
        gw.clock.now += 60  # the circuit's cooldown
        put = await push_image(gw.client, "/v2/app", make_image("app", [b"mine"]))
        assert put.status_code == 201, put.text


async def test_allow_shadow_permits_exactly_its_patterns(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """allow_shadow = ["alpine"] lets team shadow docker.io's alpine (the group then serves
    the pushed tag from team and 3.19 from docker.io) without asking upstream; other names
    docker.io has stay guarded."""
    fake.add(make_image("library/busybox", [b"busybox"]), "1")
    mine = make_image("alpine", [b"patched alpine"])
    text = hosted_config(tmp_path, hosted='allow_shadow = ["alpine"]')
    async with gateway(tmp_path, fake, text) as gw:
        put = await push_image(gw.client, "/v2/alpine", mine, "patched")
        assert put.status_code == 201, put.text
        assert fake.count("GET", "/tags/list") == 0  # allowed: nobody was asked
        ours = await gw.client.get("/v2/alpine/manifests/patched")
        assert ours.content == mine.manifest and ours.headers["x-upstream"] == "team"
        theirs = await gw.client.get("/v2/alpine/manifests/3.19")
        assert theirs.content == image.manifest and theirs.headers["x-upstream"] == "docker.io"
        busybox = await gw.client.post("/v2/busybox/blobs/uploads/")
        assert busybox.status_code == 403
        assert str(error_of(busybox)["message"]).startswith("docker.io has library/busybox")


async def test_only_upstreams_after_the_hosted_member_are_guarded(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """In a group that asks docker.io before team, team cannot shadow docker.io: a push into
    alpine asks nobody and goes through (and pulls of 3.19 still get docker.io's)."""
    text = hosted_config(tmp_path).replace(
        'members = ["team", "docker.io", "quay.io"]', 'members = ["docker.io", "team"]'
    )
    async with gateway(tmp_path, fake, text) as gw:
        put = await push_image(gw.client, "/v2/alpine", make_image("alpine", [b"late"]), "mine")
        assert put.status_code == 201, put.text
        assert fake.requests == []
        assert (await gw.client.get("/v2/alpine/manifests/3.19")).content == image.manifest


async def test_a_hosted_set_in_several_groups_is_guarded_for_each(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """team is first in dev (with docker.io) and in q (with quay.io): a push through dev of
    a name only quay.io has is refused naming quay.io and group q."""
    fake.add(make_image("app", [b"quay's"]), "1")  # quay.io/app (docker.io's is library/app)
    text = hosted_config(
        tmp_path,
        extra='[groups."q"]\nmembers = ["team", "quay.io"]\n',
    ).replace('members = ["team", "docker.io", "quay.io"]', 'members = ["team", "docker.io"]')
    async with gateway(tmp_path, fake, text) as gw:
        refused = await gw.client.post("/v2/app/blobs/uploads/")
        assert refused.status_code == 403, refused.text
        error = error_of(refused)
        assert str(error["message"]).startswith("quay.io has app")
        assert error["detail"]["group"] == "q"


async def test_verdicts_are_remembered_for_a_minute(tmp_path: Path, fake: FakeRegistry) -> None:
    """Four concurrent upload starts and three more ask each upstream once whether it has
    the name; a minute later the next push asks again."""
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        answers = await asyncio.gather(
            *(gw.client.post("/v2/app/blobs/uploads/") for _ in range(4))
        )
        for _ in range(3):
            answers.append(await gw.client.post("/v2/app/blobs/uploads/"))
        assert {a.status_code for a in answers} == {202}
        assert fake.count("GET", "/tags/list") == 2  # docker.io's library/app, quay.io's app
        gw.clock.now += 59
        assert (await gw.client.post("/v2/app/blobs/uploads/")).status_code == 202
        assert fake.count("GET", "/tags/list") == 2
        gw.clock.now += 2
        assert (await gw.client.post("/v2/app/blobs/uploads/")).status_code == 202
        assert fake.count("GET", "/tags/list") == 4


async def test_what_the_cache_knows_needs_no_upstream(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """alpine was pulled through the group, so the cache knows docker.io has it: a push
    into alpine is refused without asking docker.io, even while docker.io is down."""
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        assert (await gw.client.get("/v2/alpine/manifests/3.19")).status_code == 200
        fake.faults["/tags/list"] = [503] * 50
        refused = await gw.client.post("/v2/alpine/blobs/uploads/")
        assert refused.status_code == 403, refused.text
        assert "(this mirror's cache of it)" in str(error_of(refused)["message"])
        assert fake.count("GET", "/tags/list") == 0


async def test_a_closed_tag_list_still_meets_the_tag_at_the_manifest_put(
    tmp_path: Path, fake: FakeRegistry, image: Image
) -> None:
    """docker.io's tag lists answer 404 (closed): the uploads go through, and the manifest
    PUT is refused when docker.io answers a HEAD of that very tag (3.19), accepted for a
    tag it does not have."""
    fake.faults["/tags/list"] = [404] * 50
    mine = make_image("alpine", [b"my alpine"])
    async with gateway(tmp_path, fake, hosted_config(tmp_path)) as gw:
        for data in mine.blobs.values():
            assert (await push_blob(gw.client, "/v2/alpine", data)).status_code == 201
        headers = {"Content-Type": mine.media_type}
        taken = await gw.client.put(
            "/v2/alpine/manifests/3.19", content=mine.manifest, headers=headers
        )
        assert taken.status_code == 403, taken.text
        assert "(its tag 3.19)" in str(error_of(taken)["message"])
        free = await gw.client.put(
            "/v2/alpine/manifests/mine", content=mine.manifest, headers=headers
        )
        assert free.status_code == 201, free.text


# -- copy-in: pushes next to an upstream name that reuse its layers --------------------------


def alpine_and_mine(fake: FakeRegistry) -> tuple[Image, Image]:
    """docker.io's alpine (the base layer and one more), and an image built FROM it: the
    base layer, then one of its own."""
    alpine = fake.add(make_image("library/alpine", [BASE, b"alpine's second layer"]), "3.20")
    return alpine, make_image("alpine", [BASE, b"our patch"])


async def push_like_a_client(client: httpx.AsyncClient, base: str, image: Image) -> httpx.Response:
    """What skopeo does: HEAD each blob, upload only those the registry does not have, PUT
    the manifest."""
    for digest, data in image.blobs.items():
        if (await client.head(f"{base}/blobs/{digest}")).status_code == 200:
            continue
        assert (await push_blob(client, base, data)).status_code == 201
    return await client.put(
        f"{base}/manifests/patched",
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )


async def test_shared_layers_are_copied_in_from_the_upstream(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """With allow_shadow, a client that found the base layer through the group and did not
    upload it gets its manifest accepted: the layer is copied into team from docker.io's
    cache (fetched once), only what the manifest names; a cold gateway then serves the
    whole image from team with no upstream request."""
    _, mine = alpine_and_mine(fake)
    text = hosted_config(tmp_path, hosted='allow_shadow = ["alpine"]')
    async with gateway(tmp_path, fake, text) as gw:
        put = await push_like_a_client(gw.client, "/v2/alpine", mine)
        assert put.status_code == 201, put.text
        assert put.headers["docker-content-digest"] == mine.digest
        assert fake.count("GET", f"/blobs/{sha256(BASE)}") == 1  # the HEAD's fill, reused
        team = await gw.client.get(f"/v2/team/alpine/blobs/{sha256(BASE)}")
        assert team.status_code == 200 and team.content == BASE
        store = gw.app.services.hosted.stores["team"]
        stored = set((await store.storage.inventory()).blobs)
        assert {str(d) for d in stored} == set(mine.blobs)  # not alpine's second layer
    shutil.rmtree(tmp_path / "cache" / "docker.io")
    fake.requests.clear()
    async with gateway(tmp_path, fake, text) as gw:
        for reference in ("patched", mine.digest):
            got = await gw.client.get(f"/v2/alpine/manifests/{reference}")
            assert got.status_code == 200 and got.content == mine.manifest
            assert got.headers["docker-content-digest"] == mine.digest
        for digest, data in mine.blobs.items():
            blob = await gw.client.get(f"/v2/alpine/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data
            assert blob.headers["x-upstream"] == "team"
    assert fake.requests == []


async def test_copies_are_bounded_by_the_sets_limits(tmp_path: Path, fake: FakeRegistry) -> None:
    """A base layer over max_blob_size is refused (413 SIZE_INVALID), one over the quota
    (403 DENIED naming the set), before any byte of it is copied."""
    _, mine = alpine_and_mine(fake)
    cases = {'max_blob_size = "1KiB"': (413, "SIZE_INVALID"), 'quota = "2KiB"': (403, "DENIED")}
    for limit, (status, code) in cases.items():
        text = hosted_config(tmp_path / limit[:5], hosted=f'allow_shadow = ["alpine"]\n{limit}')
        async with gateway(tmp_path / limit[:5], fake, text) as gw:
            fake.requests.clear()
            put = await push_like_a_client(gw.client, "/v2/alpine", mine)
            assert put.status_code == status, put.text
            error = error_of(put)
            assert error["code"] == code
            if code == "DENIED":
                assert "hosted set 'team' is over its quota" in str(error["message"])
            store = gw.app.services.hosted.stores["team"]
            assert sha256(BASE) not in {str(d) for d in (await store.storage.inventory()).blobs}
            assert (await gw.client.get("/v2/team/alpine/manifests/patched")).status_code == 404


async def test_a_set_in_no_group_copies_nothing_and_asks_nobody(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """A hosted set in no group: its pushes are never guarded, and a manifest naming a blob
    it lacks is refused with MANIFEST_BLOB_UNKNOWN as before (not with a limit the blob
    would exceed), with no upstream request."""
    _, mine = alpine_and_mine(fake)
    text = hosted_config(tmp_path, hosted='max_blob_size = "1KiB"').replace(
        'members = ["team", "docker.io", "quay.io"]', 'members = ["docker.io", "quay.io"]'
    )
    async with gateway(tmp_path, fake, text) as gw:
        fake.requests.clear()
        for data in mine.blobs.values():
            if data != BASE:
                assert (await push_blob(gw.client, "/v2/team/alpine", data)).status_code == 201
        put = await gw.client.put(
            "/v2/team/alpine/manifests/3.20",
            content=mine.manifest,
            headers={"Content-Type": mine.media_type},
        )
        assert put.status_code == 400, put.text
        assert error_of(put)["code"] == "MANIFEST_BLOB_UNKNOWN"
        assert fake.requests == []


async def test_copies_come_only_from_what_the_pusher_may_pull(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """docker.io's private/app is pullable by alice, not by eve: eve's manifest naming its
    base layer without uploading it is refused with MANIFEST_BLOB_UNKNOWN; alice's is
    accepted, the layer copied in."""
    fake.add(make_image("private/app", [BASE]), "1")
    mine = make_image("private/app", [BASE, b"our patch"])
    text = secured_group(tmp_path, ["alice", "eve"], 'allow_shadow = ["private/*"]')
    base = "/v2/dev/private/app"
    async with gateway(tmp_path, fake, text) as gw:
        for data in mine.blobs.values():
            if data != BASE:
                answer = await gw.client.post(
                    f"{base}/blobs/uploads/",
                    params={"digest": sha256(data)},
                    content=data,
                    headers=basic("eve", "listening"),
                )
                assert answer.status_code == 201, answer.text
        headers = {"Content-Type": mine.media_type}
        as_eve = await gw.client.put(
            f"{base}/manifests/v1",
            content=mine.manifest,
            headers={**headers, **basic("eve", "listening")},
        )
        assert as_eve.status_code == 400, as_eve.text
        assert error_of(as_eve)["code"] == "MANIFEST_BLOB_UNKNOWN"
        assert fake.count("GET", f"/blobs/{sha256(BASE)}") == 0  # never asked for eve
        as_alice = await gw.client.put(
            f"{base}/manifests/v1",
            content=mine.manifest,
            headers={**headers, **basic("alice", "wonderland")},
        )
        assert as_alice.status_code == 201, as_alice.text
        team = await gw.client.get(f"/v2/team/private/app/blobs/{sha256(BASE)}")
        assert team.content == BASE


# -- check-config ------------------------------------------------------------------------------


def test_check_config_explains_group_order_and_warns_of_broad_patterns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config says in which order each group's pulls ask its members, what each
    hosted member may shadow or is hidden by, and warns of allow_shadow patterns that cover
    every name (or that cannot matter), never of a guarded set or of listed repositories."""
    config = tmp_path / "mirrors.toml"
    late = '[groups."kind"]\nmembers = ["docker.io", "late"]\n[hosted."late"]\n'
    expectations: list[tuple[str, list[str], list[str]]] = [
        (
            "",
            [
                "  group dev: pulls ask team (hosted, push target) > docker.io (upstream) > "
                "quay.io (upstream)\n",
                "    team: a push into a name docker.io or quay.io has is refused (shadowing "
                "guard; allow_shadow lifts it)\n",
                "  group kind: pulls ask docker.io (upstream) > late (hosted, push target)\n",
                "    late: docker.io is asked first: a tag it has hides the same tag pushed to "
                "late\n",
            ],
            [],
        ),
        (
            'allow_shadow = ["library/alpine", "team-*/*"]',
            [
                "    team: may shadow docker.io or quay.io only where allow_shadow matches "
                "(library/alpine, team-*/*); pushes into other names they have are refused\n"
            ],
            [],
        ),
        (
            'allow_shadow = ["*", "library/*", "app"]',
            [],
            [
                "warning: hosted team may shadow docker.io or quay.io for every name matching "
                "'*' (allow_shadow)",
                "matching 'library/*' (allow_shadow): anyone who may push to team can replace "
                "what clients of group dev pull",
            ],
        ),
    ]
    for hosted, out_lines, warnings in expectations:
        config.write_text(hosted_config(tmp_path, extra=late, hosted=hosted))
        assert main(["check-config", str(config)]) == 0
        captured = capsys.readouterr()
        for line in out_lines:
            assert line in captured.out, (hosted, captured.out)
        for warning in warnings:
            assert warning in captured.err, (hosted, captured.err)
        assert captured.err.count("warning:") == len(warnings), captured.err
    config.write_text(
        hosted_config(tmp_path, extra=late).replace(
            '[hosted."late"]\n', '[hosted."late"]\nallow_shadow = ["x"]\n'
        )
    )
    assert main(["check-config", str(config)]) == 0
    assert (
        "warning: allow_shadow of hosted late has no effect: it is asked before no upstream "
        "member of any group"
    ) in capsys.readouterr().err


# -- gc --dry-run: what already shadows an upstream ------------------------------------------


async def test_gc_dry_run_lists_hosted_repositories_that_shadow_an_upstream(
    tmp_path: Path, fake: FakeRegistry, image: Image, capsys: pytest.CaptureFixture[str]
) -> None:
    """gc --dry-run lists, from the caches' knowledge alone, the hosted repositories a later
    upstream has too (allowed by allow_shadow, or stored before the guard) and not the
    others; asking the upstreams also finds what no cache knows, and says which upstream
    could not be asked."""
    fake.add(make_image("library/busybox", [b"busybox"]), "1")
    fake.add(make_image("library/redis", [b"redis"]), "7")
    text = hosted_config(tmp_path, hosted='allow_shadow = ["alpine"]')
    async with gateway(tmp_path, fake, text) as gw:
        for pulled in ("alpine:3.19", "busybox:1"):  # through the group: the cache knows
            name, tag = pulled.split(":")
            assert (await gw.client.get(f"/v2/{name}/manifests/{tag}")).status_code == 200
        for name in ("alpine", "app"):
            put = await push_image(gw.client, f"/v2/{name}", make_image(name, [name.encode()]))
            assert put.status_code == 201, put.text
        store = gw.app.services.hosted.stores["team"]
        for name in ("busybox", "redis"):  # as an older version let them in
            await _store_raw(store, name, make_image(name, [b"old"]).manifest, OCI_MANIFEST, "1")
    config = tmp_path / "mirrors.toml"
    config.write_text(text)
    fake.requests.clear()
    # The command runs its own event loop: in a thread of its own here.
    assert await asyncio.to_thread(main, ["gc", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "hosted team: alpine shadows docker.io library/alpine for group dev (known from this "
        "mirror's cache of it; allowed by allow_shadow 'alpine')"
    ) in out
    assert (
        "hosted team: busybox shadows docker.io library/busybox for group dev (known from "
        "this mirror's cache of it; not allowed)"
    ) in out
    assert "redis" not in out and " app " not in out  # no cache knows redis; app is new
    assert fake.requests == []
    usage = ["gc", "--config", str(config), "--ask-upstreams"]
    assert await asyncio.to_thread(main, usage) == 2
    assert "--ask-upstreams goes with --dry-run" in capsys.readouterr().err

    settings = parse_settings(text)
    store = HostedStore(settings.hosted["team"])
    fake.faults["/v2/app/tags/list"] = [503] * 20  # quay.io's app: cannot be asked
    asked = await shadowing_report(
        settings,
        settings.hosted["team"],
        await store.repositories(),
        ask_upstreams=True,
        transport=httpx.ASGITransport(app=fake.app),
        timing=Timing(wall=lambda: 0.0, monotonic=lambda: 0.0, sleep=no_sleep),
    )
    found = {(s.repository, s.upstream): s for s in asked}
    assert set(found) == {
        ("alpine", "docker.io"),
        ("busybox", "docker.io"),
        ("redis", "docker.io"),
        ("app", "quay.io"),
    }
    assert found[("redis", "docker.io")].known_by == "its tag list"
    assert found[("redis", "docker.io")].allowed_by is None
    assert not found[("app", "quay.io")].certain
    assert found[("app", "quay.io")].known_by.startswith("could not be asked")


async def no_sleep(seconds: float) -> None:
    """Retries wait for nothing."""
