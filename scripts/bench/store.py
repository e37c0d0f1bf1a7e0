"""Benchmark (not a test): what the disk store's operations cost at 10,000, 100,000 and 1,000,000
entries — they should cost the same at every size (within a factor of 2), and eviction work should
follow what it removes, not the size of the store.

Per size, a synthetic store is built in ``<workdir>/<entries>/`` through the store's own API, in
batched transactions (``DiskStore.batch``; the staging file's fsync skipped while building, only
then, with one ``sync`` at the end): images of a tag → an index → two platform manifests → each a
config and two layers, the first layer shared by the 50 images of a group, plus the access records
(``seen:`` entries) a pull leaves; blobs of ``--blob-bytes`` each (one file each, as in a real
store). Entries are stored one image after the other, so the first built are the least recently
used. Then, on a newly opened store (nothing in memory), each ``--samples`` times:

* ``manifest hit``: what a manifest request served from the store asks of it (``get_manifest`` of an
  index, which notes a use of everything the image needs, and ``is_seen``), for a random image;
* ``blob hit``: what a blob request served from the store asks (``services.blobs.find_stored``:
  open, size, ``is_seen``);
* ``tag revalidation``: what a tag request the upstream confirmed writes as well (``get_manifest``,
  ``put_tag``, ``mark_seen``);
* ``commit``: staging, verifying (with its fsync) and committing a new blob, then the ``evict`` check
  every commit makes (the store is under its limit: nothing to remove);
* ``expiry sweep``: ``expire_unused`` removing the ``--remove`` least recently used entries (the
  oldest images, whole);
* ``eviction step``: ``evict`` freeing the bytes of ``--remove`` entries (the oldest files);
* ``…, store's own``: commit, sweep and step again, without the time spent in ``fsync``, in removing
  files and in the pauses between eviction batches (``WaitClock``): what the store itself does, apart
  from the disk's latency, which swings several-fold from run to run on a shared disk whatever the
  store's size;
* ``request``: a hit (manifest hit + blob hit) every ``--request-interval`` (1 ms: a busy node) in
  one thread, for ``--idle-seconds``, then while one real eviction step of the store runs
  (``size_limit`` just under its volume: down to 90 %, a tenth of the store, as a full cache does
  after each ~10 % of new content) in a helper process, as the running cache evicts
  (``remove_apart``); then idle again, and while the next step runs in another thread of this
  process (``… in a thread``: the workers serving requests share the GIL with it), both
  ``--eviction-rounds`` times: the latencies requests see while the store evicts; and
  ``request CPU``: the same requests' CPU time (the serving thread's), apart from their waits.
  (The eviction and expiry rows above run in this process: the store's own work, wherever it runs.)

The table gives median and p99 in milliseconds per size, and the ratio of the largest size's median to
the smallest's (target: at most 2); then the requests' p99 during the evictions against idle (target: at
most 2), and the same for the evictions in a thread. One command: ``scripts/bench/run-store [--sizes
10k,100k,1M]``. The machine should be quiet: on 2 cores, any other busy process shows in the p99s.
``--workdir`` puts the stores on the disk to measure (default: a temporary directory; removing a
file costs what the file system makes it cost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from bench.common import code_facts, cpu_counters, load_average, log, machine_facts, positive_int, steal_since
from regcache.oci.digest import digest_of
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.services.blobs import find_stored
from regcache.store.base import TagRecord
from regcache.store.disk import DiskStore

INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE = "application/vnd.oci.image.manifest.v1+json"
PLATFORMS = ("amd64", "arm64")
GROUP = 50  # images sharing a base layer
BUILD_BATCH = 200  # images per transaction while building
# Entries one image adds: tag, index, 2 platform manifests, 2 configs, 2 own layers, and the seen
# entries of its pull (index, 2 manifests, 2 configs, 2 bases, 2 layers); its group's bases aside.
ENTRIES_PER_IMAGE = 17
MS = 1000.0

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Image:
    number: int
    ref: TagRef
    repository: str
    index: str
    layers: tuple[str, ...]


@dataclass
class Measured:
    """One size's results: samples (seconds) per operation, and facts for the notes."""

    entries: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# building ----------------------------------------------------------------------------------------


def blob_data(name: str, size: int) -> bytes:
    head = f"{name}\n".encode()
    return head + b"." * max(0, size - len(head))


def commit(store: DiskStore, data: bytes) -> str:
    digest = digest_of(data)
    staging = store.stage_blob(digest)
    staging.write(data)
    store.commit_blob(staging, len(data))
    return digest


def put_manifest(store: DiskStore, media_type: str, document: dict[str, object]) -> str:
    body = json.dumps({"schemaVersion": 2, "mediaType": media_type, **document}).encode()
    digest = digest_of(body)
    store.put_manifest(digest, Manifest(media_type, body))
    return digest


