"""scripts/bench/small_big.py's bookkeeping: medians per cell, ratios, the table rows and the target checks.

Pure functions over made-up pulls; the benchmark itself never runs in tests.
"""

from __future__ import annotations

from bench import small_big as bench
from bench.small_big import BIG, COLD, DIRECT, MB, NO_CACHE, REFERENCE, REGCACHE, WARM, Cell, HitFetch, PullRun

IMAGE = 1000 * MB


def pull(path: str, cache: str, run: int, wall: float, *, up: int = 0, rss: int | None = None) -> PullRun:
    return PullRun(
        cell=Cell(BIG, "skopeo", path, cache),
        run=run,
        wall=wall,
        image_bytes=IMAGE + 2000,
        image_blob_bytes=IMAGE,
        upstream_requests=10,
        upstream_bytes=up + 2000 if up else 0,
        upstream_blob_bytes=up,
        upstream={},
        rss_peak=rss,
    )


def three_runs(path: str, cache: str, walls: tuple[float, float, float], **kw: object) -> list[PullRun]:
    return [pull(path, cache, run, wall, **kw) for run, wall in enumerate(walls, 1)]  # type: ignore[arg-type]


PULLS = [
    *three_runs(REGCACHE, WARM, (9.0, 5.0, 6.0), rss=90 * MB),
    *three_runs(DIRECT, NO_CACHE, (4.0, 5.0, 3.0), up=IMAGE),
    *three_runs(REFERENCE, COLD, (12.0, 11.0, 10.0), up=2 * IMAGE, rss=40 * MB),
    *three_runs(REFERENCE, WARM, (7.0, 8.0, 6.5), rss=45 * MB),
    *three_runs(REGCACHE, COLD, (10.0, 9.0, 9.5), up=IMAGE, rss=120 * MB),
]


def test_summaries_are_medians_in_table_order_with_ratio_to_direct() -> None:
    summaries = bench.summarize(PULLS)
    assert [(s.cell.path, s.cell.cache) for s in summaries] == [
        (DIRECT, NO_CACHE),
        (REFERENCE, COLD),
        (REFERENCE, WARM),
        (REGCACHE, COLD),
        (REGCACHE, WARM),
    ]
    warm = summaries[-1]
    assert (warm.wall, warm.wall_min, warm.wall_max, warm.runs) == (6.0, 5.0, 9.0, 3)
    assert warm.vs_direct == 1.5
    assert warm.rss_peak == 90 * MB
    assert summaries[0].rss_peak is None
    assert summaries[1].blob_bytes_vs_image == 2.0


def test_table_row_formatting() -> None:
    rows = bench.pulls_table(bench.summarize(PULLS))
    assert rows[0].startswith("| image | client | path | cache | median wall s |")
    assert rows[2] == "| big | skopeo | direct | - | 4.00 | 3.00-5.00 | 1.00x | 10 | 1000 | 1.00x | - |"
    assert rows[4] == "| big | skopeo | reference | warm | 7.00 | 6.50-8.00 | 1.75x | 10 | 0.0 | 0.00x | 45.0 |"


def test_small_formatting_helpers() -> None:
    assert bench.split_sizes(10, 3) == [4, 3, 3]
    assert sum(bench.split_sizes(2**30, 4)) == 2**30
    assert bench.ratio(3.0, 0) is None
    assert bench.ratio(float("nan"), 2.0) is None
    assert bench.fmt_seconds(3.14159) == "3.14"
    assert bench.fmt_seconds(31.4159) == "31.4"
    assert bench.fmt_mb(None) == "-"
    assert bench.fmt_mb(1234 * MB) == "1234"
    assert bench.fmt_mb(12_340_000) == "12.3"


def test_target_checks_pass_fail_and_skip() -> None:
    hits = [HitFetch(REGCACHE, 1, IMAGE, 2.0, 1), HitFetch(REFERENCE, 1, IMAGE, 0.5, 0)]
    checks = {c.target: c for c in bench.target_checks(bench.summarize(PULLS), hits)}
    warm = checks["warm pull through regcache (regcache) ≤ 1.0x the reference (big image, skopeo)"]
    assert warm.passed is True
    assert warm.detail == "6.00 s vs 7.00 s = 0.86x"
    assert checks["cold pull through regcache (regcache) ≤ 1.0x the reference (big image, skopeo)"].passed is True
    upstream = checks["cold pull (regcache): upstream blob bytes = 1.0x the image (big image, skopeo)"]
    assert upstream.passed is True
    assert "reference 2.00x" in upstream.detail
    hit = checks["blob hits through regcache (regcache) ≥ 1000 MB/s to a same-host client"]
    assert (hit.passed, hit.detail) == (False, "median 500 MB/s (reference 2000 MB/s)")
    assert checks["regcache peak RSS < 200 MB throughout"].passed is True
    assert checks["warm pull through regcache (mirror) ≤ 1.0x the reference (big image, skopeo)"].passed is None
    assert hit.line().startswith("- **FAIL** blob hits")

    without_reference = [p for p in PULLS if p.cell.path != REFERENCE]
    skipped = bench.target_checks(bench.summarize(without_reference), [])
    assert {c.passed for c in skipped if "the reference" in c.target} == {None}
    assert all(c.passed is None for c in skipped if "blob hits" in c.target)


def test_cold_regcache_fetching_a_blob_twice_fails() -> None:
    twice = [p if p.cell != Cell(BIG, "skopeo", REGCACHE, COLD) else pull(REGCACHE, COLD, p.run, p.wall, up=2 * IMAGE)
             for p in PULLS]  # fmt: skip
    checks = bench.target_checks(bench.summarize(twice), [])
    assert [c.passed for c in checks if c.target.startswith("cold pull (regcache): upstream")] == [False]
    assert any("upstream sent the image's blobs 2.00 times" in f for f in bench.findings(twice, [], []))


def test_cache_paths_take_turns_going_first() -> None:
    paths = ["direct", "reference", "regcache", "mirror"]
    assert bench.path_order(paths, 1) == paths
    assert bench.path_order(paths, 2) == ["direct", "regcache", "mirror", "reference"]
    assert bench.path_order(paths, 4) == paths
    assert bench.path_order(["direct"], 3) == ["direct"]
