"""Benchmark (not a test), issue #7: regcache against the reference pull-through cache.

A user choosing a mirror compares it with Debian's ``docker-registry`` (distribution 2.8.2) in
proxy mode. In one run on one machine this pulls the same two images with the same clients over
three paths and prints a markdown table, the target checks, and writes a chart.

Images (built with ``bed.images``, pushed as Docker v2s2):

* ``big``: ``library/bench-big:1``, ``--big-size`` (default 1 GiB) of incompressible data split into
  ``--big-layers`` (default 4) layers, gzip level 0;
* ``small``: ``library/bench-multi:1``, a manifest list for linux/amd64 and linux/arm64/v8 with three
  small layers each (one shared). Clients pull the amd64 image, as on an amd64 host.

Clients (``--clients``): ``dockerd`` (a private dockerd, ``docker pull``; before every pull every
image is removed and containerd's content store is emptied, see ``Dockerd.remove_all_images``) and
``skopeo`` (``skopeo copy docker://… dir:…`` into a fresh directory each pull).

Paths (``--paths``), all on 127.0.0.1, one upstream behind them (token server, distribution with
CDN-style ``307`` redirects, CDN stand-in: ``tests/bed``):

* ``direct``: the client pulls straight from the upstream registry. That registry instance names
  its token realm and CDN by loopback URLs (``http://127.0.0.1:…``) so clients reach them without a
  proxy (Go clients treat loopback registries as insecure: plain HTTP; skopeo with
  ``--src-tls-verify=false``). One row, no cold/warm.
* ``reference``: a second ``docker-registry`` in proxy mode (``proxy: {remoteurl: <direct upstream>}``,
  no credentials: the bed's token server grants anonymous pulls), over plain HTTP on 127.0.0.1.
  It listens on the port regcache's mirror uses when its turn comes (one cache runs at a time), so
  dockerd pulls ``docker.io/library/…`` from it through ``registry-mirrors``, as distribution's
  documentation deploys it and as dockerd pulls from regcache's mirror; skopeo pulls it by address.
* ``regcache``: ``regcache run`` (mitmproxy with the regcache addon), as ``scripts/run`` starts it
  (``scripts/bed/regcache_run.py``), its ``upstreams`` mapping Docker Hub's names to a second instance of the
  same upstream registry (same storage, token server and CDN) that uses Docker Hub's realm and CDN
  names; clients pull ``registry-1.docker.io/library/…`` with ``HTTPS_PROXY`` and the proxy CA
  (dockerd: in its environment, ``SSL_CERT_FILE`` bundle). dockerd keeps that environment for the
  other paths too: Go never sends loopback requests through a proxy.
* ``mirror``: the same regcache (same configuration, one process), used as a registry mirror: its
  plain-HTTP mirror of Docker Hub on a fixed loopback port. dockerd has it in ``registry-mirrors``
  (``--registry-mirror``) and pulls ``docker.io/library/…``: no proxy, no CA, tokens through the
  mirror's relay; skopeo pulls ``127.0.0.1:PORT/library/…`` (plain HTTP, as from the reference).
  Every pull is checked to have gone the way its path says (regcache's log: mirror or proxy lines).

``cold``: a new reference / regcache process with an empty store, then one pull; ``warm``: the same
process once every blob is stored (regcache's ``STORED blob`` log lines; the reference's storage
files), client-side image removed, a second pull. Per run, per image and client, the order is
direct, then cold and warm for reference, regcache and mirror, in an order that rotates from run to run
(``path_order``); ``--runs`` runs. ``--interleave N`` then starts every cache at once and N rounds
of warm pulls take turns across them (``warm, interleaved``); the reference and the mirror cannot
share a port then, so dockerd pulls both by address there.

Per pull: wall time of the client command (medians, min-max over runs, ratio to direct); upstream
requests and bytes from the bed's own logs (both registry instances' access logs, the CDN's log,
which carries the blob bytes, and the token server's); the proxy's peak RSS (VmRSS sampled every
100 ms during the pull; VmHWM in results.json); CPU others used meanwhile, to flag disturbed runs.
Blob hits: with the big image's proxy warm, ``curl -L`` (HTTP/1.1, follows redirects such as
regcache's ``307`` to its loopback blob server; regcache through ``--proxy`` with its CA) fetches the
largest layer 3 times per run on each path; MB/s = bytes / total time.

Output (``--out``, default ``bench-results/<UTC time>``): ``table.md`` (also printed), ``results.json``
(every pull and fetch, raw), ``chart.png``; with ``--profile`` a ``py-spy`` flame graph of mitmdump
per regcache warm pull. Units: MB = 10^6 bytes, as in the targets.

Everything started is stopped, temporary directories removed, on failure and Ctrl-C too; what was
measured before a failure is still written. ``--snapshot`` measures a frozen copy of the code.

Run: ``scripts/bench/run [--runs 3] [--big-size 1GiB] [--big-layers 4] [--images big,small]
[--clients dockerd,skopeo] [--paths direct,reference,regcache,mirror] [--out DIR] [--workdir DIR] [--snapshot]
[--profile]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import bed
from bed._process import without_proxies
from bed.cdn import Cdn, blob_path
from bed.dockerd import DOCKERD, Dockerd
from bed.images import SKOPEO, ImageSpec, LayerSpec, PushedImage, build_layout, describe, push
from bed.regcache_run import RESULT_LINE, Mitmdump
from bed.registry import REGISTRY_BIN, Registry, base_config, free_port
from bed.registry import _Instance as RegistryProcess
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from bench.common import (
    MIB,
    ROOT,
    SNAPSHOT_HELP,
    CpuAccount,
    RssSampler,
    UpstreamLogs,
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
    sources_under_test,
    status_kib,
    steal_since,
    terminate_children,
    wait_stored,
)
from regcache.config import ConfigError, parse_size
from regcache.fronts import ca

MB = 1_000_000
DIRECT, REFERENCE, REGCACHE, MIRROR = "direct", "reference", "regcache", "mirror"
PATHS = (DIRECT, REFERENCE, REGCACHE, MIRROR)
REGCACHE_PATHS = (REGCACHE, MIRROR)  # one regcache process: through its proxy, or at its mirror port
DOCKERD_CLIENT, SKOPEO_CLIENT = "dockerd", "skopeo"
CLIENTS = (DOCKERD_CLIENT, SKOPEO_CLIENT)
BIG, SMALL = "big", "small"
IMAGES = (BIG, SMALL)
NO_CACHE, COLD, WARM, INTERLEAVED = "-", "cold", "warm", "warm, interleaved"
CACHE_STATES = (NO_CACHE, COLD, WARM, INTERLEAVED)
TAG = "1"
REPOS = {BIG: "library/bench-big", SMALL: "library/bench-multi"}
# Targets of issue #7.
RSS_LIMIT = 200 * MB
HIT_TARGET = 1000 * MB  # bytes per second
HIT_FETCHES = 3  # per run and path
CURL = "/usr/bin/curl"
PY_SPY = Path(sys.executable).with_name("py-spy")


# -- bookkeeping (pure) ---------------------------------------------------------------------


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` bytes in ``parts`` nearly equal sizes (the first ones take the remainder)."""
    share, rest = divmod(total, parts)
    return [share + (1 if i < rest else 0) for i in range(parts)]


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def fmt_seconds(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_mb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / MB:.0f}" if value >= 100 * MB else f"{value / MB:.1f}"


