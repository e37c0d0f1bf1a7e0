"""Benchmark (not a test), issue #15: many clients at once, regcache against the reference.

Two scenarios, each over three paths, in one run:

* ``small, warm``: ``--small-clients`` (default 64) clients pull ``--small-images`` (default 4)
  small multi-arch images (Docker manifest lists for linux/amd64 and linux/arm64/v8, alpine-like:
  three small layers, the first shared by every image, as ``small_big.py``'s) from a warm cache,
  each client pulling again and again for ``--duration`` seconds (default 20);
* ``big, cold``: ``--big-clients`` (default 16) clients pull the big image (``--big-size``, default
  256 MiB, in ``--big-layers`` 4 layers of incompressible data) at the same moment from an empty
  cache, once each: a run takes minutes (about 12 with the defaults on 2 cores).

Paths, all on 127.0.0.1, one upstream behind them (``small_big.Bed``: token server, distribution
with CDN-style ``307`` redirects, CDN stand-in):

* ``proxy``: ``regcache run``; clients address ``https://registry-1.docker.io`` through it
  (``CONNECT`` + TLS with regcache's CA for every request), follow its ``307`` to the blob endpoint
  directly (loopback);
* ``mirror``: the same regcache's plain-HTTP registry mirror (another process of it: each path
  gets its own, so memory and CPU are each path's own);
* ``reference``: Debian's ``docker-registry`` (distribution 2.8.2) in proxy mode, plain HTTP, as the
  mirror (its port, too).

Each (scenario, path) runs ``--runs`` times (default 5), the paths taking turns in an order that
rotates from run to run; every run gets a new cache process (warm: filled by one pull of every
image first, every blob stored before the clock starts; cold: empty). Medians over the runs.

The clients are ``bench.loadclient`` (one asyncio process, its module docstring says how it pulls:
as dockerd — tag ``HEAD``, then ``GET`` by digest — or as skopeo — ``GET`` by tag — alternating
client by client; a new connection per request; every manifest's and blob's sha256 checked).
Anchoring it: ``--real`` real clients (default one skopeo and, as root, one dockerd) pull image 0
at the same time, again and again while the load runs (cold: once, with the others), checked as
``small_big.py`` checks them.

Per phase: requests/s and pulls/s over the window (release to the last pull's end), per-request
latency p50/p99 (new connection to last byte, per kind too), pull time p50/p99, errors (failed
pulls: any request failing, any digest not matching), the server's CPU (% of one core) and peak
memory (VmRSS sampled every 100 ms; VmHWM), the client's CPU, the upstream registries' CPU, what
everything else on the machine took (``CpuAccount``) and the CPU steal; upstream requests and
bytes from the registries', CDN's and token server's own logs (cold: bytes against the image).

``--profile``: a py-spy record of regcache (flame graph SVG, ``--profile-format raw`` for collapsed
stacks) for each regcache phase. ``--snapshot``: measure a frozen copy of the code.

Output (``--out``, default ``bench-results/load-<UTC time>``): ``table.md`` (also printed),
``results.json`` (every phase, raw). Everything started is stopped on exit, Ctrl-C included.

Run: ``scripts/bench/run-load [--runs 5] [--scenarios small-warm,big-cold] [--paths proxy,mirror,reference]
[--small-clients 64] [--small-images 4] [--duration 20] [--big-clients 16] [--big-size 256MiB]
[--big-layers 4] [--real skopeo,dockerd] [--profile] [--out DIR] [--workdir DIR] [--snapshot]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import bed
from bed.dockerd import DOCKERD, Dockerd
from bed.images import SKOPEO, ImageSpec, LayerSpec, PushedImage
from bed.registry import REGISTRY_BIN, free_port

from bench import loadclient
from bench.common import (
    ROOT,
    SNAPSHOT_HELP,
    SRC,
    CpuAccount,
    RssSampler,
    UpstreamTraffic,
    code_facts,
    cpu_counters,
    enter_workdir,
    listen_overflows,
    load_average,
    log,
    machine_facts,
    median,
    positive_int,
    prepare_process,
    process_cpu_seconds,
    sources_under_test,
    status_kib,
    steal_since,
    terminate_children,
)
from bench.small_big import (
    BIG,
    MB,
    PY_SPY,
    RSS_LIMIT,
    Bed,
    Cache,
    CacheTurns,
    DockerdClient,
    PullClient,
    SkopeoClient,
    _choices,
    describe_image,
    fmt_mb,
    image_bytes,
    image_specs,
    py_spy_record,
    ratio,
    regcache_ca,
)
from regcache.config import ConfigError, parse_size

PROXY, MIRROR, REFERENCE = "proxy", "mirror", "reference"
PATHS = (PROXY, MIRROR, REFERENCE)
REGCACHE_PATHS = (PROXY, MIRROR)
SMALL_WARM, BIG_COLD = "small-warm", "big-cold"
SCENARIOS = (SMALL_WARM, BIG_COLD)
REAL_CLIENTS = ("skopeo", "dockerd")
TAG = "1"
ALL = "all"  # the latency of every request, whatever its kind


# -- bookkeeping (pure) ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1): a value that was measured; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Latency:
    count: int
    p50: float  # seconds
    p99: float


def latencies(requests: Sequence[Sequence[object]]) -> dict[str, Latency]:
    """Per request kind (and :data:`ALL`): count, p50, p99 of the seconds of the client's records."""
    by: dict[str, list[float]] = {ALL: []}
    for kind, _status, seconds, _size, _ok in requests:
        by.setdefault(str(kind), []).append(float(seconds))  # type: ignore[arg-type]
        by[ALL].append(float(seconds))  # type: ignore[arg-type]
    return {k: Latency(len(v), percentile(v, 0.5), percentile(v, 0.99)) for k, v in by.items()}


