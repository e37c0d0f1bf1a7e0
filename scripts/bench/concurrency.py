"""Benchmark (not a test): regcache under N concurrent pulls of one big image.

What it measures, per scenario, with ``--clients`` skopeo processes pulling the same image at the
same moment (``skopeo copy docker://registry-1.docker.io/library/bench:1 dir:...``, one
destination directory each):

* ``pass-through`` — a plain, non-caching mitmdump that only routes Docker Hub's host names to the
  test bed (``bed.mitm.passthrough``): the baseline, what mitmproxy alone costs;
* ``regcache cold`` — a fresh regcache (``mitmdump -s addon/cache.py``, started exactly as the
  end-to-end tests start it, ``scripts/bed/regcache_run.py``) with an empty ``cache_dir``;
* ``regcache warm`` — the same regcache right after, every blob stored (the script waits for the
  ``STORED blob`` log lines before it starts).

For each: wall time from the common start to the last client's end, every client's manifest
digest checked against the registry's and every blob file's size checked (skopeo itself verifies
blob digests while it copies); upstream requests from the bed registry's own access log
(manifest GET/HEAD, blob GET/HEAD, ``/v2/``) and the token server's log; CDN requests from the
CDN's log, and upstream bytes = registry response bytes + the blob bytes the CDN sent (computed
from the blob sizes and any ``Range``, the CDN log has no byte count); the proxy's peak RSS during
the phase (VmRSS sampled every 100 ms) and its VmHWM afterwards; the CPU seconds the bench's own
processes used and those everything else on the machine took meanwhile (so a run disturbed by
someone else's work shows, and is flagged). Each scenario runs ``--runs``
times, interleaved (pass-through, cold, warm, then again), with a new regcache and an empty cache
for every cold run; the report gives medians and the ratio of each median wall time to the
pass-through one, then every run, then findings (e.g. a blob fetched upstream more than once
during the cold concurrent pull, which would defeat regcache's single flight).

The test bed (``tests/bed``) is imported and reused: token server, distribution 2.8.2 registry with
Docker-Hub-style CDN redirects, CDN stand-in, an image built and pushed with ``bed.images`` (one
``--layer-mib`` MiB layer, gzip level 0, plus a small layer). Everything listens on 127.0.0.1.

Everything it starts (servers, mitmdumps, skopeo processes) is stopped and its temporary working
directory removed on exit, Ctrl-C and SIGTERM included. With ``--workdir DIR`` the directory is kept
(logs, the built image layout and the registry storage, reused by the next run) and only the
pulled copies and regcache's caches are removed.

mitmdump re-loads an ``-s`` script when its file changes, which drops the fills in progress: a run
that overlaps an edit of ``addon/cache.py`` measures a broken pull, and as every run starts a new
regcache, runs can measure different versions. Phases during which ``addon/`` or ``scripts/bed/`` changed
are flagged in the findings. ``--snapshot`` avoids both: it copies ``addon/`` and ``scripts/`` to a
temporary directory at start and runs the whole bench (the addon script mitmdump loads included)
from that copy, so a long run measures one version while others keep editing.

Run: ``scripts/bench/run-concurrent [--clients 8] [--layer-mib 1024] [--runs 3] [--workdir DIR] [--snapshot]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bed
from bed.cdn import Cdn
from bed.images import SKOPEO, ImageSpec, LayerSpec, PushedImage, build_layout, describe, push
from bed.mitm import MitmDump, passthrough
from bed.regcache_run import Mitmdump
from bed.registry import REGISTRY_BIN, Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from bench.common import (
    MIB,
    SNAPSHOT_HELP,
    SRC,
    CpuAccount,
    RssSampler,
    UpstreamLogs,
    UpstreamTraffic,
    code_facts,
    enter_workdir,
    load_average,
    log,
    machine_facts,
    median,
    num,
    positive_int,
    prepare_process,
    release_together,
    source_digest,
    sources_under_test,
    terminate_children,
    wait_stored,
)

REPO = "library/bench"
TAG = "1"
PASS, COLD, WARM = "pass-through mitmdump", "regcache cold", "regcache warm"
SCENARIOS = (PASS, COLD, WARM)


# -- one measured phase ----------------------------------------------------------------


@dataclass
class Phase(UpstreamTraffic):
    """What one scenario's concurrent pull took, in one run (upstream traffic: the base class)."""

    scenario: str
    run: int
    clients: int
    wall: float  # common start → last client done, seconds
    client_seconds: list[float]
    rss_peak: int  # bytes, sampled VmRSS maximum during the phase
    hwm: int  # bytes, VmHWM right after the phase (whole process life)
    results: Counter[str] = field(default_factory=Counter)  # regcache log: "RESULT METHOD kind"
    pulled_bytes: int = 0  # image bytes delivered to all clients
    source_changed: bool = False  # addon/ or scripts/bed/ changed while the phase ran
    own_cpu: float = 0.0  # CPU seconds of the bench's processes (clients, proxy, bed) during the phase
    foreign_cpu: float = 0.0  # CPU seconds every other process on the machine took meanwhile


