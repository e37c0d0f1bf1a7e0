"""Benchmark (not a test): the proxy's CPU per new connection, configuration by configuration.

Registry clients (dockerd, skopeo, podman) open a new connection through the proxy for nearly every
request: a CONNECT, a full TLS handshake, one small answer. What the proxy spends on that is what a
small pull costs. Configurations (``--variants``), each its own process with its own warm store,
all running at once on their own ports:

* ``mitmdump``: ``mitmdump -s addon/cache.py`` with the RSA-2048 CA mitmproxy makes (all of
  mitmdump's addons); ``mitmdump-ecdsa``: the same with an ECDSA P-256 root;
* ``rsa``: ``regcache run`` with an RSA-2048 root and mitmproxy's own hook dispatch
  (``REGCACHE_STOCK_DISPATCH``): what ``regcache run`` was before the ECDSA CA and the cached dispatch;
* ``ecdsa``: the same with an ECDSA P-256 root (``regcache ca new``);
* ``ecint``: the same with an ECDSA intermediate under the RSA root (``regcache ca upgrade``);
* ``default``: an ECDSA root and the cached dispatch: ``regcache run`` on a new confdir now;
* ``upgraded``: the ECDSA intermediate and the cached dispatch: an upgraded confdir now;
* ``mirror``: regcache's plain-HTTP mirror port of ``default``'s process (no proxy, no TLS): what
  regcache's own request handling costs.

Each round (``--rounds``) takes the configurations in an order that rotates from round to round, so
that load from elsewhere falls on all alike: a ``curl`` batch of ``--requests`` manifest GETs by
digest (a hit: 750 B) through the proxy, each on a new connection (one curl process,
``--no-sessionid``, ``Connection: close``: a CONNECT and a full TLS 1.3 handshake per request, as Go
clients make them), the proxy's CPU (user + system, /proc/PID/stat) divided by the requests; then
(``--pulls``) a warm ``skopeo copy`` of the small multi-arch image of ``scripts/bench/run``, the
proxy's CPU per pull (8 connections). Reported: medians and interquartile ranges over the rounds,
each round's ratio to ``rsa``'s batch of the same round (paired: the median of those ratios), the CPU
steal, next to the figures of the prototype in the issue. CPU time per request is fairly robust to
a busy machine; wall time is not, and is not reported.

``--profile NAME``: one more curl batch of configuration NAME (4 times the requests) under py-spy:
where a connection's CPU goes, by part (TLS, mitmproxy, the hook dispatch, regcache, …), in ms.

Output (``--out``, default ``bench-results/conncost-<UTC time>``): ``table.md`` (also printed),
``results.json`` (every batch). Run: ``scripts/bench/run-conncost [--rounds 7] [--requests 200]
[--pulls 3] [--variants a,b,...] [--profile NAME] [--out DIR] [--workdir DIR] [--snapshot]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bed
from bed._process import without_proxies
from bed.images import SKOPEO, PushedImage
from bed.regcache_run import Mitmdump
from mitmproxy.certs import CertStore

from bench.common import (
    ROOT,
    SNAPSHOT_HELP,
    code_facts,
    cpu_counters,
    enter_workdir,
    load_average,
    log,
    machine_facts,
    positive_int,
    prepare_process,
    process_cpu,
    steal_share,
    terminate_children,
    wait_stored,
)
from bench.small_big import CURL, PY_SPY, SMALL, Bed, SkopeoClient, describe_image, image_specs, py_spy_record
from regcache.fronts import ca
from regcache.fronts.master import STOCK_DISPATCH_ENV

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
BASE = "rsa"  # what the paired ratios are against


@dataclass(frozen=True)
class Variant:
    name: str
    ca: str  # rsa | ecdsa | ecint (an ECDSA intermediate under the RSA root)
    what: str
    mitmdump: bool = False
    cached_dispatch: bool = True
    via_mirror_of: str = ""  # measured at the mirror port of that configuration's process
    issue: str = ""  # the comparable figure of the issue's prototype


VARIANTS = {
    v.name: v
    for v in (
        Variant("mitmdump", "rsa", "mitmdump -s addon/cache.py, RSA CA", True, False, issue="13.1 (full mitmdump)"),
        Variant(
            "mitmdump-ecdsa", "ecdsa", "mitmdump -s addon/cache.py, ECDSA root", True, False, issue="11.4 (ECDSA CA)"
        ),
        Variant("rsa", "rsa", "regcache run, RSA root, stock dispatch (before)", cached_dispatch=False, issue="8.55"),
        Variant("ecdsa", "ecdsa", "regcache run, ECDSA root, stock dispatch", cached_dispatch=False),
        Variant("ecint", "ecint", "regcache run, ECDSA intermediate (upgrade), stock dispatch", cached_dispatch=False),
        Variant("default", "ecdsa", "regcache run, ECDSA root, cached dispatch (new confdir)"),
        Variant("upgraded", "ecint", "regcache run, ECDSA intermediate, cached dispatch (upgraded)"),
        Variant("mirror", "ecdsa", "regcache's plain-HTTP mirror (no proxy, no TLS)", via_mirror_of="default"),
    )
}
# The prototype's figures (issue #15): CPU ms per new connection, 200 sequential curl requests, medians.
ISSUE_FLOORS = (
    ("full mitmdump with an answering addon", "13.1"),
    ("the same with an ECDSA P-256 CA", "11.4"),
    ("a slim master (5 addons)", "8.55"),
    ("slim master + raw TCP passthrough to an aiohttp TLS backend, in total", "7.8"),
    ("the aiohttp TLS backend alone", "3.15"),
    ("a bare asyncio CONNECT front terminating TLS itself", "2.8"),
)


# -- statistics (pure) --------------------------------------------------------------------------


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); all the median for fewer than two values."""
    if len(values) < 2:
        only = values[0] if values else float("nan")
        return only, only, only
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def fmt_spread(values: Sequence[float], unit: str = "") -> str:
    """``7.50 [6.96-8.33]``: the median and the interquartile range."""
    if not values:
        return "-"
    q1, q2, q3 = quartiles(values)
    return f"{q2:.2f}{unit} [{q1:.2f}-{q3:.2f}]"


