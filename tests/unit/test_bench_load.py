"""scripts/bench/load.py's bookkeeping (percentiles, medians per scenario and path, the target
checks) and scripts/bench/loadclient.py's pure parts (challenges, body checks, the amd64 child); and the
environment a benchmark re-executed on a snapshot of the code gets (scripts/bench/common.py).

Pure functions over made-up phases; the benchmark itself never runs in unit tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench import common, load, loadclient
from bench.load import ALL, BIG_COLD, MIRROR, PROXY, REFERENCE, SMALL_WARM, Latency, Phase

MB = 1_000_000
IMAGE = 256 * MB


def phase(scenario: str, path: str, run: int, **kw: object) -> Phase:
    values: dict[str, object] = {
        "scenario": scenario,
        "path": path,
        "run": run,
        "clients": 64,
        "window": 20.0,
        "requests": 2000,
        "failed_requests": 0,
        "pulls": 200,
        "failed_pulls": 0,
        "latency": {ALL: Latency(2000, 0.1, 0.5)},
        "pull_p50": 1.0,
        "pull_p99": 2.0,
        "bytes_to_clients": 0,
        "image_bytes": IMAGE + 2000,
        "image_blob_bytes": IMAGE,
        "server_cpu": 10.0,
        "server_rss_peak": 100 * MB,
        "server_hwm": 120 * MB,
        "client_cpu": 5.0,
        "upstream_cpu": 1.0,
        "bench_cpu": 0.5,
        "foreign_cpu": 0.0,
        "steal": "0 %",
        "upstream": {},
        "upstream_requests": 600,
        "upstream_bytes": 0,
        "upstream_blob_bytes": 0,
    }
    values.update(kw)
    return Phase(**values)  # type: ignore[arg-type]


def test_percentile_is_a_measured_value_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 0.5) == 50
    assert load.percentile(values, 0.99) == 99
    assert load.percentile([3.0], 0.99) == 3
    assert load.percentile([], 0.5) != load.percentile([], 0.5)  # NaN


def test_latencies_by_kind_and_for_every_request() -> None:
    records = [("blob", 200, 0.2, 10, True), ("blob", 200, 0.4, 10, True), ("ping", 401, 0.1, 0, True)]
    got = load.latencies(records)
    assert got[ALL].count == 3 and got[ALL].p50 == 0.2 and got[ALL].p99 == 0.4
    assert got["ping"] == Latency(1, 0.1, 0.1)


def test_summaries_take_medians_and_add_up_failures_and_the_worst_memory() -> None:
    phases = [
        phase(SMALL_WARM, MIRROR, 1, pulls=100, window=10.0),
        phase(SMALL_WARM, MIRROR, 2, pulls=300, window=10.0, failed_pulls=2, server_hwm=150 * MB),
        phase(SMALL_WARM, MIRROR, 3, pulls=200, window=10.0),
    ]
    (summary,) = load.summarize(phases)
    assert summary.pulls_per_s == 20.0  # median of 10, 29.8, 20
    assert summary.failed_pulls == 2 and summary.pulls == 600
    assert summary.server_hwm == 150 * MB
    assert summary.server_cpu_per_pull == 10.0 / 200


def checks(phases: list[Phase]) -> dict[str, bool | None]:
    return {c.target: c.passed for c in load.target_checks(load.summarize(phases))}


def test_the_targets_errors_memory_and_cold_upstream_bytes() -> None:
    got = checks(
        [
            phase(SMALL_WARM, PROXY, 1, failed_pulls=1),
            phase(SMALL_WARM, MIRROR, 1, pulls=400),
            phase(SMALL_WARM, REFERENCE, 1, failed_pulls=3),
            phase(BIG_COLD, MIRROR, 1, clients=16, pulls=16, upstream_blob_bytes=IMAGE, window=30.0),
            phase(BIG_COLD, PROXY, 1, clients=16, pulls=16, upstream_blob_bytes=2 * IMAGE, server_hwm=250 * MB),
            phase(BIG_COLD, REFERENCE, 1, clients=16, pulls=16, upstream_blob_bytes=14 * IMAGE, window=40.0),
        ]
    )
    assert got["errors = 0 (small-warm, proxy)"] is False
    assert got["errors = 0 (small-warm, mirror)"] is True
    assert got["reference errors (small-warm, reference)"] is None  # reported, no verdict
    assert got["regcache peak RSS (VmHWM) < 200 MB"] is False
    assert got["cold upstream blob bytes = 1.0x the image (mirror, 16 clients)"] is True
    assert got["cold upstream blob bytes = 1.0x the image (proxy, 16 clients)"] is False
    assert got["cold big pull ≤ 1.0x the reference's wall time (mirror, 16 clients)"] is True
    assert got["warm small pulls/s ≥ the reference's (mirror, 64 clients)"] is True
    assert got["warm small pulls/s ≥ the reference's (proxy, 64 clients)"] is None  # CONNECT + TLS: no verdict


def test_the_report_has_every_table() -> None:
    phases = [phase(SMALL_WARM, path, 1) for path in load.PATHS] + [phase(BIG_COLD, MIRROR, 1, clients=16)]
    text, _ = load.report(phases, ["date: today"], [])
    for heading in ("## 64 clients, small images, warm", "## 16 clients, the big image, cold", "## Targets"):
        assert heading in text
    assert "| reference | 1 | 64 | 10.0 | 1.00x |" in text


def test_paths_take_turns_from_run_to_run() -> None:
    assert load.rotated(["a", "b", "c"], 1) == ["a", "b", "c"]
    assert load.rotated(["a", "b", "c"], 2) == ["b", "c", "a"]
    assert load.rotated(["a", "b", "c"], 4) == ["a", "b", "c"]


def test_the_client_reads_bearer_challenges() -> None:
    challenge = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
    expected = {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"}
    assert loadclient.bearer_params(challenge) == expected
    assert loadclient.bearer_params('Basic realm="x"') is None


def test_the_client_checks_size_then_digest() -> None:
    digest, other = (f"sha256:{hashlib.sha256(data).hexdigest()}" for data in (b"abc", b"abd"))
    assert loadclient.body_problem(digest, 3, digest, 3) == ""
    assert "2 bytes, expected 3" in loadclient.body_problem(digest, 3, digest, 2)
    assert "expected" in loadclient.body_problem(digest, 3, other, 3)


def test_the_client_picks_the_amd64_manifest_of_a_list() -> None:
    body = json.dumps(
        {
            "manifests": [
                {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
            ]
        }
    ).encode()
    assert loadclient.amd64_child(body) == "sha256:amd"
    with pytest.raises(loadclient.PullFailed):
        loadclient.amd64_child(b'{"manifests": []}')


def test_a_snapshot_knows_its_checkout(tmp_path: Path) -> None:
    """Re-executed on a copy (--snapshot), a benchmark imports the copy, and still names the
    checkout as its root: else it reports the copy as "the working tree" with no git HEAD, writes
    its results into the copy, and never removes the copy."""
    for part in ("addon", "scripts"):
        shutil.copytree(common.ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    probe = "from bench import common; print(common.__file__, common.ROOT, common.SRC, sep='\\n')"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=common.snapshot_environment(tmp_path),
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split("\n")
    assert out[:3] == [str(tmp_path / "scripts/bench/common.py"), str(common.ROOT), str(tmp_path)]


def test_the_code_digest_covers_the_package(tmp_path: Path) -> None:
    """What the report calls the measured code changes with any module of the package under
    addon/, not only with addon/cache.py."""
    (tmp_path / "regcache" / "fronts").mkdir(parents=True)
    (tmp_path / "cache.py").write_text("import regcache\n")
    module = tmp_path / "regcache" / "fronts" / "mirror.py"
    module.write_text("CHUNK = 1\n")
    before = common.source_digest(tmp_path)
    module.write_text("CHUNK = 2\n")
    assert common.source_digest(tmp_path) != before
