"""Operating a cache: Prometheus metrics after real pulls, and `regcache stats`, `ls`, `purge`,
`verify`, `gc` against a cache populated by real pulls.

Metric values are compared with what really happened: the registry's own access log, the CDN's
request log, and the images' known blobs and sizes.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.images import ImageSet, PushedImage
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from prometheus_client.parser import text_string_to_metric_families

from regcache.ops.bundle import parse_image_ref
from regcache.store.disk import DiskStore

from .conftest import regcache_cli
from .test_pull import assert_stored

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(regcache: Mitmdump) -> Samples:
    """Every sample the metrics endpoint serves, by name and labels."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    with opener.open(regcache.metrics_url(), timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples that have these labels (and any others)."""
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= found)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_metrics_after_cold_and_warm_pulls(
    images: ImageSet,
    skopeo: Skopeo,
    regcache: Mitmdump,
    upstream_registry: Registry,
    cdn: Cdn,
    store: DiskStore,
    tmp_path: Path,
) -> None:
    image = images.oci_single
    before, registry_mark, cdn_mark = scrape(regcache), upstream_registry.mark(), cdn.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "cold") == image.digest
    assert_stored(store, image)
    cold = scrape(regcache)
    upstream = upstream_registry.requests(registry_mark)

    assert delta(before, cold, "regcache_requests_total", registry="docker.io", kind="blob", result="MISS") == len(
        image.blobs
    )
    assert delta(before, cold, "regcache_requests_total", kind="manifest", result="MISS") == 1
    assert delta(before, cold, "regcache_requests_total", result="HIT") == 0
    # Every request the registry logged, and no other, is counted: regcache's own and relayed ones.
    for method in ("GET", "HEAD"):
        logged = sum(1 for r in upstream if r.method == method)
        assert delta(before, cold, "regcache_upstream_requests_total", registry="docker.io", method=method) == logged
    cdn_label = "production.cloudflare.docker.com"
    assert delta(before, cold, "regcache_upstream_requests_total", registry=cdn_label) == cdn.count(since=cdn_mark)
    assert cdn.count(since=cdn_mark) == len(image.blobs)  # each blob fetched once, through its redirect
    fetched = delta(before, cold, "regcache_bytes_total", source="upstream")
    assert image.total_size <= fetched <= image.total_size + 64 * 1024  # + manifest, pings, tokens
    assert delta(before, cold, "regcache_bytes_total", source="cache") == 0
    assert delta(before, cold, "regcache_pulls_saved_total") == 0
    assert total(cold, "regcache_fill_errors_total") == 0

    registry_mark, cdn_mark = upstream_registry.mark(), cdn.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "warm") == image.digest
    warm = scrape(regcache)
    upstream = upstream_registry.requests(registry_mark)
    blob_hits = delta(cold, warm, "regcache_requests_total", registry="docker.io", kind="blob", result="HIT")
    assert blob_hits == len(image.blobs)
    assert delta(cold, warm, "regcache_requests_total", kind="manifest", result="REVALIDATED") == 1
    assert delta(cold, warm, "regcache_requests_total", result="MISS") == 0
    assert delta(cold, warm, "regcache_bytes_total", source="cache") == image.total_size
    assert delta(cold, warm, "regcache_pulls_saved_total", registry="docker.io") == 1
    assert sorted(f"{r.method} {r.kind}" for r in upstream) == ["GET base", "HEAD manifest"]
    assert delta(cold, warm, "regcache_upstream_requests_total", registry="docker.io") == len(upstream)
    assert delta(cold, warm, "regcache_upstream_requests_total", registry=cdn_label) == 0 == cdn.count(since=cdn_mark)

    assert total(warm, "regcache_store_entries", type="blob") == len(image.blobs)
    assert total(warm, "regcache_store_entries", type="manifest") == 1
    assert total(warm, "regcache_store_entries", type="tag") == 1
    assert total(warm, "regcache_store_bytes") >= image.total_size
    assert total(warm, "regcache_store_size_limit_bytes") == 50 * 1024**3


