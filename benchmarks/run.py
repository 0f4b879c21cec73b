"""The mirrorrouter benchmark suite (issue 5): one run, interleaved rounds, one table of ratios.

    .venv/bin/python -m benchmarks.run [--quick] [--rounds N] [--out FILE] [--only PHASES]

Everything runs on loopback, started and stopped by this run:

- UPSTREAM: a CNCF distribution registry holding ``library/big:1`` (one uncompressed 256 MiB
  layer; 64 MiB with ``--quick``), ``library/small:1`` and ``library/huge:1`` (1 GiB; 256 MiB);
- PEER: a second distribution registry in proxy mode in front of the upstream, the
  pull-through cache mirrorrouter is compared with;
- CEILING: nginx with sendfile serving the blob file mirrorrouter committed to its cache;
- mirrorrouter with 1 worker, and with 2 workers where that can matter;
- for the proxy row: the upstream's storage served over TLS by a second registry (a test
  CA), and squid as the corporate forward proxy the gateway reaches it through (CONNECT).
- SLOW: the fault proxy of the tests answering every request after 2 s, in front of the
  upstream, as the first of two mirrors (the upstream itself is the second).
- for groups: one mirrorrouter whose group ``dev`` puts a hosted set before docker.io,
  asked for the same cached manifest through the group and through docker.io's own route.

Each round measures every contender in turn (the order rotates from round to round), so slow
drift of the machine hits all of them alike; the table shows the median and the range over
rounds, and ratios are taken within a round before they are summarised. Absolute figures
depend on the machine: compare the ratios. The JSON file holds every sample.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.clients import (
    ACCEPT_MANIFESTS,
    ClientError,
    curl_read,
    parallel_reads,
    skopeo_pull,
)
from benchmarks.peers import (
    BLOB_PATH,
    Gateway,
    NginxServer,
    RssSampler,
    cpu_seconds,
    process_name,
    process_tree,
    status_kib,
)
from benchmarks.results import Row
from benchmarks.runner import BenchBase, run_bench
from tests.support.faultproxy import FaultProxy
from tests.support.gateway import HOSTED_FIRST_GROUP
from tests.support.httpproxy import Squid
from tests.support.images import Descriptor, ImageFactory, PushedImage, api_push
from tests.support.registry import DistributionRegistry, wait_until
from tests.support.testca import issue

MIB = 1024 * 1024
GB = 1e9
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "latest.json"
COLD_CLIENTS = 10
WARM_CLIENTS = 4

NGINX = "nginx"
PEER = "peer"
MR1 = "mr-1w"
MR2 = "mr-2w"
MR_PROXY = "mr-1w-proxy"
DIRECT = "direct"
SLOW = "slow-1st"
ROUTE = "route"
GROUP_UP = "group-up"
GROUP_HOSTED = "group-hosted"
LABELS = {
    NGINX: "nginx sendfile (ceiling)",
    PEER: "peer: distribution proxy",
    MR1: "mirrorrouter, 1 worker",
    MR2: "mirrorrouter, 2 workers",
    MR_PROXY: "mirrorrouter, 1 worker, through squid",
    DIRECT: "upstream directly",
    SLOW: "mirrorrouter, slow first mirror, healthy second",
    ROUTE: "docker.io's own route",
    GROUP_UP: "group, docker.io answers (hosted member asked first)",
    GROUP_HOSTED: "group, the hosted member answers",
}
SLOW_SECONDS = 2.0  # how late the slow first mirror answers every request


@dataclass(frozen=True)
class Plan:
    quick: bool
    rounds: int
    big_size: int  # payload of the big layer (the layer is a tar: 1.5 KiB more)
    huge_size: int  # payload of the layer served for the memory measure
    wrk_duration: float
    sample_bytes: int  # what one warm-blob sample reads in all (whole GETs of the layer)
    out: Path
    keep: bool
    only: tuple[str, ...] = ()  # phases to run (PHASES keys); all when empty

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            rounds=args.rounds or (3 if quick else 5),
            big_size=(64 if quick else 256) * MIB,
            huge_size=(256 if quick else 1024) * MIB,
            wrk_duration=2.0 if quick else 5.0,
            sample_bytes=(512 if quick else 1024) * MIB,
            out=args.out,
            keep=bool(args.keep),
            only=tuple(args.only or ()),
        )


@dataclass(frozen=True)
class Target:
    """Where a contender answers: blob reads go to ``blob_path`` on ``host:port``."""

    name: str
    host: str
    port: int
    blob_path: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsUpstream:
    """The upstream's storage served over TLS, and the proxy in front of it."""

    registry: DistributionRegistry
    ca_bundle: Path
    squid: Squid

    @property
    def mirror(self) -> str:
        # 0.0.0.0: loopback names are never proxied (Go's rule, and the gateway's); 0.0.0.0
        # is not loopback, and on Linux it reaches the registry on 127.0.0.1.
        return f"https://0.0.0.0:{self.registry.port}"


@dataclass
class World:
    root: Path
    upstream: DistributionRegistry
    peer: DistributionRegistry
    big: PushedImage
    small: PushedImage
    huge: PushedImage
    layer: Descriptor  # the big layer
    huge_layer: Descriptor
    warm_cache: Path


