"""Benchmark (not a test): a regcache cluster over one shared store against the reference's cluster.

Both deployments are three nodes behind which nine clients pull one big image at the same moment,
cold and then warm; what a user running several caches behind one name compares:

* ``regcache``: ``--nodes`` (default 3) ``regcache run`` processes, each with its own port, its own
  L1 ``cache_dir``, its own node id and ``blob_url``, all over one S3 bucket (Ceph radosgw) and one
  Redis (``shared``: ``bed.ceph``, ``bed.redis``): the deployment of docs/deployment.md. One upstream
  fetch per blob for the whole cluster is the target (upstream blob bytes 1.0x the image, whatever
  the number of nodes).
* ``reference``: as many Debian ``docker-registry`` (distribution 2.8.2) processes in proxy mode over
  ONE shared filesystem storage directory, the deployment the reference's documentation describes
  for several instances (it keeps no state outside its storage).
* ``independent`` (optional): the regcache nodes without ``shared``, each with only its own store:
  what the shared store saves.

Clients: ``--clients`` (default 9) skopeo processes, spread over the nodes in turn (3 per node),
each copying the image into a directory of its own (``skopeo copy docker://… dir:…``; the digest
and every blob's size are checked). skopeo, not dockerd: nine dockerds extracting 1 GiB each at
once would measure this 2-core machine's disk and CPU, not the caches. Through regcache with
``--front proxy`` (default): ``HTTPS_PROXY`` to the node and its CA, Docker Hub names, so blob hits
are ``307`` redirects (to the node's blob endpoint, or to a presigned S3 URL for what only the
bucket holds); with ``--front mirror`` at the node's plain-HTTP mirror port. The reference is
pulled by address (plain HTTP), as its documentation deploys it.

The upstream (``scripts/bed``, as in ``scripts/bench/small_big.py``): token server, distribution with
CDN-style ``307`` redirects and the CDN stand-in; the image is ``--size`` (default 1 GiB) of
incompressible data in ``--layers`` (default 4) layers, Docker v2s2.

Per round (cold: fresh stores everywhere; warm: the same processes once every blob is stored, the
clients' copies removed), measured from the bed's own logs and /proc:

* wall time, common start to the last client's end, and each client's;
* upstream requests and bytes: the registry's access log (both instances: the Docker Hub-named one
  regcache reaches, the loopback-named one the reference reaches), the token server's log and the
  CDN's log, which carries the blob bytes (``upstream blob MB`` = CDN bytes; ``vs image`` against
  the image's blob bytes);
* each node's peak RSS (VmRSS sampled every 100 ms);
* S3: radosgw's access log, blob GETs on presigned URLs (``X-Amz-Signature`` in the query: clients
  following a node's ``307``) and the bytes radosgw sent for them; with the wall time, the rate at
  which the bucket served the clients;
* CPU seconds of the bench's own processes and of everything else, and the CPU steal (time the VM's
  host gave other guests) during the bench.

Blob hits: with every store warm, ``curl -L`` fetches the largest layer ``--hit-fetches`` times per
run: from a reference node; through regcache node 1; and through a probe node started for each
fetch with an empty L1 over the same bucket and Redis, so what it has is only in the bucket (a
presigned ``307``). Each fetch is classified by radosgw's log: served by S3 or by a node.

Every scenario runs ``--runs`` times (default 3; the order of the deployments alternates from run to
run) and the table gives medians. Cost here (2 cores, 23 GiB RAM) with the defaults: the image is
built and pushed once (~1 min; kept with ``--workdir``), a run of both deployments pulls 36 GiB
(9 clients x 1 GiB x cold and warm x 2 deployments) and takes ~4-6 min, Ceph's RAM-backed OSD holds
the bucket (~1.5 GiB with 1 GiB in it), and the clients' copies take 9 GiB of disk at a time.
``--size 256MiB --runs 1`` is a look in about two minutes.

Output (``--out``, default ``bench-results/cluster-<UTC time>``): ``table.md`` (also printed) and
``results.json`` (every round and fetch, raw). ``--snapshot`` measures a frozen copy of the code.

Run: ``scripts/bench/run-cluster [--runs 3] [--size 1GiB] [--layers 4] [--nodes 3] [--clients 9]
[--paths reference,regcache[,independent]] [--front proxy|mirror] [--hit-fetches 3] [--out DIR]
[--workdir DIR] [--snapshot]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import bed
from bed.ceph import COMMANDS as CEPH_COMMANDS
from bed.ceph import Ceph, RgwRecord
from bed.images import SKOPEO, PushedImage
from bed.redis import COMMAND as REDIS_COMMAND
from bed.redis import Redis
from bed.regcache_run import Mitmdump
from bed.registry import REGISTRY_BIN, free_port

from bench.common import (
    ROOT,
    SNAPSHOT_HELP,
    CpuAccount,
    RssSampler,
    code_facts,
    cpu_counters,
    enter_workdir,
    exit_status,
    guarded,
    load_average,
    log,
    machine_facts,
    median,
    num,
    positive_int,
    prepare_process,
    release_together,
    sources_under_test,
    steal_since,
    terminate_children,
    wait_stored,
)
from bench.small_big import (
    BIG,
    CURL,
    MB,
    RSS_LIMIT,
    Bed,
    Check,
    HitFetch,
    ReferenceCache,
    SkopeoClient,
    _choices,
    curl_fetch,
    fmt_mb,
    fmt_ratio,
    fmt_seconds,
    hits_table,
    image_specs,
    largest_layer,
    ratio,
)
from regcache.config import ConfigError, parse_size

REFERENCE, REGCACHE, INDEPENDENT = "reference", "regcache", "independent"
PATHS = (REFERENCE, REGCACHE, INDEPENDENT)
DEFAULT_PATHS = (REFERENCE, REGCACHE)
PROXY, MIRROR = "proxy", "mirror"
COLD, WARM = "cold", "warm"
ROUNDS = (COLD, WARM)
# Where a blob hit came from (the rows of the hits table).
FROM_STORAGE, FROM_NODE, FROM_S3 = "reference (its storage)", "regcache node (blob endpoint)", "regcache S3 (presigned)"
HIT_SOURCES = (FROM_STORAGE, FROM_NODE, FROM_S3)
BUCKET = "regcache-bench"


# -- what was measured (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One measured round: every client pulling the image at once from one deployment."""

    path: str
    state: str  # COLD or WARM
    run: int
    nodes: int
    clients: int
    wall: float  # common start → the last client's end, seconds
    client_seconds: list[float]
    image_blob_bytes: int
    upstream_requests: int  # registry + CDN + token server
    upstream_bytes: int  # registry response bytes + CDN blob bytes
    upstream_blob_bytes: int  # CDN blob bytes
    upstream: dict[str, object]  # the detailed counts (UpstreamTraffic.summary)
    node_rss_peaks: list[int]  # bytes, per node, sampled VmRSS maximum during the round
    s3_blob_gets: int = 0  # presigned GETs of blob objects radosgw answered
    s3_blob_bytes: int = 0  # what radosgw sent for them
    own_cpu: float = 0.0
    foreign_cpu: float = 0.0
    steal: str = ""
    source_changed: bool = False

    @property
    def blob_bytes_vs_image(self) -> float | None:
        return ratio(self.upstream_blob_bytes, self.image_blob_bytes)

    @property
    def s3_rate(self) -> float | None:
        """Bytes per second the bucket served the clients over the round's wall time (None: nothing)."""
        return self.s3_blob_bytes / self.wall if self.s3_blob_bytes and self.wall > 0 else None