def test_pulls_saved_equal_manifest_gets_avoided_and_survive_a_restart(
    images: ImageSet, skopeo: Skopeo, regcache: Mitmdump, upstream_registry: Registry, tmp_path: Path
) -> None:
    """An index and its platform manifests: every manifest GET the cold pull sent upstream is one
    the warm pull saves. The totals `regcache stats` shows are the same after a restart."""
    image = images.docker_multi
    before, mark = scrape(regcache), upstream_registry.mark()
    skopeo.copy_to_dir(image.ref, tmp_path / "cold", all_platforms=True)
    manifest_gets = upstream_registry.manifest_gets(mark)
    assert manifest_gets == 1 + len(image.children)
    mark = upstream_registry.mark()
    skopeo.copy_to_dir(image.ref, tmp_path / "warm", all_platforms=True)
    after = scrape(regcache)
    assert upstream_registry.manifest_gets(mark) == 0
    assert delta(before, after, "regcache_pulls_saved_total", registry="docker.io") == manifest_gets

    regcache.stop()  # saves the counts not yet saved
    cache_dir = str(regcache.workdir / "cache")
    stats = json.loads(regcache_cli("stats", "--cache-dir", cache_dir, "--json").stdout)
    assert stats["pulls_saved"] == {"docker.io": manifest_gets}
    for result in ("HIT", "REVALIDATED", "MISS"):
        counted = sum(total(after, "regcache_requests_total", kind=k, result=result) for k in ("manifest", "blob"))
        assert stats["requests"].get(result, 0) == counted
    assert stats["repositories"][0] == {
        "repository": f"docker.io/{image.repo}",
        "requests": sum(total(after, "regcache_requests_total", kind=kind) for kind in ("manifest", "blob")),
        "from_store": stats["repositories"][0]["from_store"],
        "pulls": 2 * manifest_gets,
        "pulls_saved": manifest_gets,
    }
    assert stats["bytes_cache"] == total(after, "regcache_bytes_total", source="cache")
    assert 0 < stats["hit_ratio"] < 1
    table = regcache_cli("stats", "--cache-dir", cache_dir).stdout
    assert "hit ratio" in table and f"docker.io/{image.repo}" in table

    regcache.start()  # counters start at zero in a new process; the saved totals go on
    skopeo.copy_to_dir(image.ref, tmp_path / "again", all_platforms=True)
    regcache.stop()
    again = json.loads(regcache_cli("stats", "--cache-dir", cache_dir, "--json").stdout)
    assert again["pulls_saved"] == {"docker.io": 2 * manifest_gets}


def test_metrics_endpoint_can_be_turned_off(regcache_with: Callable[..., Mitmdump]) -> None:
    quiet = regcache_with(metrics_listen="off")
    assert "metrics at" not in quiet.log()


@pytest.fixture
def populated(images: ImageSet, skopeo: Skopeo, regcache: Mitmdump, store: DiskStore, tmp_path: Path) -> str:
    """A cache filled by real pulls of three images that share their base layer; its directory."""
    skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "single")
    skopeo.copy_to_dir(images.oci_multi.ref, tmp_path / "multi", all_platforms=True)
    skopeo.copy_to_dir(images.docker_multi.ref, tmp_path / "docker", all_platforms=True)
    for image in (images.oci_single, images.oci_multi, images.docker_multi):
        assert_stored(store, image)
    return str(regcache.workdir / "cache")


def own_blobs(image: PushedImage, *others: PushedImage) -> set[str]:
    """Blobs of `image` (amd64) that none of `others` has."""
    return {b.digest for b in image.blobs} - {b.digest for other in others for b in other.blobs}


def test_ls(images: ImageSet, populated: str) -> None:
    rows = json.loads(regcache_cli("ls", "--cache-dir", populated, "--json").stdout)
    by_ref = {row["ref"]: row for row in rows}
    pulled = (images.oci_single, images.oci_multi, images.docker_multi)
    assert set(by_ref) == {f"docker.io/{image.ref}" for image in pulled}
    single = by_ref[f"docker.io/{images.oci_single.ref}"]
    assert single["digest"] == images.oci_single.digest
    stored_manifest = len(images.oci_single.media_type) + 1 + len(images.oci_single.manifest)  # type, \n, body
    assert single["size"] == images.oci_single.total_size + stored_manifest
    assert single["last_used"] > 0 and not single["pinned"]
    # skopeo --all fetched both platforms: the index and its children are counted
    multi = by_ref[f"docker.io/{images.oci_multi.ref}"]
    assert multi["size"] > images.oci_multi.total_size

    only = json.loads(regcache_cli("ls", "--cache-dir", populated, "--json", "oci-single").stdout)
    assert [row["ref"] for row in only] == [f"docker.io/{images.oci_single.ref}"]
    table = regcache_cli("ls", "--cache-dir", populated).stdout
    assert f"docker.io/{images.oci_single.ref}" in table
    assert images.oci_single.digest[:19] in table


def test_purge_a_tag_keeps_shared_blobs(
    images: ImageSet, populated: str, store: DiskStore, skopeo: Skopeo, regcache: Mitmdump, tmp_path: Path
) -> None:
    single, multi = images.oci_single, images.oci_multi
    ref = f"docker.io/{single.ref}"
    dry = regcache_cli("purge", "--cache-dir", populated, "--dry-run", ref).stdout
    assert f"tag:{ref}" in dry and f"would remove (purge {ref}): 1 tags, 1 manifests" in dry
    assert store.peek_manifest(single.digest) is not None  # nothing removed yet

    done = regcache_cli("purge", "--cache-dir", populated, ref).stdout
    assert f"removed (purge {ref}): 1 tags, 1 manifests" in done
    assert store.tag_records(parse_image_ref(ref)) == {}
    assert store.peek_manifest(single.digest) is None
    gone = own_blobs(single, multi, images.docker_multi)
    assert gone and all(store.blob_size(digest) is None for digest in gone)
    shared = {b.digest for b in single.blobs} - gone
    assert shared and all(store.blob_size(digest) is not None for digest in shared)  # oci-multi's base layer
    assert_stored(store, multi)

    # The purged image is fetched again when pulled.
    mark = regcache.mark()
    assert skopeo.copy_to_dir(single.ref, tmp_path / "again") == single.digest
    assert ("MISS", "GET", f"docker.io/{single.ref}") in regcache.results(mark)
    assert_stored(store, single)