class Bench(BenchBase):
    """One run: owns the temp directory, every server and the results."""

    world: World

    label_width = 12  # contender names in the log

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.rounds, LABELS)
        self.plan = plan

    @contextlib.contextmanager
    def gateway(
        self, name: str, cache: Path, workers: int, *, slow_first: bool = False
    ) -> Iterator[Gateway]:
        """A gateway process in front of the upstream, stopped on leaving the block;
        ``slow_first``: behind a first mirror answering every request after 2 s."""
        with contextlib.ExitStack() as stack:
            first: list[str] = []
            if slow_first:
                slow = self.start(stack, FaultProxy(self.world.upstream.url))
                slow.delay(SLOW_SECONDS)
                first.append(slow.url)
            yield self.start(
                stack,
                Gateway(
                    self.world.root / "gateways" / name,
                    self.world.upstream.url,
                    cache,
                    workers=workers,
                    first_mirrors=first,
                ),
            )

    def target(self, name: str, host: str, repo: str = "library/big") -> Target:
        address, _, port = host.partition(":")
        digest = (self.world.layer if repo == "library/big" else self.world.huge_layer).digest
        return Target(name, address, int(port), f"/v2/{repo}/blobs/{digest}")

    # -- setup ---------------------------------------------------------------------------

    def setup(self, root: Path) -> None:
        plan = self.plan
        factory = ImageFactory(root / "images")
        self.log(
            f"building images: big {plan.big_size // MIB} MiB, huge {plan.huge_size // MIB} MiB"
        )
        big = factory.large("big", size=plan.big_size, seed=6)
        huge = factory.large("huge", size=plan.huge_size, seed=8)
        small = factory.small()
        upstream = self.start(self.stack, DistributionRegistry(root / "upstream"))
        self.log(f"upstream {upstream.url}: pushing library/big:1, library/small:1, library/huge:1")
        pushed_big = factory.push(big, upstream, "library/big", "1")
        pushed_small = factory.push(small, upstream, "library/small", "1")
        pushed_huge = factory.push(huge, upstream, "library/huge", "1")
        peer = self.start(
            self.stack, DistributionRegistry(root / "peer", proxy_remoteurl=upstream.url)
        )
        self.world = World(
            root=root,
            upstream=upstream,
            peer=peer,
            big=pushed_big,
            small=pushed_small,
            huge=pushed_huge,
            layer=max(pushed_big.blobs, key=lambda b: b.size),
            huge_layer=max(pushed_huge.blobs, key=lambda b: b.size),
            warm_cache=root / "warm-cache",
        )
        self.meta["sizes"] = {
            "big_layer_bytes": self.world.layer.size,
            "huge_layer_bytes": self.world.huge_layer.size,
            "small_manifest_digest": pushed_small.digest,
        }

    def warm(self, host: str, name: str) -> None:
        """Fetch the small image's manifest (tag, digest), big's tag and its layer once."""
        world = self.world
        headers = {"Accept": ACCEPT_MANIFESTS}
        with httpx.Client(base_url=f"http://{host}", timeout=120, trust_env=False) as client:
            for path in (
                "/v2/library/small/manifests/1",
                f"/v2/library/small/manifests/{world.small.digest}",
                "/v2/library/big/manifests/1",
            ):
                response = client.get(path, headers=headers)
                if response.status_code != 200:
                    raise ClientError(f"{name} {path}: HTTP {response.status_code}")
        target = self.target(name, host)
        parallel_reads(
            target.host, target.port, target.blob_path, clients=1, expected_size=world.layer.size
        )

    def warm_peer(self) -> None:
        """Warm the peer, wait for its background copy to commit, check it serves locally."""
        world = self.world
        self.warm(world.peer.host, PEER)
        committed = True
        try:
            wait_until(
                lambda: world.peer.has_blob("library/big", world.layer.digest),
                120,
                "the peer committing the big layer",
            )
        except TimeoutError as exc:
            committed = False
            self.results.warn(f"peer: {exc}")
        since = world.upstream.mark()
        self.warm(world.peer.host, PEER)
        refetched = [r for r in world.upstream.blob_gets(since) if world.layer.digest in r.path]
        if refetched:
            self.results.warn(
                f"peer: fetched the big layer from upstream again after warming "
                f"({len(refetched)} GETs): its blob GETs were not all local"
            )
        self.meta["peer_committed_before_measuring"] = committed and not refetched

    def nginx_file(self) -> Path:
        """The blob file mirrorrouter committed (the ceiling reads the very same bytes)."""
        digest = self.world.layer.digest
        hexdigest = digest.partition(":")[2]
        path = self.world.warm_cache / "docker.io" / "blobs" / "sha256" / hexdigest[:2] / hexdigest
        if path.is_file() and path.stat().st_size == self.world.layer.size:
            self.meta["nginx_serves"] = str(path)
            return path
        copy = self.world.root / "nginx-blob"
        shutil.copyfile(self.world.big.image.blob_path(digest), copy)
        self.results.warn(f"no committed blob at {path}; nginx serves a copy of the layer")
        self.meta["nginx_serves"] = str(copy)
        return copy

    def calibrate_client(self, nginx: Target) -> None:
        """The raw-socket reader against curl, both reading from nginx (one client)."""
        size = self.world.layer.size
        ours, theirs = [], []
        for _ in range(3):
            reads = parallel_reads(
                nginx.host, nginx.port, nginx.blob_path, clients=1, expected_size=size
            )
            ours.append(reads.bytes_per_second / GB)
            got, seconds = curl_read(nginx.url + nginx.blob_path)
            if got != size:
                raise ClientError(f"curl read {got} bytes from nginx, expected {size}")
            theirs.append(size / seconds / GB)
        self.meta["client_calibration_gbps"] = {
            "socket_reader": ours,
            "curl": theirs,
        }
        self.meta["client"] = (
            f"raw-socket reader discarding with recv(MSG_TRUNC) (nginx, 1 client: "
            f"{statistics.median(ours):.2f} GB/s; curl -o /dev/null: "
            f"{statistics.median(theirs):.2f} GB/s)"
        )
        if statistics.median(ours) < statistics.median(theirs):
            self.results.warn(
                "the socket reader was slower than curl against nginx: the client may limit "
                "the blob figures"
            )

    # -- 2 and 3: warm blobs and cached manifests ------------------------------------------

    def warm_phases(self) -> None:
        world, plan, results = self.world, self.plan, self.results
        with contextlib.ExitStack() as stack:
            mr1 = self.start(
                stack,
                Gateway(
                    world.root / "gateways/warm-1w", world.upstream.url, world.warm_cache, workers=1
                ),
            )
            self.log(f"warming mirrorrouter 1 worker ({mr1.url}) and the peer ({world.peer.url})")
            self.warm(mr1.host, MR1)
            mr2 = self.start(
                stack,
                Gateway(
                    world.root / "gateways/warm-2w", world.upstream.url, world.warm_cache, workers=2
                ),
            )
            for _ in range(4):  # each worker serves some of these
                self.warm(mr2.host, MR2)
            self.warm_peer()
            # One nginx worker process against the gateway's default of one worker: the
            # same number of serving processes (the peer, a Go program, uses every core).
            nginx = self.start(
                stack,
                NginxServer(world.root / "nginx", self.nginx_file(), worker_processes="1"),
            )
            self.log(f"nginx {nginx.url} serving {self.meta['nginx_serves']}")
            pids = {NGINX: nginx.pid, PEER: world.peer.pid, MR1: mr1.pid, MR2: mr2.pid}
            targets = {
                NGINX: Target(NGINX, "127.0.0.1", nginx.port, BLOB_PATH),
                PEER: self.target(PEER, world.peer.host),
                MR1: self.target(MR1, mr1.host),
                MR2: self.target(MR2, mr2.host),
            }
            self.calibrate_client(targets[NGINX])

            size = world.layer.size
            for clients in (1, WARM_CLIENTS):
                results.measure(
                    f"blob_{clients}c",
                    f"warm blob GET, {clients} client{'s' if clients > 1 else ''}",
                    "GB/s",
                    "higher",
                )
                results.measure(
                    f"cpu_{clients}c",
                    f"server CPU per GB served, {clients} client{'s' if clients > 1 else ''}",
                    "CPU-s/GB",
                    "lower",
                )
            for kind in ("digest", "tag"):
                self.manifest_measures(f"manifest_{kind}", f"GET by {kind}")

            blob_contenders = [NGINX, PEER, MR1, MR2]
            for r in range(plan.rounds):
                self.log(f"round {r + 1}/{plan.rounds}: warm blob GETs ({size // MIB} MiB)")
                for clients in (1, WARM_CLIENTS):
                    for name in self.order(blob_contenders, r):
                        cpu: dict[str, float] = {}
                        self.attempt(
                            f"blob_{clients}c",
                            name,
                            r,
                            functools.partial(
                                self.blob_throughput, targets[name], clients, pids[name], cpu
                            ),
                            lambda v: f"{v:.2f} GB/s",
                        )
                        if "per_gb" in cpu:
                            self.attempt(
                                f"cpu_{clients}c",
                                name,
                                r,
                                lambda cpu=cpu: (cpu["per_gb"], None),
                                lambda v: f"{v:.3f} CPU-s/GB",
                            )
            manifest_contenders = [PEER, MR1, MR2]
            paths = {
                "digest": f"/v2/library/small/manifests/{world.small.digest}",
                "tag": "/v2/library/small/manifests/1",
            }
            for r in range(plan.rounds):
                self.log(
                    f"round {r + 1}/{plan.rounds}: manifest GETs "
                    f"(wrk -t2 -c32 -d{plan.wrk_duration:g}s)"
                )
                for kind in self.order(["digest", "tag"], r):
                    for name in self.order(manifest_contenders, r):
                        self.attempt(
                            f"manifest_{kind}",
                            name,
                            r,
                            functools.partial(
                                self.manifest_rate, name, kind, r, targets[name].url + paths[kind]
                            ),
                            lambda v: f"{v:.0f} req/s",
                        )

    def blob_throughput(
        self,
        target: Target,
        clients: int,
        pid: int | None = None,
        cpu: dict[str, float] | None = None,
    ) -> tuple[float, Any]:
        """GB/s of ``clients`` readers; with ``pid``, the CPU time its process tree took per
        GB served goes to ``cpu["per_gb"]``."""
        before = cpu_seconds(pid) if pid is not None else 0.0
        reads = parallel_reads(
            target.host,
            target.port,
            target.blob_path,
            clients=clients,
            repeat=max(1, round(self.plan.sample_bytes / (clients * self.world.layer.size))),
            expected_size=self.world.layer.size,
        )
        if pid is not None and cpu is not None:
            cpu["per_gb"] = (cpu_seconds(pid) - before) / (reads.total_bytes / GB)
        if target.name in (MR1, MR2):
            caches = {read.cache for read in reads.reads}
            if caches != {"HIT"}:
                self.results.warn(f"{LABELS[target.name]}: warm blob GET answered X-Cache {caches}")
        return reads.bytes_per_second / GB, reads.raw()

    # -- 3b: cached manifests through a group ----------------------------------------------

    def group_phase(self) -> None:
        """The same cached manifest through docker.io's own route and through a group whose
        hosted member comes first (it misses, docker.io answers), and a manifest the hosted
        member answers; one worker, interleaved."""
        world, plan = self.world, self.plan
        small = world.small
        for kind in ("digest", "tag"):
            self.manifest_measures(f"manifest_group_{kind}", f"GET by {kind}, group")
        with contextlib.ExitStack() as stack:
            gw = self.start(
                stack,
                Gateway(
                    world.root / "gateways/group",
                    world.upstream.url,
                    world.root / "group-cache",
                    workers=1,
                    extra=HOSTED_FIRST_GROUP,
                ),
            )
            self.log(f"group gateway {gw.url}: pushing small as dev/app:1 (to the hosted member)")
            api_push(small.image, gw.host, "dev/app", "1")
            paths = {
                (ROUTE, "digest"): f"/v2/library/small/manifests/{small.digest}",
                (ROUTE, "tag"): "/v2/library/small/manifests/1",
                (GROUP_UP, "digest"): f"/v2/dev/library/small/manifests/{small.digest}",
                (GROUP_UP, "tag"): "/v2/dev/library/small/manifests/1",
                (GROUP_HOSTED, "digest"): f"/v2/dev/app/manifests/{small.digest}",
                (GROUP_HOSTED, "tag"): "/v2/dev/app/manifests/1",
            }
            for (name, _), path in paths.items():  # the first GETs also fill the cache
                self.check_answer(gw.url + path, "team" if name == GROUP_HOSTED else "docker.io")
            for r in range(plan.rounds):
                self.log(
                    f"round {r + 1}/{plan.rounds}: group manifest GETs "
                    f"(wrk -t2 -c32 -d{plan.wrk_duration:g}s)"
                )
                for kind in self.order(["digest", "tag"], r):
                    for name in self.order([ROUTE, GROUP_UP, GROUP_HOSTED], r):
                        self.attempt(
                            f"manifest_group_{kind}",
                            name,
                            r,
                            functools.partial(
                                self.manifest_rate,
                                name,
                                f"group_{kind}",
                                r,
                                gw.url + paths[(name, kind)],
                            ),
                            lambda v: f"{v:.0f} req/s",
                        )

    def manifest_measures(self, key: str, what: str) -> None:
        """The measures of a manifest rate: requests/s, and upstream requests per GET."""
        self.results.measure(key, f"cached manifest {what}", "req/s", "higher")
        self.results.measure(
            f"{key}_upstream", f"upstream requests per manifest {what}", "per GET", "lower"
        )

    @staticmethod
    def check_answer(url: str, member: str) -> None:
        """The URL answers the small manifest from ``member`` (before it is measured)."""
        response = httpx.get(url, headers={"Accept": ACCEPT_MANIFESTS}, trust_env=False)
        if response.status_code != 200 or response.headers.get("x-upstream") != member:
            raise ClientError(
                f"{url}: HTTP {response.status_code} from {response.headers.get('x-upstream')}, "
                f"expected 200 from {member}"
            )

    # -- 4: cold pull of the big image -----------------------------------------------------

    def cold_pull_phase(self) -> None:
        plan, results = self.plan, self.results
        results.measure("cold_pull", "cold pull, skopeo copy of library/big:1", "s", "lower")
        for r in range(plan.rounds):
            self.log(f"round {r + 1}/{plan.rounds}: cold pull with skopeo")
            for name in self.order([MR1, DIRECT], r):
                self.attempt(
                    "cold_pull",
                    name,
                    r,
                    functools.partial(self.cold_pull, name, r),
                    lambda v: f"{v:.2f} s",
                )

    def slow_mirror_phase(self) -> None:
        plan, results = self.plan, self.results
        results.measure(
            "cold_pull_slow_first",
            "cold pull, skopeo copy of library/big:1, with and without a slow first mirror",
            "s",
            "lower",
        )
        for r in range(plan.rounds):
            self.log(f"round {r + 1}/{plan.rounds}: cold pull behind a slow first mirror")
            for name in self.order([MR1, SLOW], r):
                self.attempt(
                    "cold_pull_slow_first",
                    name,
                    r,
                    functools.partial(self.cold_pull, name, r),
                    lambda v: f"{v:.2f} s",
                )

    def cold_pull(
        self, name: str, round_index: int, tls: TlsUpstream | None = None
    ) -> tuple[float, Any]:
        world = self.world
        scratch = world.root / f"cold-pull-{name}-{round_index}{'-tls' if tls else ''}"
        dest = scratch / "image"
        scratch.mkdir(parents=True)
        try:
            if name == DIRECT:
                host = tls.registry.host if tls else world.upstream.host
                seconds = skopeo_pull(f"{host}/library/big:1", dest)
                raw: dict[str, Any] = {}
            elif tls is not None:
                seconds, raw = self.tls_gateway_pull(name, scratch, dest, tls)
            else:
                gateway = self.gateway(
                    f"cold-pull-{name}-{round_index}", scratch / "cache", 1, slow_first=name == SLOW
                )
                with gateway as gw:
                    since = world.upstream.mark()
                    seconds = skopeo_pull(f"{gw.host}/library/big:1", dest)
                    raw = {"upstream_blob_gets": len(world.upstream.blob_gets(since))}
                    if name == SLOW:
                        raw["hedges"] = hedges(gw.url)
            hexdigest = world.layer.digest.partition(":")[2]
            pulled = dest / hexdigest
            if not pulled.is_file() or pulled.stat().st_size != world.layer.size:
                raise ClientError(f"skopeo left no {world.layer.size}-byte layer in {dest}")
            raw["seconds"] = seconds
            return seconds, raw
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- 4b: the same cold pull over TLS, the gateway behind a real proxy ---------------------

    def proxy_pull_phase(self) -> None:
        world, plan = self.world, self.plan
        root = world.root / "tls"
        root.mkdir()
        ca = issue(root, "ca")
        leaf = issue(root, "upstream", ca, hosts=("0.0.0.0",))
        self.results.measure(
            "cold_pull_tls", "cold pull over TLS, skopeo copy of library/big:1", "s", "lower"
        )
        with contextlib.ExitStack() as stack:
            registry = self.start(
                stack,
                DistributionRegistry(
                    root / "registry",
                    extra_config={
                        "http": {
                            "tls": {"certificate": str(leaf.cert_path), "key": str(leaf.key_path)}
                        },
                        "storage": {
                            "filesystem": {"rootdirectory": str(world.upstream.storage_dir)}
                        },
                    },
                ),
            )
            tls = TlsUpstream(registry, ca.cert_path, self.start(stack, Squid()))
            self.log(f"TLS upstream {tls.mirror}, squid {tls.squid.url}")
            for r in range(plan.rounds):
                self.log(
                    f"round {r + 1}/{plan.rounds}: cold pull over TLS, direct and behind squid"
                )
                for name in self.order([MR_PROXY, MR1, DIRECT], r):
                    self.attempt(
                        "cold_pull_tls",
                        name,
                        r,
                        functools.partial(self.cold_pull, name, r, tls),
                        lambda v: f"{v:.2f} s",
                    )

    def tls_gateway_pull(
        self, name: str, scratch: Path, dest: Path, tls: TlsUpstream
    ) -> tuple[float, dict[str, Any]]:
        """A cold pull through a fresh gateway in a corporate environment (HTTP(S)_PROXY name
        squid): through squid (MR_PROXY), or directly with the upstream in NO_PROXY (MR1, the
        case that used to cost 2x); squid's log must agree with which it was."""
        env = {
            "HTTP_PROXY": tls.squid.url,
            "HTTPS_PROXY": tls.squid.url,
            "NO_PROXY": "127.0.0.1,localhost" + (",0.0.0.0" if name == MR1 else ""),
        }
        before = len(tls.squid.requests())
        with contextlib.ExitStack() as stack:
            gw = self.start(
                stack,
                Gateway(
                    scratch / "gateway",
                    tls.mirror,
                    scratch / "cache",
                    workers=1,
                    ca_bundle=tls.ca_bundle,
                    env=env,
                ),
            )
            seconds = skopeo_pull(f"{gw.host}/library/big:1", dest)
        tls.squid.sync()  # a tunnel is logged when it closes: with the gateway
        tunnels = tls.squid.requests()[before:]
        if bool(tunnels) != (name == MR_PROXY) or any(t.method != "CONNECT" for t in tunnels):
            raise ClientError(f"{LABELS[name]}: squid logged {tunnels}")
        return seconds, {"proxy_tunnels": len(tunnels)}

    # -- 5: ten concurrent cold GETs of one blob -------------------------------------------

    def cold_fanout_phase(self) -> None:
        plan, results = self.plan, self.results
        results.measure("cold_1_wall", "cold blob GET, 1 client", "s", "lower")
        results.measure(
            "cold_n_wall", f"cold blob GET, {COLD_CLIENTS} clients at once", "s", "lower"
        )
        results.measure("cold_1_upstream", "upstream blob GETs, 1 cold client", "GETs")
        results.measure(
            "cold_n_upstream", f"upstream blob GETs, {COLD_CLIENTS} cold clients", "GETs"
        )
        for r in range(plan.rounds):
            self.log(f"round {r + 1}/{plan.rounds}: cold blob GETs, 1 and {COLD_CLIENTS} clients")
            for name in self.order([MR1, MR2, PEER], r):
                for clients in (1, COLD_CLIENTS):
                    self.cold_fanout(name, clients, r)

    def cold_fanout(self, name: str, clients: int, round_index: int) -> None:
        """One fresh contender, ``clients`` concurrent GETs of the big layer, upstream count."""
        world = self.world
        tag = "1" if clients == 1 else "n"
        wall_key, count_key = f"cold_{tag}_wall", f"cold_{tag}_upstream"
        scratch = world.root / f"cold-{name}-{clients}-{round_index}"
        layer = world.layer
        try:
            with contextlib.ExitStack() as stack:
                if name == PEER:
                    peer = self.start(
                        stack,
                        DistributionRegistry(scratch / "peer", proxy_remoteurl=world.upstream.url),
                    )
                    target = self.target(name, peer.host)
                else:
                    gw = self.start(
                        stack,
                        Gateway(
                            scratch / "gateway",
                            world.upstream.url,
                            scratch / "cache",
                            workers=2 if name == MR2 else 1,
                        ),
                    )
                    target = self.target(name, gw.host)
                since = world.upstream.mark()
                reads = None

                def run() -> tuple[float, Any]:
                    nonlocal reads
                    reads = parallel_reads(
                        target.host,
                        target.port,
                        target.blob_path,
                        clients=clients,
                        expected_size=layer.size,
                    )
                    return reads.wall, reads.raw()

                self.attempt(wall_key, name, round_index, run, lambda v: f"{v:.2f} s wall")
                if reads is None:
                    return
                if name == PEER:
                    # The peer copies the blob to its storage in the background: wait for it,
                    # so that its upstream GET is counted too.
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda: peer.has_blob("library/big", layer.digest), 120)
                requests = world.upstream.requests(since)
                gets = [
                    r for r in requests if r.method == "GET" and f"/blobs/{layer.digest}" in r.path
                ]
                heads = [
                    r for r in requests if r.method == "HEAD" and f"/blobs/{layer.digest}" in r.path
                ]
                raw = {
                    "gets": [{"status": r.status, "bytes": r.size} for r in gets],
                    "heads": len(heads),
                }
                self.attempt(
                    count_key,
                    name,
                    round_index,
                    lambda: (float(len(gets)), raw),
                    lambda v: f"{v:.0f} upstream blob GETs ({len(heads)} HEADs)",
                )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- 6: memory while serving a big cached blob -----------------------------------------

    def memory_phase(self) -> None:
        world, plan, results = self.world, self.plan, self.results
        size = world.huge_layer.size
        self.log(f"filling the cache with the {size // MIB} MiB layer (not measured)")
        with self.gateway("huge-fill", world.warm_cache, 1) as gw:
            target = self.target(MR1, gw.host, "library/huge")
            parallel_reads(
                target.host, target.port, target.blob_path, clients=1, expected_size=size
            )
        results.measure(
            "rss_hwm", f"peak RSS serving {size // MIB} MiB to {WARM_CLIENTS} clients", "MiB"
        )
        results.measure("rss_sampled", "peak RSS sampled every 10 ms", "MiB")
        results.measure("rss_idle", "RSS idle, before serving", "MiB")
        results.measure("rss_gbps", "throughput while measuring memory", "GB/s")
        for r in range(plan.rounds):
            self.log(f"round {r + 1}/{plan.rounds}: memory, {WARM_CLIENTS} clients")
            for name in self.order([MR1, MR2], r):
                self.memory(name, r)

    def memory(self, name: str, round_index: int) -> None:
        world = self.world
        workers = 2 if name == MR2 else 1
        with self.gateway(f"rss-{name}-{round_index}", world.warm_cache, workers) as gw:
            pids = process_tree(gw.pid)
            idle = sum(status_kib(p, "VmRSS") or 0 for p in pids)
            target = self.target(name, gw.host, "library/huge")
            with RssSampler(gw.pid) as sampler:
                reads = None

                def serve() -> tuple[float, Any]:
                    nonlocal reads
                    reads = parallel_reads(
                        target.host,
                        target.port,
                        target.blob_path,
                        clients=WARM_CLIENTS,
                        expected_size=world.huge_layer.size,
                    )
                    return reads.bytes_per_second / GB, reads.raw()

                self.attempt("rss_gbps", name, round_index, serve, lambda v: f"{v:.2f} GB/s")
            if reads is None:
                return
            caches = {read.cache for read in reads.reads}
            if caches != {"HIT"}:
                self.results.warn(f"{LABELS[name]}: memory run answered X-Cache {caches}")
            processes = {
                str(p): {
                    "cmd": process_name(p),
                    "VmHWM_kib": status_kib(p, "VmHWM"),
                    "VmRSS_kib": status_kib(p, "VmRSS"),
                }
                for p in process_tree(gw.pid)
            }
            hwm = sum(int(info["VmHWM_kib"] or 0) for info in processes.values())
            raw = {"processes": processes, "samples": sampler.samples}
            self.attempt(
                "rss_hwm", name, round_index, lambda: (hwm / 1024, raw), lambda v: f"{v:.0f} MiB"
            )
            self.attempt(
                "rss_sampled",
                name,
                round_index,
                lambda: (sampler.peak_kib / 1024, {"samples": sampler.samples}),
                lambda v: f"{v:.0f} MiB sampled",
            )
            self.attempt(
                "rss_idle", name, round_index, lambda: (idle / 1024, None), lambda v: f"{v:.0f} MiB"
            )

    # -- the table -----------------------------------------------------------------------

    def rows(self) -> list[Row]:
        big = f"{self.world.layer.size // MIB} MiB"
        huge = f"{self.world.huge_layer.size // MIB} MiB"
        rows: list[Row] = []
        for clients in (1, WARM_CLIENTS):
            section = f"warm blob GET {big}, {clients} client{'s' if clients > 1 else ''}"
            key = f"blob_{clients}c"
            for name in (NGINX, PEER, MR1, MR2):
                rows.append(Row(section, LABELS[name], key, name, "GB/s"))
            for name in (MR1, MR2):
                for base in (NGINX, PEER):
                    rows.append(
                        Row(section, f"ratio {name} / {base}", key, name, "x", over=(key, base))
                    )
            cpu = f"cpu_{clients}c"
            for name in (NGINX, PEER, MR1, MR2):
                rows.append(
                    Row(section, f"CPU per GB: {LABELS[name]}", cpu, name, "CPU-s/GB", digits=3)
                )
            for name in (MR1, MR2):
                for base in (NGINX, PEER):
                    rows.append(
                        Row(
                            section,
                            f"CPU per GB ratio {name} / {base} (lower is better)",
                            cpu,
                            name,
                            "x",
                            over=(cpu, base),
                        )
                    )
        for kind in ("digest", "tag"):
            section = f"manifest GET by {kind}" + (" (within TTL)" if kind == "tag" else "")
            key = f"manifest_{kind}"
            for name in (PEER, MR1, MR2):
                rows.append(Row(section, LABELS[name], key, name, "req/s", digits=0))
            for name in (MR1, MR2):
                rows.append(Row(section, f"ratio {name} / peer", key, name, "x", over=(key, PEER)))
            rows += upstream_rows(section, key, (PEER, MR1, MR2))
        for kind in ("digest", "tag"):
            section = f"manifest GET by {kind} through a group, 1 worker" + (
                " (within TTL)" if kind == "tag" else ""
            )
            key = f"manifest_group_{kind}"
            for name in (ROUTE, GROUP_UP, GROUP_HOSTED):
                rows.append(Row(section, LABELS[name], key, name, "req/s", digits=0))
            for name in (GROUP_UP, GROUP_HOSTED):
                rows.append(
                    Row(section, f"ratio {name} / {ROUTE}", key, name, "x", over=(key, ROUTE))
                )
            rows += upstream_rows(section, key, (ROUTE, GROUP_UP, GROUP_HOSTED))
        section = f"cold pull of big:1 ({big} layer), skopeo"
        rows.append(Row(section, LABELS[DIRECT], "cold_pull", DIRECT, "s"))
        rows.append(Row(section, "through mirrorrouter, 1 worker", "cold_pull", MR1, "s"))
        rows.append(
            Row(
                section,
                "ratio gateway / direct (lower is better)",
                "cold_pull",
                MR1,
                "x",
                over=("cold_pull", DIRECT),
            )
        )
        section = f"cold pull of big:1 ({big} layer) over TLS, skopeo"
        rows.append(Row(section, LABELS[DIRECT], "cold_pull_tls", DIRECT, "s"))
        rows.append(
            Row(section, "through mirrorrouter, upstream in NO_PROXY", "cold_pull_tls", MR1, "s")
        )
        rows.append(
            Row(section, "through mirrorrouter behind squid", "cold_pull_tls", MR_PROXY, "s")
        )
        for name, base, label in (
            (MR_PROXY, DIRECT, "ratio behind squid / direct"),
            (MR1, DIRECT, "ratio NO_PROXY / direct"),
            (MR_PROXY, MR1, "ratio behind squid / NO_PROXY"),
        ):
            rows.append(
                Row(
                    section,
                    f"{label} (lower is better)",
                    "cold_pull_tls",
                    name,
                    "x",
                    over=("cold_pull_tls", base),
                )
            )
        section = f"cold pull of big:1 ({big} layer), first mirror answers after 2 s"
        measure = "cold_pull_slow_first"
        rows.append(Row(section, "mirrorrouter, one healthy mirror", measure, MR1, "s"))
        rows.append(Row(section, "slow first mirror, healthy second", measure, SLOW, "s"))
        rows.append(
            Row(
                section,
                "ratio slow first / healthy (lower is better)",
                measure,
                SLOW,
                "x",
                over=(measure, MR1),
            )
        )
        section = f"cold blob GET {big}, {COLD_CLIENTS} clients vs 1"
        for name in (MR1, MR2, PEER):
            rows.append(Row(section, f"{name} wall, 1 client", "cold_1_wall", name, "s"))
            rows.append(
                Row(section, f"{name} wall, {COLD_CLIENTS} clients", "cold_n_wall", name, "s")
            )
            rows.append(
                Row(
                    section,
                    f"{name} ratio {COLD_CLIENTS} / 1 (lower is better)",
                    "cold_n_wall",
                    name,
                    "x",
                    over=("cold_1_wall", name),
                )
            )
            rows.append(
                Row(
                    section,
                    f"{name} upstream blob GETs, {COLD_CLIENTS} clients",
                    "cold_n_upstream",
                    name,
                    "GETs",
                    digits=0,
                )
            )
        section = f"gateway memory, {huge} cached blob to {WARM_CLIENTS} clients"
        for name in (MR1, MR2):
            workers = "process" if name == MR1 else "sum over processes"
            rows.append(Row(section, f"{name} idle RSS", "rss_idle", name, "MiB", digits=0))
            rows.append(
                Row(
                    section, f"{name} peak RSS (VmHWM, {workers})", "rss_hwm", name, "MiB", digits=0
                )
            )
            rows.append(
                Row(
                    section,
                    f"{name} peak RSS (10 ms samples)",
                    "rss_sampled",
                    name,
                    "MiB",
                    digits=0,
                )
            )
        # Phases left out with --only measured nothing: their rows go.
        measured = self.results.measures
        return [
            r for r in rows if r.measure in measured and (r.over is None or r.over[0] in measured)
        ]

    def document(self, rows: list[Row], complete: bool) -> dict[str, Any]:
        return {
            "schema": 1,
            "complete": complete,
            "quick": self.plan.quick,
            "rounds": self.plan.rounds,
            "meta": self.meta,
            "summary": self.results.summary(rows) if rows else [],
            "measures": {k: m.to_json() for k, m in self.results.measures.items()},
            "warnings": self.results.warnings,
        }


