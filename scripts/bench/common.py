"""What regcache's benchmarks share (``scripts/bench/small_big.py``, ``scripts/bench/concurrency.py``,
``scripts/bench/conncost.py``):
the one module they share, importing the test bed (``scripts/bed``) and nothing from ``tests/``.

* Where the code under test is: the working tree, or with ``--snapshot`` a frozen copy of
  ``addon/`` and ``scripts/`` (:func:`snapshot_and_reexec`, :data:`SRC`), which the re-executed
  benchmark imports first: its wrapper (``scripts/bench/run``) puts ``scripts/`` on ``PYTHONPATH``,
  the snapshot's re-execution the copy's ``scripts/`` and ``addon/`` (they reach the processes the
  benchmark starts too, ``regcache run`` included).
* Measuring processes: peak memory (:class:`RssSampler`, :func:`status_kib`), the CPU the bench used
  and what everything else on the machine took meanwhile (:class:`CpuAccount`), one process's CPU
  (:func:`process_cpu`), the VM's CPU steal (:func:`steal_share`).
* Upstream traffic as the bed's own servers saw it (:class:`UpstreamLogs`, :class:`UpstreamTraffic`):
  registry access logs, the CDN's log (which carries the blob bytes), the token server's log.
* Waiting for regcache's background blob commits (:func:`wait_stored`).
* Clients released at one moment, each in a thread of its own (:func:`release_together`).
* Report facts (machine, tool versions, the code measured, load) and number formatting.
* Clean-up: signals as ``KeyboardInterrupt`` (:func:`raise_on_signals`) so ``ExitStack`` callbacks
  run, and stopping our own stray child processes by PID (:func:`terminate_children`); a failure or an
  interrupt still reports what was measured (:func:`guarded`, :func:`exit_status`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

import mitmproxy.version
from bed.cdn import Cdn, CdnRequest, _parse_range
from bed.regcache_run import Mitmdump
from bed.registry import AccessRecord, Registry
from bed.tokens import TokenServer

import regcache.ops.cli

# --snapshot re-executes the benchmark with a frozen copy of addon/ and scripts/ named in
# SNAPSHOT_ENV; the checkout it copied is named in ROOT_ENV (this module is the copy's by then).
SNAPSHOT_ENV = "REGCACHE_BENCH_SRC"
ROOT_ENV = "REGCACHE_BENCH_ROOT"
ROOT = Path(os.environ.get(ROOT_ENV) or Path(__file__).resolve().parents[2])
SRC = Path(os.environ.get(SNAPSHOT_ENV) or ROOT)

MIB = 1024 * 1024
_STORED = re.compile(r"STORED blob (sha256:[0-9a-f]{64}) ")


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def source_digest(directory: Path) -> str:
    """sha256 over the paths and contents of the ``*.py`` files in and below ``directory`` (the
    package under ``addon/`` too), first 12 hex digits."""
    sha = hashlib.sha256()
    for path in sorted(directory.rglob("*.py")):
        with contextlib.suppress(OSError):
            sha.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:12]


def sources_under_test() -> tuple[str, str]:
    """Digests of ``addon/`` and ``scripts/bed/``: mitmdump reloads its scripts when they change."""
    return source_digest(SRC / "addon"), source_digest(SRC / "scripts" / "bed")


# -- memory and CPU ------------------------------------------------------------------


def status_kib(pid: int, key: str) -> int | None:
    """``key`` (VmRSS, VmHWM) from /proc/PID/status in KiB; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else None


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def _own_seconds() -> float:
    """CPU seconds of this process, its reaped children, and its live descendants (mitmdump, registry)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            rest = text[text.rindex(")") + 2 :].split()
            pid = int(stat.parent.name)
            parents[pid] = int(rest[1])
            # utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 after the command name.
            ticks[pid] = sum(int(v) for v in rest[11:15])
    me = os.getpid()
    for pid in ticks:
        ancestor = parents.get(pid, 0)
        while ancestor > 1 and ancestor != me:
            ancestor = parents.get(ancestor, 0)
        if ancestor == me:
            total += ticks[pid] / _TICK
    return total


def process_cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far; 0 when it is gone (or None)."""
    if pid is None:
        return 0.0
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # utime and stime: fields 14 and 15 of stat, 12 and 13 after the command name.
    rest = text[text.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / _TICK


def listen_overflows() -> int:
    """Connections the kernel dropped since boot because a listening socket's accept queue was full
    (``ListenOverflows`` in /proc/net/netstat, machine-wide): each costs its client a SYN
    retransmission, a second or more."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
        names, values = next((n, v) for n, v in zip(lines[::2], lines[1::2], strict=False) if n[0] == "TcpExt:")
        return int(values[names.index("ListenOverflows")])
    return 0


class CpuAccount:
    """Machine-wide busy CPU seconds during the ``with`` block, and how many were not this bench's.

    The bench's are this process's and its descendants' (clients, proxies, registries, dockerd and
    its containerd); kernel threads (writeback of pulled bytes) count as others'.
    """

    def __enter__(self) -> CpuAccount:
        self._busy, self._own = _machine_busy_seconds(), _own_seconds()
        self.busy = self.own = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.busy = _machine_busy_seconds() - self._busy
        self.own = _own_seconds() - self._own

    @property
    def foreign(self) -> float:
        """CPU seconds other processes (e.g. someone's test run) took from the machine meanwhile."""
        return max(0.0, self.busy - self.own)


class RssSampler:
    """Highest VmRSS of ``pid`` seen while the ``with`` block runs, sampled every ``interval`` s.

    ``pid`` None samples nothing (a path without a proxy); :attr:`peak` stays 0.
    """

    def __init__(self, pid: int | None, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0  # bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _sample(self) -> None:
        kib = status_kib(self.pid, "VmRSS") if self.pid is not None else None
        if kib is not None:
            self.peak = max(self.peak, kib * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._sample()
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()


# -- upstream traffic ------------------------------------------------------------------


@dataclass
class UpstreamTraffic:
    """What the upstream (the bed's registries, CDN and token server) saw during one measured phase."""

    registry: list[AccessRecord]  # upstream registry access log lines of the phase
    cdn: list[CdnRequest]
    blob_sizes: dict[str, int]
    tokens: int  # token server requests

    def _count(self, method: str, kind: str) -> int:
        return sum(1 for r in self.registry if r.method == method and r.kind == kind)

    @property
    def manifest_gets(self) -> int:
        return self._count("GET", "manifest")

    @property
    def manifest_heads(self) -> int:
        return self._count("HEAD", "manifest")

    @property
    def blob_gets(self) -> int:
        return self._count("GET", "blob")

    @property
    def blob_heads(self) -> int:
        return self._count("HEAD", "blob")

    @property
    def pings(self) -> int:
        return sum(1 for r in self.registry if r.kind == "base")

    @property
    def other(self) -> int:
        return sum(1 for r in self.registry if r.kind == "other")

    @property
    def cdn_requests(self) -> int:
        return len(self.cdn)

    @property
    def requests(self) -> int:
        """Every request upstream: registry, CDN and token server."""
        return len(self.registry) + len(self.cdn) + self.tokens

    @property
    def cdn_bytes(self) -> int:
        """Body bytes the CDN sent: whole blobs for 200, the range for 206, nothing for HEAD."""
        total = 0
        for r in self.cdn:
            size = self.blob_sizes.get(r.digest or "")
            if r.method != "GET" or size is None:
                continue
            if r.status == 200:
                total += size
            elif r.status == 206 and r.range:
                parsed = _parse_range(r.range, size)
                total += parsed[1] - parsed[0] + 1 if parsed else 0
        return total

    @property
    def registry_bytes(self) -> int:
        return sum(r.size for r in self.registry)

    @property
    def upstream_bytes(self) -> int:
        return self.registry_bytes + self.cdn_bytes

    def blob_fetches(self) -> dict[str, int]:
        """CDN GETs per blob digest (each a transfer of that blob, or part of it, from upstream)."""
        return dict(Counter(r.digest for r in self.cdn if r.method == "GET" and r.digest))

    def summary(self) -> dict[str, object]:
        """The counts, for a JSON report."""
        return {
            "manifest_gets": self.manifest_gets,
            "manifest_heads": self.manifest_heads,
            "blob_gets": self.blob_gets,
            "blob_heads": self.blob_heads,
            "pings": self.pings,
            "other_registry_requests": self.other,
            "cdn_requests": self.cdn_requests,
            "token_requests": self.tokens,
            "requests": self.requests,
            "registry_bytes": self.registry_bytes,
            "cdn_bytes": self.cdn_bytes,
            "upstream_bytes": self.upstream_bytes,
            "cdn_gets_by_blob": self.blob_fetches(),
        }


UpstreamMark = tuple[tuple[int, ...], int, int]


@dataclass
class UpstreamLogs:
    """The bed servers whose logs make up upstream traffic; marks and what came after one."""

    registries: Sequence[Registry]
    cdn: Cdn
    tokens: TokenServer

    def mark(self) -> UpstreamMark:
        return tuple(r.mark() for r in self.registries), self.cdn.mark(), self.tokens.mark()

    def since(self, mark: UpstreamMark, blob_sizes: dict[str, int]) -> UpstreamTraffic:
        registry_marks, cdn_mark, token_mark = mark
        records = [rec for reg, at in zip(self.registries, registry_marks, strict=True) for rec in reg.requests(at)]
        return UpstreamTraffic(
            registry=records,
            cdn=self.cdn.requests(since=cdn_mark),
            blob_sizes=blob_sizes,
            tokens=len(self.tokens.requests(since=token_mark)),
        )


def wait_stored(proxy: Mitmdump, digests: Iterable[str], since: int, timeout: float = 120.0) -> float | None:
    """Seconds until regcache logged ``STORED blob`` for every digest after log mark ``since`` (None: not all)."""
    wanted = set(digests)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if wanted <= set(_STORED.findall(proxy.log()[since:])):
            return time.monotonic() - start
        time.sleep(0.1)
    return None


@dataclass
class Released:
    """What :func:`release_together` measured: per job its seconds from the common start to its end,
    and the exception it raised (None: it finished)."""

    seconds: list[float]
    errors: list[BaseException | None]

    @property
    def wall(self) -> float:
        """Common start → the last job's end."""
        return max(self.seconds, default=0.0)

    def failures(self) -> list[str]:
        return [f"client {i}: {error}" for i, error in enumerate(self.errors) if error is not None]


def release_together(jobs: Sequence[Callable[[], object]]) -> Released:
    """Run every job in a thread of its own, all released at the same moment (a barrier), and wait
    for the last one; an exception a job raises is recorded, not raised."""
    barrier = threading.Barrier(len(jobs) + 1)
    ends = [0.0] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)

    def work(i: int) -> None:
        try:
            barrier.wait()
            jobs[i]()
        except BaseException as e:  # reported by the caller
            errors[i] = e
        finally:
            ends[i] = time.monotonic()

    threads = [threading.Thread(target=work, args=(i,), name=f"client-{i}", daemon=True) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.monotonic()
    for thread in threads:
        thread.join()
    return Released([end - start for end in ends], errors)


# -- report facts and formatting ------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def num(value: float) -> str:
    """A count that may be a median of counts: ``3`` or ``2.5``."""
    return str(int(value)) if value == int(value) else f"{value:.1f}"


def command_version(cmd: list[str]) -> str:
    """First line ``cmd`` prints (e.g. ``skopeo --version``)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def load_average() -> str:
    """1-minute load average: other work on this machine skews every number."""
    return f"{os.getloadavg()[0]:.2f}"


def cpu_counters() -> list[int]:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal)."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:9]]


def steal_share(before: list[int]) -> float:
    """Share of CPU time (0-1) the VM's host gave to other guests since `before`: noise no process shows."""
    delta = [now - then for then, now in zip(before, cpu_counters(), strict=True)]
    return delta[7] / max(1, sum(delta))


def steal_since(before: list[int]) -> str:
    return f"{100 * steal_share(before):.0f} %"


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` used so far (/proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def code_facts() -> str:
    """Which regcache was measured: the addon script mitmdump loads, its digest, the git state."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
        return ""

    dirty = "uncommitted changes in addon/" if git("status", "--porcelain", "--", "addon") else "addon/ clean"
    frozen = f"a copy of {ROOT} made at start (--snapshot)" if SRC != ROOT else "the working tree"
    return (
        f"code: {regcache.ops.cli.ADDON} ({frozen}); sha256 of addon/**/*.py {source_digest(SRC / 'addon')} at start; "
        f"{ROOT} at start: git HEAD {git('rev-parse', '--short', 'HEAD') or '?'}, {dirty}"
    )


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if found:
            return found[1]
    return "unknown CPU"


def memory_total() -> str:
    with contextlib.suppress(OSError):
        found = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if found:
            return f"{int(found[1]) / MIB:.1f} GiB RAM"
    return "RAM unknown"


def machine_facts(tools: dict[str, list[str]]) -> list[str]:
    """Date, CPU, cores, RAM, kernel, Python, mitmproxy; then ``role: version`` of each of ``tools``."""
    versions = "; ".join(f"{role}: {command_version(cmd)}" for role, cmd in tools.items())
    return [
        f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, {memory_total()}, Linux {platform.release()}",
        f"python {platform.python_version()} ({sys.executable}), mitmproxy {mitmproxy.version.VERSION}",
        versions,
    ]


# -- clean-up ------------------------------------------------------------------------------------


def terminate_children(*names: str) -> None:
    """SIGTERM our own child processes called one of ``names`` (clients left by an interrupt), by PID."""
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
            if ppid == me and comm in names:
                os.kill(int(stat.parent.name), signal.SIGTERM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def raise_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt``, like Ctrl-C, so clean-up code runs."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


def snapshot_environment(src: Path) -> dict[str, str]:
    """The environment of a benchmark re-executed on the copy ``src``: it imports the copy, and
    still knows the checkout (the git facts, the default ``--out``, and that the copy is its own
    to remove)."""
    path = os.pathsep.join([str(src / "scripts"), str(src / "addon")])
    return {**os.environ, SNAPSHOT_ENV: str(src), ROOT_ENV: str(ROOT), "PYTHONPATH": path}


def guarded(work: Callable[[], None]) -> str | None:
    """Run the bench's `work`; None when it finished, else why it stopped (interrupted, or failed:
    the traceback is logged), so that what was measured before is still reported."""
    try:
        work()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); cleaning up")
        return f"interrupted ({e or 'Ctrl-C'})"
    except Exception as e:
        log(f"failed: {e}\n{traceback.format_exc()}")
        return f"failed: {e}"
    return None


def exit_status(error: str | None, failed_targets: int = 0) -> int:
    """130 interrupted, 1 failed (or targets failed, when `failed_targets` counts), 0."""
    if error:
        return 130 if error.startswith("interrupted") else 1
    return 1 if failed_targets else 0


def snapshot_and_reexec(module: str, argv: list[str]) -> NoReturn:
    """Copy addon/ and scripts/ to a temporary directory and run benchmark ``module`` again on that copy.

    The new process finds the copy in ``$REGCACHE_BENCH_SRC`` (and imports it: ``PYTHONPATH``),
    and removes it when it exits.
    """
    src = Path(tempfile.mkdtemp(prefix="regcache-bench-src-"))
    try:
        ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info")
        for part in ("addon", "scripts"):
            shutil.copytree(ROOT / part, src / part, ignore=ignore)
        log(f"measuring a copy of addon/ and scripts/ in {src}")
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], snapshot_environment(src))
    except BaseException:
        shutil.rmtree(src, ignore_errors=True)
        raise


def prepare_process(module: str, argv: list[str], snapshot: bool) -> None:
    """With ``snapshot``, re-execute benchmark ``module`` (``bench.small_big``) on a frozen copy of
    the code (does not return); then SIGTERM and SIGHUP raise ``KeyboardInterrupt`` like Ctrl-C."""
    if snapshot and SNAPSHOT_ENV not in os.environ:
        snapshot_and_reexec(module, argv)
    raise_on_signals()


def enter_workdir(stack: contextlib.ExitStack, keep: Path | None, scratch: Sequence[str]) -> Path:
    """The bench's working directory, removed when ``stack`` closes, with the snapshot copy if any.

    ``keep`` (``--workdir``): use that directory and keep it (logs, built layouts and registry storage,
    which the next run reuses); only its ``scratch`` subdirectories (pulled copies, caches) are removed.
    """
    if SRC != ROOT:
        stack.callback(shutil.rmtree, SRC, ignore_errors=True)
    if keep is None:
        workdir = Path(tempfile.mkdtemp(prefix="regcache-bench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    else:
        workdir = keep.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        for name in scratch:
            stack.callback(shutil.rmtree, workdir / name, ignore_errors=True)
    log(f"workdir {workdir}")
    return workdir


SNAPSHOT_HELP = (
    "measure a copy of addon/ and scripts/ taken at start, so edits made during the run "
    "(mitmdump reloads addon/cache.py when it changes) neither change nor break the code under test"
)