def paired(mine: Sequence[float], base: Sequence[float]) -> list[float]:
    """Round by round, mine / base's: load that drifts over a run cancels out."""
    return [m / b for m, b in zip(mine, base, strict=False) if b > 0]


# -- configurations ---------------------------------------------------------------------------


def make_confdirs(root: Path) -> tuple[dict[str, Path], Path]:
    """One confdir per CA kind, and a bundle of the roots clients trust (the RSA root covers ecint)."""
    dirs = {"rsa": root / "conf-rsa", "ecdsa": root / "conf-ecdsa", "ecint": root / "conf-ecint"}
    CertStore.from_store(dirs["rsa"], "mitmproxy", 2048)  # what mitmproxy itself makes
    ca.create_root(dirs["ecdsa"])
    shutil.copytree(dirs["rsa"], dirs["ecint"])
    ca.upgrade(dirs["ecint"])
    bundle = root / "roots.pem"
    bundle.write_bytes(b"".join((dirs[k] / ca.CA_CERT).read_bytes() for k in ("rsa", "ecdsa")))
    return dirs, bundle


@dataclass
class Running:
    """One configuration's process (shared by ``mirror`` with the one it is the mirror of)."""

    variant: Variant
    proxy: Mitmdump
    skopeo: SkopeoClient

    @property
    def pid(self) -> int:
        assert self.proxy.pid is not None, "not running"
        return self.proxy.pid


@dataclass
class Batch:
    round: int
    cpu_ms_per_request: float
    steal: float  # share 0-1


@dataclass
class Pull:
    round: int
    cpu_ms: float
    steal: float


