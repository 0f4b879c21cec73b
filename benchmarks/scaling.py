"""What ONE mirrorrouter replica on the shared backends (S3 + Redis) sustains, as ratios against
the same gateway on the embedded filesystem backend, side by side in one run.

    .venv/bin/python -m benchmarks.scaling [--quick] [--rounds N] [--out FILE]

Everything runs on loopback, started and stopped by this run:

- UPSTREAM: a CNCF distribution registry holding ``library/big:1`` (one uncompressed 256 MiB
  layer; 64 MiB with ``--quick``) and ``library/small:1``;
- SeaweedFS (``weed mini``: the S3 store) and redis-server, shared by the replicas;
- ``fs``: mirrorrouter, 1 worker, filesystem cache (the baseline);
- ``s3-local``: a replica (1 worker, s3 + redis) that fetched the layer itself and serves its
  local copy; ``s3-bucket``: a second replica that never fetched it (every read comes from
  the bucket: the local copy a whole read leaves is removed before each read);
  ``s3-redirect``: a third with ``redirect = true`` (the client
  follows the 307 to SeaweedFS); ``seaweed``: the presigned URL read straight from SeaweedFS,
  the store's own ceiling;
- cold: 10 concurrent clients GET the uncached layer from 1 fresh ``fs`` gateway, or spread
  over 3 fresh s3 + redis replicas (a fresh key prefix in the bucket and in Redis), counting
  the upstream's blob GETs in its access log.

Each round measures every contender in turn (the order rotates), the table shows median and
range over rounds, ratios are taken within a round. Absolute figures depend on the machine
(2 cores shared by the gateway, SeaweedFS, Redis and the clients): compare the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import http.client
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import obstore
from obstore.exceptions import NotFoundError

from benchmarks.clients import (
    ACCEPT_MANIFESTS,
    ClientError,
    ParallelReads,
    Read,
    get_discard,
    run_parallel,
)
from benchmarks.peers import Gateway
from benchmarks.results import Row
from benchmarks.runner import BenchBase, kinds, run_bench, settle
from tests.support.gateway import GatewayProcess
from tests.support.images import Descriptor, ImageFactory, PushedImage
from tests.support.redisserver import RedisServer
from tests.support.registry import DistributionRegistry, wait_until
from tests.support.seaweed import SeaweedS3

MIB = 1024 * 1024
MB = 1e6
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
COLD_CLIENTS = 10
WARM_CLIENTS = 4
REPLICAS = 3

FS = "fs"
S3_LOCAL = "s3-local"
S3_BUCKET = "s3-bucket"
S3_REDIRECT = "s3-redirect"
SEAWEED = "seaweed"
S3_CLUSTER = "s3x3"
LABELS = {
    FS: "fs: filesystem gateway, 1 worker",
    S3_LOCAL: "s3-local: replica, its local copy",
    S3_BUCKET: "s3-bucket: replica, no local copy",
    S3_REDIRECT: "s3-redirect: 307 to SeaweedFS",
    SEAWEED: "seaweed: presigned GET (ceiling)",
    S3_CLUSTER: f"s3x3: {REPLICAS} s3+redis replicas",
}
S3_ENV_KEY, S3_ENV_SECRET = "MR_BENCH_S3_KEY", "MR_BENCH_S3_SECRET"


@dataclass(frozen=True)
class Plan:
    quick: bool
    rounds: int
    big_size: int
    wrk_duration: float
    sample_bytes: int  # what one warm-blob sample reads in all
    out: Path
    keep: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        out = args.out or RESULTS_DIR / f"scaling-{dt.date.today().isoformat()}.json"
        return cls(
            quick=quick,
            rounds=args.rounds or (3 if quick else 5),
            big_size=(64 if quick else 256) * MIB,
            wrk_duration=2.0 if quick else 5.0,
            sample_bytes=(256 if quick else 1024) * MIB,
            out=out,
            keep=bool(args.keep),
        )


@dataclass
class World:
    root: Path
    upstream: DistributionRegistry
    seaweed: SeaweedS3
    redis: RedisServer
    big: PushedImage
    small: PushedImage
    layer: Descriptor


# -- clients -------------------------------------------------------------------------------


def redirect_location(host: str, port: int, path: str, timeout: float = 60.0) -> tuple[str, str]:
    """GET ``path`` without following: the 307's Location and its X-Cache header."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": "mirrorrouter-bench"})
        response = connection.getresponse()
        response.read()
        location = response.getheader("Location")
        if response.status != 307 or not location:
            raise ClientError(f"GET {path}: HTTP {response.status}, expected a 307 redirect")
        return location, response.getheader("X-Cache") or ""
    finally:
        connection.close()


