"""Hostile and flaky upstreams, driven through the real gateway process: a registry that
redirects blobs to a CDN with signed, expiring URLs (tests/support/cdn.py) and an upstream
sending huge bodies and off-host redirects (tests/support/hostile.py).

Everything is proven by what the receiving servers logged: credentials and tokens never
reach the CDN, its realm or an off-host target; redirect targets' failures are asked of
the registry again and end in verified blobs; memory stays flat while 600 MB is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.cdn import RedirectingUpstream
from tests.support.clients import Skopeo
from tests.support.gateway import GatewayProcess
from tests.support.hostile import Collector, HostileUpstream
from tests.support.images import Descriptor, ImageFactory, PushedImage
from tests.support.registry import DistributionRegistry

pytestmark = pytest.mark.real

MIB = 1024 * 1024
PASSWORD = "hunter2-never-leaves"
BASIC = base64.b64encode(f"bob:{PASSWORD}".encode()).decode()


@dataclass
class Stocked:
    registry: DistributionRegistry
    small: PushedImage
    mid: PushedImage

    @property
    def layer(self) -> Descriptor:
        return max(self.mid.blobs, key=lambda b: b.size)


@pytest.fixture(scope="module")
def stocked(tmp_path_factory: pytest.TempPathFactory, factory: ImageFactory) -> Iterator[Stocked]:
    """A distribution registry with a small image and one with a 24 MiB layer (read-only)."""
    with DistributionRegistry(tmp_path_factory.mktemp("cdn-backend")) as registry:
        small = factory.push(factory.small(), registry, "library/small", "1")
        mid = factory.push(factory.large("mid", size=24 * MIB), registry, "library/mid", "1")
        yield Stocked(registry, small, mid)


@pytest.fixture
def upstream_cdn(tmp_path: Path, stocked: Stocked) -> Iterator[RedirectingUpstream]:
    """Realm, CDN and registry front of this test's own over the stocked registry."""
    with RedirectingUpstream(
        tmp_path / "upstream",
        stocked.registry.url,
        stocked.registry.storage_dir,
        users={"bob": PASSWORD},
    ) as upstream:
        yield upstream


def gateway(
    tmp_path: Path, mirror: str, policy: str = "", ca: Path | None = None
) -> GatewayProcess:
    """The gateway with docker.io on ``mirror``, bob's credentials, and ``ca`` trusted."""
    config = f"""
[cache]
directory = "{tmp_path / "cache"}"
[upstreams."docker.io"]
mirrors = [{{ url = "{mirror}" }}]
{policy}
[upstreams."docker.io".credentials]
username = "bob"
password_env = "HUB_PASSWORD"
"""
    if ca is not None:
        config += f'[upstreams."docker.io".tls]\nca_bundle = "{ca}"\n'
    return GatewayProcess(tmp_path / "gw", config, env={"HUB_PASSWORD": PASSWORD})


def gateway_for(tmp_path: Path, upstream: RedirectingUpstream, policy: str = "") -> GatewayProcess:
    return gateway(tmp_path, upstream.url, policy, upstream.ca.ca_path)


def fetch_digest(url: str) -> str:
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=60) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def assert_nothing_leaked(upstream: RedirectingUpstream) -> None:
    """The CDN got no Authorization, no password, no token; its realm got no request."""
    received = upstream.cdn.log.text()
    assert all("authorization" not in s.headers for s in upstream.cdn.log.all())
    assert PASSWORD not in received and BASIC not in received
    assert not any(token in received for token in upstream.realm.tokens)
    assert upstream.cdn.realm_log.all() == []


# ---------------------------------------------------------------------- credentials stay home


def test_skopeo_pulls_through_a_cdn_that_never_sees_credentials(
    tmp_path: Path, stocked: Stocked, upstream_cdn: RedirectingUpstream
) -> None:
    """skopeo pulls an image whose blobs come from the CDN: digests match, every blob was
    asked of the registry once and fetched from the CDN once, without any credentials."""
    with gateway_for(tmp_path, upstream_cdn) as gateway:
        copied = Skopeo().copy_to_local(f"{gateway.host}/library/small:1", tmp_path / "out")
    assert copied.manifest_digest == stocked.small.digest
    assert copied.blob_digests == {b.digest for b in stocked.small.blobs}
    cdn_gets = sorted(s.path for s in upstream_cdn.cdn.log.all())
    assert cdn_gets == sorted(f"/blobs/{b.digest}" for b in stocked.small.blobs)
    assert len(upstream_cdn.front.blob_gets()) == len(stocked.small.blobs)
    assert_nothing_leaked(upstream_cdn)
    realm = upstream_cdn.realm.log.all()
    assert realm and all(s.headers["authorization"] == f"Basic {BASIC}" for s in realm)