@dataclass(frozen=True)
class RealPull:
    """One pull by a real client (skopeo, dockerd) while the load ran."""

    client: str
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class Phase:
    """One scenario over one path, one run: what the clients, the server and the upstream saw."""

    scenario: str
    path: str
    run: int
    clients: int
    window: float  # seconds, release to the last pull's end
    requests: int
    failed_requests: int
    pulls: int
    failed_pulls: int
    latency: dict[str, Latency]
    pull_p50: float
    pull_p99: float
    bytes_to_clients: int
    image_bytes: int  # one pull of every image the scenario pulls, for upstream bytes against it
    image_blob_bytes: int
    server_cpu: float  # CPU seconds of the cache process during the phase
    server_rss_peak: int  # bytes, sampled VmRSS maximum
    server_hwm: int  # bytes, VmHWM right after the phase (the process's whole life: it is new per phase)
    client_cpu: float
    upstream_cpu: float  # the bed's registry processes
    bench_cpu: float  # this process: the bed's token server and CDN (threads), samplers
    foreign_cpu: float  # everything else on the machine meanwhile
    steal: str
    upstream: dict[str, object]
    upstream_requests: int
    upstream_bytes: int
    upstream_blob_bytes: int
    listen_overflows: int = 0  # connections dropped by full accept queues (machine-wide)
    real: list[RealPull] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    source_changed: bool = False

    @property
    def pulls_per_s(self) -> float:
        return (self.pulls - self.failed_pulls) / self.window if self.window > 0 else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window if self.window > 0 else float("nan")

    @property
    def server_cpu_share(self) -> float:
        """The server's CPU as a share of one core over the window (1.0: one core busy throughout)."""
        return self.server_cpu / self.window if self.window > 0 else float("nan")

    @property
    def server_cpu_per_pull(self) -> float:
        """The server's CPU seconds per pull: what one pull costs it, however busy the machine was."""
        return self.server_cpu / self.pulls if self.pulls else float("nan")

    @property
    def client_cpu_share(self) -> float:
        return self.client_cpu / self.window if self.window > 0 else float("nan")

    @property
    def megabytes_per_s(self) -> float:
        return self.bytes_to_clients / self.window / MB if self.window > 0 else float("nan")

    def line(self) -> str:
        """One log line while the bench runs."""
        every = self.latency.get(ALL, Latency(0, float("nan"), float("nan")))
        real = ", ".join(f"{r.client} {r.seconds:.2f} s" + ("" if r.ok else " FAILED") for r in self.real)
        return (
            f"{self.scenario} {self.path} run {self.run}: {self.pulls - self.failed_pulls}/{self.pulls} pulls in "
            f"{self.window:.1f} s = {self.pulls_per_s:.1f}/s, {self.requests_per_s:.0f} requests/s, p50 "
            f"{ms(every.p50)} ms, p99 {ms(every.p99)} ms, server CPU {pct(self.server_cpu_share)} "
            f"({ms(self.server_cpu_per_pull)} ms/pull), client CPU "
            f"{pct(self.client_cpu_share)}, VmHWM {fmt_mb(self.server_hwm)} MB, upstream {self.upstream_requests} "
            f"requests {fmt_mb(self.upstream_bytes)} MB, others {self.foreign_cpu:.1f} CPU s, steal {self.steal}, "
            f"listen overflows {self.listen_overflows}"
            + (f"; real: {real}" if real else "")
        )


@dataclass(frozen=True)
class Summary:
    """Medians of one (scenario, path) over its runs; errors and memory over all of them."""

    scenario: str
    path: str
    runs: int
    clients: int
    pulls_per_s: float
    requests_per_s: float
    p50: float
    p99: float
    pull_p50: float
    pull_p99: float
    window: float
    megabytes_per_s: float
    failed_pulls: int  # all runs together
    pulls: int
    server_cpu_share: float
    server_cpu_per_pull: float
    client_cpu_share: float
    server_hwm: int  # max
    upstream_requests_per_pull: float
    upstream_bytes: float
    upstream_blob_bytes: float
    image_bytes: int
    image_blob_bytes: int
    foreign_cpu: float

    @property
    def blob_bytes_vs_image(self) -> float | None:
        return ratio(self.upstream_blob_bytes, self.image_blob_bytes)

    @property
    def bytes_vs_image(self) -> float | None:
        return ratio(self.upstream_bytes, self.image_bytes)