def build_image(store: DiskStore, number: int, bases: dict[str, str], blob_bytes: int) -> Image:
    """One image, stored as a pull stores it: manifests and tag record, blobs, access records."""
    repository = f"docker.io/bench/image{number}"
    platforms, layers, seen = [], [], []
    for platform in PLATFORMS:
        base_name = f"base {number // GROUP} {platform}"
        if base_name not in bases:
            bases[base_name] = commit(store, blob_data(base_name, blob_bytes))
        config = commit(store, blob_data(f"config {number} {platform}", blob_bytes))
        layer = commit(store, blob_data(f"layer {number} {platform}", blob_bytes))
        base = bases[base_name]
        manifest = put_manifest(
            store, IMAGE, {"config": {"digest": config}, "layers": [{"digest": base}, {"digest": layer}]}
        )
        platforms.append(manifest)
        layers.append(layer)
        seen += [manifest, config, base, layer]
    index = put_manifest(store, INDEX, {"manifests": [{"digest": d} for d in platforms]})
    ref = TagRef("docker.io", f"bench/image{number}", "1")
    store.put_tag(ref, (INDEX,), TagRecord(index, INDEX, 100, time.time()))
    store.mark_seen(repository, [index, *seen])
    return Image(number, ref, repository, index, tuple(layers))


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """While building only: a synthetic store need not survive a crash, and an fsync per blob file
    would make building a million entries take many minutes on a disk."""
    fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = fsync