# -- the bench -------------------------------------------------------------------------


class Bench:
    """The bed, the proxies and the pulls; everything started is registered on ``stack``."""

    def __init__(self, workdir: Path, clients: int, layer_mib: int, stack: contextlib.ExitStack) -> None:
        self.workdir = workdir
        self.clients = clients
        self.layer_mib = layer_mib
        self.stack = stack
        self.tokens = TokenServer(workdir / "bed" / "certs")
        self.registry = Registry(workdir / "bed" / "registry", self.tokens)
        self.cdn = Cdn(self.registry.storage_root)
        self.image: PushedImage | None = None
        self.hostmap: dict[str, str] = {}
        self.regcache_confdir = workdir / "regcache-conf"
        self.addon_digest = source_digest(SRC / "addon")

    # set-up

    def start_bed(self) -> PushedImage:
        self.tokens.start()
        self.stack.callback(self.tokens.stop)
        self.registry.start()
        self.stack.callback(self.registry.close)
        self.cdn.start()
        self.stack.callback(self.cdn.stop)
        self.hostmap = bed.hostmap(self.registry, self.tokens, self.cdn)
        self.upstream = UpstreamLogs([self.registry], self.cdn, self.tokens)
        spec = ImageSpec(
            REPO,
            ("linux/amd64",),
            (LayerSpec("bench-big", big=self.layer_mib * MIB, level=0), LayerSpec("bench-small", files=2)),
        )
        started = time.monotonic()
        layout = build_layout(spec, self.workdir / "images" / "layouts")
        log(f"image layout ready in {time.monotonic() - started:.1f} s: {layout}")
        started = time.monotonic()
        # Docker v2s2 manifest, as Docker Hub serves most images.
        push(layout, self.registry, REPO, TAG, fmt="v2s2", workdir=self.workdir / "images" / "skopeo")
        self.image = describe(self.registry, REPO, TAG)
        log(f"pushed {REPO}:{TAG} ({self.image.digest}) in {time.monotonic() - started:.1f} s")
        return self.image

    def start_passthrough(self) -> MitmDump:
        proxy = passthrough(self.workdir / "passthrough", self.hostmap)
        self.stack.callback(proxy.stop)
        proxy.start()
        return proxy

    @contextlib.contextmanager
    def regcache(self, run: int) -> Iterator[Mitmdump]:
        """A fresh regcache with an empty cache_dir; stopped and its cache removed afterwards."""
        workdir = self.workdir / f"regcache-run{run}"
        cache_dir = workdir / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        proxy = Mitmdump(workdir, {"cache_dir": str(cache_dir), "upstreams": self.hostmap}, self.regcache_confdir)
        try:
            proxy.start()
            yield proxy
        finally:
            proxy.stop()
            shutil.rmtree(cache_dir, ignore_errors=True)

    # measuring

    @property
    def pushed(self) -> PushedImage:
        if self.image is None:
            raise RuntimeError("the image was not pushed")
        return self.image

    def pull_all(self, proxy: MitmDump, label: str) -> tuple[float, list[float]]:
        """``clients`` skopeo copies through ``proxy`` released at once; (wall s, per-client s).

        Raises if any client failed or got other content than the registry has.
        """
        image = self.pushed
        dest_root = self.workdir / "pulls" / label
        client_root = self.workdir / "clients" / label
        # One workdir per client: Skopeo rewrites its CA bundle there on every call.
        skopeos = [Skopeo(client_root / f"c{i}", proxy.url, proxy.ca_cert) for i in range(self.clients)]
        digests: list[str] = [""] * self.clients

        def pull(i: int) -> None:
            digests[i] = skopeos[i].copy_to_dir(image.ref, dest_root / f"c{i}")

        released = release_together([functools.partial(pull, i) for i in range(self.clients)])
        try:
            failed = released.failures()
            if failed:
                changed = "" if source_digest(SRC / "addon") == self.addon_digest else " (addon/ changed meanwhile!)"
                raise RuntimeError(
                    f"{label}: {len(failed)} of {self.clients} pulls failed{changed}:\n"
                    + "\n".join(failed)
                    + f"\n--- proxy log ({proxy.log_path}), last lines ---\n{proxy.log_tail(40)}"
                )
            for i, digest in enumerate(digests):
                if digest != image.digest:
                    raise RuntimeError(f"{label}: client {i} got {digest}, the registry has {image.digest}")
                for blob in image.blobs:
                    got = (dest_root / f"c{i}" / blob.digest.partition(":")[2]).stat().st_size
                    if got != blob.size:
                        raise RuntimeError(f"{label}: client {i}: blob {blob.digest} is {got} B, not {blob.size} B")
        finally:
            shutil.rmtree(dest_root, ignore_errors=True)
            shutil.rmtree(client_root, ignore_errors=True)
        return released.wall, released.seconds

    def measure(self, scenario: str, run: int, proxy: MitmDump) -> Phase:
        if proxy.pid is None:
            raise RuntimeError(f"{scenario}: proxy is not running")
        label = f"run{run}-{scenario.replace(' ', '-')}"
        upstream_mark, log_mark = self.upstream.mark(), proxy.mark()
        # mitmdump re-loads an -s script whose file changes, dropping what the old one was doing.
        sources = sources_under_test()
        with CpuAccount() as cpu, RssSampler(proxy.pid) as rss:
            wall, seconds = self.pull_all(proxy, label)
        changed = sources != sources_under_test()
        image = self.pushed
        traffic = self.upstream.since(upstream_mark, {b.digest: b.size for b in image.blobs})
        phase = Phase(
            **vars(traffic),
            scenario=scenario,
            run=run,
            clients=self.clients,
            wall=wall,
            client_seconds=seconds,
            rss_peak=rss.peak,
            hwm=proxy.peak_rss(),
            pulled_bytes=self.clients * (image.total_size + len(image.manifest)),
            source_changed=changed,
            own_cpu=cpu.own,
            foreign_cpu=cpu.foreign,
        )
        if isinstance(proxy, Mitmdump):
            blobs = {b.digest for b in image.blobs}
            for result, method, what in proxy.results(since=log_mark):
                ref = what.rpartition("@")[2]
                kind = "ping" if what.endswith("/v2/") else "blob" if ref in blobs else "manifest"
                phase.results[f"{result} {method} {kind}"] += 1
        log(
            f"run {run} {scenario}: {wall:.1f} s, upstream manifest GET {phase.manifest_gets} / HEAD "
            f"{phase.manifest_heads}, blob GET {phase.blob_gets}, CDN {phase.cdn_requests}, "
            f"{phase.upstream_bytes / MIB:.1f} MiB up, RSS peak {phase.rss_peak / MIB:.0f} MiB"
        )
        return phase

    def wait_stored(self, proxy: Mitmdump, since: int) -> float | None:
        """Seconds until regcache logged ``STORED blob`` for every blob of the image (None: not all)."""
        return wait_stored(proxy, (b.digest for b in self.pushed.blobs), since)