@dataclass(frozen=True)
class RoundSummary:
    """Medians of one deployment and round over the runs."""

    path: str
    state: str
    runs: int
    nodes: int
    clients: int
    wall: float
    wall_min: float
    wall_max: float
    slowest_client: float  # median over runs of the slowest client
    fastest_client: float
    upstream_requests: float
    upstream_bytes: float
    upstream_blob_bytes: float
    image_blob_bytes: int
    node_rss_peaks: list[int]  # per node, max over runs
    s3_blob_gets: float
    s3_rate: float | None

    @property
    def blob_bytes_vs_image(self) -> float | None:
        return ratio(self.upstream_blob_bytes, self.image_blob_bytes)


def summarize(rounds: Sequence[Round]) -> list[RoundSummary]:
    by: dict[tuple[str, str], list[Round]] = {}
    for r in rounds:
        by.setdefault((r.path, r.state), []).append(r)
    out = []
    for path, state in sorted(by, key=lambda k: (PATHS.index(k[0]), ROUNDS.index(k[1]))):
        rs = by[(path, state)]

        def mid(value: Callable[[Round], float], rs: list[Round] = rs) -> float:
            return median([value(r) for r in rs])

        rates = [rate for r in rs if (rate := r.s3_rate) is not None]
        out.append(
            RoundSummary(
                path, state, len(rs), rs[0].nodes, rs[0].clients,
                wall=mid(lambda r: r.wall),
                wall_min=min(r.wall for r in rs),
                wall_max=max(r.wall for r in rs),
                slowest_client=mid(lambda r: max(r.client_seconds)),
                fastest_client=mid(lambda r: min(r.client_seconds)),
                upstream_requests=mid(lambda r: r.upstream_requests),
                upstream_bytes=mid(lambda r: r.upstream_bytes),
                upstream_blob_bytes=mid(lambda r: r.upstream_blob_bytes),
                image_blob_bytes=rs[0].image_blob_bytes,
                node_rss_peaks=[max(peaks) for peaks in zip(*(r.node_rss_peaks for r in rs), strict=True)],
                s3_blob_gets=mid(lambda r: r.s3_blob_gets),
                s3_rate=median(rates) if rates else None,
            )
        )
    return out


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], labels: int = 2) -> list[str]:
    """A markdown table: the first `labels` columns left-aligned, the figures after them right-aligned."""
    align = ["---"] * labels + ["---:"] * (len(columns) - labels)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def rounds_table(summaries: Sequence[RoundSummary]) -> list[str]:
    columns = (
        "cache", "round", "nodes", "clients", "median wall s", "min-max s", "client s (fastest-slowest)",
        "upstream requests", "upstream blob MB", "vs image", "peak RSS per node MB", "S3 blob GETs", "S3 MB/s",
    )
    rows = [
        [
            s.path, s.state, str(s.nodes), str(s.clients), fmt_seconds(s.wall),
            f"{fmt_seconds(s.wall_min)}-{fmt_seconds(s.wall_max)}",
            f"{fmt_seconds(s.fastest_client)}-{fmt_seconds(s.slowest_client)}", num(s.upstream_requests),
            fmt_mb(s.upstream_blob_bytes), fmt_ratio(s.blob_bytes_vs_image),
            " / ".join(fmt_mb(peak) for peak in s.node_rss_peaks),
            "-" if s.path == REFERENCE else num(s.s3_blob_gets), fmt_mb(s.s3_rate),
        ]
        for s in summaries
    ]
    return table(columns, rows)