def test_purge_repository_and_registry_keep_pinned(images: ImageSet, populated: str, store: DiskStore) -> None:
    multi, pinned = images.oci_multi, images.docker_multi
    regcache_cli("purge", "--cache-dir", populated, "oci-multi")  # Docker Hub names as users write them
    assert store.peek_manifest(multi.digest) is None
    assert all(store.blob_size(d) is None for d in own_blobs(multi, images.oci_single, pinned))
    assert store.seen_pairs() and all(repo != f"docker.io/{multi.repo}" for repo, _ in store.seen_pairs())

    regcache_cli("pin", "--cache-dir", populated, pinned.ref)
    everything = regcache_cli("purge", "--cache-dir", populated, "docker.io").stdout
    assert f"kept docker.io/{pinned.ref}: pinned" in everything
    assert store.peek_manifest(images.oci_single.digest) is None
    assert_stored(store, pinned)
    listed = json.loads(regcache_cli("ls", "--cache-dir", populated, "--json").stdout)
    assert [row["ref"] for row in listed] == [f"docker.io/{pinned.ref}"]


def test_verify_reports_and_removes_corrupt_blobs(
    images: ImageSet, populated: str, store: DiskStore, skopeo: Skopeo, regcache: Mitmdump, tmp_path: Path
) -> None:
    clean = regcache_cli("verify", "--cache-dir", populated)
    assert " 0 corrupt" in clean.stdout
    layer = images.oci_single.layers[-1]
    path = store.blob_file(layer.digest)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # one flipped bit's worth of rot, same size
    path.write_bytes(bytes(data))

    reported = regcache_cli("verify", "--cache-dir", populated, "--dry-run", check=False)
    assert reported.returncode == 1
    assert f"CORRUPT blob:{layer.digest}: its bytes hash to sha256:" in reported.stdout
    assert store.blob_file(layer.digest) is not None  # kept

    removed = regcache_cli("verify", "--cache-dir", populated, check=False)
    assert removed.returncode == 1
    assert f"CORRUPT blob:{layer.digest}" in removed.stdout and "removed" in removed.stdout
    assert store.blob_size(layer.digest) is None
    assert regcache_cli("verify", "--cache-dir", populated).returncode == 0

    mark = regcache.mark()  # the next pull fetches the good bytes again
    assert skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "again") == images.oci_single.digest
    assert ("MISS", "GET", f"docker.io/{images.oci_single.repo}@{layer.digest}") in regcache.results(mark)
    assert_stored(store, images.oci_single)


def test_gc_removes_orphans_and_staging_leftovers(
    images: ImageSet, populated: str, store: DiskStore, skopeo: Skopeo, tmp_path: Path
) -> None:
    # A pull by digest records no tag: no tag record needs what it stored.
    big = images.big
    skopeo.copy_to_dir(f"{big.repo}@{big.digest}", tmp_path / "by-digest")
    assert_stored(store, big)
    leftover = store.staging_dir / "fill-crashed"
    leftover.write_bytes(b"half a blob")

    young = regcache_cli("gc", "--cache-dir", populated, "--dry-run").stdout  # default --min-age 1h
    assert "would remove (orphans and leftovers): 0 tags, 0 manifests, 0 blobs" in young
    dry = regcache_cli("gc", "--cache-dir", populated, "--dry-run", "--min-age", "0").stdout
    assert f"manifest:{big.digest}" in dry and str(leftover) in dry
    assert store.peek_manifest(big.digest) is not None

    done = regcache_cli("gc", "--cache-dir", populated, "--min-age", "0").stdout
    assert f"0 tags, 1 manifests, {len(big.blobs)} blobs" in done
    assert "expired (unused for max_age): 0 entries" in done and "evicted (size_limit): 0 entries" in done
    assert store.peek_manifest(big.digest) is None
    assert all(store.blob_size(blob.digest) is None for blob in big.blobs)
    assert not leftover.exists()
    assert all(digest not in {b.digest for b in big.blobs} for _, digest in store.seen_pairs())
    for image in (images.oci_single, images.oci_multi, images.docker_multi):
        assert_stored(store, image)  # every tagged image is whole