def hedges(gateway_url: str) -> float:
    """``mirrorrouter_hedges_total`` on a gateway's /metrics, summed over its mirrors."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=10, trust_env=False).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mirrorrouter_hedges_total"
    )


def upstream_rows(section: str, key: str, contenders: Sequence[str]) -> list[Row]:
    """The rows of the upstream requests each contender made per manifest GET of ``key``."""
    return [
        Row(section, f"{name}: upstream requests per GET", f"{key}_upstream", name, "req", digits=3)
        for name in contenders
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="64 MiB layer, 256 MiB for memory, 3 rounds, 2 s wrk runs (about 2 minutes)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(PHASES),
        help="run only this phase (repeatable); default: all of them",
    )
    args = parser.parse_args(argv)  # choices= refuses unknown phases
    if args.rounds is not None and not 1 <= args.rounds <= 50:
        parser.error("--rounds must be between 1 and 50")
    return args


# --only KEY: (the phase's name, its method)
PHASES = {
    "warm": ("warm blobs and manifests", "warm_phases"),
    "cold": ("cold pull", "cold_pull_phase"),
    "proxy": ("cold pull over TLS through a proxy", "proxy_pull_phase"),
    "slow": ("slow first mirror", "slow_mirror_phase"),
    "group": ("group manifests", "group_phase"),
    "fanout": ("cold fan-out", "cold_fanout_phase"),
    "memory": ("memory", "memory_phase"),
}


def main(argv: Sequence[str] | None = None) -> int:
    plan = Plan.from_args(parse_args(argv))
    bench = Bench(plan)
    phases = [
        (name, getattr(bench, method))
        for key, (name, method) in PHASES.items()
        if not plan.only or key in plan.only
    ]
    return run_bench(
        bench,
        plan,
        prefix="mirrorrouter-bench-",
        repo_root=REPO_ROOT,
        phases=phases,
        report=lambda rows: print_report(bench, rows),
    )


def print_report(bench: Bench, rows: list[Row]) -> None:
    meta, plan = bench.meta, bench.plan
    print()
    print(
        f"mirrorrouter benchmarks{' (--quick)' if plan.quick else ''}: "
        f"{meta['cores']} CPU cores, {meta['memory_gib']} GiB, Linux {meta['kernel']}, "
        f"Python {meta['python']}; {plan.rounds} interleaved rounds in {meta['duration_s']:.0f} s"
    )
    print(
        "Every figure comes from this one run on this machine; the absolute numbers are not "
        "portable, the ratios are."
    )
    print(
        "Median [min, max] over rounds; a ratio is taken within each round, then summarised. "
        "Higher is better unless a row says otherwise."
    )
    if "client" in meta:
        print(f"Blob client: {meta['client']}.")
    shares = meta.get("foreign_cpu_share", {})
    if shares:
        print(
            "CPU taken by other processes: "
            + ", ".join(f"{name} {share:.1%}" for name, share in shares.items())
            + " of the machine."
        )
    print()
    if rows:
        print(bench.results.table(rows))
    if bench.results.warnings:
        print()
        print("Warnings:")
        for warning in bench.results.warnings:
            print(f"  - {warning}")
    print()
    print(f"Samples: {plan.out}")


if __name__ == "__main__":
    sys.exit(main())