@dataclass(frozen=True)
class Cell:
    """One row of the table: an image pulled by a client over a path, cold, warm, or without cache."""

    image: str
    client: str
    path: str
    cache: str  # NO_CACHE for direct

    def sort_key(self) -> tuple[int, int, int, int]:
        return (
            IMAGES.index(self.image),
            CLIENTS.index(self.client),
            PATHS.index(self.path),
            CACHE_STATES.index(self.cache),
        )

    @property
    def label(self) -> str:
        return f"{self.image}/{self.client}/{self.path}" + ("" if self.cache == NO_CACHE else f" {self.cache}")


@dataclass(frozen=True)
class PullRun:
    """One measured pull."""

    cell: Cell
    run: int
    wall: float  # seconds, the client command from start to exit
    image_bytes: int  # blobs + manifests one pull transfers (the amd64 image)
    image_blob_bytes: int
    upstream_requests: int  # registry + CDN + token server
    upstream_bytes: int  # registry response bytes + CDN blob bytes
    upstream_blob_bytes: int  # CDN blob bytes
    upstream: dict[str, object]  # the detailed counts (UpstreamTraffic.summary)
    rss_peak: int | None = None  # bytes, the proxy's sampled VmRSS maximum during the pull
    hwm: int | None = None  # bytes, the proxy's VmHWM after the pull (its whole life so far)
    own_cpu: float = 0.0
    foreign_cpu: float = 0.0
    source_changed: bool = False


@dataclass(frozen=True)
class HitFetch:
    """One fetch of a cached blob by a same-host client (curl -L)."""

    path: str
    run: int
    size: int  # bytes
    seconds: float
    redirects: int
    upstream_blob_gets: int = 0  # CDN GETs meanwhile: a real hit has none

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.size / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class CellSummary:
    """Medians of one cell over its runs."""

    cell: Cell
    runs: int
    wall: float  # median
    wall_min: float
    wall_max: float
    vs_direct: float | None
    upstream_requests: float
    upstream_bytes: float
    upstream_blob_bytes: float
    image_bytes: int
    image_blob_bytes: int
    rss_peak: int | None  # max over runs

    @property
    def bytes_vs_image(self) -> float | None:
        return ratio(self.upstream_bytes, self.image_bytes)

    @property
    def blob_bytes_vs_image(self) -> float | None:
        return ratio(self.upstream_blob_bytes, self.image_blob_bytes)


def summarize(pulls: Sequence[PullRun]) -> list[CellSummary]:
    """One summary per cell, in table order; ``vs_direct`` against the same image and client's direct median."""
    by_cell: dict[Cell, list[PullRun]] = {}
    for pull in pulls:
        by_cell.setdefault(pull.cell, []).append(pull)
    direct = {(c.image, c.client): median([p.wall for p in ps]) for c, ps in by_cell.items() if c.path == DIRECT}
    out = []
    for cell in sorted(by_cell, key=Cell.sort_key):
        ps = by_cell[cell]
        walls = [p.wall for p in ps]
        peaks = [p.rss_peak for p in ps if p.rss_peak is not None]
        out.append(
            CellSummary(
                cell=cell,
                runs=len(ps),
                wall=median(walls),
                wall_min=min(walls),
                wall_max=max(walls),
                vs_direct=ratio(median(walls), direct.get((cell.image, cell.client))),
                upstream_requests=median([p.upstream_requests for p in ps]),
                upstream_bytes=median([p.upstream_bytes for p in ps]),
                upstream_blob_bytes=median([p.upstream_blob_bytes for p in ps]),
                image_bytes=ps[0].image_bytes,
                image_blob_bytes=ps[0].image_blob_bytes,
                rss_peak=max(peaks) if peaks else None,
            )
        )
    return out