def build(directory: Path, entries: int, blob_bytes: int) -> tuple[list[Image], list[float]]:
    """A store of about `entries` entries; its images, and when each was done (oldest first)."""
    store = DiskStore(directory, 2**62)
    images: list[Image] = []
    done_at: list[float] = []
    bases: dict[str, str] = {}
    count = max(1, entries // ENTRIES_PER_IMAGE)
    with no_fsync():
        for start in range(0, count, BUILD_BATCH):
            with store.batch():
                for number in range(start, min(count, start + BUILD_BATCH)):
                    images.append(build_image(store, number, bases, blob_bytes))
                    done_at.append(time.time())
                store.flush_uses()
    store.close()
    # What the build wrote without fsync reaches the disk now: measured, its write-back (and the
    # journal commits that fsyncs and unlinks wait for) would be charged to the largest store.
    os.sync()
    return images, done_at


def entry_count(store: DiskStore) -> int:
    return sum(count for count, _ in store.entry_totals().values())


# measuring ---------------------------------------------------------------------------------------


class WaitClock:
    """Seconds spent, while `counting`, in what the disk decides the cost of (an fsync, a file's
    removal) and in the pauses between eviction batches: what an operation took without them is
    the store's own work, which should not grow with its size. Counted in this thread only."""

    CALLS = ((os, "fsync"), (os, "remove"), (os, "unlink"), (time, "sleep"))

    def __init__(self) -> None:
        self.seconds = 0.0
        self._thread = threading.get_ident()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        originals = [(module, name, getattr(module, name)) for module, name in self.CALLS]
        for module, name, call in originals:
            setattr(module, name, self._timing(call))
        try:
            yield
        finally:
            for module, name, call in originals:
                setattr(module, name, call)

    def _timing(self, call: Callable[P, T]) -> Callable[P, T]:
        def timed_call(*args: P.args, **kwargs: P.kwargs) -> T:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                if threading.get_ident() == self._thread:
                    self.seconds += time.perf_counter() - started

        return timed_call


OWN = ", store's own"  # the rows without what `WaitClock` counts


def timed_apart(
    result: Measured, name: str, clock: WaitClock, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`work(*args)` timed into the samples `name`, and without what `clock` counted meanwhile into
    `name + OWN`; what it returned."""
    waited = clock.seconds
    took: list[float] = []
    outcome = timed(took, work, *args, **kwargs)
    result.samples.setdefault(name, []).append(took[0])
    result.samples.setdefault(name + OWN, []).append(took[0] - (clock.seconds - waited))
    return outcome


def timed(samples: list[float], work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args)`, its duration appended to `samples`; what it returned."""
    started = time.perf_counter()
    outcome = work(*args, **kwargs)
    samples.append(time.perf_counter() - started)
    return outcome


def manifest_hit(store: DiskStore, image: Image) -> None:
    assert store.get_manifest(image.index) is not None
    assert store.is_seen(image.repository, image.index)


def blob_hit(store: DiskStore, image: Image) -> None:
    assert find_stored(store, image.layers[0], image.repository) is not None


def revalidation(store: DiskStore, image: Image) -> None:
    manifest = store.get_manifest(image.index)
    assert manifest is not None
    store.put_tag(image.ref, (INDEX,), TagRecord(image.index, INDEX, len(manifest.body), time.time()))
    store.mark_seen(image.repository, [image.index])


def commit_and_check(store: DiskStore, data: bytes) -> None:
    """A fill's end: the commit, then the eviction check every commit makes."""
    commit(store, data)
    store.evict()


def request(store: DiskStore, image: Image) -> None:
    manifest_hit(store, image)
    blob_hit(store, image)


def measure(directory: Path, args: argparse.Namespace, entries: int) -> Measured:
    started = time.monotonic()
    images, done_at = build(directory, entries, args.blob_bytes)
    built = time.monotonic() - started
    opened_at = time.perf_counter()
    store = DiskStore(directory, 2**62)
    result = Measured(entry_count(store))
    result.notes.append(
        f"{result.entries:,} entries ({len(images):,} images, {store.entry_totals()['blob'][0]:,} blob files): "
        f"built in {built:.0f} s, opened in {(time.perf_counter() - opened_at) * MS:.0f} ms"
    )
    log(result.notes[-1])
    rng = random.Random(15)
    # Hits on the newest 40 %: the removals below take the oldest images first (about half of the
    # store at the smallest size).
    live = images[len(images) * 3 // 5 :]
    for name, work in (("manifest hit", manifest_hit), ("blob hit", blob_hit), ("tag revalidation", revalidation)):
        samples = result.samples[name] = []
        for _ in range(args.samples):
            timed(samples, work, store, rng.choice(live))
    store.flush_uses()
    clock = WaitClock()
    with clock.counting():
        for number in range(args.samples):
            data = blob_data(f"commit {number} {time.time()}", args.blob_bytes)
            timed_apart(result, "commit", clock, commit_and_check, store, data)
        measure_removals(store, args, images, done_at, result, clock)
    measure_requests(store, live, rng, args, result)
    store.close()
    return result


def measure_removals(
    store: DiskStore, args: argparse.Namespace, images: list[Image], done_at: list[float], result: Measured,
    clock: WaitClock,
) -> None:
    """Expiry sweeps of the oldest images, whole, then eviction steps of the next oldest files:
    each about `--remove` entries."""
    per_sweep = max(1, args.remove // ENTRIES_PER_IMAGE)
    removed = []
    oldest = 0
    for _ in range(args.removal_samples):
        oldest = min(len(images) - 1, oldest + per_sweep)
        cutoff = done_at[oldest - 1] + 1e-6  # just after the image's last entry was stored
        removed.append(timed_apart(result, "expiry sweep", clock, store.expire_unused, 1.0, cutoff + 1.0)[0])
    result.notes.append(f"expiry sweeps removed {statistics.median(removed):.0f} entries each (median)")
    evicted = []
    for _ in range(args.removal_samples):
        down_to = store.volume() - args.remove * args.blob_bytes
        evicted.append(timed_apart(result, "eviction step", clock, store.evict, down_to)[0])
    result.notes.append(f"eviction steps removed {statistics.median(evicted):.0f} entries each (median)")


def measure_requests(
    store: DiskStore, live: list[Image], rng: random.Random, args: argparse.Namespace, result: Measured
) -> None:
    """Requests (a manifest hit and a blob hit) one every `--request-interval`, as a busy node gets
    them, in rounds: idle for `--idle-seconds`, then while one eviction step runs (down to 90 %: a
    tenth of the store, from the oldest), in a helper process as the running cache evicts
    (`remove_apart`), then idle again and while the next step runs in a thread of this process."""
    idle = result.samples["request, idle"] = []
    during = result.samples["request, during eviction"] = []
    in_thread = result.samples["request, during eviction in a thread"] = []
    # The same requests' CPU time (this thread's): what a slow one spent working, not waiting.
    idle_cpu = result.samples["request CPU, idle"] = []
    during_cpu = result.samples["request CPU, during eviction"] = []
    in_thread_cpu = result.samples["request CPU, during eviction in a thread"] = []
    newest = live[len(live) // 2 :]  # never reached by these evictions
    removed = freed = 0
    seconds = 0.0
    for _ in range(args.eviction_rounds):
        for apart, samples in ((True, (during, during_cpu)), (False, (in_thread, in_thread_cpu))):
            going = before(time.monotonic() + args.idle_seconds)
            paced_requests(store, newest, rng, args.request_interval, (idle, idle_cpu), going)
            store.size_limit = store.volume() - 1  # over its limit
            store.remove_apart = apart
            outcome: list[tuple[int, int]] = []
            evicting = threading.Thread(target=lambda out=outcome: out.append(store.evict()))
            started = time.monotonic()
            evicting.start()
            paced_requests(store, newest, rng, args.request_interval, samples, evicting.is_alive)
            evicting.join()
            seconds += time.monotonic() - started
            removed, freed = removed + outcome[0][0], freed + outcome[0][1]
    store.remove_apart = False
    result.notes.append(
        f"{2 * args.eviction_rounds} evictions during requests (half in a helper process) removed {removed:,} "
        f"entries ({freed / 1e6:.0f} MB) in {seconds:.2f} s ({seconds / max(1, removed) * 1e6:.0f} µs an entry), "
        f"{len(during) + len(in_thread):,} requests meanwhile"
    )
    log(result.notes[-1])


def before(deadline: float) -> Callable[[], bool]:
    """Is it still before `deadline` (monotonic)?"""
    return lambda: time.monotonic() < deadline


def paced_requests(
    store: DiskStore, images: list[Image], rng: random.Random, interval: float,
    samples: tuple[list[float], list[float]], going: Callable[[], bool],
) -> None:
    """A request every `interval` seconds (or back to back, if one takes longer) while `going()`;
    each one's wall time and CPU time (this thread's) into `samples`."""
    walls, cpus = samples
    while going():
        started, cpu = time.monotonic(), time.thread_time()
        timed(walls, request, store, rng.choice(images))
        cpus.append(time.thread_time() - cpu)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


# report ------------------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def cell(values: list[float]) -> str:
    return f"{statistics.median(values) * MS:8.3f} / {p99(values) * MS:8.3f}" if values else "-"


def table(results: list[Measured]) -> list[str]:
    """Median / p99 per operation and size; the largest size's median over the smallest's."""
    names = list(results[0].samples)
    width = max(len(name) for name in names) + 2
    header = f"{'operation (ms: median / p99)':<{width}}" + "".join(f"{r.entries:>21,}" for r in results)
    lines = [header + "   largest/smallest (median)"]
    for name in names:
        ratio = statistics.median(results[-1].samples[name]) / statistics.median(results[0].samples[name])
        verdict = "" if name.startswith("request") else ("  ok" if ratio <= 2 else "  OVER 2x")
        row = f"{name:<{width}}" + "".join(f"{cell(r.samples[name]):>21}" for r in results)
        lines.append(f"{row}   {ratio:6.2f}{verdict}")
    during = [p99(r.samples["request, during eviction"]) / p99(r.samples["request, idle"]) for r in results]
    verdicts = "".join(f"{ratio:>21.2f}" for ratio in during)
    lines.append(f"{'request p99 evicting/idle':<{width}}{verdicts}   {'ok' if max(during) <= 2 else 'OVER 2x'}")
    threaded = [
        p99(r.samples["request, during eviction in a thread"]) / p99(r.samples["request, idle"]) for r in results
    ]
    lines.append(f"{'  the same, evicting in a thread':<{width}}" + "".join(f"{ratio:>21.2f}" for ratio in threaded))
    return lines


def size_arg(text: str) -> list[int]:
    """`10k,100k,1M` → [10000, 100000, 1000000]."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        factor = {"k": 1000, "m": 1000_000}.get(part[-1:], 1)
        try:
            sizes.append(int(float(part.rstrip("km")) * factor))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 10k,100k,1M, got {text!r}") from None
    return sorted(sizes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench/run-store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=size_arg, default=size_arg("10k,100k,1M"), help="entries (10k,100k,1M)")
    parser.add_argument("--samples", type=positive_int, default=300, help="samples of each hit and commit")
    parser.add_argument("--removal-samples", type=positive_int, default=10, help="expiry sweeps, eviction steps")
    parser.add_argument("--remove", type=positive_int, default=50, help="entries each sweep and step removes")
    parser.add_argument("--blob-bytes", type=positive_int, default=4096, help="size of each synthetic blob")
    parser.add_argument("--idle-seconds", type=float, default=1.0, help="idle requests before each eviction")
    parser.add_argument("--eviction-rounds", type=positive_int, default=3, help="evictions during requests")
    parser.add_argument("--request-interval", type=float, default=0.001, help="seconds between requests")
    parser.add_argument("--workdir", type=Path, help="build the stores here, and keep them (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="regcache-bench-store-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}")
    results = []
    cpu, load = cpu_counters(), load_average()
    try:
        for entries in args.sizes:
            log(f"building and measuring a store of ~{entries:,} entries")
            results.append(measure(workdir / str(entries), args, entries))
            if not args.workdir:
                shutil.rmtree(workdir / str(entries), ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(machine_facts({})[:3]))
    print(code_facts())
    print(f"load average at start {load}, now {load_average()}; CPU steal meanwhile {steal_since(cpu)}")
    print(f"samples: {args.samples} per hit and commit, {args.removal_samples} sweeps and steps of ~{args.remove} "
          f"entries, blobs of {args.blob_bytes} B, workdir {workdir}")
    print()
    print("\n".join(table(results)))
    print()
    for result in results:
        print(f"{result.entries:,}: " + "; ".join(result.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