def every_round_table(rounds: Sequence[Round]) -> list[str]:
    columns = (
        "cache", "round", "run", "wall s", "client s", "upstream manifest GETs", "upstream blob GETs",
        "CDN GETs by blob", "upstream MB", "S3 blob GETs / MB", "peak RSS per node MB", "bench / other CPU s", "steal",
    )
    rows = []
    for r in sorted(rounds, key=lambda r: (r.run, PATHS.index(r.path), ROUNDS.index(r.state))):
        gets = r.upstream.get("cdn_gets_by_blob") or {}
        assert isinstance(gets, dict)
        rows.append(
            [
                r.path, r.state, str(r.run), fmt_seconds(r.wall), " ".join(f"{s:.1f}" for s in r.client_seconds),
                str(r.upstream.get("manifest_gets", "-")), str(r.upstream.get("blob_gets", "-")),
                " ".join(f"{digest[7:15]}x{n}" for digest, n in sorted(gets.items())) or "-",
                fmt_mb(r.upstream_bytes), f"{r.s3_blob_gets} / {fmt_mb(r.s3_blob_bytes)}",
                " / ".join(fmt_mb(p) for p in r.node_rss_peaks), f"{r.own_cpu:.0f} / {r.foreign_cpu:.0f}", r.steal,
            ]
        )
    return table(columns, rows)


def target_checks(summaries: Sequence[RoundSummary], hits: Sequence[HitFetch]) -> list[Check]:
    """The issue's targets: upstream blob bytes of a cold cluster 1.0x the image whatever the number
    of nodes, nothing upstream when warm, every node's peak RSS below 200 MB; and the blob hits."""
    cells = {(s.path, s.state): s for s in summaries}
    checks = []
    cold, ref_cold = cells.get((REGCACHE, COLD)), cells.get((REFERENCE, COLD))
    target = "upstream blob bytes of the cold cluster = 1.0x the image"
    if cold is None:
        checks.append(Check(target, None, "regcache not measured"))
    else:
        ratio_text = fmt_ratio(cold.blob_bytes_vs_image)
        reference = f"; the reference's {fmt_ratio(ref_cold.blob_bytes_vs_image)}" if ref_cold else ""
        passed = cold.blob_bytes_vs_image is not None and abs(cold.blob_bytes_vs_image - 1.0) < 0.005
        checks.append(Check(target, passed, f"{ratio_text} with {cold.nodes} nodes, {cold.clients} clients{reference}"))
    warm = cells.get((REGCACHE, WARM))
    if warm is not None:
        checks.append(
            Check("no upstream blob bytes when warm", warm.upstream_blob_bytes == 0, fmt_mb(warm.upstream_blob_bytes))
        )
    peaks = [peak for s in summaries if s.path != REFERENCE for peak in s.node_rss_peaks]
    if peaks:
        checks.append(Check("every node's peak RSS < 200 MB", max(peaks) < RSS_LIMIT, f"max {fmt_mb(max(peaks))} MB"))
    s3 = [h.rate for h in hits if h.path == FROM_S3]
    if s3:
        checks.append(Check("blob hits from S3 (presigned 307)", None, f"median {median(s3) / MB:.0f} MB/s"))
    return checks


