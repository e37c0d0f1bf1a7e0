"""How the `regcache` commands show sizes, times, digests, tables and removal plans (cli.py for a
node's store, cluster_cli.py for a cluster's)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime

from rich.console import Console
from rich.table import Table

from regcache.ops.admin import ImageRow, Plan, RefPattern, UsageSummary, Verification
from regcache.ops.bundle import incomplete_message


def size_text(count: float) -> str:
    """Binary units, as `size_limit` is usually written (50GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def when_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def short_digest(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}:{hex_digest[:12]}"


def console() -> Console:
    """On a terminal, its width; into a pipe or file, wide enough that digests and names never fold."""
    return Console() if sys.stdout.isatty() else Console(width=240)


def print_plan(plan: Plan, what: str, dry_run: bool, size: int) -> None:
    """`size`: what the plan would free (dry run), or what carrying it out freed."""
    if dry_run:
        for key in plan.keys:
            entry_size = plan.sizes.get(key)
            print(f"  {key}{f' ({entry_size} B)' if entry_size else ''}")
        for path in plan.staging_files:
            print(f"  staging file {path}")
    counts = ", ".join(
        f"{plan.count(kind)} {label}"
        for kind, label in (("tag", "tags"), ("manifest", "manifests"), ("blob", "blobs"), ("seen", "access records"))
    )
    staging = f", {len(plan.staging_files)} staging files" if plan.staging_files else ""
    print(f"{'would remove' if dry_run else 'removed'} ({what}): {counts}{staging}, {size_text(size)}")


def usage_rows(usage: UsageSummary) -> list[tuple[str, str]]:
    """(label, value) rows of a usage summary: hit ratio, pulls saved, bytes by source."""
    ratio = "no requests yet" if usage.hit_ratio is None else f"{usage.hit_ratio:.1%}"
    results = ", ".join(f"{result} {count}" for result, count in sorted(usage.requests.items()))
    saved = sum(usage.pulls_saved.values())
    by_registry = ", ".join(f"{registry} {count}" for registry, count in sorted(usage.pulls_saved.items()))
    return [
        ("hit ratio", f"{ratio} ({results})" if results else ratio),
        ("pulls saved", f"{saved} ({by_registry})" if by_registry else "0"),
        ("bytes", f"{size_text(usage.bytes_cache)} from cache, {size_text(usage.bytes_upstream)} from upstream"),
    ]


def print_images(rows: list[ImageRow], pattern: RefPattern | None, as_json: bool) -> None:
    """`regcache ls`: a table of cached images (JSON: every field, full digests) and what the
    incomplete ones lack."""
    if as_json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return
    table = Table(title=f"cached images{f' in {pattern}' if pattern else ''}: {len(rows)}")
    for column in ("image", "digest", "size", "last used", "pinned", "complete"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for row in rows:
        pinned, complete = "yes" if row.pinned else "", "NO" if row.missing else "yes"
        table.add_row(row.ref, short_digest(row.digest), size_text(row.size), when_text(row.last_used), pinned,
                      complete)  # fmt: skip
    console().print(table)
    for row in rows:
        if row.missing:
            print(f"{incomplete_message(row.ref, row.missing)} ({short_digest(row.digest)})")


def report_verification(found: Verification, dry_run: bool, scope: str = "") -> int:
    """`regcache verify`'s lines (the corrupt entries, removed unless `dry_run`, then the totals);
    the exit status: 1 if anything was corrupt."""
    for corrupt in found.corrupt:
        print(f"CORRUPT {corrupt.key}: {corrupt.problem}{'' if dry_run else ' (removed)'}")
    outcome = ", kept (--dry-run)" if dry_run else ", removed (pulls fetch them again)"
    outcome = outcome if found.corrupt else ""
    print(
        f"verified {scope}{found.manifests} manifests and {found.blobs} blobs, {size_text(found.bytes)}: "
        f"{len(found.corrupt)} corrupt{outcome}"
    )
    return 1 if found.corrupt else 0