@dataclass
class Results:
    batches: dict[str, list[Batch]] = field(default_factory=dict)
    pulls: dict[str, list[Pull]] = field(default_factory=dict)
    profile: dict[str, float] = field(default_factory=dict)  # part → share of the busy samples

    def cpu(self, name: str) -> list[float]:
        return [b.cpu_ms_per_request for b in self.batches.get(name, [])]

    def pull_cpu(self, name: str) -> list[float]:
        return [p.cpu_ms for p in self.pulls.get(name, [])]

    def steals(self) -> list[float]:
        return [b.steal for batches in self.batches.values() for b in batches]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.results = Results()
        self.running: dict[str, Running] = {}

    def setup(self) -> None:
        self.bed = Bed(self.workdir / "bed", self.stack)
        spec, all_platforms = image_specs(1, 1)[SMALL]
        self.image: PushedImage = self.bed.push(spec, all_platforms)
        self.confdirs, self.bundle = make_confdirs(self.workdir)
        for variant in (VARIANTS[name] for name in self.args.variants):
            if variant.via_mirror_of:
                self.running[variant.name] = self.process(VARIANTS[variant.via_mirror_of])
            else:
                self.running[variant.name] = self.process(variant)
        for run in self.processes():
            self.fill(run)
        for name, run in self.running.items():
            self.curl_batch(VARIANTS[name], run, 10)  # leaves minted, lazy imports done
        log(f"{describe_image('small', self.image)}; {', '.join(self.running)} running and warm")

    def process(self, variant: Variant) -> Running:
        """`variant`'s process, started (one per configuration; a mirror shares its proxy's)."""
        for name, run in self.running.items():
            if name == variant.name or VARIANTS[name].via_mirror_of == variant.name:
                return run
        workdir = self.workdir / "runs" / variant.name
        config = {
            "cache_dir": str(workdir / "cache"),
            "upstreams": self.bed.hostmap,
            "mirrors": {"docker.io": "127.0.0.1:0"},
            "metrics_listen": "127.0.0.1:0",
        }
        proxy = Mitmdump(workdir, config, self.confdirs[variant.ca], mitmdump=variant.mitmdump)
        proxy.extra_env = {} if variant.cached_dispatch else {STOCK_DISPATCH_ENV: "1"}
        proxy.start()
        self.stack.callback(proxy.stop)
        return Running(variant, proxy, SkopeoClient(workdir / "skopeo", proxy.url, self.bundle))

    def processes(self) -> list[Running]:
        """Each process once (a mirror's is its proxy's)."""
        return list({id(run.proxy): run for run in self.running.values()}.values())

    def fill(self, run: Running) -> None:
        """Unmeasured: the store filled by a first pull, and a warm pull."""
        mark = run.proxy.mark()
        self.pull(run)
        if wait_stored(run.proxy, (b.digest for b in self.image.blobs), mark) is None:
            raise RuntimeError(f"{run.variant.name}: not every blob was stored after the first pull")
        self.pull(run)

    def pull(self, run: Running) -> None:
        ref = f"{bed.REGISTRY_HOST}/{self.image.ref}"
        run.skopeo.pull(ref, self.image, via_proxy=True)
        run.skopeo.forget(ref)

    def curl_batch(self, variant: Variant, run: Running, n: int) -> None:
        """`n` manifest GETs by digest, each on a new connection (and, through the proxy, a new
        CONNECT and a full TLS handshake); every answer must be a 200."""
        path = f"/v2/{self.image.repo}/manifests/{self.image.amd64_digest}"
        cmd = [CURL, "--silent", "--show-error", "--fail", "--http1.1", "--no-sessionid"]
        if variant.via_mirror_of:
            url = run.proxy.mirror_url() + path
        else:
            url = f"https://{bed.REGISTRY_HOST}{path}"
            cmd += ["--proxy", run.proxy.url, "--cacert", str(self.bundle)]
        config = self.workdir / f"curl-{variant.name}.cfg"
        config.write_text(f'url = "{url}"\noutput = "/dev/null"\n' * n)
        token = self.bed.tokens.mint(self.image.repo)  # fresh: a long run outlives a token
        cmd += ["--header", "Connection: close", "--header", f"Authorization: Bearer {token}"]
        cmd += ["--header", f"Accept: {MANIFEST_ACCEPT}", "--write-out", "%{http_code}\n", "--config", str(config)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=without_proxies(), timeout=900, check=False)
        codes = proc.stdout.split()
        if proc.returncode != 0 or codes != ["200"] * n:
            raise RuntimeError(f"{variant.name}: curl rc {proc.returncode}, codes {sorted(set(codes))}: {proc.stderr}")

    @contextlib.contextmanager
    def measured(self, pid: int) -> Iterator[dict[str, float]]:
        """The block's CPU seconds of process `pid` (`cpu`) and the machine's steal share (`steal`)."""
        out: dict[str, float] = {}
        cpu, counters = process_cpu(pid), cpu_counters()
        yield out
        out["cpu"] = process_cpu(pid) - cpu
        out["steal"] = steal_share(counters)

    def run(self) -> None:
        names = list(self.running)
        for round_ in range(1, self.args.rounds + 1):
            order = rotate(names, round_)
            for name in order:
                run = self.running[name]
                with self.measured(run.pid) as got:
                    self.curl_batch(VARIANTS[name], run, self.args.requests)
                per_request = 1000 * got["cpu"] / self.args.requests
                self.results.batches.setdefault(name, []).append(Batch(round_, per_request, got["steal"]))
            for name in order if self.args.pulls else []:
                if VARIANTS[name].via_mirror_of:
                    continue
                run = self.running[name]
                with self.measured(run.pid) as got:
                    for _ in range(self.args.pulls):
                        self.pull(run)
                per_pull = 1000 * got["cpu"] / self.args.pulls  # several: finer than the 10 ms CPU tick
                self.results.pulls.setdefault(name, []).append(Pull(round_, per_pull, got["steal"]))
            log(f"round {round_}: " + ", ".join(f"{n} {self.results.cpu(n)[-1]:.2f}" for n in names) + " ms/request")
        if self.args.profile:
            self.profile(self.args.profile)

    def profile(self, name: str) -> None:
        run = self.running[name]
        dest = self.args.out / f"profile-{name}.txt"
        with py_spy_record(run.pid, dest, fmt="raw"):
            self.curl_batch(VARIANTS[name], run, 4 * self.args.requests)
        self.results.profile = spy_parts(dest.read_text(errors="replace"))
        log(f"py-spy samples of {name}: {dest}")

    def notes(self) -> list[str]:
        return [
            f"{run.variant.name} logged a traceback: {run.proxy.log_path}"
            for run in self.processes()
            if "Traceback" in run.proxy.log()
        ]