def split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port, target


def follow_read(host: str, port: int, path: str) -> Read:
    """One whole-blob GET through a redirect: the 307, then the object store's answer."""
    started = time.perf_counter()
    location, cache = redirect_location(host, port, path)
    read = get_discard(*split_url(location))
    return Read(
        read.status, read.body_bytes, read.finished - started, cache, started, read.finished
    )


def bucket_read(spool: Path, host: str, port: int, path: str) -> Read:
    """One whole-blob GET of a replica that has no local copy of it: the copy a previous
    read kept (a whole read from the bucket warms one, cache/objectstore/writers.py) is
    removed first, as if this replica had never served the blob. Unlinking is safe: the
    replica forgets a copy that is gone, and a reader that has it open keeps its inode."""
    for copy in spool.glob("*/copies/*/*"):  # <upstream>/copies/<owner>/<blob>
        copy.unlink(missing_ok=True)
    return get_discard(host, port, path)


def tree_bytes(path: Path, *, within: str = "") -> int:
    """Bytes of the files below ``path`` (only those below a directory named ``within``)."""
    if not path.exists():
        return 0
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and (not within or within in p.relative_to(path).parts[:-1])
    )


# -- the run -------------------------------------------------------------------------------


class Bench(BenchBase):
    """One run: owns the temp directory, every server and the results."""

    world: World
    redirect_port: int  # the s3-redirect replica, which hands out presigned URLs

    label_width = 11  # contender names in the log

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.rounds, LABELS)
        self.plan = plan

    def blob_path(self) -> str:
        return f"/v2/library/big/blobs/{self.world.layer.digest}"

    def blob_key(self, prefix: str) -> str:
        """The layer's object in the bucket (``<prefix>/<upstream>/blobs/<alg>/<hex>``)."""
        algorithm, _, hexdigest = self.world.layer.digest.partition(":")
        return f"{prefix}/docker.io/blobs/{algorithm}/{hexdigest}"

    def in_bucket(self, prefix: str) -> bool:
        try:
            meta = obstore.head(self.world.seaweed.store(retries=0), self.blob_key(prefix))
        except (NotFoundError, FileNotFoundError):
            return False
        return int(meta["size"]) == self.world.layer.size

    def replica(
        self, stack: contextlib.ExitStack, name: str, prefix: str, **kw: Any
    ) -> GatewayProcess:
        return self.start(stack, self._replica(name, prefix, **kw))

    def _replica(self, name: str, prefix: str, *, redirect: bool = False) -> GatewayProcess:
        world = self.world
        workdir = world.root / "gateways" / name
        gateway = GatewayProcess(
            workdir,
            "",
            env={S3_ENV_KEY: world.seaweed.access_key, S3_ENV_SECRET: world.seaweed.secret_key},
        )
        gateway.config_path.write_text(
            f"""
[server]
workers = 1
[cache]
backend = "s3"
directory = "{workdir / "spool"}"
[cache.s3]
bucket = "{world.seaweed.bucket}"
endpoint = "{world.seaweed.endpoint}"
prefix = "{prefix}"
access_key_id_env = "{S3_ENV_KEY}"
secret_access_key_env = "{S3_ENV_SECRET}"
redirect = {"true" if redirect else "false"}
[upstreams."docker.io"]
mirrors = [{{ url = "{world.upstream.url}" }}]
tag_ttl = "10m"
[coordination]
backend = "redis"
redis_url = "{world.redis.redis_url}"
key_prefix = "{prefix}"
lock_ttl = "30s"
advertise_url = "http://127.0.0.1:{gateway.port}"
"""
        )
        return gateway

    # -- setup ---------------------------------------------------------------------------

    def setup(self, root: Path) -> None:
        plan = self.plan
        factory = ImageFactory(root / "images")
        self.log(f"building images: big {plan.big_size // MIB} MiB")
        big = factory.large("big", size=plan.big_size, seed=6)
        small = factory.small()
        upstream = self.start(self.stack, DistributionRegistry(root / "upstream"))
        self.log(f"upstream {upstream.url}: pushing library/big:1, library/small:1")
        pushed_big = factory.push(big, upstream, "library/big", "1")
        pushed_small = factory.push(small, upstream, "library/small", "1")
        seaweed = self.start(self.stack, SeaweedS3(root / "seaweed", startup_timeout=60))
        redis = self.start(self.stack, RedisServer(root / "redis"))
        self.log(f"SeaweedFS S3 {seaweed.endpoint}, redis {redis.redis_url}")
        self.world = World(
            root=root,
            upstream=upstream,
            seaweed=seaweed,
            redis=redis,
            big=pushed_big,
            small=pushed_small,
            layer=max(pushed_big.blobs, key=lambda b: b.size),
        )
        self.meta["sizes"] = {"big_layer_bytes": self.world.layer.size}

    def warm(self, host: str, name: str, *, redirect: bool = False) -> None:
        """The small image's manifest by tag and digest, big's tag, and one read of the layer."""
        world = self.world
        with httpx.Client(base_url=f"http://{host}", timeout=120, trust_env=False) as client:
            for path in (
                "/v2/library/small/manifests/1",
                f"/v2/library/small/manifests/{world.small.digest}",
                "/v2/library/big/manifests/1",
            ):
                response = client.get(path, headers={"Accept": ACCEPT_MANIFESTS})
                if response.status_code != 200:
                    raise ClientError(f"{name} {path}: HTTP {response.status_code}")
        address, _, port = host.partition(":")
        job = functools.partial(
            follow_read if redirect else get_discard, address, int(port), self.blob_path()
        )
        run_parallel([job], expected_size=world.layer.size)

    # -- warm blobs and cached manifests ---------------------------------------------------

    def warm_phases(self) -> None:
        world, plan, results = self.world, self.plan, self.results
        prefix = f"warm-{uuid.uuid4().hex[:8]}"
        with contextlib.ExitStack() as stack:
            fs = self.start(
                stack,
                Gateway(
                    world.root / "gateways/fs",
                    world.upstream.url,
                    world.root / "fs-cache",
                    workers=1,
                ),
            )
            local = self.replica(stack, "s3-local", prefix)
            self.log(f"warming fs ({fs.url}) and s3-local ({local.url}) from upstream")
            self.warm(fs.host, FS)
            self.warm(local.host, S3_LOCAL)
            wait_until(lambda: self.in_bucket(prefix), 120, "the layer committed to the bucket")
            copies = tree_bytes(world.root / "gateways/s3-local/spool", within="copies")
            self.meta["s3_local_copy_bytes"] = copies
            if copies < world.layer.size:
                results.warn(f"s3-local keeps {copies} bytes of local copies: not the layer")
            bucket = self.replica(stack, "s3-bucket", prefix)
            redirect = self.replica(stack, "s3-redirect", prefix, redirect=True)
            since = world.upstream.mark()
            self.warm(bucket.host, S3_BUCKET)
            self.warm(redirect.host, S3_REDIRECT, redirect=True)
            shared = settle(world.upstream, since)
            self.meta["upstream_requests_warming_other_replicas"] = kinds(shared)
            if shared:
                results.warn(
                    f"warming s3-bucket and s3-redirect asked the upstream {len(shared)} times"
                )

            self.redirect_port = redirect.port
            path = self.blob_path()
            jobs: dict[str, Callable[[], Read]] = {
                FS: functools.partial(get_discard, "127.0.0.1", fs.port, path),
                S3_LOCAL: functools.partial(get_discard, "127.0.0.1", local.port, path),
                S3_BUCKET: functools.partial(
                    bucket_read,
                    world.root / "gateways/s3-bucket/spool",
                    "127.0.0.1",
                    bucket.port,
                    path,
                ),
                S3_REDIRECT: functools.partial(follow_read, "127.0.0.1", redirect.port, path),
            }
            for clients in (1, WARM_CLIENTS):
                results.measure(
                    f"blob_{clients}c",
                    f"warm blob GET, {clients} client{'s' if clients > 1 else ''}",
                    "MB/s",
                    "higher",
                )
            size = world.layer.size
            contenders = [FS, S3_LOCAL, S3_BUCKET, S3_REDIRECT, SEAWEED]
            for r in range(plan.rounds):
                self.log(f"round {r + 1}/{plan.rounds}: warm blob GETs ({size // MIB} MiB)")
                for clients in (1, WARM_CLIENTS):
                    for name in self.order(contenders, r):
                        self.attempt(
                            f"blob_{clients}c",
                            name,
                            r,
                            functools.partial(self.blob_throughput, name, jobs, clients),
                            lambda v: f"{v:.0f} MB/s",
                        )
            # What its whole reads from the bucket left for the next client
            # (cache/objectstore/writers.py).
            spool = world.root / "gateways/s3-bucket/spool"
            self.meta["s3_bucket_warm_copy_bytes"] = tree_bytes(spool, within="copies")
            left = tree_bytes(spool, within="tmp")
            if left:
                results.warn(f"s3-bucket left {left} bytes of spool files behind")

            for kind in ("digest", "tag"):
                results.measure(
                    f"manifest_{kind}", f"cached manifest GET by {kind}", "req/s", "higher"
                )
                results.measure(
                    f"manifest_{kind}_upstream",
                    f"upstream requests per manifest GET by {kind}",
                    "per GET",
                    "lower",
                )
            urls = {FS: fs.url, S3_LOCAL: local.url}
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
                    for name in self.order([FS, S3_LOCAL], r):
                        self.attempt(
                            f"manifest_{kind}",
                            name,
                            r,
                            functools.partial(
                                self.manifest_rate, name, kind, r, urls[name] + paths[kind]
                            ),
                            lambda v: f"{v:.0f} req/s",
                        )

    def blob_throughput(
        self, name: str, jobs: dict[str, Callable[[], Read]], clients: int
    ) -> tuple[float, Any]:
        size = self.world.layer.size
        job = jobs.get(name)
        if job is None:  # SEAWEED: a fresh presigned URL of the object, as s3-redirect hands out
            location, _ = redirect_location("127.0.0.1", self.redirect_port, self.blob_path())
            job = functools.partial(get_discard, *split_url(location))
        reads = run_parallel(
            [job] * clients,
            repeat=max(1, round(self.plan.sample_bytes / (clients * size))),
            expected_size=size,
        )
        if name != SEAWEED:
            caches = {read.cache for read in reads.reads}
            if caches != {"HIT"}:
                self.results.warn(f"{LABELS[name]}: warm blob GET answered X-Cache {caches}")
        return reads.bytes_per_second / MB, reads.raw()

    def cold_phase(self) -> None:
        plan, results = self.plan, self.results
        results.measure("cold_wall", f"cold blob GET, {COLD_CLIENTS} clients at once", "s", "lower")
        results.measure("cold_upstream", "upstream blob GETs of the layer", "GETs")
        results.measure("seaweed_put", "SeaweedFS PUT of the layer (multipart)", "s", "lower")
        for r in range(plan.rounds):
            self.log(f"round {r + 1}/{plan.rounds}: cold blob GETs, {COLD_CLIENTS} clients")
            for name in self.order([FS, S3_CLUSTER, SEAWEED], r):
                if name == SEAWEED:
                    self.attempt(
                        "seaweed_put",
                        SEAWEED,
                        r,
                        functools.partial(self.seaweed_put, r),
                        lambda v: f"{v:.2f} s PUT",
                    )
                else:
                    self.cold(name, r)

    def seaweed_put(self, round_index: int) -> tuple[float, Any]:
        """The upload a cold fill on s3 makes before its readers get the last byte: the layer
        file PUT to the bucket as the s3 backend does (8 MiB parts, 4 in flight)."""
        world = self.world
        source = world.big.image.blob_path(world.layer.digest)
        key = f"put-{round_index}-{uuid.uuid4().hex[:8]}/layer"
        started = time.perf_counter()
        obstore.put(world.seaweed.store(), key, source, chunk_size=8 * MIB, max_concurrency=4)
        seconds = time.perf_counter() - started
        obstore.delete(world.seaweed.store(), key)
        return seconds, {"bytes": world.layer.size}

    def cold(self, name: str, round_index: int) -> None:
        world = self.world
        scratch = world.root / f"cold-{name}-{round_index}"
        prefix = f"cold-{round_index}-{uuid.uuid4().hex[:8]}"
        path = self.blob_path()
        try:
            with contextlib.ExitStack() as stack:
                if name == FS:
                    gw = self.start(
                        stack,
                        Gateway(scratch / "gw", world.upstream.url, scratch / "cache", workers=1),
                    )
                    ports = [gw.port]
                else:
                    ports = [
                        self.replica(stack, f"cold-{round_index}-{i}", prefix).port
                        for i in range(REPLICAS)
                    ]
                jobs = [
                    functools.partial(get_discard, "127.0.0.1", ports[i % len(ports)], path)
                    for i in range(COLD_CLIENTS)
                ]
                since = world.upstream.mark()
                reads: ParallelReads | None = None

                def run() -> tuple[float, Any]:
                    nonlocal reads
                    reads = run_parallel(jobs, expected_size=world.layer.size)
                    raw = reads.raw()
                    walls: dict[str, float] = {}
                    for i, read in enumerate(reads.reads):  # one read per job, in job order
                        port = str(ports[i % len(ports)])
                        walls[port] = max(walls.get(port, 0.0), read.seconds)
                    raw["slowest_client_s_by_gateway_port"] = walls
                    return reads.wall, raw

                self.attempt("cold_wall", name, round_index, run, lambda v: f"{v:.2f} s wall")
                if reads is None:
                    return
                if name == S3_CLUSTER:
                    # Let the upload to the bucket finish before the next contender starts.
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda: self.in_bucket(prefix), 120)
                requests = settle(world.upstream, since)
                digest = world.layer.digest
                gets = [r for r in requests if r.method == "GET" and f"/blobs/{digest}" in r.path]
                heads = [r for r in requests if r.method == "HEAD" and f"/blobs/{digest}" in r.path]
                raw = {
                    "gets": [{"status": r.status, "bytes": r.size} for r in gets],
                    "heads": len(heads),
                    "x_cache": sorted({read.cache for read in reads.reads}),
                }
                if len(gets) != 1:
                    self.results.warn(
                        f"{LABELS[name]}: {len(gets)} upstream GETs of the layer in round "
                        f"{round_index + 1} (expected 1)"
                    )
                self.attempt(
                    "cold_upstream",
                    name,
                    round_index,
                    lambda: (float(len(gets)), raw),
                    lambda v: f"{v:.0f} upstream blob GETs ({len(heads)} HEADs)",
                )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            for i in range(REPLICAS):
                shutil.rmtree(world.root / "gateways" / f"cold-{round_index}-{i}", True)

    # -- the table -----------------------------------------------------------------------

    def rows(self) -> list[Row]:
        big = f"{self.world.layer.size // MIB} MiB"
        rows: list[Row] = []
        for kind in ("digest", "tag"):
            section = f"cached manifest GET by {kind}" + (" (TTL)" if kind == "tag" else "")
            key = f"manifest_{kind}"
            for name in (FS, S3_LOCAL):
                rows.append(Row(section, LABELS[name], key, name, "req/s", digits=0))
            rows.append(Row(section, "ratio s3 / fs", key, S3_LOCAL, "x", over=(key, FS)))
            for name in (FS, S3_LOCAL):
                rows.append(
                    Row(section, f"{name}: upstream req per GET", f"{key}_upstream", name, "req")
                )
        for clients in (1, WARM_CLIENTS):
            section = f"warm blob GET {big}, {clients} client{'s' if clients > 1 else ''}"
            key = f"blob_{clients}c"
            for name in (FS, S3_LOCAL, S3_BUCKET, S3_REDIRECT, SEAWEED):
                rows.append(Row(section, LABELS[name], key, name, "MB/s", digits=0))
            for name in (S3_LOCAL, S3_BUCKET, S3_REDIRECT):
                rows.append(Row(section, f"ratio {name} / fs", key, name, "x", over=(key, FS)))
            for name in (S3_BUCKET, S3_REDIRECT):
                rows.append(
                    Row(section, f"ratio {name} / seaweed", key, name, "x", over=(key, SEAWEED))
                )
        section = f"cold blob GET {big}, {COLD_CLIENTS} clients"
        for name in (FS, S3_CLUSTER):
            rows.append(Row(section, f"{LABELS[name]}: wall", "cold_wall", name, "s"))
        rows.append(
            Row(
                section,
                "ratio s3x3 / fs (lower is better)",
                "cold_wall",
                S3_CLUSTER,
                "x",
                over=("cold_wall", FS),
            )
        )
        rows.append(Row(section, "SeaweedFS PUT of the layer alone", "seaweed_put", SEAWEED, "s"))
        for name in (FS, S3_CLUSTER):
            rows.append(
                Row(section, f"{name}: upstream blob GETs", "cold_upstream", name, "GETs", digits=0)
            )
        return rows

    def document(self, rows: list[Row], complete: bool) -> dict[str, Any]:
        return {
            "schema": 1,
            "benchmark": "scaling",
            "complete": complete,
            "quick": self.plan.quick,
            "rounds": self.plan.rounds,
            "meta": self.meta,
            "summary": self.results.summary(rows) if rows else [],
            "measures": {k: m.to_json() for k, m in self.results.measures.items()},
            "warnings": self.results.warnings,
        }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="64 MiB layer, 3 rounds, 2 s wrk runs (~2 minutes)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument(
        "--out", type=Path, help="JSON results file (benchmarks/results/scaling-<date>.json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)
    if args.rounds is not None and not 1 <= args.rounds <= 50:
        parser.error("--rounds must be between 1 and 50")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    plan = Plan.from_args(parse_args(argv))
    bench = Bench(plan)
    return run_bench(
        bench,
        plan,
        prefix="mirrorrouter-scaling-",
        repo_root=REPO_ROOT,
        phases=[("warm blobs and manifests", bench.warm_phases), ("cold", bench.cold_phase)],
        report=lambda rows: print_report(bench, rows),
    )


def print_report(bench: Bench, rows: list[Row]) -> None:
    meta, plan = bench.meta, bench.plan
    print()
    print(
        f"mirrorrouter scaling benchmark{' (--quick)' if plan.quick else ''}: one replica on "
        f"S3 (SeaweedFS) + Redis vs the filesystem backend; {meta['cores']} CPU cores, "
        f"Linux {meta['kernel']}, Python {meta['python']}; {plan.rounds} interleaved rounds "
        f"in {meta['duration_s']:.0f} s"
    )
    print(
        "Median [min, max] over rounds; ratios are taken within a round. Every gateway has 1 "
        "worker; SeaweedFS, Redis, the gateways and the clients share this machine."
    )
    shares = meta.get("foreign_cpu_share", {})
    if shares:
        print(
            "CPU taken by other processes: "
            + ", ".join(f"{name} {share:.1%}" for name, share in shares.items())
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