# -- report ----------------------------------------------------------------------------


def report(phases: list[Phase], image: PushedImage, args: argparse.Namespace, load_before: str, code: str) -> str:
    by: dict[str, list[Phase]] = {s: [p for p in phases if p.scenario == s] for s in SCENARIOS}
    base_wall = median([p.wall for p in by[PASS]])
    layers = " + ".join(f"{b.size / MIB:.1f} MiB" if b.size >= MIB else f"{b.size} B" for b in image.layers)
    lines = ["# regcache: concurrent pulls", ""]
    tools = {"clients": [SKOPEO, "--version"], "upstream": [REGISTRY_BIN, "--version"]}
    lines += [f"- {fact}" for fact in machine_facts(tools)]
    lines.append(f"- {code}")
    lines.append(f"- load average (1 min): {load_before} before the bench, {load_average()} at its end")
    lines += [
        f"- image: {image.ref} ({image.digest}), Docker v2s2, layers {layers} (gzip level 0), "
        f"config {image.config.size} B; {image.total_size / MIB:.1f} MiB per pull",
        f"- each scenario: {args.clients} concurrent `skopeo copy docker://registry-1.docker.io/{image.ref} dir:…` "
        f"released together; {args.runs} run(s), interleaved; medians below",
        "- command: `scripts/bench/run-concurrent "
        f"--clients {args.clients} --layer-mib {args.layer_mib} --runs {args.runs}"
        f"{' --snapshot' if args.snapshot else ''}`",
        "",
        "| scenario | clients | median wall s | ratio vs pass-through | upstream manifest GETs "
        "| upstream blob GETs | CDN requests | upstream bytes | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in SCENARIOS:
        ps = by[scenario]
        if not ps:
            continue
        wall = median([p.wall for p in ps])
        lines.append(
            f"| {scenario} | {args.clients} | {wall:.1f} | {wall / base_wall:.2f} "
            f"| {num(median([p.manifest_gets for p in ps]))} | {num(median([p.blob_gets for p in ps]))} "
            f"| {num(median([p.cdn_requests for p in ps]))} "
            f"| {median([p.upstream_bytes for p in ps]) / MIB:.1f} MiB "
            f"| {median([p.rss_peak for p in ps]) / MIB:.0f} |"
        )
    lines += [
        "",
        "Upstream = the bed registry's access log (Docker Hub's `registry-1.docker.io`); blob GETs there "
        "answer 307 to the CDN, whose requests carry the bytes. Upstream bytes = registry response bytes "
        "+ CDN blob bytes. Peak RSS = highest VmRSS of the proxy sampled every 100 ms during the phase. "
        "CPU: seconds used by the bench's own processes vs. by everything else on the machine during the "
        "phase (/proc/stat minus this process tree; kernel threads such as writeback count as other, "
        "~5-10 % of capacity on a quiet machine), so runs disturbed by other work show.",
        "",
        "## Every run",
        "",
        "| scenario | run | wall s | client s (min-max) | MB/s to clients | manifest GET/HEAD | blob GET/HEAD "
        "| /v2/ | tokens | CDN GETs by blob | upstream MiB | RSS peak MiB | VmHWM MiB | bench / other CPU s "
        "| regcache log |",
        "|---|---:|---:|---|---:|---|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for p in sorted(phases, key=lambda p: (p.run, SCENARIOS.index(p.scenario))):
        fetches = p.blob_fetches()
        cdn_gets = " ".join(f"{d[7:15]}x{n}" for d, n in sorted(fetches.items())) or "-"
        results = ", ".join(f"{k} {n}" for k, n in sorted(p.results.items())) or "-"
        lines.append(
            f"| {p.scenario} | {p.run} | {p.wall:.1f} | {min(p.client_seconds):.1f}-{max(p.client_seconds):.1f} "
            f"| {p.pulled_bytes / p.wall / 1e6:.0f} | {p.manifest_gets}/{p.manifest_heads} "
            f"| {p.blob_gets}/{p.blob_heads} | {p.pings} | {p.tokens} | {cdn_gets} "
            f"| {p.upstream_bytes / MIB:.1f} | {p.rss_peak / MIB:.0f} | {p.hwm / MIB:.0f} "
            f"| {p.own_cpu:.0f} / {p.foreign_cpu:.0f} | {results} |"
        )
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in findings(phases, image)] or ["- nothing unexpected"]
    return "\n".join(lines)


def findings(phases: list[Phase], image: PushedImage) -> list[str]:
    """What a reader should look at: deviations from what regcache promises."""
    out = []
    names = {b.digest: ("config" if b is image.config else f"layer {b.size / MIB:.1f} MiB") for b in image.blobs}
    for p in phases:
        where = f"run {p.run}, {p.scenario}"
        capacity = p.wall * len(os.sched_getaffinity(0))
        # Kernel threads (writeback of the pulled copies) alone take ~5-10 %.
        if p.foreign_cpu > 0.2 * capacity:
            out.append(
                f"{where}: other processes used {p.foreign_cpu:.0f} CPU s of the {capacity:.0f} available "
                f"({p.foreign_cpu / capacity:.0%}, kernel threads included); its wall time is inflated"
            )
        if p.source_changed:
            out.append(f"{where}: addon/ or scripts/bed/ changed while it ran (mitmdump reloads its scripts): discard")
        if p.scenario == COLD:
            for digest, n in sorted(p.blob_fetches().items()):
                if n > 1:
                    times = sorted(r.time for r in p.cdn if r.digest == digest and r.method == "GET")
                    ranges = [r.range for r in p.cdn if r.digest == digest and r.method == "GET" and r.range]
                    out.append(
                        f"{where}: blob {digest} ({names.get(digest, '?')}) was fetched from the CDN {n} times "
                        f"during the concurrent cold pull (single flight expects 1); requests "
                        f"{times[-1] - times[0]:.2f} s apart first to last" + (f", ranges {ranges}" if ranges else "")
                    )
            per_blob = Counter(r.reference or "" for r in p.registry if r.kind == "blob" and r.method == "GET")
            for ref, n in sorted(per_blob.items()):
                if n > 1:
                    out.append(f"{where}: blob {ref} was requested from the registry {n} times (307s)")
            if p.manifest_gets > 1:
                out.append(
                    f"{where}: {p.manifest_gets} upstream manifest GETs for {p.clients} clients "
                    "(counted pulls on Docker Hub)"
                )
        if p.scenario == WARM:
            extra = [
                f"{n} {what}"
                for n, what in (
                    (p.manifest_gets, "manifest GETs"),
                    (p.blob_gets + p.blob_heads, "blob requests"),
                    (p.cdn_requests, "CDN requests"),
                    (p.other, "other registry requests"),
                )
                if n
            ]
            if extra:
                out.append(f"{where}: upstream saw {', '.join(extra)} (warm expects only manifest HEADs and /v2/)")
    by = {s: [p for p in phases if p.scenario == s] for s in SCENARIOS}
    if by[PASS] and by[WARM]:
        ratio = median([p.wall for p in by[WARM]]) / median([p.wall for p in by[PASS]])
        if ratio > 1.1:
            out.append(f"warm regcache is {ratio:.2f}x the pass-through wall time although nothing goes upstream")
    return out


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench-concurrent",
        description="Benchmark regcache (cold, warm) against a pass-through mitmdump under concurrent skopeo pulls.",
    )
    parser.add_argument("--clients", type=positive_int, default=8, help="concurrent pulls per phase (default 8)")
    parser.add_argument(
        "--layer-mib", type=positive_int, default=1024, help="size of the big layer in MiB (default 1024)"
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="repetitions of every scenario (default 3)")
    parser.add_argument("--workdir", type=Path, help="keep logs, layout and registry storage here (default: temp)")
    parser.add_argument("--snapshot", action="store_true", help=SNAPSHOT_HELP)
    args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prepare_process("bench.concurrency", argv, args.snapshot)
    started = time.monotonic()
    load_before = load_average()
    code = code_facts()
    with contextlib.ExitStack() as stack:
        workdir = enter_workdir(stack, args.workdir, scratch=("pulls",))
        bench = Bench(workdir, args.clients, args.layer_mib, stack)
        # Registered last, so it runs first: clients go before the servers they talk to.
        stack.callback(terminate_children, "skopeo")
        try:
            image = bench.start_bed()
            baseline = bench.start_passthrough()
            phases: list[Phase] = []
            for run in range(1, args.runs + 1):
                phases.append(bench.measure(PASS, run, baseline))
                with bench.regcache(run) as regcache:
                    mark = regcache.mark()
                    phases.append(bench.measure(COLD, run, regcache))
                    waited = bench.wait_stored(regcache, mark)
                    if waited is None:
                        log(f"run {run}: regcache did not log STORED for every blob; warm may not be warm")
                    else:
                        log(f"run {run}: every blob stored {waited:.1f} s after the cold pull ended")
                    phases.append(bench.measure(WARM, run, regcache))
                    if "Traceback" in regcache.log():
                        log(f"run {run}: regcache logged a traceback, see {regcache.log_path}")
        except KeyboardInterrupt as e:
            log(f"interrupted ({e or 'Ctrl-C'}); cleaning up")
            return 130
        except Exception as e:
            log(f"failed: {e}\n{traceback.format_exc()}")
            return 1
        print(report(phases, image, args, load_before, code))
        log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
