"""The `regcache` commands on a cluster's shared store: what `stats`, `ls`, `pin`, `unpin`, `pins`,
`purge`, `verify`, `gc`, `export`, `import` and `warm` do when the configuration has `shared`
(unless `--local`, which acts on this machine's own cache_dir as on a single node). The work is
cluster.py's and admin.py's; here it is parsed from the options and shown.

- `gc`: under the cluster's sweep lock (one node or command at a time): the inventory is recounted
  from the bucket's listing, orphans (content no tag record and no pin needs, unused for
  `--min-age`) leave the bucket, abandoned multipart uploads are aborted. `--local`: this machine's
  L1 only, as `gc` on one node.
- `verify`: every object in the bucket (`--sample N`: N picked at random), blobs streamed.
- `purge`: the bucket and Redis; the nodes' L1 copies go by their own eviction.
- `import`, `warm`: into a scratch store first (all verified there), then into the bucket and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import gc as garbage
import json
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from regcache.config import ConfigError, Settings, SharedSettings, parse_duration
from regcache.ops import cluster as shared
from regcache.ops.admin import list_images, parse_ref_pattern, plan_orphans, plan_purge
from regcache.ops.bundle import (
    BundleError,
    collect_for_export,
    import_bundle,
    is_public,
    mark_public,
    parse_image_ref,
    write_bundle,
)
from regcache.ops.show import console, print_images, print_plan, report_verification, size_text, usage_rows, when_text
from regcache.ops.warm import default_platforms, warm_all
from regcache.store.access import DiskAccessRecords
from regcache.store.disk import DiskStore

Handler = Callable[[argparse.Namespace, Settings], int]


def _shared(settings: Settings) -> SharedSettings:
    if settings.shared is None:
        raise ConfigError("shared", "this command needs the shared section")
    return settings.shared


def _run(settings: Settings, work: Callable[[shared.Cluster], Coroutine[Any, Any, int]]) -> int:
    """Open the cluster's store, run `work` on it, close it."""

    async def main() -> int:
        async with shared.opened(_shared(settings)) as cluster:
            return await work(cluster)

    try:
        return asyncio.run(main())
    finally:
        # An obstore stream that failed (a listing while S3 is down) must be collected before the
        # interpreter exits: freed during shutdown, after its runtime, it aborts the process.
        garbage.collect()


# stats -------------------------------------------------------------------------------------------


def stats(options: argparse.Namespace, settings: Settings) -> int:
    async def work(cluster: shared.Cluster) -> int:
        show_stats(await shared.cluster_stats(cluster), options)
        return 0

    return _run(settings, work)