def pulls_table(summaries: Sequence[CellSummary]) -> list[str]:
    lines = [
        "| image | client | path | cache | median wall s | min-max s | vs direct | upstream requests "
        "| upstream MB | vs image | proxy peak RSS MB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        c = s.cell
        lines.append(
            f"| {c.image} | {c.client} | {c.path} | {c.cache} | {fmt_seconds(s.wall)} "
            f"| {fmt_seconds(s.wall_min)}-{fmt_seconds(s.wall_max)} | {fmt_ratio(s.vs_direct)} "
            f"| {num(s.upstream_requests)} | {fmt_mb(s.upstream_bytes)} | {fmt_ratio(s.bytes_vs_image)} "
            f"| {fmt_mb(s.rss_peak)} |"
        )
    return lines


def hits_table(hits: Sequence[HitFetch], paths: Sequence[str] = PATHS) -> list[str]:
    lines = [
        "| path | blob MB | fetches | median MB/s | min-max MB/s | redirects followed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        hs = [h for h in hits if h.path == path]
        if not hs:
            continue
        rates = [h.rate for h in hs]
        lines.append(
            f"| {path} | {fmt_mb(hs[0].size)} | {len(hs)} | {median(rates) / MB:.0f} "
            f"| {min(rates) / MB:.0f}-{max(rates) / MB:.0f} | {max(h.redirects for h in hs)} |"
        )
    return lines


@dataclass(frozen=True)
class Check:
    """One target of issue #7 for one image and client (or overall); ``passed`` None: not measured."""

    target: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"- **{verdict}** {self.target}: {self.detail}"


def target_checks(summaries: Sequence[CellSummary], hits: Sequence[HitFetch]) -> list[Check]:
    """The issue's targets, from the medians: regcache against the reference, upstream bytes, hits, RSS."""
    by = {s.cell: s for s in summaries}
    checks = []
    pairs = sorted({(s.cell.image, s.cell.client) for s in summaries}, key=lambda p: (IMAGES.index(p[0]), p[1]))
    for image, client in pairs:

        def cell(path: str, cache: str, image: str = image, client: str = client) -> CellSummary | None:
            return by.get(Cell(image, client, path, cache))

        where = f"{image} image, {client}"
        for path in REGCACHE_PATHS:
            for cache in (WARM, COLD, INTERLEAVED):
                mine, ref = cell(path, cache), cell(REFERENCE, cache)
                target = f"{cache} pull through regcache ({path}) ≤ 1.0x the reference ({where})"
                if cache == INTERLEAVED and (mine is None or ref is None):
                    continue  # only with --interleave
                if mine is None or ref is None:
                    checks.append(Check(target, None, f"{path} or reference not measured"))
                    continue
                r = ratio(mine.wall, ref.wall)
                checks.append(
                    Check(
                        target,
                        mine.wall <= ref.wall,
                        f"{fmt_seconds(mine.wall)} s vs {fmt_seconds(ref.wall)} s = {fmt_ratio(r)}",
                    )
                )
            cold, ref_cold = cell(path, COLD), cell(REFERENCE, COLD)
            target = f"cold pull ({path}): upstream blob bytes = 1.0x the image ({where})"
            if cold is None:
                checks.append(Check(target, None, f"{path} cold not measured"))
                continue
            blob_ratio = cold.blob_bytes_vs_image
            reference = f"; reference {fmt_ratio(ref_cold.blob_bytes_vs_image)}" if ref_cold else ""
            checks.append(
                Check(
                    target,
                    blob_ratio is not None and round(blob_ratio, 3) == 1.0,
                    f"regcache {fmt_ratio(blob_ratio)} of {fmt_mb(cold.image_blob_bytes)} MB blobs "
                    f"(all upstream bytes {fmt_ratio(cold.bytes_vs_image)}){reference}",
                )
            )
    for path in REGCACHE_PATHS:
        target = f"blob hits through regcache ({path}) ≥ {HIT_TARGET / MB:.0f} MB/s to a same-host client"
        mine_hits = [h.rate for h in hits if h.path == path]
        if not mine_hits:
            checks.append(Check(target, None, "not measured"))
            continue
        others = "; ".join(
            f"{other} {median([h.rate for h in hits if h.path == other]) / MB:.0f} MB/s"
            for other in (REFERENCE, DIRECT)
            if any(h.path == other for h in hits)
        )
        rate = median(mine_hits)
        checks.append(
            Check(target, rate >= HIT_TARGET, f"median {rate / MB:.0f} MB/s" + (f" ({others})" if others else ""))
        )
    target = f"regcache peak RSS < {RSS_LIMIT / MB:.0f} MB throughout"
    peaks = [s.rss_peak for s in summaries if s.cell.path in REGCACHE_PATHS and s.rss_peak is not None]
    if not peaks:
        checks.append(Check(target, None, "not measured"))
    else:
        ref_peaks = [s.rss_peak for s in summaries if s.cell.path == REFERENCE and s.rss_peak is not None]
        reference = f" (reference {fmt_mb(max(ref_peaks))} MB)" if ref_peaks else ""
        checks.append(Check(target, max(peaks) < RSS_LIMIT, f"max {fmt_mb(max(peaks))} MB{reference}"))
    return checks


def runs_table(pulls: Sequence[PullRun]) -> list[str]:
    """Every pull: the upstream requests by kind, for whoever wants to see where the time went."""
    lines = [
        "| run | image | client | path | cache | wall s | manifest GET/HEAD | blob GET/HEAD | CDN requests | tokens "
        "| upstream MB | RSS peak / VmHWM MB | others' CPU s |",
        "|---:|---|---|---|---|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for p in sorted(pulls, key=lambda p: (p.run, p.cell.sort_key())):
        u, c = p.upstream, p.cell
        lines.append(
            f"| {p.run} | {c.image} | {c.client} | {c.path} | {c.cache} | {fmt_seconds(p.wall)} "
            f"| {u.get('manifest_gets', 0)}/{u.get('manifest_heads', 0)} | {u.get('blob_gets', 0)}/"
            f"{u.get('blob_heads', 0)} | {u.get('cdn_requests', 0)} "
            f"| {u.get('token_requests', 0)} | {fmt_mb(p.upstream_bytes)} | {fmt_mb(p.rss_peak)} / {fmt_mb(p.hwm)} "
            f"| {p.foreign_cpu:.0f} |"
        )
    return lines


def findings(pulls: Sequence[PullRun], hits: Sequence[HitFetch], notes: Sequence[str]) -> list[str]:
    """What a reader should look at: disturbed runs, code that changed, traffic a warm cache should not make."""
    out = list(notes)
    cores = len(os.sched_getaffinity(0))
    for p in pulls:
        where = f"run {p.run}, {p.cell.label}"
        # Kernel threads (writeback of the pulled bytes) alone take ~5-10 %; under a second is noise.
        if p.foreign_cpu >= 1 and p.foreign_cpu > 0.25 * p.wall * cores:
            out.append(f"{where}: other processes used {p.foreign_cpu:.0f} CPU s meanwhile; wall time inflated")
        if p.source_changed:
            out.append(f"{where}: addon/ or scripts/bed/ changed while it ran (mitmdump reloads its scripts): discard")
        if p.cell.path in REGCACHE_PATHS and p.cell.cache == WARM and p.upstream_blob_bytes:
            out.append(f"{where}: {fmt_mb(p.upstream_blob_bytes)} MB of blobs fetched upstream by a warm regcache")
        if p.cell.cache == COLD and p.upstream_blob_bytes > p.image_blob_bytes:
            times = p.upstream_blob_bytes / p.image_blob_bytes
            known = (
                " (known of the reference: it fetches each blob twice on a miss)" if p.cell.path == REFERENCE else ""
            )
            out.append(f"{where}: upstream sent the image's blobs {times:.2f} times{known}")
    for h in hits:
        if h.path != DIRECT and h.upstream_blob_gets:
            out.append(f"run {h.run}, {h.path} blob hit: {h.upstream_blob_gets} upstream blob GETs (not a hit)")
    return out


def report(
    pulls: Sequence[PullRun], hits: Sequence[HitFetch], facts: Sequence[str], notes: Sequence[str]
) -> tuple[str, list[CellSummary], list[Check]]:
    summaries = summarize(pulls)
    checks = target_checks(summaries, hits)
    lines = ["# regcache vs the reference pull-through cache (issue #7)", ""]
    lines += [f"- {fact}" for fact in facts]
    lines += ["", *pulls_table(summaries), ""]
    lines.append(
        "Wall time: the client command, start to exit; median of the runs, `vs direct` against the same "
        "image and client pulling straight from the upstream. Upstream: everything the upstream saw during "
        "the pull (registry incl. `/v2/` and 307s, CDN, token server); bytes = registry response bytes + CDN "
        "blob bytes, `vs image` against the bytes one pull of the image transfers. Proxy peak RSS: VmRSS of "
        "mitmdump resp. the reference `docker-registry`, sampled every 100 ms, max over runs. MB = 10^6 bytes."
    )
    if any(p.cell.cache == INTERLEAVED for p in pulls):
        lines.append(
            "`warm, interleaved` (`--interleave N`): after the runs, per image and client, every cache is started "
            "and filled, then N rounds of warm pulls take turns across the caches, pull by pull (the order "
            "rotating per round); `runs` counts rounds. The same process serves `regcache` and `mirror` there."
        )
    if hits:
        lines += ["", "## Blob hits", "", *hits_table(hits), ""]
        lines.append(
            "The big image's largest layer fetched by `curl -L --http1.1` on the same host from a warm cache "
            "(regcache through `--proxy` with its CA; redirects followed); MB/s = bytes / total time."
        )
    lines += ["", "## Targets", "", *[c.line() for c in checks]]
    lines += ["", "## Every run", "", *runs_table(pulls)]
    found = findings(pulls, hits, notes)
    lines += ["", "## Findings", "", *([f"- {f}" for f in found] or ["- nothing unexpected"])]
    return "\n".join(lines) + "\n", summaries, checks


# -- chart -----------------------------------------------------------------------------------------

SERIES = (
    (DIRECT, NO_CACHE, "direct", "#9e9e9e", ""),
    (REFERENCE, COLD, "reference cold", "#e6842a", ""),
    (REFERENCE, WARM, "reference warm", "#f5c089", "//"),
    (REGCACHE, COLD, "regcache cold", "#1f5fa8", ""),
    (REGCACHE, WARM, "regcache warm", "#7fb2e5", "//"),
    (MIRROR, COLD, "regcache mirror cold", "#2e7d32", ""),
    (MIRROR, WARM, "regcache mirror warm", "#8bc34a", "//"),
)


def write_chart(summaries: Sequence[CellSummary], dest: Path, title: str, panels: dict[str, str]) -> None:
    """Grouped bars: median wall time per client, one bar per path and cache state; one panel per image.

    ``panels``: image → panel title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {s.cell: s for s in summaries}
    images = [i for i in IMAGES if any(s.cell.image == i for s in summaries)]
    fig, axes = plt.subplots(1, len(images), figsize=(6.5 * len(images), 5), squeeze=False)
    for ax, image in zip(axes[0], images, strict=True):
        clients = [c for c in CLIENTS if any(s.cell.image == image and s.cell.client == c for s in summaries)]
        series = [s for s in SERIES if any(Cell(image, c, s[0], s[1]) in by for c in clients)]
        width = 0.8 / max(1, len(series))
        for i, (path, cache, label, color, hatch) in enumerate(series):
            cells = [by.get(Cell(image, client, path, cache)) for client in clients]
            heights = [s.wall if s else float("nan") for s in cells]
            low = [s.wall - s.wall_min if s else 0.0 for s in cells]
            high = [s.wall_max - s.wall if s else 0.0 for s in cells]
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(clients))]
            bars = ax.bar(xs, heights, width, label=label, color=color, hatch=hatch, edgecolor="#333333", linewidth=0.5)
            ax.errorbar(xs, heights, yerr=[low, high], fmt="none", ecolor="#333333", capsize=2, linewidth=0.8)
            ax.bar_label(bars, labels=[fmt_seconds(h) if h == h else "" for h in heights], fontsize=7, padding=2)
        ax.set_xticks(range(len(clients)), clients)
        ax.set_ylabel("median wall time, s (bars: min-max)")
        ax.set_title(panels.get(image, f"{image} image"), fontsize=10)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)


# -- the bed: one upstream under two sets of names --------------------------------------------------


def image_specs(big_size: int, big_layers: int) -> dict[str, tuple[ImageSpec, bool]]:
    """name → (spec, all platforms); both pushed as Docker v2s2 (a list for the multi-arch one)."""
    big = ImageSpec(
        REPOS[BIG],
        ("linux/amd64",),
        tuple(
            LayerSpec(f"bench-big-{i}", big=size, level=0) for i, size in enumerate(split_sizes(big_size, big_layers))
        ),
    )
    small = ImageSpec(
        REPOS[SMALL],
        ("linux/amd64", "linux/arm64/v8"),
        (LayerSpec("bench-multi-app", files=4, file_size=64 * 1024), LayerSpec("bench-multi-etc", files=2)),
        shared=(LayerSpec("bench-multi-base", files=8, file_size=128 * 1024),),
    )
    return {BIG: (big, False), SMALL: (small, True)}


def image_bytes(image: PushedImage) -> int:
    """Bytes one amd64 pull transfers: the top manifest, the amd64 manifest of a list, every blob."""
    manifests = len(image.manifest) + (len(image.amd64_manifest) if image.is_list else 0)
    return manifests + image.total_size


def describe_image(name: str, image: PushedImage) -> str:
    layers = [b.size for b in image.layers]
    if len(set(layers)) == 1 or all(abs(s - layers[0]) < MIB for s in layers):
        shape = f"{len(layers)} layers x {layers[0] / MIB:.1f} MiB"
    else:
        shape = f"{len(layers)} layers (" + " + ".join(f"{s / 1024:.0f} KiB" for s in layers) + ")"
    kind = "Docker manifest list (linux/amd64, linux/arm64/v8), amd64 pulled" if image.is_list else "Docker v2s2"
    return f"{name}: `{image.ref}` ({image.digest[:19]}…), {kind}, {shape}; {image_bytes(image) / MB:.1f} MB per pull"


def chart_title(name: str, image: PushedImage) -> str:
    kind = "multi-arch, amd64 pulled" if image.is_list else "single-arch"
    return f"{name} image: {image_bytes(image) / MB:.1f} MB, {len(image.layers)} layers, {kind}"


class Bed:
    """Token server, CDN and distribution on one storage, as two registries: Docker Hub names and loopback names.

    ``hub`` names its token realm ``auth.docker.io`` and redirects blobs to Docker Hub's CDN name: what
    regcache (with the names mapped by its ``upstreams``) sees. ``loopback`` is the same content
    under ``http://127.0.0.1`` names, which clients and the reference reach without a proxy.
    """

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir = workdir
        self.tokens = TokenServer(workdir / "certs")
        self.tokens.start()
        stack.callback(self.tokens.stop)
        self.hub = Registry(workdir / "registry", self.tokens)
        self.cdn = Cdn(self.hub.storage_root)
        self.cdn.start()
        stack.callback(self.cdn.stop)
        self.hub.start()
        stack.callback(self.hub.close)
        self.loopback = Registry(
            workdir / "registry-loopback",
            self.tokens,
            realm=f"{self.tokens.url}/token",
            cdn_baseurl=self.cdn.url,
            storage_root=self.hub.storage_root,
        )
        self.loopback.start()
        stack.callback(self.loopback.close)
        self.hostmap = bed.hostmap(self.hub, self.tokens, self.cdn)
        self.upstream = UpstreamLogs([self.hub, self.loopback], self.cdn, self.tokens)

    def push(self, spec: ImageSpec, all_platforms: bool) -> PushedImage:
        started = time.monotonic()
        layout = build_layout(spec, self.workdir / "images" / "layouts")
        built = time.monotonic() - started
        push(layout, self.hub, spec.name, TAG, fmt="v2s2", all_platforms=all_platforms, workdir=self.workdir / "push")
        image = describe(self.hub, spec.name, TAG)
        log(f"{image.ref}: built in {built:.1f} s, pushed in {time.monotonic() - started - built:.1f} s")
        return image


# -- caches --------------------------------------------------------------------------------


class Cache(Protocol):
    """A pull-through cache on one path, started fresh (empty store) for each cold pull."""

    via_proxy: bool

    @property
    def pid(self) -> int | None: ...

    def ref(self, client: str, image_ref: str) -> str:
        """How ``client`` names ``library/x:1`` to pull it from this cache."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def mark(self) -> int: ...

    def check(self, since: int) -> None:
        """Raise if the pull since ``since`` (a :meth:`mark`) did not take this path."""

    def wait_stored(self, image: PushedImage, since: int) -> float | None: ...

    def notes(self) -> list[str]: ...


class ReferenceCache:
    """Debian's ``docker-registry`` in proxy mode in front of the loopback upstream; own storage.

    With ``mirror_port`` it listens there, where dockerd's ``registry-mirrors`` points, and dockerd
    pulls ``docker.io/…`` from it: as its documentation deploys it, and as dockerd pulls from
    regcache's mirror. Otherwise (and for skopeo) it is pulled by its address."""

    via_proxy = False

    def __init__(
        self, workdir: Path, remote_url: str, mirror_port: int | None = None, storage: Path | None = None
    ) -> None:
        """`storage`: a storage directory other references share (default: its own)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.storage = storage or workdir / "storage"
        self.remote_url = remote_url
        self.as_mirror = mirror_port is not None
        self.process = RegistryProcess(workdir, "reference", mirror_port or 0, ready_status=200)

    def ref(self, client: str, image_ref: str) -> str:
        if client == DOCKERD_CLIENT and self.as_mirror:
            return f"docker.io/{image_ref}"
        return f"127.0.0.1:{self.process.port}/{image_ref}"

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int | None:
        return self.process.process.pid

    def config(self) -> dict[str, object]:
        # The bed registry's configuration (same logging), plus proxy mode. No username/password:
        # the upstream's token server grants anonymous pulls.
        return {**base_config(self.storage, self.process.port), "proxy": {"remoteurl": self.remote_url}}

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.process.start(self.config(), timeout=30)

    def stop(self) -> None:
        self.process.process.stop(10)

    def mark(self) -> int:
        return 0

    def check(self, since: int) -> None:
        pass

    def wait_stored(self, image: PushedImage, since: int, timeout: float = 120.0) -> float | None:
        """Seconds until every blob of the image is in the reference's storage with its full size,
        and linked into the image's repository (distribution serves a blob from its storage only
        to a repository it is linked in: without the link it fetches the blob upstream again)."""
        files = {self.storage / blob_path(b.digest).lstrip("/"): b.size for b in image.blobs}
        layers = self.storage / "docker/registry/v2/repositories" / image.repo / "_layers/sha256"
        links = [layers / b.digest.removeprefix("sha256:") / "link" for b in image.blobs]
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(OSError):
                if all(f.stat().st_size == size for f, size in files.items()) and all(f.exists() for f in links):
                    return time.monotonic() - start
            time.sleep(0.1)
        return None

    def notes(self) -> list[str]:
        return []


class RegcacheCache:
    """``regcache run`` with an empty cache dir, on the port dockerd's environment names, its
    Docker Hub mirror on ``mirror_port``. Clients pull Docker Hub names through the proxy, or, as
    `through_mirror` says, from the mirror: dockerd through its ``registry-mirrors`` (``docker.io/…``
    names, no proxy involved) unless ``by_address``, skopeo at the mirror's address (plain HTTP)."""

    def __init__(self, workdir: Path, hostmap: dict[str, str], confdir: Path, port: int, mirror_port: int) -> None:
        self.mirror_port = mirror_port
        self.via_mirror = False
        self.by_address = False
        config = {
            "cache_dir": str(workdir / "cache"),
            "upstreams": hostmap,
            "mirrors": {"docker.io": f"127.0.0.1:{mirror_port}"},
        }
        self.proxy = Mitmdump(workdir, config, confdir, port=port)

    @property
    def via_proxy(self) -> bool:
        return not self.via_mirror

    def through_mirror(self, by_address: bool = False) -> RegcacheCache:
        """The same regcache process, pulled from at its mirror."""
        twin = copy.copy(self)
        twin.via_mirror = True
        twin.by_address = by_address
        return twin

    def ref(self, client: str, image_ref: str) -> str:
        if not self.via_mirror:
            return f"{bed.REGISTRY_HOST}/{image_ref}"
        if client == DOCKERD_CLIENT and not self.by_address:
            return f"docker.io/{image_ref}"
        return f"127.0.0.1:{self.mirror_port}/{image_ref}"

    @property
    def pid(self) -> int | None:
        return self.proxy.pid

    def start(self) -> None:
        self.proxy.start()  # returns at regcache's ready line: the mirror serves too

    def stop(self) -> None:
        self.proxy.stop()

    def mark(self) -> int:
        return self.proxy.mark()

    def check(self, since: int) -> None:
        lines = [line for line in self.proxy.log()[since:].splitlines() if RESULT_LINE.search(line)]
        astray = [line for line in lines if ("(mirror" in line) != self.via_mirror]
        if not lines or astray:
            way = "to the mirror" if self.via_mirror else "through the proxy"
            raise RuntimeError(f"the pull did not go {way}: {astray[:3]}")

    def wait_stored(self, image: PushedImage, since: int) -> float | None:
        return wait_stored(self.proxy, (b.digest for b in image.blobs), since)

    def notes(self) -> list[str]:
        if "Traceback" in self.proxy.log():
            return [f"regcache logged a traceback: {self.proxy.log_path}"]
        return []


# -- clients -------------------------------------------------------------------------------------


class PullClient(Protocol):
    name: str

    def pull(self, ref: str, image: PushedImage, via_proxy: bool) -> None:
        """Pull ``ref``; raise unless the client got exactly ``image``."""

    def forget(self, ref: str) -> None:
        """Remove what the client keeps of any pull, so the next one fetches every blob."""


class DockerdClient:
    """``docker pull`` on a private dockerd whose environment names regcache as ``HTTPS_PROXY``."""

    name = DOCKERD_CLIENT

    def __init__(self, daemon: Dockerd) -> None:
        self.daemon = daemon

    def pull(self, ref: str, image: PushedImage, via_proxy: bool) -> None:
        self.daemon.pull(ref)
        digests = self.daemon.repo_digests(ref)
        if not any(d.endswith(f"@{image.digest}") for d in digests):
            raise RuntimeError(f"dockerd pulled {ref} as {digests}, the registry has {image.digest}")

    def forget(self, ref: str) -> None:
        self.daemon.rmi(ref, prune=True)
        if self.daemon.images():
            raise RuntimeError(f"dockerd still has images after removing them: {self.daemon.images()}")


class SkopeoClient:
    """``skopeo copy docker://… dir:…`` into a fresh directory; through regcache with its CA."""

    name = SKOPEO_CLIENT

    def __init__(self, workdir: Path, proxy_url: str | None, ca_pem: Path | None) -> None:
        self.plain = Skopeo(workdir / "plain", None)
        self.proxied = Skopeo(workdir / "proxied", proxy_url, ca_pem) if proxy_url else None
        self.pulls = workdir / "pulls"

    def pull(self, ref: str, image: PushedImage, via_proxy: bool) -> None:
        client = self.proxied if via_proxy else self.plain
        if client is None:
            raise RuntimeError("skopeo has no proxy configured")
        dest = self.pulls / uuid.uuid4().hex
        # Through regcache with its CA; the loopback paths are plain HTTP, as Go clients assume.
        got = client.copy_to_dir(ref, dest, tls_verify=via_proxy, timeout=3600)
        if got != image.amd64_digest:
            raise RuntimeError(f"skopeo copied {ref} as {got}, the registry has {image.amd64_digest}")
        for blob in image.blobs:
            size = (dest / blob.digest.partition(":")[2]).stat().st_size
            if size != blob.size:
                raise RuntimeError(f"skopeo: blob {blob.digest} is {size} B, not {blob.size} B")

    def forget(self, ref: str) -> None:
        shutil.rmtree(self.pulls, ignore_errors=True)


def regcache_ca(confdir: Path) -> Path:
    """The CA every regcache of a bench uses (one confdir), made now so clients can trust it from the start:
    the ECDSA root `regcache run` makes in a new confdir."""
    ca.ensure_root(confdir)
    return confdir / ca.CA_CERT


# -- hit throughput and profiling ------------------------------------------------------------------


def curl_fetch(url: str, headers: dict[str, str], proxy: Mitmdump | None = None) -> tuple[int, int, float, int]:
    """GET ``url`` with curl following redirects, body discarded: (status, bytes, seconds, redirects)."""
    cmd = [CURL, "--silent", "--show-error", "--location", "--http1.1", "--output", "/dev/null"]
    cmd += ["--write-out", "%{http_code} %{size_download} %{time_total} %{num_redirects}"]
    if proxy is not None:
        # Loopback redirect targets (regcache's blob server) are fetched directly, as Go clients do.
        cmd += ["--proxy", proxy.url, "--cacert", str(proxy.ca_cert), "--noproxy", "127.0.0.1,localhost"]
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, env=without_proxies(), timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url} failed ({proc.returncode}): {proc.stderr.strip()}")
    status, size, seconds, redirects = proc.stdout.split()
    return int(status), int(size), float(seconds), int(redirects)


@contextlib.contextmanager
def py_spy_record(pid: int, dest: Path, fmt: str = "flamegraph") -> Iterator[None]:
    """Sample ``pid`` with ``py-spy record`` while the block runs; flame graph SVG at ``dest`` (``fmt``
    raw: collapsed stacks, one ``frame;frame;… count`` per line)."""
    log_path = dest.with_suffix(".log")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(PY_SPY),
                "record",
                "--pid",
                str(pid),
                "--output",
                str(dest),
                "--format",
                fmt,
                "--rate",
                "200",
                "--nonblocking",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 10
        while b"Sampling" not in log_path.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if dest.exists():
        log_path.unlink()
    else:
        log(f"py-spy wrote no {dest.name}: {log_path.read_text(errors='replace')[-500:]}")


# -- the bench ----------------------------------------------------------------------------------


class CacheTurns:
    """The caches a bench measures in turn, one process per phase: what `Bench` here and the load
    bench's share. One cache at a time: the reference listens on the mirror port, as regcache's
    mirror does."""

    workdir: Path
    confdir: Path
    regcache_port: int
    mirror_port: int
    notes: list[str]

    @property
    def bed(self) -> Bed:
        raise NotImplementedError

    def new_cache(self, path: str, label: str) -> Cache:
        """A cache process of its own, with an empty store."""
        workdir = self.workdir / "caches" / label
        shutil.rmtree(workdir, ignore_errors=True)
        if path == REFERENCE:
            return ReferenceCache(workdir, self.bed.loopback.url, self.mirror_port)
        regcache = RegcacheCache(workdir, self.bed.hostmap, self.confdir, self.regcache_port, self.mirror_port)
        return regcache.through_mirror() if path == MIRROR else regcache

    @contextlib.contextmanager
    def running(self, cache: Cache) -> Iterator[Cache]:
        """``cache`` started; stopped and its store removed afterwards."""
        cache.start()
        try:
            yield cache
        finally:
            cache.stop()
            self.notes += cache.notes()
            shutil.rmtree(self.workdir / "caches", ignore_errors=True)


class Bench(CacheTurns):
    """The bed, the clients, the caches; what was measured so far in ``pulls`` and ``hits``."""

    def __init__(self, args: argparse.Namespace, workdir: Path, out: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.out = out
        self.stack = stack
        self.pulls: list[PullRun] = []
        self.hits: list[HitFetch] = []
        self.notes: list[str] = []
        self.images: dict[str, PushedImage] = {}
        self.clients: dict[str, PullClient] = {}
        self.confdir = workdir / "regcache-conf"
        self.regcache_port = free_port()
        self.mirror_port = free_port()
        self._bed: Bed | None = None

    @property
    def bed(self) -> Bed:
        if self._bed is None:
            raise RuntimeError("the bed is not running")
        return self._bed

    # set-up

    def setup(self) -> None:
        self._bed = Bed(self.workdir / "bed", self.stack)
        for name, (spec, all_platforms) in image_specs(self.args.big_size, self.args.big_layers).items():
            if name in self.args.images:
                self.images[name] = self.bed.push(spec, all_platforms)
        proxy_url, ca = None, None
        if REGCACHE in self.args.paths:
            proxy_url, ca = f"http://127.0.0.1:{self.regcache_port}", self._regcache_ca()
        if DOCKERD_CLIENT in self.args.clients:
            # Where the reference, or regcache's mirror, listens when its turn comes.
            mirror = ("--registry-mirror", f"http://127.0.0.1:{self.mirror_port}") if self.uses_mirror_port() else ()
            daemon = Dockerd(self.workdir / "dockerd", proxy_url, ca, extra_args=mirror)
            self.stack.callback(daemon.close)
            daemon.start()
            self.clients[DOCKERD_CLIENT] = DockerdClient(daemon)
        if SKOPEO_CLIENT in self.args.clients:
            self.clients[SKOPEO_CLIENT] = SkopeoClient(self.workdir / "skopeo", proxy_url, ca)

    def _regcache_ca(self) -> Path:
        return regcache_ca(self.confdir)

    def uses_mirror_port(self) -> bool:
        """dockerd pulls the reference and regcache's mirror as its ``registry-mirrors``."""
        return bool({REFERENCE, MIRROR} & set(self.args.paths))

    # measuring

    def measure(self, cell: Cell, run: int, pull: Callable[[], None], pid: int | None) -> PullRun:
        image = self.images[cell.image]
        sources = sources_under_test()
        mark = self.bed.upstream.mark()
        with CpuAccount() as cpu, RssSampler(pid) as rss:
            started = time.monotonic()
            pull()
            wall = time.monotonic() - started
        traffic = self.bed.upstream.since(mark, {b.digest: b.size for b in image.blobs})
        hwm = status_kib(pid, "VmHWM") if pid is not None else None
        result = PullRun(
            cell=cell,
            run=run,
            wall=wall,
            image_bytes=image_bytes(image),
            image_blob_bytes=image.total_size,
            upstream_requests=traffic.requests,
            upstream_bytes=traffic.upstream_bytes,
            upstream_blob_bytes=traffic.cdn_bytes,
            upstream=traffic.summary(),
            rss_peak=rss.peak if pid is not None else None,
            hwm=hwm * 1024 if hwm is not None else None,
            own_cpu=cpu.own,
            foreign_cpu=cpu.foreign,
            source_changed=sources != sources_under_test(),
        )
        self.pulls.append(result)
        log(
            f"run {run} {cell.label}: {fmt_seconds(wall)} s, {traffic.requests} upstream requests, "
            f"{fmt_mb(traffic.upstream_bytes)} MB up, RSS peak {fmt_mb(result.rss_peak)} MB"
        )
        return result

    def pull_direct(self, name: str, client: PullClient, run: int) -> None:
        image = self.images[name]
        ref = f"{self.bed.loopback.host}/{image.ref}"
        client.forget(ref)
        self.measure(Cell(name, client.name, DIRECT, NO_CACHE), run, lambda: client.pull(ref, image, False), None)
        client.forget(ref)
        if self.measures_hits(name, client):
            token = self.bed.tokens.mint(image.repo)
            url = f"{self.bed.loopback.url}/v2/{image.repo}/blobs/{largest_layer(image)}"
            self.fetch_hits(DIRECT, run, image, lambda: curl_fetch(url, {"Authorization": f"Bearer {token}"}))

    def pull_cold_warm(self, name: str, client: PullClient, path: str, run: int) -> None:
        image = self.images[name]
        label = f"run{run}-{name}-{client.name}-{path}"
        with self.running(self.new_cache(path, label)) as cache:
            ref = cache.ref(client.name, image.ref)
            client.forget(ref)
            mark = cache.mark()

            def pull() -> None:
                client.pull(ref, image, cache.via_proxy)

            self.measure(Cell(name, client.name, path, COLD), run, pull, cache.pid)
            cache.check(mark)
            waited = cache.wait_stored(image, mark)
            if waited is None:
                self.notes.append(f"run {run}, {name}/{client.name}/{path}: not every blob stored; warm may not be")
            client.forget(ref)
            profile = self.args.profile and path in REGCACHE_PATHS and cache.pid is not None
            mark = cache.mark()
            with (
                py_spy_record(cache.pid, self.out / f"profile-{label}-warm.svg")
                if profile
                else contextlib.nullcontext()
            ):
                self.measure(Cell(name, client.name, path, WARM), run, pull, cache.pid)
            cache.check(mark)
            client.forget(ref)
            if self.measures_hits(name, client):
                self.fetch_hits(path, run, image, self.hit_fetcher(cache, image))

    def interleave(self, name: str, client: PullClient) -> None:
        """Warm pulls with every cache running at once, taking turns pull by pull (``--interleave``
        rounds): whatever disturbs the machine for a while disturbs every path alike. The
        reference and the mirror cannot both be dockerd's ``registry-mirrors`` at once: here
        dockerd pulls both by their addresses."""
        image = self.images[name]
        label = f"interleaved-{name}-{client.name}"
        caches: dict[str, Cache] = {}
        if REFERENCE in self.args.paths:
            workdir = self.workdir / "caches" / f"{label}-reference"
            caches[REFERENCE] = ReferenceCache(workdir, self.bed.loopback.url)
        regcache = RegcacheCache(
            self.workdir / "caches" / f"{label}-regcache",
            self.bed.hostmap,
            self.confdir,
            self.regcache_port,
            self.mirror_port,
        )
        for path in (REGCACHE, MIRROR):
            if path in self.args.paths:
                caches[path] = regcache if path == REGCACHE else regcache.through_mirror(by_address=True)
        starting = [caches[REFERENCE]] if REFERENCE in caches else []
        starting += [regcache] if {REGCACHE, MIRROR} & caches.keys() else []
        with contextlib.ExitStack() as running:
            for cache in starting:
                running.enter_context(self.running(cache))
            regcache_filled = False
            for path, cache in caches.items():  # fill each cache, then forget the client's copy
                ref = cache.ref(client.name, image.ref)
                client.forget(ref)
                mark = cache.mark()
                client.pull(ref, image, cache.via_proxy)
                # The proxy and the mirror are one process: its second fill finds every blob stored
                # already and logs no new STORED line, so only its first is waited for.
                ours = path in (REGCACHE, MIRROR)
                if not (ours and regcache_filled) and cache.wait_stored(image, mark) is None:
                    self.notes.append(f"interleaved {name}/{client.name}/{path}: not every blob stored")
                regcache_filled = regcache_filled or ours
                client.forget(ref)
            for round_ in range(1, self.args.interleave + 1):
                for path in path_order(list(caches), round_):
                    cache = caches[path]
                    ref = cache.ref(client.name, image.ref)
                    mark = cache.mark()
                    self.measure(
                        Cell(name, client.name, path, INTERLEAVED),
                        round_,
                        lambda cache=cache, ref=ref: client.pull(ref, image, cache.via_proxy),
                        cache.pid,
                    )
                    cache.check(mark)
                    client.forget(ref)

    def measures_hits(self, name: str, client: PullClient) -> bool:
        """Blob hits are measured once per run and path: with the big image, after the first client's pulls."""
        return name == BIG and client.name == self.args.clients[0]

    def hit_fetcher(self, cache: Cache, image: PushedImage) -> Callable[[], tuple[int, int, float, int]]:
        digest = largest_layer(image)
        if isinstance(cache, RegcacheCache) and cache.via_mirror:
            token = self.bed.tokens.mint(image.repo)
            url = f"http://127.0.0.1:{cache.mirror_port}/v2/{image.repo}/blobs/{digest}"
            return lambda: curl_fetch(url, {"Authorization": f"Bearer {token}"})
        if isinstance(cache, RegcacheCache):
            # A client's own token, as a client would send; regcache checks it upstream once (a HEAD).
            token = self.bed.tokens.mint(image.repo)
            url = f"https://{bed.REGISTRY_HOST}/v2/{image.repo}/blobs/{digest}"
            return lambda: curl_fetch(url, {"Authorization": f"Bearer {token}"}, cache.proxy)
        if isinstance(cache, ReferenceCache):
            url = f"{cache.url}/v2/{image.repo}/blobs/{digest}"
            return lambda: curl_fetch(url, {})
        raise TypeError(f"no hit fetch for {cache!r}")

    def fetch_hits(
        self, path: str, run: int, image: PushedImage, fetch: Callable[[], tuple[int, int, float, int]]
    ) -> None:
        size = next(b.size for b in image.blobs if b.digest == largest_layer(image))
        for _ in range(HIT_FETCHES):
            cdn_mark = self.bed.cdn.mark()
            status, got, seconds, redirects = fetch()
            if status != 200 or got != size:
                raise RuntimeError(f"{path} blob fetch: HTTP {status}, {got} of {size} bytes")
            cdn_gets = sum(1 for r in self.bed.cdn.requests(cdn_mark) if r.method == "GET")
            upstream = cdn_gets - (1 if path == DIRECT else 0)
            hit = HitFetch(path, run, got, seconds, redirects, upstream_blob_gets=upstream)
            self.hits.append(hit)
            log(f"run {run} {path} blob hit: {got / MB:.0f} MB in {seconds:.2f} s = {hit.rate / MB:.0f} MB/s")

    def run(self) -> None:
        for run in range(1, self.args.runs + 1):
            for name in self.images:
                for client_name in self.args.clients:
                    client = self.clients[client_name]
                    for path in path_order(self.args.paths, run):
                        if path == DIRECT:
                            self.pull_direct(name, client, run)
                        else:
                            self.pull_cold_warm(name, client, path, run)
        if self.args.interleave:
            for name in self.images:
                for client_name in self.args.clients:
                    self.interleave(name, self.clients[client_name])

    # reporting

    def facts(self, load_before: str, code: str, counters_before: list[int]) -> list[str]:
        tools = {
            "upstream and reference": [REGISTRY_BIN, "--version"],
            "dockerd": [DOCKERD, "--version"],
            "skopeo": [SKOPEO, "--version"],
            "curl": [CURL, "--version"],
        }
        a = self.args
        command = (
            f"scripts/bench/run --runs {a.runs} --big-size {a.big_size_text} --big-layers {a.big_layers} "
            f"--images {','.join(a.images)} --clients {','.join(a.clients)} --paths {','.join(a.paths)}"
            + (f" --interleave {a.interleave}" if a.interleave else "")
            + (" --snapshot" if a.snapshot else "")
            + (" --profile" if a.profile else "")
        )
        return [
            *machine_facts(tools),
            code,
            f"load average (1 min): {load_before} before the bench, {load_average()} at its end; "
            f"CPU steal (time the VM's host gave other guests) during the bench: {steal_since(counters_before)}",
            *[describe_image(name, image) for name, image in self.images.items()],
            *self.proxy_facts(),
            f"{a.runs} run(s); per run, image and client: direct, then cold + warm for each of "
            f"{', '.join(p for p in a.paths if p != DIRECT)}, the order of those rotating from run to run "
            "(each cache fresh for its cold pull)",
            f"command: `{command}`",
        ]

    def proxy_facts(self) -> list[str]:
        """What the proxy path ran with: its CA and its hook dispatch."""
        state = ca.read_ca(self.confdir)
        if state is None:
            return []
        return [f"regcache's proxy: CA {state.describe()}, hook events dispatched to the addons that implement them"]

    def write(self, load_before: str, code: str, counters_before: list[int], error: str | None) -> int:
        """Write table.md, results.json and chart.png; print the table. Returns the number of failed targets."""
        facts = self.facts(load_before, code, counters_before)
        notes = [f"INCOMPLETE: {error}"] if error else []
        text, summaries, checks = report(self.pulls, self.hits, facts, notes + self.notes)
        print(text, end="")
        (self.out / "table.md").write_text(text)
        results = {
            "facts": facts,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "images": {
                name: {
                    "ref": i.ref,
                    "digest": i.digest,
                    "amd64_digest": i.amd64_digest,
                    "bytes": image_bytes(i),
                    "blobs": [dataclasses.asdict(b) for b in i.blobs],
                }
                for name, i in self.images.items()
            },
            "pulls": [dataclasses.asdict(p) for p in self.pulls],
            "blob_hits": [{**dataclasses.asdict(h), "bytes_per_second": h.rate} for h in self.hits],
            "summary": [dataclasses.asdict(s) for s in summaries],
            "checks": [dataclasses.asdict(c) for c in checks],
            "error": error,
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        if summaries:
            panels = {name: chart_title(name, image) for name, image in self.images.items()}
            title = f"regcache vs the reference pull-through cache; {self.args.runs} run(s), {facts[0]}"
            write_chart(summaries, self.out / "chart.png", title, panels)
        log(f"wrote {self.out}/table.md, results.json" + (", chart.png" if summaries else ""))
        return sum(1 for c in checks if c.passed is False)


def path_order(paths: Sequence[str], run: int) -> list[str]:
    """Direct first, then the caches in an order that rotates from run to run: whatever a pull
    leaves behind (dockerd's deletions, the kernel's writeback) slows the next, and with a fixed
    order it would always slow the same path."""
    caches = [p for p in paths if p != DIRECT]
    shift = (run - 1) % len(caches) if caches else 0
    return [p for p in paths if p == DIRECT] + caches[shift:] + caches[:shift]


def largest_layer(image: PushedImage) -> str:
    return max(image.layers, key=lambda b: b.size).digest


# -- main -------------------------------------------------------------------------------------


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = [c.strip() for c in text.split(",") if c.strip()]
        wrong = [c for c in chosen if c not in allowed]
        if wrong or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (comma-separated), not {text!r}")
        return list(dict.fromkeys(chosen))

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="Pull a big and a small multi-arch image with dockerd and skopeo: directly, through "
        "Debian's docker-registry in proxy mode, and through regcache, cold and warm (issue #7).",
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="repetitions of every pull (default 3)")
    parser.add_argument("--big-size", default="1GiB", help="total layer data of the big image (default 1GiB)")
    parser.add_argument("--big-layers", type=positive_int, default=4, help="layers of the big image (default 4)")
    parser.add_argument("--images", type=_choices(IMAGES), default=list(IMAGES), help="big,small (default both)")
    parser.add_argument("--clients", type=_choices(CLIENTS), default=list(CLIENTS), help="dockerd,skopeo (default)")
    parser.add_argument("--paths", type=_choices(PATHS), default=list(PATHS), help="direct,reference,regcache,mirror")
    parser.add_argument(
        "--out", type=Path, help="where table.md, results.json, chart.png go (default bench-results/<time>)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the bed (layouts, registry storage, logs) here (default: temp)"
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="N",
        help="then N rounds of warm pulls with all caches running, taking turns pull by pull (default 0: none)",
    )
    parser.add_argument("--snapshot", action="store_true", help=SNAPSHOT_HELP)
    parser.add_argument("--profile", action="store_true", help="py-spy flame graph of mitmdump per regcache warm pull")
    args = parser.parse_args(argv)
    try:
        args.big_size_text, args.big_size = args.big_size, parse_size("--big-size", args.big_size)
    except ConfigError as e:
        parser.error(str(e))
    if args.out is None:
        args.out = ROOT / "bench-results" / f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    missing = [tool for tool in (CURL, REGISTRY_BIN, SKOPEO) if not Path(tool).exists()]
    if DOCKERD_CLIENT in args.clients and not Path(DOCKERD).exists():
        missing.append(DOCKERD)
    if args.profile and not PY_SPY.exists():
        missing.append(f"{PY_SPY} (scripts/setup test bench)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib (scripts/setup test bench)")
    if missing:
        parser.error(f"missing: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prepare_process("bench.small_big", argv, args.snapshot)
    started = time.monotonic()
    load_before, code, counters_before = load_average(), code_facts(), cpu_counters()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        workdir = enter_workdir(stack, args.workdir, scratch=("caches", "skopeo", "dockerd"))
        log(f"results to {out}")
        bench = Bench(args, workdir, out, stack)

        def work() -> None:
            bench.setup()
            # Registered after the servers, so it runs before they stop: clients go first.
            stack.callback(terminate_children, "skopeo", "docker", "curl", "py-spy")
            bench.run()

        error = guarded(work)
        failed = bench.write(load_before, code, counters_before, error)
    log(f"done in {time.monotonic() - started:.0f} s; {failed} target(s) failed")
    return exit_status(error)


if __name__ == "__main__":
    sys.exit(main())