def comparisons(summaries: Sequence[RoundSummary]) -> list[str]:
    """regcache's wall times against the reference's, round by round (no target: a comparison)."""
    cells = {(s.path, s.state): s for s in summaries}
    out = []
    for state in ROUNDS:
        ref = cells.get((REFERENCE, state))
        for path in (REGCACHE, INDEPENDENT):
            other = cells.get((path, state))
            if ref and other:
                out.append(
                    f"{state}: {path} {fmt_seconds(other.wall)} s against the reference's {fmt_seconds(ref.wall)} s "
                    f"({fmt_ratio(ratio(other.wall, ref.wall))}); upstream blob bytes "
                    f"{fmt_ratio(other.blob_bytes_vs_image)} against {fmt_ratio(ref.blob_bytes_vs_image)} the image"
                )
    return out


def findings(rounds: Sequence[Round], notes: Sequence[str]) -> list[str]:
    out = list(notes)
    for r in rounds:
        where = f"run {r.run}, {r.path} {r.state}"
        if r.source_changed:
            out.append(f"{where}: addon/ or scripts/bed/ changed while it ran: discard it")
        capacity = r.wall * len(os.sched_getaffinity(0))
        if r.foreign_cpu > 0.2 * capacity:
            out.append(f"{where}: other processes took {r.foreign_cpu:.0f} CPU s of ~{capacity:.0f}: inflated")
        gets = r.upstream.get("cdn_gets_by_blob") or {}
        assert isinstance(gets, dict)
        if r.path == REGCACHE and r.state == COLD:
            out += [f"{where}: blob {d} fetched from the CDN {n} times (expected 1)" for d, n in gets.items() if n > 1]
        if r.state == WARM and r.path != REFERENCE and r.upstream_blob_bytes:
            out.append(f"{where}: {fmt_mb(r.upstream_blob_bytes)} MB of blobs upstream while warm")
    return out


def report(
    rounds: Sequence[Round], hits: Sequence[HitFetch], facts: Sequence[str], notes: Sequence[str]
) -> tuple[str, list[RoundSummary], list[Check]]:
    summaries = summarize(rounds)
    checks = target_checks(summaries, hits)
    lines = ["# regcache cluster vs the reference's cluster", "", *[f"- {fact}" for fact in facts], ""]
    lines += ["## Rounds (medians over the runs)", "", *rounds_table(summaries), ""]
    lines += [
        "Upstream = the bed registry's access logs, the token server's and the CDN's; blob bytes are the CDN's, "
        "`vs image` against the image's blob bytes. S3 blob GETs: presigned URLs radosgw answered (clients "
        "following a node's 307); S3 MB/s: the bytes it sent them over the round's wall time. Peak RSS: VmRSS "
        "sampled every 100 ms, each node (max over runs). MB = 10^6 bytes.",
        "",
    ]
    if hits:
        lines += ["## Blob hits (`curl -L`, the largest layer, same host)", ""]
        lines += [*hits_table(hits, HIT_SOURCES), ""]
    lines += ["## Targets", "", *[check.line() for check in checks], ""]
    compared = comparisons(summaries)
    if compared:
        lines += ["## Against the reference", "", *[f"- {line}" for line in compared], ""]
    lines += ["## Every round", "", *every_round_table(rounds), ""]
    found = findings(rounds, notes)
    lines += ["## Findings", "", *([f"- {f}" for f in found] or ["- nothing unexpected"]), ""]
    return "\n".join(lines), summaries, checks


def s3_blob_reads(records: Sequence[RgwRecord], bucket: str) -> tuple[int, int]:
    """(GETs, bytes sent) of blob objects by presigned URL among radosgw's records."""
    reads = [
        r
        for r in records
        if r.method == "GET" and r.status in (200, 206) and "/blobs/" in r.path
        and r.path.startswith(f"/{bucket}/") and "X-Amz-Signature=" in r.query
    ]
    return len(reads), sum(r.size for r in reads)


# -- the deployments ---------------------------------------------------------------------------------


class Deployment(Protocol):
    """Several cache nodes behind which the clients pull; fresh (empty stores) when started."""

    path: str
    via_proxy: bool

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pids(self) -> list[int | None]: ...

    def client(self, i: int, workdir: Path) -> SkopeoClient:
        """Client `i`'s skopeo, set up for its node (clients go to the nodes in turn)."""

    def ref(self, i: int, image_ref: str) -> str:
        """How client `i` names `library/x:1`."""

    def wait_stored(self, image: PushedImage) -> float | None:
        """Seconds until every blob of the image is stored where a warm round reads it (None: not all)."""

    def notes(self) -> list[str]: ...