# Where a sample's CPU goes: the part of its deepest frame that carries one of the part's marks
# (frames of other modules, such as stdlib helpers, count for their caller).
IDLE_LEAVES = ("EpollSelector.select (", "_worker (concurrent/futures/thread.py")  # waiting, not working
SYSCALL_LEAVES = ("_SelectorSocketTransport.write (", "socket._real_close (", "socket.accept (", "_sock_connect")
SOCKETS = "socket send/close/accept (kernel; on loopback a send runs the receiver's TCP too)"
SPY_PARTS = (
    ("store lookups (diskcache, thread pool)", ("diskcache/", "sqlite3/")),
    ("TLS (OpenSSL via pyOpenSSL, ssl, cryptography)", ("OpenSSL/", "cryptography/", "sslproto.py", "/ssl.py")),
    ("regcache's log line (logging, mitmproxy termlog)", ("logging/", "termlog.py")),
    ("hook dispatch (mitmproxy addonmanager, regcache master)", ("mitmproxy/addonmanager.py", "fronts/master.py")),
    ("regcache (the addon, services, store)", ("(regcache/",)),
    ("aiohttp", ("aiohttp/", "multidict/", "yarl/")),
    ("mitmproxy addons' hook bodies", ("mitmproxy/addons/",)),
    ("mitmproxy connection handler", ("mitmproxy/proxy/server.py", "proxy/mode_servers.py")),
    ("mitmproxy layers, flows, options", ("mitmproxy/", "kaitaistruct")),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
)


def spy_part(stack: str) -> str:
    """The part of the proxy one sample (py-spy's collapsed stack) belongs to; `idle` for waiting."""
    frames = stack.split(";")
    if any(mark in frames[-1] for mark in IDLE_LEAVES):
        return "idle"
    if any(mark in frames[-1] for mark in SYSCALL_LEAVES):
        return SOCKETS
    for frame in reversed(frames):
        for name, marks in SPY_PARTS:
            if any(mark in frame for mark in marks):
                return name
    return "other"


def spy_parts(raw: str) -> dict[str, float]:
    """Shares of the busy samples per part, largest first (py-spy raw: `frame;frame;… count` lines)."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        part = spy_part(stack) if count.isdigit() else "idle"
        if part != "idle":
            counts[part] = counts.get(part, 0) + int(count)
    total = max(1, sum(counts.values()))
    return {part: n / total for part, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def rotate(items: list[str], shift: int) -> list[str]:
    shift %= max(1, len(items))
    return items[shift:] + items[:shift]


# -- report -----------------------------------------------------------------------------------


def table(results: Results, variants: Sequence[str]) -> list[str]:
    lines = [
        "| configuration | what | CPU ms per new connection | vs rsa (paired) | skopeo warm pull, CPU ms "
        "| issue's figure |",
        "|---|---|---:|---:|---:|---|",
    ]
    base = results.cpu(BASE)
    for name in variants:
        variant, cpu = VARIANTS[name], results.cpu(name)
        vs = fmt_spread(paired(cpu, base), "x") if base and name != BASE else ("1.00x" if name == BASE else "-")
        pulls = fmt_spread(results.pull_cpu(name)) if results.pull_cpu(name) else "-"
        lines.append(f"| {name} | {variant.what} | {fmt_spread(cpu)} | {vs} | {pulls} | {variant.issue} |")
    return lines


def floors_table() -> list[str]:
    lines = ["| the issue's prototype (its machine) | CPU ms per new connection |", "|---|---:|"]
    return lines + [f"| {what} | {value} |" for what, value in ISSUE_FLOORS]


def profile_table(results: Results, name: str) -> list[str]:
    """The profiled configuration's CPU per connection (its median), split by the sampled shares."""
    if not results.profile:
        return []
    per_connection = quartiles(results.cpu(name))[1]
    lines = [f"Where a connection's CPU goes in `{name}` (py-spy, 200 Hz):", ""]
    lines += ["| part | share | ms |", "|---|---:|---:|"]
    lines += [f"| {part} | {share:.0%} | {share * per_connection:.2f} |" for part, share in results.profile.items()]
    return [*lines, ""]