@pytest.mark.parametrize("challenge", ["bearer", "basic"])
def test_a_cdn_challenge_is_never_answered_and_counts_against_the_mirror(
    tmp_path: Path, stocked: Stocked, upstream_cdn: RedirectingUpstream, challenge: str
) -> None:
    """A CDN answering 401 with its own Bearer realm or Basic challenge gets no credentials
    and its realm no request; each try asks the registry again; after breaker_failures
    failed pulls the mirror's circuit is open, and the next pull is the one probe of it
    (every circuit open: issue 14 item 9), which fails the same way."""
    upstream_cdn.cdn.challenge = challenge
    blob = stocked.small.blobs[0]
    policy = "retry_attempts = 2\nbreaker_failures = 2"
    with gateway_for(tmp_path, upstream_cdn, policy) as gateway:
        url = f"{gateway.url}/v2/library/small/blobs/{blob.digest}"
        failed = [httpx.get(url, timeout=30) for _ in range(2)]
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=30).text
        asked_before_probe = len(upstream_cdn.front.blob_gets())
        probe = httpx.get(url, timeout=30)
    assert_nothing_leaked(upstream_cdn)
    assert [r.status_code for r in [*failed, probe]] == [503, 503, 503]
    tried = [
        json.loads(r.content)["errors"][0]["detail"]["tried"][0]["result"] for r in [*failed, probe]
    ]
    assert tried == [f"redirect target {upstream_cdn.cdn.url} answered HTTP 401"] * 3
    assert asked_before_probe == 4  # two pulls of two tries each
    open_circuit = [
        line
        for line in metrics.splitlines()
        if line.startswith("mirrorrouter_circuit_state{") and line.endswith(" 2.0")
    ]
    assert len(open_circuit) == 1, metrics


# ---------------------------------------------------------------------- redirect targets failing


def test_an_expired_url_is_asked_for_again(
    tmp_path: Path, stocked: Stocked, upstream_cdn: RedirectingUpstream
) -> None:
    """A signed URL that expired before it was used (403): the registry is asked again, the
    fresh URL serves a blob whose digest matches; a mirror handing out only expired URLs
    is asked retry_attempts times, and the client gets 503, not BLOB_UNKNOWN."""
    layer = stocked.layer
    upstream_cdn.front.expire_next = 1
    with gateway_for(tmp_path, upstream_cdn) as gateway:
        assert fetch_digest(f"{gateway.url}/v2/library/mid/blobs/{layer.digest}") == layer.digest
        assert [s.status for s in upstream_cdn.cdn.log.all()] == [403, 200]
        assert len(upstream_cdn.front.blob_gets()) == 2
        upstream_cdn.front.url_ttl = -60  # every URL from now on is expired on arrival
        config = stocked.mid.blobs[0] if stocked.mid.blobs[0] != layer else stocked.mid.blobs[1]
        refused = httpx.get(f"{gateway.url}/v2/library/mid/blobs/{config.digest}", timeout=30)
    assert refused.status_code == 503
    assert json.loads(refused.content)["errors"][0]["code"] == "UNAVAILABLE"
    assert len(upstream_cdn.front.blob_gets()) == 2 + 3  # retry_attempts, then given up
    assert_nothing_leaked(upstream_cdn)


@pytest.mark.parametrize("fault", ["403", "503", "cut"])
def test_cdn_failures_with_a_healthy_registry_end_in_a_good_pull(
    tmp_path: Path, stocked: Stocked, upstream_cdn: RedirectingUpstream, fault: str
) -> None:
    """A CDN refusing (403), failing (503, twice) or cutting the body 8 MiB in: the blob
    arrives whole and verified; each new CDN request came from a new registry answer, a
    cut one resuming with Range where it broke."""
    layer = stocked.layer
    cdn = upstream_cdn.cdn
    if fault == "cut":
        cdn.cut_after(8 * MIB)
    else:
        cdn.fail(int(fault), times=1 if fault == "403" else 2)
    with gateway_for(tmp_path, upstream_cdn) as gateway:
        assert fetch_digest(f"{gateway.url}/v2/library/mid/blobs/{layer.digest}") == layer.digest
    cdn_requests = cdn.log.all()
    assert len(upstream_cdn.front.blob_gets()) == len(cdn_requests)
    if fault == "cut":
        assert [s.status for s in cdn_requests] == [200, 206]
        offset = int(cdn_requests[1].headers["range"].removeprefix("bytes=").rstrip("-"))
        assert 4 * MIB <= offset <= 8 * MIB
    else:
        assert len(cdn_requests) == (2 if fault == "403" else 3)
    assert_nothing_leaked(upstream_cdn)