class ReferenceNodes:
    """`count` docker-registry processes in proxy mode over one storage directory."""

    path = REFERENCE
    via_proxy = False

    def __init__(self, workdir: Path, remote_url: str, count: int) -> None:
        self.storage = workdir / "storage"
        self.nodes = [ReferenceCache(workdir / f"node{i + 1}", remote_url, storage=self.storage) for i in range(count)]

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def pids(self) -> list[int | None]:
        return [node.pid for node in self.nodes]

    def client(self, i: int, workdir: Path) -> SkopeoClient:
        return SkopeoClient(workdir, None, None)

    def ref(self, i: int, image_ref: str) -> str:
        return self.nodes[i % len(self.nodes)].ref(SkopeoClient.name, image_ref)

    def blob_url(self, image: PushedImage) -> str:
        return f"{self.nodes[0].url}/v2/{image.repo}/blobs/{largest_layer(image)}"

    def wait_stored(self, image: PushedImage) -> float | None:
        return self.nodes[0].wait_stored(image, 0)

    def notes(self) -> list[str]:
        return []


@dataclass
class Engines:
    """The shared store's engines: Ceph (radosgw) with the bench's bucket, and Redis."""

    ceph: Ceph
    redis: Redis

    def shared_config(self, node: str, prefix: str) -> dict[str, object]:
        """The `shared` section of a node's YAML: this bucket under `prefix`, this Redis, its keys
        under a prefix of the same name (so every cold round starts empty)."""
        return {
            "node": node,
            "s3": {
                "endpoint": self.ceph.endpoint,
                "bucket": BUCKET,
                "region": self.ceph.region,
                "access_key": self.ceph.access_key,
                "secret_key": self.ceph.secret_key,
                "prefix": f"{prefix}/",
            },
            "redis": {"url": self.redis.url, "prefix": f"regcache:{prefix}:"},
        }

    def s3_keys(self, prefix: str) -> dict[str, int]:
        return self.ceph.s3.list_keys(BUCKET, f"{prefix}/")

    def empty(self, prefix: str) -> None:
        """Delete every object (and any unfinished upload) under `prefix`: the OSD keeps its data in RAM."""
        s3 = self.ceph.s3
        for key in self.s3_keys(prefix):
            s3.request("DELETE", f"/{BUCKET}/{key}")
        for key, upload in s3.multipart_uploads(BUCKET, f"{prefix}/"):
            s3.abort_upload(BUCKET, key, upload)


class RegcacheNodes:
    """`count` regcache nodes: over one bucket and Redis (`engines`), or each on its own (None).

    Each node has its own L1 cache_dir, node id, blob endpoint (`blob_url`, on its own port) and
    mirror port; one CA for all (made before they start: three first starts would race for it)."""

    def __init__(
        self, workdir: Path, hostmap: dict[str, str], count: int, front: str, engines: Engines | None
    ) -> None:
        self.path = REGCACHE if engines else INDEPENDENT
        self.via_proxy = front == PROXY
        self.workdir = workdir
        self.hostmap = hostmap
        self.engines = engines
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.confdir = workdir / "conf"
        self.mirror_ports = [free_port() for _ in range(count)]
        self.nodes = [self.node(f"node{i + 1}", port) for i, port in enumerate(self.mirror_ports)]
        self._marks = [0] * count

    def node(self, name: str, mirror_port: int) -> Mitmdump:
        """A node (not started) with a fresh L1."""
        workdir = self.workdir / name
        shutil.rmtree(workdir / "cache", ignore_errors=True)
        blob_port = free_port()
        config: dict[str, object] = {
            "cache_dir": str(workdir / "cache"),
            "upstreams": self.hostmap,
            "mirrors": {"docker.io": f"127.0.0.1:{mirror_port}"},
            "blob_listen": f"127.0.0.1:{blob_port}",
            "blob_url": f"http://127.0.0.1:{blob_port}",
        }
        if self.engines is not None:
            config["shared"] = self.engines.shared_config(name, self.prefix)
        return Mitmdump(workdir, config, self.confdir)

    def start(self) -> None:
        from mitmproxy.certs import CertStore

        CertStore.from_store(self.confdir, "mitmproxy", 2048)
        for i, node in enumerate(self.nodes):
            node.start(timeout=60)
            self._marks[i] = node.mark()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.engines is not None:
            self.engines.empty(self.prefix)

    def pids(self) -> list[int | None]:
        return [node.pid for node in self.nodes]

    def client(self, i: int, workdir: Path) -> SkopeoClient:
        node = self.nodes[i % len(self.nodes)]
        return SkopeoClient(workdir, node.url, node.ca_cert) if self.via_proxy else SkopeoClient(workdir, None, None)

    def ref(self, i: int, image_ref: str) -> str:
        if self.via_proxy:
            return f"{bed.REGISTRY_HOST}/{image_ref}"
        return f"127.0.0.1:{self.mirror_ports[i % len(self.nodes)]}/{image_ref}"

    def wait_stored(self, image: PushedImage, timeout: float = 300.0) -> float | None:
        """Shared: until the bucket holds every blob with its size. On their own: until each node
        logged `STORED blob` for every blob."""
        if self.engines is None:
            digests = [b.digest for b in image.blobs]
            waits = [wait_stored(n, digests, m) for n, m in zip(self.nodes, self._marks, strict=True)]
            return None if None in waits else max(w for w in waits if w is not None)
        wanted = {f"{self.prefix}/blobs/{b.digest.replace(':', '/')}": b.size for b in image.blobs}
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            held = self.engines.s3_keys(self.prefix)
            if all(held.get(key) == size for key, size in wanted.items()):
                return time.monotonic() - start
            time.sleep(0.2)
        return None

    @contextlib.contextmanager
    def probe(self, run: int, fetch: int) -> Iterator[Mitmdump]:
        """One more node over the same shared store, with an empty L1: what it serves comes from the bucket."""
        node = self.node(f"probe-run{run}-{fetch}", free_port())
        node.start(timeout=60)
        try:
            yield node
        finally:
            node.stop()
            shutil.rmtree(node.workdir / "cache", ignore_errors=True)

    def notes(self) -> list[str]:
        return [f"{node.workdir.name} logged a traceback: {node.log_path}" for node in self.nodes
                if "Traceback" in node.log()]