def show_stats(found: shared.ClusterStats, options: argparse.Namespace) -> None:
    if options.json:
        document = {
            "cluster": {
                "bucket": {"objects": found.objects, "bytes": found.bytes, "size_limit": found.size_limit},
                "tags": found.tags,
                **asdict(found.usage),
                "repositories": [asdict(r) for r in found.usage.repositories[: options.top]],
                "hit_ratio": found.usage.hit_ratio,
            },
            "nodes": [
                {
                    "node": node.node,
                    "urls": node.urls,
                    "started": node.started,
                    "last_seen": node.last_seen,
                    **asdict(node.usage),
                    "repositories": [asdict(r) for r in node.usage.repositories[: options.top]],
                    "hit_ratio": node.usage.hit_ratio,
                }
                for node in found.nodes
            ],
        }
        print(json.dumps(document, indent=2))
        return
    summary = Table(title=f"regcache cluster: {len(found.nodes)} nodes", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    limit = f" of {size_text(found.size_limit)} (shared.size_limit)" if found.size_limit else ""
    summary.add_row("bucket", f"{size_text(found.bytes)}{limit}, {found.objects} objects")
    summary.add_row("tags", str(found.tags))
    for label, value in usage_rows(found.usage):
        summary.add_row(label, value)
    nodes = Table(title="nodes")
    for column in ("node", "blob endpoint", "last seen", "hit ratio", "requests", "from cache", "from upstream"):
        nodes.add_column(column, justify="right" if column in ("requests", "from cache", "from upstream") else "left")
    for node in found.nodes:
        ratio = "-" if node.usage.hit_ratio is None else f"{node.usage.hit_ratio:.1%}"
        seen = when_text(node.last_seen) if node.last_seen else "never registered"
        requests = str(sum(node.usage.requests.values()))
        nodes.add_row(node.node, node.urls.get("blob", ""), seen, ratio, requests,
                      size_text(node.usage.bytes_cache), size_text(node.usage.bytes_upstream))  # fmt: skip
    out = console()
    out.print(summary)
    out.print(nodes)


# ls, pins -----------------------------------------------------------------------------------------


def ls(options: argparse.Namespace, settings: Settings) -> int:
    pattern = parse_ref_pattern(options.ref, settings.registries) if options.ref else None

    async def work(cluster: shared.Cluster) -> int:
        print_images(list_images(await shared.snapshot(cluster), pattern), pattern, options.json)
        return 0

    return _run(settings, work)


def pin(options: argparse.Namespace, settings: Settings) -> int:
    refs = [parse_image_ref(image) for image in options.images]

    async def work(cluster: shared.Cluster) -> int:
        for ref in refs:
            record = await shared.newest_stored(cluster, ref)
            if record is None:
                raise BundleError(f"{ref} is not in the cluster's store: pull, warm or import it first")
            cluster.redis.pins.pin(ref, record.digest)
            print(f"pinned {ref} -> {record.digest} (cluster-wide)")
        return 0

    return _run(settings, work)


def unpin(options: argparse.Namespace, settings: Settings) -> int:
    refs = [parse_image_ref(image) for image in options.images]

    async def work(cluster: shared.Cluster) -> int:
        for ref in refs:
            done = cluster.redis.pins.unpin(ref)
            print(f"unpinned {ref}" if done else f"{ref} was not pinned")
        return 0

    return _run(settings, work)


def pins(options: argparse.Namespace, settings: Settings) -> int:
    async def work(cluster: shared.Cluster) -> int:
        for ref, digest in sorted((cluster.redis.pins.pins()).items()):
            print(f"{ref} {digest}")
        return 0

    return _run(settings, work)


# purge, gc, verify ----------------------------------------------------------------------------------


def purge(options: argparse.Namespace, settings: Settings) -> int:
    pattern = parse_ref_pattern(options.ref, settings.registries)

    async def work(cluster: shared.Cluster) -> int:
        plan = plan_purge(await shared.snapshot(cluster), pattern)
        for ref in plan.kept_pinned:
            print(f"kept {ref}: pinned (regcache unpin {ref} first)")
        if not plan.keys:
            print(f"nothing in the cluster's store to purge for {pattern}")
            return 0
        size = plan.bytes if options.dry_run else (await shared.remove(cluster, plan.keys))[1]
        print_plan(plan, f"purge {pattern} from the bucket and Redis", options.dry_run, size)
        return 0

    return _run(settings, work)


def gc(options: argparse.Namespace, settings: Settings) -> int:
    min_age = parse_duration("--min-age", options.min_age)

    async def work(cluster: shared.Cluster) -> int:
        async with shared.sweep_lock(cluster):
            if not options.dry_run:
                counted, forgotten = await shared.recount(cluster)
                print(f"inventory: {counted} uncounted objects of the bucket counted, {forgotten} gone ones forgotten")
            plan = plan_orphans(await shared.snapshot(cluster), min_age)
            size = plan.bytes if options.dry_run else (await shared.remove(cluster, plan.keys))[1]
            print_plan(plan, "orphans in the bucket", options.dry_run, size)
        if options.dry_run:
            print("(the sweep by shared.max_age and shared.size_limit runs without --dry-run)")
        elif (swept := await shared.sweep(cluster)) is None:
            print("swept: nothing, another node is sweeping the bucket now")
        else:
            print(f"swept (shared.max_age, shared.size_limit; pins kept): {swept[0]} entries, {size_text(swept[1])}")
        objects, stored = cluster.redis.inventory.totals()
        limit = cluster.settings.size_limit
        of_limit = f" of size_limit {size_text(limit)}" if limit else ""
        print(f"bucket: {size_text(stored)}{of_limit}, {objects} objects")
        return 0

    return _run(settings, work)


def verify(options: argparse.Namespace, settings: Settings) -> int:
    if options.sample is not None and options.sample < 1:
        raise BundleError("--sample takes a number of objects, at least 1")

    async def work(cluster: shared.Cluster) -> int:
        columns = (TextColumn("verifying the bucket"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("verify", total=None)
            found = await shared.verify_bucket(cluster, options.sample, lambda count: progress.advance(task, count))
        if found.corrupt and not options.dry_run:
            await shared.remove(cluster, [corrupt.key for corrupt in found.corrupt])
        which = f"a sample of {options.sample} objects" if options.sample is not None else "every object"
        return report_verification(found, options.dry_run, f"{which} in the bucket: ")

    return _run(settings, work)


# export, import, warm ---------------------------------------------------------------------------------


def export(options: argparse.Namespace, settings: Settings) -> int:
    refs = [parse_image_ref(image) for image in options.images] if options.images else None
    out = Path(options.output)

    async def work(cluster: shared.Cluster) -> int:
        content = await shared.snapshot(cluster)
        contents = collect_for_export(content, refs, cluster.access_records())
        for skipped in contents.skipped:
            print(f"regcache export: skipped: {skipped}", file=sys.stderr)
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.blobs", dir=out.resolve().parent) as scratch:
            content.blob_dir = Path(scratch)
            await shared.download_blobs(cluster, contents.blobs, content.blob_dir)
            write_bundle(content, contents, out)
        print(f"regcache: exported {contents.summary()} from the cluster's store to {options.output}")
        return 0

    return _run(settings, work)


def _through_scratch(settings: Settings, fill: Callable[[DiskStore, DiskAccessRecords], int]) -> int:
    """With the cluster's store open (Redis answering), `fill` a scratch store (everything verified
    there), then put what it holds into the cluster."""

    async def work(cluster: shared.Cluster) -> int:
        with shared.scratch_store() as store:
            records = DiskAccessRecords(store.cache_dir)
            try:
                status = fill(store, records)
                pushed = await shared.push(cluster, store, records)
            finally:
                records.close()
        print(f"into the cluster's store: {pushed.blobs} blobs ({size_text(pushed.bytes)}) and "
              f"{pushed.manifests} manifests the bucket lacked, {pushed.tags} tag records")  # fmt: skip
        return status

    return _run(settings, work)


def import_(options: argparse.Namespace, settings: Settings) -> int:
    as_ref = parse_image_ref(options.as_ref) if options.as_ref else None
    if not Path(options.bundle).exists():
        raise BundleError(f"{options.bundle}: no such file or directory")
    _shared(settings)

    def fill(store: DiskStore, records: DiskAccessRecords) -> int:
        contents = import_bundle(store, Path(options.bundle), as_ref, pin=options.pin, records=records,
                                 public=options.public)  # fmt: skip
        print(f"regcache: imported {contents.summary()}")
        for ref, _, record in contents.tags:
            print(f"  {ref} -> {record.digest}")
        return 0

    return _through_scratch(settings, fill)


def warm(options: argparse.Namespace, settings: Settings, images: list[str]) -> int:
    """As a node fills: each blob under the cluster's lease (a node pulling it meanwhile waits for
    the bucket's copy instead of fetching it too), into the bucket; tags and manifests too."""
    refs = [parse_image_ref(image) for image in images]
    platforms = set(options.platform) if options.platform else default_platforms(settings)

    async def work(cluster: shared.Cluster) -> int:
        with shared.tiered_over_scratch(cluster) as tiered:
            results = await warm_all(settings, tiered, refs, platforms, tiered)
            records = DiskAccessRecords(tiered.cache_dir)  # what warm's anonymous tokens showed public
            try:
                public = sorted({ref.repository for ref in refs if is_public(records, ref.repository)})
            finally:
                records.close()
        mark_public(cluster.access_records(), public)
        for result in results:
            if isinstance(result, str):
                print(f"regcache warm: FAILED {result}", file=sys.stderr)
            else:
                print(f"warmed {result.ref} -> {result.digest} ({result.manifests} manifests, {result.blobs} blobs)"
                      " into the cluster's store")  # fmt: skip
        return 1 if any(isinstance(result, str) for result in results) else 0

    return _run(settings, work)


HANDLERS: dict[str, Handler] = {
    "stats": stats,
    "ls": ls,
    "pin": pin,
    "unpin": unpin,
    "pins": pins,
    "purge": purge,
    "gc": gc,
    "verify": verify,
    "export": export,
    "import": import_,
}