def report(results: Results, args: argparse.Namespace, facts: list[str], notes: list[str]) -> str:
    steals = results.steals()
    steal = f"{100 * statistics.median(steals):.1f} % (max {100 * max(steals):.1f} %)" if steals else "-"
    out = [
        "# The proxy's CPU per new connection",
        "",
        *[f"- {fact}" for fact in facts],
        f"- CPU steal during the batches: median {steal}",
        "",
        f"Medians [interquartile range] over {args.rounds} rounds; a batch is {args.requests} manifest GETs, each on "
        "a new connection (CONNECT + full TLS 1.3 handshake); `vs rsa`: each round's ratio to the `rsa` batch "
        f"of that round; skopeo: the proxy's CPU per warm pull (8 connections), {args.pulls} pulls per round and "
        "configuration.",
        "",
        *table(results, args.variants),
        "",
        *floors_table(),
        "",
        *profile_table(results, args.profile),
        *[f"- NOTE: {note}" for note in notes],
    ]
    return "\n".join(out).rstrip() + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run-conncost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=7, help="rounds (default 7, at least 5 for the docs)")
    parser.add_argument("--requests", type=positive_int, default=200, help="requests per batch (default 200)")
    parser.add_argument("--pulls", type=int, default=3, help="warm skopeo pulls per round and configuration (3)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)} (default all)"
    )
    parser.add_argument("--profile", default="", metavar="NAME", help="a py-spy flame graph of NAME's curl batch")
    parser.add_argument("--out", type=Path, help="where table.md, results.json go (default bench-results/conncost-…)")
    parser.add_argument("--workdir", type=Path, help="keep the bed and the processes' logs here (default: temp)")
    parser.add_argument("--snapshot", action="store_true", help=SNAPSHOT_HELP)
    args = parser.parse_args(argv)
    args.variants = list(dict.fromkeys(v for v in args.variants.split(",") if v))
    unknown = [v for v in [*args.variants, *([args.profile] if args.profile else [])] if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"unknown configurations {unknown}: choose from {','.join(VARIANTS)}")
    if args.profile and args.profile not in args.variants:
        parser.error(f"--profile {args.profile}: not among --variants")
    if BASE not in args.variants:
        log(f"note: without {BASE} there are no paired ratios")
    missing = [tool for tool in (CURL, SKOPEO) if not Path(tool).exists()]
    if args.profile and not PY_SPY.exists():
        missing.append(f"{PY_SPY} (scripts/setup test bench)")
    if missing:
        parser.error(f"missing: {', '.join(missing)}")
    args.out = (args.out or ROOT / "bench-results" / f"conncost-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}").resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prepare_process("bench.conncost", argv, args.snapshot)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before, code = load_average(), code_facts()
    error: str | None = None
    with contextlib.ExitStack() as stack:
        workdir = enter_workdir(stack, args.workdir, scratch=("runs",))
        bench = Bench(args, workdir, stack)
        try:
            bench.setup()
            stack.callback(terminate_children, "skopeo", "curl", "py-spy")
            bench.run()
        except KeyboardInterrupt as e:
            error = f"interrupted ({e or 'Ctrl-C'})"
        except Exception as e:
            log(f"failed: {e}\n{traceback.format_exc()}")
            error = f"failed: {e}"
        facts = [
            *machine_facts({"curl": [CURL, "--version"], "skopeo": [SKOPEO, "--version"]}),
            code,
            f"load average (1 min): {load_before} before, {load_average()} after",
        ]
        notes = ([f"INCOMPLETE: {error}"] if error else []) + bench.notes()
        text = report(bench.results, args, facts, notes)
    print(text, end="")
    (args.out / "table.md").write_text(text)
    raw = {"facts": facts, "args": {k: str(v) for k, v in vars(args).items()}, "error": error}
    raw["batches"] = {k: [vars(b) for b in v] for k, v in bench.results.batches.items()}
    raw["pulls"] = {k: [vars(p) for p in v] for k, v in bench.results.pulls.items()}
    raw["profile"] = bench.results.profile
    (args.out / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    log(f"wrote {args.out}/table.md, results.json")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