# -- the bench -------------------------------------------------------------------------------------


class Bench:
    """The bed, the engines, the deployments; what was measured so far in `rounds` and `hits`."""

    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.rounds: list[Round] = []
        self.hits: list[HitFetch] = []
        self.notes: list[str] = []
        self._bed: Bed | None = None
        self._image: PushedImage | None = None
        self.engines: Engines | None = None

    @property
    def bed(self) -> Bed:
        if self._bed is None:
            raise RuntimeError("the bed is not running")
        return self._bed

    @property
    def image(self) -> PushedImage:
        if self._image is None:
            raise RuntimeError("the image was not pushed")
        return self._image

    def setup(self) -> None:
        self._bed = Bed(self.workdir / "bed", self.stack)
        spec, _ = image_specs(self.args.size, self.args.layers)[BIG]
        self._image = self.bed.push(spec, all_platforms=False)
        if REGCACHE in self.args.paths:
            # The bucket holds one image at a time (emptied after each run); memstore keeps it in RAM.
            ceph = Ceph(self.workdir / "ceph", store_bytes=3 * self.args.size + (1 << 30), bucket=BUCKET)
            redis = Redis(self.workdir / "redis")
            self.stack.callback(ceph.close)
            ceph.start(timeout=120)
            self.stack.callback(redis.stop)
            redis.start()
            self.engines = Engines(ceph, redis)
            log(f"Ceph radosgw at {ceph.endpoint} (ready in {ceph.startup_seconds:.1f} s), Redis at {redis.url}")

    def deployment(self, path: str, run: int) -> Deployment:
        workdir = self.workdir / "deployments" / f"run{run}-{path}"
        shutil.rmtree(workdir, ignore_errors=True)
        if path == REFERENCE:
            return ReferenceNodes(workdir, self.bed.loopback.url, self.args.nodes)
        engines = self.engines if path == REGCACHE else None
        return RegcacheNodes(workdir, self.bed.hostmap, self.args.nodes, self.args.front, engines)

    @contextlib.contextmanager
    def running(self, deployment: Deployment) -> Iterator[Deployment]:
        deployment.start()
        try:
            yield deployment
        finally:
            deployment.stop()
            self.notes += deployment.notes()
            shutil.rmtree(self.workdir / "deployments", ignore_errors=True)

    def s3_mark(self) -> int:
        return self.engines.ceph.mark() if self.engines else 0

    def s3_reads(self, mark: int) -> tuple[int, int]:
        return s3_blob_reads(self.engines.ceph.requests(mark), BUCKET) if self.engines else (0, 0)

    def pull_round(self, deployment: Deployment, state: str, run: int) -> Round:
        """Every client pulls the image at the same moment; raises unless each got exactly the image."""
        image = self.image
        root = self.workdir / "clients" / f"run{run}-{deployment.path}-{state}"
        clients = [deployment.client(i, root / f"c{i}") for i in range(self.args.clients)]
        jobs = [
            functools.partial(client.pull, deployment.ref(i, image.ref), image, deployment.via_proxy)
            for i, client in enumerate(clients)
        ]
        sources, counters = sources_under_test(), cpu_counters()
        mark, s3_mark = self.bed.upstream.mark(), self.s3_mark()
        try:
            with CpuAccount() as cpu, contextlib.ExitStack() as sampling:
                samplers = [sampling.enter_context(RssSampler(pid)) for pid in deployment.pids()]
                released = release_together(jobs)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if released.failures():
            raise RuntimeError(f"{deployment.path} {state}, run {run}: " + "\n".join(released.failures()))
        traffic = self.bed.upstream.since(mark, {b.digest: b.size for b in image.blobs})
        s3_gets, s3_bytes = self.s3_reads(s3_mark)
        result = Round(
            path=deployment.path,
            state=state,
            run=run,
            nodes=self.args.nodes,
            clients=self.args.clients,
            wall=released.wall,
            client_seconds=released.seconds,
            image_blob_bytes=image.total_size,
            upstream_requests=traffic.requests,
            upstream_bytes=traffic.upstream_bytes,
            upstream_blob_bytes=traffic.cdn_bytes,
            upstream=traffic.summary(),
            node_rss_peaks=[sampler.peak for sampler in samplers],
            s3_blob_gets=s3_gets,
            s3_blob_bytes=s3_bytes,
            own_cpu=cpu.own,
            foreign_cpu=cpu.foreign,
            steal=steal_since(counters),
            source_changed=sources != sources_under_test(),
        )
        self.rounds.append(result)
        log(
            f"run {run} {deployment.path} {state}: {released.wall:.1f} s, {traffic.requests} upstream requests, "
            f"{fmt_mb(traffic.cdn_bytes)} MB of blobs upstream ({fmt_ratio(result.blob_bytes_vs_image)}), "
            f"S3 {s3_gets} GETs {fmt_mb(s3_bytes)} MB, RSS peaks {' / '.join(fmt_mb(p) for p in result.node_rss_peaks)}"
        )
        return result

    def measure(self, path: str, run: int) -> None:
        with self.running(self.deployment(path, run)) as deployment:
            self.pull_round(deployment, COLD, run)
            waited = deployment.wait_stored(self.image)
            if waited is None:
                self.notes.append(f"run {run}, {path}: not every blob was stored after the cold round")
            else:
                log(f"run {run} {path}: every blob stored {waited:.1f} s after the cold round")
            self.pull_round(deployment, WARM, run)
            if isinstance(deployment, ReferenceNodes):
                url = deployment.blob_url(self.image)
                self.fetch_hits(run, lambda: curl_fetch(url, {}), reference=True)
            elif isinstance(deployment, RegcacheNodes) and deployment.engines is not None:
                self.fetch_hits(run, functools.partial(self.fetch_through, deployment, deployment.nodes[0]))
                for fetch in range(self.args.hit_fetches):
                    with deployment.probe(run, fetch) as probe:
                        self.fetch_hits(run, functools.partial(self.fetch_through, deployment, probe), count=1)

    def fetch_through(self, deployment: RegcacheNodes, node: Mitmdump) -> tuple[int, int, float, int]:
        """The largest layer through `node` as a client would ask for it, with a client's own token."""
        image = self.image
        headers = {"Authorization": f"Bearer {self.bed.tokens.mint(image.repo)}"}
        path = f"/v2/{image.repo}/blobs/{largest_layer(image)}"
        if deployment.via_proxy:
            return curl_fetch(f"https://{bed.REGISTRY_HOST}{path}", headers, node)
        return curl_fetch(f"{node.mirror_url()}{path}", headers)

    def fetch_hits(
        self, run: int, fetch: Callable[[], tuple[int, int, float, int]], count: int = 0, reference: bool = False
    ) -> None:
        """`count` (default `--hit-fetches`) fetches of the largest layer, each filed under where
        radosgw's log says it came from (a reference's: from its storage)."""
        image = self.image
        size = next(b.size for b in image.blobs if b.digest == largest_layer(image))
        for _ in range(count or self.args.hit_fetches):
            cdn_mark, s3_mark = self.bed.cdn.mark(), self.s3_mark()
            status, got, seconds, redirects = fetch()
            if status != 200 or got != size:
                raise RuntimeError(f"blob hit: HTTP {status}, {got} of {size} bytes")
            s3_gets, _ = self.s3_reads(s3_mark)
            source = FROM_STORAGE if reference else FROM_S3 if s3_gets else FROM_NODE
            cdn_gets = sum(1 for r in self.bed.cdn.requests(cdn_mark) if r.method == "GET")
            hit = HitFetch(source, run, got, seconds, redirects, upstream_blob_gets=cdn_gets)
            self.hits.append(hit)
            log(f"run {run} blob hit from {source}: {got / MB:.0f} MB in {seconds:.2f} s = {hit.rate / MB:.0f} MB/s")

    def run(self) -> None:
        for run in range(1, self.args.runs + 1):
            shift = (run - 1) % len(self.args.paths)
            for path in self.args.paths[shift:] + self.args.paths[:shift]:
                self.measure(path, run)

    # reporting

    def facts(self, load_before: str, code: str, counters_before: list[int]) -> list[str]:
        a = self.args
        tools = {"upstream and reference": [REGISTRY_BIN, "--version"], "skopeo": [SKOPEO, "--version"]}
        if self.engines:
            tools.update({"S3": ["radosgw", "--version"], "Redis": [REDIS_COMMAND, "--version"]})
        command = (
            f"scripts/bench/run-cluster --runs {a.runs} --size {a.size_text} --layers {a.layers} --nodes {a.nodes} "
            f"--clients {a.clients} --paths {','.join(a.paths)} --front {a.front} --hit-fetches {a.hit_fetches}"
            + (" --snapshot" if a.snapshot else "")
        )
        image = (
            f"image: `{self.image.ref}`, Docker v2s2, {len(self.image.layers)} layers, "
            f"{self.image.total_size / MB:.1f} MB of blobs"
            if self._image
            else "image: not pushed"
        )
        way = "HTTPS_PROXY to its node + its CA" if a.front == PROXY else "its node's mirror port (plain HTTP)"
        return [
            *machine_facts(tools),
            code,
            f"load average (1 min): {load_before} before the bench, {load_average()} at its end; "
            f"CPU steal during the bench: {steal_since(counters_before)}",
            image,
            f"{a.nodes} nodes, {a.clients} skopeo clients spread over them in turn; regcache clients through {way}; "
            f"the reference's by address; {a.runs} run(s), the order of the deployments alternating",
            f"command: `{command}`",
        ]

    def write(self, out: Path, load_before: str, code: str, counters_before: list[int], error: str | None) -> int:
        """table.md and results.json; the table printed. Returns how many targets failed."""
        facts = self.facts(load_before, code, counters_before)
        notes = ([f"INCOMPLETE: {error}"] if error else []) + self.notes
        text, summaries, checks = report(self.rounds, self.hits, facts, notes)
        print(text, end="")
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text)
        results = {
            "facts": facts,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "image": dataclasses.asdict(self._image) if self._image else None,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "blob_hits": [{**dataclasses.asdict(h), "bytes_per_second": h.rate} for h in self.hits],
            "summary": [dataclasses.asdict(s) for s in summaries],
            "checks": [dataclasses.asdict(c) for c in checks],
            "error": error,
        }
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"wrote {out}/table.md, results.json")
        return sum(1 for c in checks if c.passed is False)


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench-cluster",
        description="Nine clients pulling one big image from three regcache nodes over one shared store (S3 + "
        "Redis), cold and warm, side by side with three reference caches over one storage directory.",
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="repetitions of every round (default 3)")
    parser.add_argument("--size", default="1GiB", help="the image's layer data (default 1GiB)")
    parser.add_argument("--layers", type=positive_int, default=4, help="its layers (default 4)")
    parser.add_argument("--nodes", type=positive_int, default=3, help="cache nodes per deployment (default 3)")
    parser.add_argument("--clients", type=positive_int, default=9, help="clients pulling at once (default 9)")
    parser.add_argument(
        "--paths",
        type=_choices(PATHS),
        default=list(DEFAULT_PATHS),
        help="reference,regcache[,independent] (default the first two)",
    )
    parser.add_argument(
        "--front", choices=(PROXY, MIRROR), default=PROXY, help="how clients reach regcache (default proxy)"
    )
    parser.add_argument("--hit-fetches", type=positive_int, default=3, help="blob hit fetches per source and run")
    parser.add_argument("--out", type=Path, help="where table.md and results.json go (default bench-results/cluster-…)")
    parser.add_argument("--workdir", type=Path, help="keep the bed (layouts, registry storage, logs) here")
    parser.add_argument("--snapshot", action="store_true", help=SNAPSHOT_HELP)
    args = parser.parse_args(argv)
    try:
        args.size_text, args.size = args.size, parse_size("--size", args.size)
    except ConfigError as e:
        parser.error(str(e))
    if args.out is None:
        args.out = ROOT / "bench-results" / f"cluster-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    commands = [CURL, REGISTRY_BIN, SKOPEO]
    if REGCACHE in args.paths:
        commands += [*CEPH_COMMANDS, REDIS_COMMAND]
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        parser.error(f"missing: {', '.join(missing)} (scripts/test installs the Debian packages as root)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prepare_process("bench.cluster", argv, args.snapshot)
    started = time.monotonic()
    load_before, code, counters_before = load_average(), code_facts(), cpu_counters()
    out = args.out.resolve()
    with contextlib.ExitStack() as stack:
        workdir = enter_workdir(stack, args.workdir, scratch=("deployments", "clients", "ceph", "redis"))
        bench = Bench(args, workdir, stack)

        def work() -> None:
            bench.setup()
            # Registered after the servers, so it runs before they stop: clients go first.
            stack.callback(terminate_children, "skopeo", "curl")
            bench.run()

        error = guarded(work)
        failed = bench.write(out, load_before, code, counters_before, error)
    log(f"done in {time.monotonic() - started:.0f} s; {failed} target(s) failed")
    return exit_status(error, failed)


if __name__ == "__main__":
    sys.exit(main())