# ---------------------------------------------------------------------- a hostile upstream


@pytest.fixture
def hostile() -> Iterator[HostileUpstream]:
    """A hostile upstream wanting bob's Basic credentials, and the collector it redirects to."""
    collector = Collector()
    upstream = HostileUpstream(collector, user=("bob", PASSWORD))
    with collector.server, upstream.server:
        yield upstream


def hostile_gateway(tmp_path: Path, upstream: HostileUpstream, policy: str = "") -> GatewayProcess:
    return gateway(tmp_path, upstream.server.url, policy)


def memory(gateway: GatewayProcess) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of the gateway process, in bytes."""
    assert gateway.process is not None
    status = Path(f"/proc/{gateway.process.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith("Vm"))
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}


def test_memory_stays_flat_while_600_mb_error_bodies_are_refused(
    tmp_path: Path, hostile: HostileUpstream
) -> None:
    """Error answers with 600 MB bodies (a 400 read for its error code, a 500 retried)
    are read to a few KiB: the client gets 503, the gateway's peak memory stays within
    64 MiB of where it was (and under 256 MiB), and the upstream sent a sliver of each."""
    with hostile_gateway(tmp_path, hostile, "retry_attempts = 2") as gateway:
        assert httpx.get(f"{gateway.url}/v2/library/warm/manifests/1").status_code == 404
        before = memory(gateway)
        for status in (400, 500):
            hostile.error_status = status
            answer = httpx.get(f"{gateway.url}/v2/huge-error/app/manifests/1", timeout=60)
            assert answer.status_code == 503
        after = memory(gateway)
    sent = hostile.sent_to("/v2/huge-error/")
    assert len(sent) == 3  # the 400 once, the 500 twice (retry_attempts)
    assert all(n < 32 * MIB for n in sent), sent
    assert after["VmHWM"] - before["VmRSS"] < 64 * MIB, (before, after)
    assert after["VmHWM"] < 256 * MIB


def test_a_huge_tag_list_is_an_upstream_failure(tmp_path: Path, hostile: HostileUpstream) -> None:
    """A 64 MiB tag list is read to max_list_bytes and refused: 503 with the reason."""
    policy = 'max_list_bytes = "1MiB"\nretry_attempts = 1'
    with hostile_gateway(tmp_path, hostile, policy) as gateway:
        answer = httpx.get(f"{gateway.url}/v2/huge-tags/app/tags/list", timeout=60)
    assert answer.status_code == 503
    result = json.loads(answer.content)["errors"][0]["detail"]["tried"][0]["result"]
    assert result == "tag list (max_list_bytes) is over the 1 MiB limit"
    assert all(n < 32 * MIB for n in hostile.sent_to("/tags/list"))


def test_off_host_redirects_of_tags_and_referrers_are_refused(
    tmp_path: Path, hostile: HostileUpstream
) -> None:
    """Tag lists and referrers redirected to another host are refused before it is asked:
    the collector never receives a request, let alone the credentials, and the client gets
    an error, never the collector's document."""
    digest = "sha256:" + "a" * 64
    with hostile_gateway(tmp_path, hostile, "retry_attempts = 1") as gateway:
        tags = httpx.get(f"{gateway.url}/v2/moved/app/tags/list", timeout=30)
        referrers = httpx.get(f"{gateway.url}/v2/moved/app/referrers/{digest}", timeout=30)
    for answer in (tags, referrers):
        assert answer.status_code == 503 and b"internal-secret" not in answer.content
        result = json.loads(answer.content)["errors"][0]["detail"]["tried"][0]["result"]
        assert result.startswith(f"redirect to {hostile.collector.server.url} refused")
    assert hostile.collector.log.all() == []
    assert [s.status for s in hostile.log.all() if "/moved/" in s.path][-2:] == [307, 307]