def summarize(phases: Sequence[Phase]) -> list[Summary]:
    out = []
    for scenario in SCENARIOS:
        for path in PATHS:
            ps = [p for p in phases if p.scenario == scenario and p.path == path]
            if not ps:
                continue
            pulls = sum(p.pulls for p in ps)
            out.append(
                Summary(
                    scenario=scenario,
                    path=path,
                    runs=len(ps),
                    clients=ps[0].clients,
                    pulls_per_s=median([p.pulls_per_s for p in ps]),
                    requests_per_s=median([p.requests_per_s for p in ps]),
                    p50=median([p.latency[ALL].p50 for p in ps if ALL in p.latency]),
                    p99=median([p.latency[ALL].p99 for p in ps if ALL in p.latency]),
                    pull_p50=median([p.pull_p50 for p in ps]),
                    pull_p99=median([p.pull_p99 for p in ps]),
                    window=median([p.window for p in ps]),
                    megabytes_per_s=median([p.megabytes_per_s for p in ps]),
                    failed_pulls=sum(p.failed_pulls for p in ps),
                    pulls=pulls,
                    server_cpu_share=median([p.server_cpu_share for p in ps]),
                    server_cpu_per_pull=median([p.server_cpu_per_pull for p in ps]),
                    client_cpu_share=median([p.client_cpu_share for p in ps]),
                    server_hwm=max(p.server_hwm for p in ps),
                    upstream_requests_per_pull=median([p.upstream_requests / max(1, p.pulls) for p in ps]),
                    upstream_bytes=median([p.upstream_bytes for p in ps]),
                    upstream_blob_bytes=median([p.upstream_blob_bytes for p in ps]),
                    image_bytes=ps[0].image_bytes,
                    image_blob_bytes=ps[0].image_blob_bytes,
                    foreign_cpu=median([p.foreign_cpu for p in ps]),
                )
            )
    return out


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    value = seconds * 1000
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def secs(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"


def pct(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.0f} %"


def vs(mine: float, reference: float | None) -> str:
    r = ratio(mine, reference)
    return "-" if r is None else f"{r:.2f}x"


# -- the report ----------------------------------------------------------------------------------


def small_table(summaries: Sequence[Summary]) -> list[str]:
    ref = next((s for s in summaries if s.path == REFERENCE), None)
    lines = [
        "| path | runs | clients | pulls/s | vs reference | requests/s | p50 ms | p99 ms | pull p50 s | pull p99 s "
        "| failed pulls | server CPU | server CPU ms/pull | server VmHWM MB | client CPU | upstream requests/pull "
        "| others' CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.path} | {s.runs} | {s.clients} | {s.pulls_per_s:.1f} "
            f"| {vs(s.pulls_per_s, ref.pulls_per_s if ref else None)} | {s.requests_per_s:.0f} | {ms(s.p50)} "
            f"| {ms(s.p99)} | {secs(s.pull_p50)} | {secs(s.pull_p99)} | {s.failed_pulls} of {s.pulls} "
            f"| {pct(s.server_cpu_share)} | {ms(s.server_cpu_per_pull)} | {fmt_mb(s.server_hwm)} "
            f"| {pct(s.client_cpu_share)} | {s.upstream_requests_per_pull:.1f} | {s.foreign_cpu:.0f} |"
        )
    return lines


def big_table(summaries: Sequence[Summary]) -> list[str]:
    ref = next((s for s in summaries if s.path == REFERENCE), None)
    lines = [
        "| path | runs | clients | wall s | vs reference | MB/s to clients | requests/s | p50 ms | p99 ms "
        "| failed pulls | upstream MB | blob bytes vs image | server CPU | server VmHWM MB | client CPU "
        "| others' CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        blob_ratio = s.blob_bytes_vs_image
        lines.append(
            f"| {s.path} | {s.runs} | {s.clients} | {secs(s.window)} | {vs(s.window, ref.window if ref else None)} "
            f"| {s.megabytes_per_s:.0f} | {s.requests_per_s:.0f} | {ms(s.p50)} | {ms(s.p99)} "
            f"| {s.failed_pulls} of {s.pulls} | {fmt_mb(s.upstream_bytes)} "
            f"| {'-' if blob_ratio is None else f'{blob_ratio:.2f}x'} | {pct(s.server_cpu_share)} "
            f"| {fmt_mb(s.server_hwm)} | {pct(s.client_cpu_share)} | {s.foreign_cpu:.0f} |"
        )
    return lines


def kinds_table(phases: Sequence[Phase]) -> list[str]:
    lines = ["| scenario | path | request | per run | p50 ms | p99 ms |", "|---|---|---|---:|---:|---:|"]
    for scenario in SCENARIOS:
        for path in PATHS:
            ps = [p for p in phases if p.scenario == scenario and p.path == path]
            kinds = sorted({k for p in ps for k in p.latency if k != ALL})
            for kind in kinds:
                got = [p.latency[kind] for p in ps if kind in p.latency]
                lines.append(
                    f"| {scenario} | {path} | {kind} | {median([g.count for g in got]):.0f} "
                    f"| {ms(median([g.p50 for g in got]))} | {ms(median([g.p99 for g in got]))} |"
                )
    return lines


def real_table(phases: Sequence[Phase]) -> list[str]:
    lines = [
        "| scenario | path | client | pulls | failed | median s | synthetic pull p50 s (same phases) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for scenario in SCENARIOS:
        for path in PATHS:
            ps = [p for p in phases if p.scenario == scenario and p.path == path]
            for client in sorted({r.client for p in ps for r in p.real}):
                pulls = [r for p in ps for r in p.real if r.client == client]
                good = [r.seconds for r in pulls if r.ok]
                lines.append(
                    f"| {scenario} | {path} | {client} | {len(pulls)} | {len(pulls) - len(good)} "
                    f"| {secs(median(good))} | {secs(median([p.pull_p50 for p in ps]))} |"
                )
    return lines


def runs_table(phases: Sequence[Phase]) -> list[str]:
    lines = [
        "| scenario | path | run | window s | pulls | failed | pulls/s | requests/s | p50 ms | p99 ms "
        "| server CPU s | client CPU s | upstream CPU s | bench CPU s | others' CPU s | steal | VmHWM MB "
        "| upstream requests | upstream MB | listen overflows |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in sorted(phases, key=lambda p: (SCENARIOS.index(p.scenario), p.run, PATHS.index(p.path))):
        every = p.latency.get(ALL, Latency(0, float("nan"), float("nan")))
        lines.append(
            f"| {p.scenario} | {p.path} | {p.run} | {secs(p.window)} | {p.pulls} | {p.failed_pulls} "
            f"| {p.pulls_per_s:.1f} | {p.requests_per_s:.0f} | {ms(every.p50)} | {ms(every.p99)} "
            f"| {p.server_cpu:.1f} | {p.client_cpu:.1f} | {p.upstream_cpu:.1f} | {p.bench_cpu:.1f} "
            f"| {p.foreign_cpu:.1f} | {p.steal} | {fmt_mb(p.server_hwm)} | {p.upstream_requests} "
            f"| {fmt_mb(p.upstream_bytes)} | {p.listen_overflows} |"
        )
    return lines


@dataclass(frozen=True)
class Check:
    target: str
    passed: bool | None  # None: reported, no verdict
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "INFO"}[self.passed]
        return f"- **{verdict}** {self.target}: {self.detail}"


def target_checks(summaries: Sequence[Summary]) -> list[Check]:
    by = {(s.scenario, s.path): s for s in summaries}
    checks = []
    for s in summaries:
        where = f"{s.scenario}, {s.path}"
        if s.path in REGCACHE_PATHS:
            checks.append(Check(f"errors = 0 ({where})", s.failed_pulls == 0, f"{s.failed_pulls} of {s.pulls} pulls"))
        elif s.failed_pulls:
            checks.append(Check(f"reference errors ({where})", None, f"{s.failed_pulls} of {s.pulls} pulls failed"))
    hwm = [s.server_hwm for s in summaries if s.path in REGCACHE_PATHS]
    if hwm:
        ref_hwm = [s.server_hwm for s in summaries if s.path == REFERENCE]
        reference = f" (reference {fmt_mb(max(ref_hwm))} MB)" if ref_hwm else ""
        checks.append(
            Check(
                f"regcache peak RSS (VmHWM) < {RSS_LIMIT / MB:.0f} MB",
                max(hwm) < RSS_LIMIT,
                f"max {fmt_mb(max(hwm))} MB{reference}",
            )
        )
    for path in REGCACHE_PATHS:
        cold, ref = by.get((BIG_COLD, path)), by.get((BIG_COLD, REFERENCE))
        if cold is not None:
            r = cold.blob_bytes_vs_image
            reference = f"; reference {ref.blob_bytes_vs_image:.2f}x" if ref and ref.blob_bytes_vs_image else ""
            checks.append(
                Check(
                    f"cold upstream blob bytes = 1.0x the image ({path}, {cold.clients} clients)",
                    r is not None and round(r, 3) == 1.0,
                    f"{'-' if r is None else f'{r:.2f}x'} of {fmt_mb(cold.image_blob_bytes)} MB{reference}",
                )
            )
            if ref is not None:
                checks.append(
                    Check(
                        f"cold big pull ≤ 1.0x the reference's wall time ({path}, {cold.clients} clients)",
                        cold.window <= ref.window,
                        f"{secs(cold.window)} s vs {secs(ref.window)} s = {vs(cold.window, ref.window)}",
                    )
                )
        warm, ref = by.get((SMALL_WARM, path)), by.get((SMALL_WARM, REFERENCE))
        if warm is not None and ref is not None:
            # The proxy pays a CONNECT and a TLS handshake per request that the reference (plain
            # HTTP) does not: reported, no verdict. The mirror speaks what the reference speaks.
            checks.append(
                Check(
                    f"warm small pulls/s ≥ the reference's ({path}, {warm.clients} clients)",
                    warm.pulls_per_s >= ref.pulls_per_s if path == MIRROR else None,
                    f"{warm.pulls_per_s:.1f} vs {ref.pulls_per_s:.1f} = {vs(warm.pulls_per_s, ref.pulls_per_s)}; "
                    f"p99 {ms(warm.p99)} vs {ms(ref.p99)} ms",
                )
            )
    return checks


def findings(phases: Sequence[Phase], notes: Sequence[str]) -> list[str]:
    out = list(notes)
    cores = len(os.sched_getaffinity(0))
    for p in phases:
        where = f"{p.scenario}, {p.path}, run {p.run}"
        if p.foreign_cpu >= 1 and p.foreign_cpu > 0.1 * p.window * cores:
            out.append(f"{where}: other processes used {p.foreign_cpu:.0f} CPU s meanwhile; its numbers are inflated")
        if p.listen_overflows:
            out.append(
                f"{where}: {p.listen_overflows} connections dropped by a full accept queue (a listen backlog: "
                "the client retries the SYN after 1 s or more)"
            )
        if p.source_changed:
            out.append(f"{where}: addon/ or scripts/bed/ changed while it ran (mitmdump reloads its scripts): discard")
        out += [f"{where}: {message}" for message in p.messages[:5]]
        out += [f"{where}: real {r.client} failed: {r.error}" for r in p.real if not r.ok][:3]
        if p.scenario == SMALL_WARM and p.upstream_blob_bytes:
            out.append(f"{where}: {fmt_mb(p.upstream_blob_bytes)} MB of blobs fetched upstream by a warm cache")
    return out


def report(phases: Sequence[Phase], facts: Sequence[str], notes: Sequence[str]) -> tuple[str, list[Check]]:
    summaries = summarize(phases)
    checks = target_checks(summaries)
    lines = ["# regcache under load: many clients at once (issue #15)", "", *[f"- {f}" for f in facts]]
    small = [s for s in summaries if s.scenario == SMALL_WARM]
    if small:
        lines += ["", f"## {small[0].clients} clients, small images, warm", "", *small_table(small), ""]
        lines.append(
            "Each client pulls again and again for the duration; pulls/s and requests/s over the window "
            "(release to the last pull's end), medians of the runs. p50/p99: per request, new connection to "
            "last byte (CONNECT and TLS included through the proxy). Server CPU: the cache process's, as a share "
            "of one core over the window; client CPU likewise (one asyncio process for every client). "
            "Upstream requests/pull: registry + CDN + token server, from their own logs. MB = 10^6 bytes."
        )
    big = [s for s in summaries if s.scenario == BIG_COLD]
    if big:
        lines += ["", f"## {big[0].clients} clients, the big image, cold", "", *big_table(big), ""]
        lines.append(
            "Every client pulls once, all released together, from an empty cache; wall = release to the last "
            "pull's end. Upstream: what the registry, CDN and token server saw (CDN blob bytes against one "
            "image's blobs: single flight means 1.00x however many clients)."
        )
    lines += ["", "## Latency by request", "", *kinds_table(phases)]
    if any(p.real for p in phases):
        lines += ["", "## Real clients in the same load", "", *real_table(phases), ""]
        lines.append(
            "Real clients pulling image 0 while the synthetic ones ran (warm: again and again; cold: once, "
            "released with them): the synthetic client's pull time should be of their order."
        )
    lines += ["", "## Targets", "", *[c.line() for c in checks]]
    lines += ["", "## Every run", "", *runs_table(phases)]
    found = findings(phases, notes)
    lines += ["", "## Findings", "", *([f"- {f}" for f in found] or ["- nothing unexpected"])]
    return "\n".join(lines) + "\n", checks


# -- images -------------------------------------------------------------------------------------------


def small_specs(count: int) -> list[ImageSpec]:
    """``count`` alpine-like multi-arch images: the shared base layer of ``small_big.py``'s small
    image, and two small layers of each image's own."""
    return [
        ImageSpec(
            f"library/bench-load-{i}",
            ("linux/amd64", "linux/arm64/v8"),
            (LayerSpec(f"bench-load-{i}-app", files=4, file_size=64 * 1024), LayerSpec(f"bench-load-{i}-etc", files=2)),
            shared=(LayerSpec("bench-multi-base", files=8, file_size=128 * 1024),),
        )
        for i in range(count)
    ]


def client_image(image: PushedImage) -> loadclient.Image:
    return loadclient.Image(
        image.repo, image.tag, image.digest, image.amd64_digest, [(b.digest, b.size) for b in image.blobs]
    )


# -- measuring one phase -------------------------------------------------------------------------


class Meters:
    """What a phase cost, from the ``with`` block's start to its end: CPU of the cache process (its
    peak memory too), of the bed's registries, of this process (the bed's token server and CDN) and of
    everything else on the machine, the CPU steal, and the upstream's traffic from its own logs."""

    def __init__(self, bed_: Bed, server: int | None, blob_sizes: dict[str, int]) -> None:
        self._bed = bed_
        self.server = server
        self._sizes = blob_sizes
        self._upstream_pids = [bed_.hub.pid, bed_.loopback.pid]
        self.cpu = CpuAccount()
        self.rss = RssSampler(server)
        self.server_cpu = self.upstream_cpu = self.bench_cpu = 0.0
        self.hwm = 0
        self.steal = "-"
        self.traffic: UpstreamTraffic | None = None
        self.source_changed = False
        self.overflows = 0

    def _cpu(self) -> tuple[float, float, float]:
        upstream = sum(process_cpu_seconds(p) for p in self._upstream_pids)
        return process_cpu_seconds(self.server), upstream, _self_cpu()

    def __enter__(self) -> Meters:
        self._sources, self._mark, self._counters = sources_under_test(), self._bed.upstream.mark(), cpu_counters()
        self._before, self._overflows = self._cpu(), listen_overflows()
        self.cpu.__enter__()
        self.rss.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss.__exit__(*exc)
        self.cpu.__exit__(*exc)
        self.steal = steal_since(self._counters)
        self.server_cpu, self.upstream_cpu, self.bench_cpu = (
            after - before for after, before in zip(self._cpu(), self._before, strict=True)
        )
        hwm = status_kib(self.server, "VmHWM") if self.server is not None else None
        self.hwm = (hwm or 0) * 1024
        self.traffic = self._bed.upstream.since(self._mark, self._sizes)
        self.source_changed = self._sources != sources_under_test()
        self.overflows = listen_overflows() - self._overflows


def make_phase(
    scenario: str,
    path: str,
    run: int,
    clients: int,
    images: Sequence[PushedImage],
    results: loadclient.Results,
    real: list[RealPull],
    meters: Meters,
) -> Phase:
    traffic = meters.traffic
    assert traffic is not None, "the phase was not measured"
    pull_seconds = [p[4] for p in results.pulls if p[5]]
    requests = results.requests
    return Phase(
        scenario=scenario,
        path=path,
        run=run,
        clients=clients,
        window=results.ended - results.started,
        requests=len(requests),
        failed_requests=sum(1 for r in requests if not r[4]),
        pulls=len(results.pulls),
        failed_pulls=results.errors,
        latency=latencies(requests),
        pull_p50=percentile(pull_seconds, 0.5),
        pull_p99=percentile(pull_seconds, 0.99),
        bytes_to_clients=sum(r[3] for r in requests),
        image_bytes=sum(image_bytes(i) for i in images),
        image_blob_bytes=sum({b.digest: b.size for i in images for b in i.blobs}.values()),
        server_cpu=meters.server_cpu,
        server_rss_peak=meters.rss.peak,
        server_hwm=meters.hwm,
        client_cpu=results.cpu,
        upstream_cpu=meters.upstream_cpu,
        bench_cpu=meters.bench_cpu,
        foreign_cpu=meters.cpu.foreign,
        steal=meters.steal,
        upstream=traffic.summary(),
        upstream_requests=traffic.requests,
        upstream_bytes=traffic.upstream_bytes,
        upstream_blob_bytes=traffic.cdn_bytes,
        listen_overflows=meters.overflows,
        real=real,
        messages=results.messages,
        source_changed=meters.source_changed,
    )


# -- real clients ----------------------------------------------------------------------------------


class RealClients:
    """Real skopeo / dockerd pulls of one image alongside the load: in threads, until ``stop``
    (or once each). Their pulls go in ``pulls``."""

    def __init__(
        self,
        clients: Sequence[tuple[str, PullClient]],
        ref: Callable[[str], str],
        image: PushedImage,
        via_proxy: bool,
        once: bool,
    ) -> None:
        self.pulls: list[RealPull] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(name, client, ref(name), image, via_proxy, once), daemon=True)
            for name, client in clients
        ]

    def _loop(self, name: str, client: PullClient, ref: str, image: PushedImage, via_proxy: bool, once: bool) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                client.pull(ref, image, via_proxy)
                self.pulls.append(RealPull(name, time.monotonic() - started, True))
            except Exception as e:
                self.pulls.append(RealPull(name, time.monotonic() - started, False, str(e)[:300]))
            with contextlib.suppress(Exception):
                client.forget(ref)
            if once:
                return

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


# -- the bench ---------------------------------------------------------------------------------------


class Bench(CacheTurns):
    def __init__(self, args: argparse.Namespace, workdir: Path, out: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.out = out
        self.stack = stack
        self.phases: list[Phase] = []
        self.notes: list[str] = []
        self.small: list[PushedImage] = []
        self.big: PushedImage | None = None
        self.confdir = workdir / "regcache-conf"
        self.ca = regcache_ca(self.confdir)
        self.regcache_port = free_port()
        self.mirror_port = free_port()
        self.real: list[tuple[str, PullClient]] = []
        self._bed: Bed | None = None

    @property
    def bed(self) -> Bed:
        if self._bed is None:
            raise RuntimeError("the bed is not running")
        return self._bed

    def setup(self) -> None:
        self._bed = Bed(self.workdir / "bed", self.stack)
        if SMALL_WARM in self.args.scenarios:
            self.small = [self.bed.push(spec, True) for spec in small_specs(self.args.small_images)]
        if BIG_COLD in self.args.scenarios:
            spec, all_platforms = image_specs(self.args.big_size, self.args.big_layers)[BIG]
            self.big = self.bed.push(spec, all_platforms)
        proxy_url = f"http://127.0.0.1:{self.regcache_port}"
        for i, name in enumerate(self.args.real):
            if name == "skopeo":
                self.real.append((name, SkopeoClient(self.workdir / "skopeo" / f"c{i}", proxy_url, self.ca)))
            else:
                # Its registry-mirrors: where the reference, or regcache's mirror, listens in its turn.
                mirror = ("--registry-mirror", f"http://127.0.0.1:{self.mirror_port}")
                daemon = Dockerd(self.workdir / "dockerd", proxy_url, self.ca, extra_args=mirror)
                self.stack.callback(daemon.close)
                daemon.start()
                self.real.append((name, DockerdClient(daemon)))

    def spec(self, path: str, images: Sequence[PushedImage], clients: int, duration: float | None) -> loadclient.Spec:
        if path == PROXY:
            base, proxy, ca = f"https://{bed.REGISTRY_HOST}", f"http://127.0.0.1:{self.regcache_port}", str(self.ca)
        else:  # the mirror, and the reference on the mirror's port
            base, proxy, ca = f"http://127.0.0.1:{self.mirror_port}", None, None
        return loadclient.Spec(
            base, proxy, ca, [client_image(i) for i in images], clients, list(self.args.patterns), duration
        )

    def load(self, spec: loadclient.Spec, label: str, real: RealClients | None = None) -> loadclient.Results:
        """Run the load client process on ``spec``; real clients start when it releases its clients."""
        work = self.workdir / "load"
        work.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = work / f"{label}-spec.json", work / f"{label}-result.json"
        spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC / "scripts"), str(SRC / "addon")])}
        command = [sys.executable, "-m", "bench.loadclient", str(spec_path), str(result_path)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        try:
            if proc.stdout.readline().strip() == loadclient.RELEASED and real is not None:
                real.start()
            proc.stdout.read()
            status = proc.wait()
        finally:
            if real is not None:
                real.stop()
            if proc.poll() is None:  # interrupted: the clients go first
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if status != 0:
            raise RuntimeError(f"the load client failed ({status}) for {label}")
        raw = json.loads(result_path.read_text())
        return loadclient.Results(**raw)

    def phase(
        self, scenario: str, path: str, run: int, images: Sequence[PushedImage], clients: int, duration: float | None
    ) -> None:
        label = f"{scenario}-{path}-run{run}"
        with self.running(self.new_cache(path, label)) as cache:
            if scenario == SMALL_WARM:
                self.fill(cache, path, images, label)
            pid = cache.pid
            real = None
            if self.real:
                image = images[0]
                real = RealClients(self.real, partial_ref(cache, image), image, cache.via_proxy, once=duration is None)
            spec = self.spec(path, images, clients, duration)
            log_mark = cache.mark()
            meters = Meters(self.bed, pid, {b.digest: b.size for i in images for b in i.blobs})
            profile = self.args.profile and path in REGCACHE_PATHS and pid is not None
            dest = self.out / f"profile-{label}.{'svg' if self.args.profile_format == 'flamegraph' else 'txt'}"
            with meters, py_spy_record(pid, dest, self.args.profile_format) if profile and pid else nullcontext():
                results = self.load(spec, label, real)
            try:
                cache.check(log_mark)
            except RuntimeError as e:
                self.notes.append(f"{label}: {e}")
        phase = make_phase(scenario, path, run, clients, images, results, real.pulls if real else [], meters)
        self.phases.append(phase)
        log(phase.line())
        for message in phase.messages[:3]:
            log(f"  error: {message}")

    def fill(self, cache: Cache, path: str, images: Sequence[PushedImage], label: str) -> None:
        """Warm the cache: one pull of every image through the phase's path, one image after the
        other, every blob stored before the next. (At once, the reference fetches a layer that
        several images share once for all of them, but links it into one repository only, and
        then fetches it again for the others on every warm pull.)"""
        mark = cache.mark()  # a layer the images share is stored once, by the first image's pull
        for i, image in enumerate(images):
            results = self.load(self.spec(path, [image], 1, None), f"{label}-fill{i}")
            if results.errors:
                raise RuntimeError(f"{label}: filling the cache failed: {results.messages[:3]}")
            if cache.wait_stored(image, mark) is None:
                self.notes.append(f"{label}: not every blob of {image.ref} stored; warm may not be")

    def run(self) -> None:
        a = self.args
        for scenario in a.scenarios:
            if scenario == SMALL_WARM:
                images, clients, duration = self.small, a.small_clients, a.duration
            else:
                assert self.big is not None
                images, clients, duration = [self.big], a.big_clients, None
            for run in range(1, a.runs + 1):
                for path in rotated(a.paths, run):
                    self.phase(scenario, path, run, images, clients, duration)

    def facts(self, load_before: str, code: str, counters_before: list[int]) -> list[str]:
        a = self.args
        tools = {"upstream and reference": [REGISTRY_BIN, "--version"], "skopeo": [SKOPEO, "--version"]}
        if "dockerd" in a.real:
            tools["dockerd"] = [DOCKERD, "--version"]
        command = (
            f"scripts/bench/run-load --runs {a.runs} --scenarios {','.join(a.scenarios)} --paths {','.join(a.paths)} "
            f"--small-clients {a.small_clients} --small-images {a.small_images} --duration {a.duration:g} "
            f"--big-clients {a.big_clients} --big-size {a.big_size_text} --big-layers {a.big_layers} "
            f"--patterns {','.join(a.patterns)} --real {','.join(a.real) or 'none'}"
            + (" --profile" if a.profile else "")
            + (" --snapshot" if a.snapshot else "")
        )
        images = [describe_image(f"small {i}", image) for i, image in enumerate(self.small)]
        images += [describe_image("big", self.big)] if self.big else []
        return [
            *machine_facts(tools),
            code,
            f"load average (1 min): {load_before} before the bench, {load_average()} at its end; "
            f"CPU steal (time the VM's host gave other guests) during the bench: {steal_since(counters_before)}",
            *images,
            f"{a.runs} run(s) per scenario; per run the paths take turns, the order rotating; a new cache process "
            "for every phase; clients pull as "
            + " and ".join(a.patterns)
            + f" (alternating), a new connection per request, {loadclient.BLOB_CONCURRENCY} blobs at a time",
            f"command: `{command}`",
        ]

    def write(self, load_before: str, code: str, counters_before: list[int], error: str | None) -> int:
        facts = self.facts(load_before, code, counters_before)
        notes = [f"INCOMPLETE: {error}"] if error else []
        text, checks = report(self.phases, facts, notes + self.notes)
        print(text, end="")
        (self.out / "table.md").write_text(text)
        results = {
            "facts": facts,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "phases": [
                {
                    **dataclasses.asdict(p),
                    "pulls_per_s": p.pulls_per_s,
                    "requests_per_s": p.requests_per_s,
                    "server_cpu_share": p.server_cpu_share,
                }
                for p in self.phases
            ],
            "summary": [dataclasses.asdict(s) for s in summarize(self.phases)],
            "checks": [dataclasses.asdict(c) for c in checks],
            "error": error,
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"wrote {self.out}/table.md, results.json")
        return sum(1 for c in checks if c.passed is False)


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def partial_ref(cache: Cache, image: PushedImage) -> Callable[[str], str]:
    """How each real client names ``image`` on ``cache``."""
    return lambda client: cache.ref(client, image.ref)


def rotated(paths: Sequence[str], run: int) -> list[str]:
    """The paths in an order that rotates from run to run: what one phase leaves behind (the
    kernel's writeback, dockerd's clean-up) slows the next, and with a fixed order always the same."""
    shift = (run - 1) % len(paths)
    return [*paths[shift:], *paths[:shift]]


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench-load",
        description="Many clients at once: small images warm and the big image cold, through regcache's proxy "
        "and mirror and through Debian's docker-registry in proxy mode (issue #15).",
    )
    parser.add_argument("--runs", type=positive_int, default=5, help="runs of every scenario and path (default 5)")
    parser.add_argument("--scenarios", type=_choices(SCENARIOS), default=list(SCENARIOS), help="small-warm,big-cold")
    parser.add_argument("--paths", type=_choices(PATHS), default=list(PATHS), help="proxy,mirror,reference")
    parser.add_argument("--small-clients", type=positive_int, default=64, help="clients at once, small (default 64)")
    parser.add_argument("--small-images", type=positive_int, default=4, help="small images to pull (default 4)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each small phase pulls (default 20)")
    parser.add_argument("--big-clients", type=positive_int, default=16, help="clients at once, big (default 16)")
    parser.add_argument("--big-size", default="256MiB", help="the big image's layer data (default 256MiB)")
    parser.add_argument("--big-layers", type=positive_int, default=4, help="the big image's layers (default 4)")
    parser.add_argument(
        "--patterns", type=_choices(loadclient.PATTERNS), default=list(loadclient.PATTERNS), help="dockerd,skopeo"
    )
    parser.add_argument(
        "--real",
        type=lambda text: [] if text == "none" else _choices(REAL_CLIENTS)(text),
        default=None,
        help="real clients pulling alongside: skopeo,dockerd (default: both as root, else skopeo), or none",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy record of regcache for each regcache phase")
    parser.add_argument("--profile-format", default="flamegraph", choices=("flamegraph", "raw", "speedscope"))
    parser.add_argument("--out", type=Path, help="for table.md, results.json (default bench-results/load-<time>)")
    parser.add_argument("--workdir", type=Path, help="keep the bed (layouts, registry storage, logs) here")
    parser.add_argument("--snapshot", action="store_true", help=SNAPSHOT_HELP)
    args = parser.parse_args(argv)
    try:
        args.big_size_text, args.big_size = args.big_size, parse_size("--big-size", args.big_size)
    except ConfigError as e:
        parser.error(str(e))
    if args.duration <= 0:
        parser.error("--duration must be more than 0")
    if args.real is None:
        args.real = ["skopeo", "dockerd"] if os.geteuid() == 0 and Path(DOCKERD).exists() else ["skopeo"]
    if args.out is None:
        args.out = ROOT / "bench-results" / f"load-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    missing = [tool for tool in (REGISTRY_BIN, SKOPEO) if not Path(tool).exists()]
    if "dockerd" in args.real and not Path(DOCKERD).exists():
        missing.append(DOCKERD)
    if args.profile and not PY_SPY.exists():
        missing.append(f"{PY_SPY} (scripts/setup test bench)")
    if missing:
        parser.error(f"missing: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prepare_process("bench.load", argv, args.snapshot)
    started = time.monotonic()
    load_before, code, counters_before = load_average(), code_facts(), cpu_counters()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    error: str | None = None
    with contextlib.ExitStack() as stack:
        workdir = enter_workdir(stack, args.workdir, scratch=("caches", "skopeo", "dockerd", "load"))
        log(f"results to {out}")
        bench = Bench(args, workdir, out, stack)
        try:
            bench.setup()
            # Registered after the servers, so it runs before they stop: clients go first.
            stack.callback(terminate_children, "skopeo", "docker", "py-spy")
            bench.run()
        except KeyboardInterrupt as e:
            log(f"interrupted ({e or 'Ctrl-C'}); cleaning up")
            error = f"interrupted ({e or 'Ctrl-C'})"
        except Exception as e:
            log(f"failed: {e}\n{traceback.format_exc()}")
            error = f"failed: {e}"
        failed = bench.write(load_before, code, counters_before, error)
    log(f"done in {time.monotonic() - started:.0f} s; {failed} target(s) failed")
    if error:
        return 130 if error.startswith("interrupted") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
