"""A full disk never stops pulls: real skopeo and dockerd through a regcache whose cache_dir is a
small tmpfs, filled to its last byte by a filler file.

What is cached keeps being served (reads never write), what is not is passed through uncached,
`regcache stats` reports the disk, and a disk that fills up in the middle of a fill still gives
every client following it the whole blob. Upstream traffic is counted from the CDN's request log.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo
from bed.tmpfs import Tmpfs

from regcache.store.disk import DiskStore

from .conftest import regcache_cli
from .test_concurrency import eventually
from .test_pull import assert_stored


@pytest.fixture
def regcache_on(tmpfs: Tmpfs, regcache_with: Callable[..., Mitmdump]) -> Callable[[str], tuple[Path, Mitmdump]]:
    """``start(size)``: a regcache whose cache_dir is on a fresh tmpfs of `size`; its cache_dir and it."""

    def start(size: str) -> tuple[Path, Mitmdump]:
        cache_dir = tmpfs.mount(size) / "cache"
        return cache_dir, regcache_with(cache_dir=str(cache_dir))

    return start


def stored_files(cache_dir: Path) -> dict[str, int]:
    """Every file of the store but SQLite's own (blobs, large manifests) → its size."""
    store = cache_dir / "store"
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*") if p.is_file() and p.parent != store}


def test_a_full_disk_serves_what_is_cached_and_passes_the_rest_through(
    tmpfs: Tmpfs,
    regcache_on: Callable[[str], tuple[Path, Mitmdump]],
    images: ImageSet,
    skopeo_factory: Callable[..., Skopeo],
    dockerd_factory: Callable[..., Dockerd],
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    cache_dir, regcache = regcache_on("100m")  # the images, and room for regcache's 64 MiB reserve
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    daemon = dockerd_factory(regcache.url, regcache.ca_cert)
    cached, by_dockerd, new = images.oci_single, images.docker_multi, images.oci_multi
    assert skopeo.copy_to_dir(cached.ref, tmp_path / "cold") == cached.digest
    daemon.pull(by_dockerd.ref)
    store = DiskStore(cache_dir, 10**12, owner=False)
    assert_stored(store, cached)
    assert_stored(store, by_dockerd)

    filler = tmpfs.fill(cache_dir.parent)
    mark = regcache.mark()
    assert skopeo.copy_to_dir(cached.ref, tmp_path / "full") == cached.digest
    daemon.rmi(by_dockerd.ref)
    daemon.pull(by_dockerd.ref)
    assert daemon.image_id(by_dockerd.ref) == by_dockerd.config.digest
    served = regcache.results(mark)
    assert ("REVALIDATED", "GET", f"docker.io/{cached.ref}") in served
    assert ("REVALIDATED", "HEAD", f"docker.io/{by_dockerd.ref}") in served
    blobs = {(image.repo, blob.digest) for image in (cached, by_dockerd) for blob in image.blobs}
    assert {what for result, _, what in served if result == "HIT"} >= {f"docker.io/{r}@{d}" for r, d in blobs}
    assert not [line for line in served if line[0] in ("MISS", "ERROR", "STALE")], served

    files, totals = stored_files(cache_dir), store.entry_totals()
    mark, cdn_mark = regcache.mark(), cdn.mark()
    assert skopeo.copy_to_dir(new.ref, tmp_path / "new") == new.amd64_digest  # its amd64 image
    uncached = {blob.digest for blob in new.blobs} - {digest for _, digest in blobs}
    fetched = Counter(r.digest for r in cdn.requests(cdn_mark) if r.method == "GET")
    assert uncached and fetched == Counter(uncached)  # each once, by the client itself
    assert ("MISS", "GET", f"docker.io/{new.ref}") in regcache.results(mark)
    assert f"docker.io/{new.ref} 200" in regcache.log()[mark:] and "not cached: " in regcache.log()[mark:]
    assert stored_files(cache_dir) == files and store.entry_totals() == totals
    assert store.get_manifest(new.digest) is None
    assert list((cache_dir / "staging").iterdir()) == []

    table = regcache_cli("stats", "--cache-dir", str(cache_dir)).stdout
    assert "FULL, 0 B free: nothing new is cached" in table
    stats = json.loads(regcache_cli("stats", "--cache-dir", str(cache_dir), "--json").stdout)
    assert stats["disk"] == {"free": 0, "full": True}
    assert stats["store"]["entries"]["blob"] == len({digest for _, digest in blobs})
    assert "Traceback" not in regcache.log()

    filler.unlink()  # room again: caching resumes
    assert skopeo.copy_to_dir(new.ref, tmp_path / "after") == new.amd64_digest
    assert_stored(store, new)


def staging_readers(regcache: Mitmdump, staging_dir: Path) -> Counter[Path]:
    """How many descriptors regcache holds on each staging file: the fill's own, one per follower."""
    readers: Counter[Path] = Counter()
    for fd in Path(f"/proc/{regcache.pid}/fd").iterdir():
        try:
            target = Path(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
        if target.parent == staging_dir and target.stat().st_size > 2**20:
            readers[target] += 1
    return readers


def test_a_disk_filling_up_mid_fill_still_gives_every_follower_the_whole_blob(
    tmpfs: Tmpfs,
    regcache_on: Callable[[str], tuple[Path, Mitmdump]],
    images: ImageSet,
    skopeo_factory: Callable[..., Skopeo],
    dockerd_factory: Callable[..., Dockerd],
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    """skopeo through the proxy and dockerd through the registry mirror follow the fill of the
    100 MB layer; the disk fills up when a part of it is written."""
    cache_dir, regcache = regcache_on("200m")  # the layer fits, with the reserve: regcache caches it
    image = images.big
    layer = max(image.layers, key=lambda blob: blob.size)
    proxied = skopeo_factory(regcache.url, regcache.ca_cert)
    mirrored = dockerd_factory(None, None, extra_args=("--registry-mirror", regcache.mirror_url()))
    cdn.throttle(25 * 10**6)  # ~4 s for the layer: time for both to follow and for the disk to fill
    cdn_mark = cdn.mark()
    with ThreadPoolExecutor(max_workers=2) as pool:
        copy = pool.submit(proxied.copy_to_dir, image.ref, tmp_path / "proxied")
        pull = pool.submit(mirrored.pull, image.ref)
        eventually(
            lambda: 3 in staging_readers(regcache, cache_dir / "staging").values(),
            "the two clients never both followed the layer's fill",
            timeout=60,
        )
        tmpfs.fill(cache_dir.parent)
        assert copy.result() == image.digest
        pull.result()
    assert mirrored.image_id(image.ref) == image.config.digest
    assert cdn.count(layer.digest, since=cdn_mark) == 1
    assert f"fill of {layer.digest} relayed from memory after the first" in regcache.log()
    store = DiskStore(cache_dir, 10**12, owner=False)
    assert store.blob_size(layer.digest) is None
    eventually(lambda: list((cache_dir / "staging").iterdir()) == [], "the staging file was left behind")
    assert regcache.peak_rss() < 200 * 2**20  # what memory held was bounded

    cdn.throttle(None)
    mark = regcache.mark()  # while the disk is in trouble, a new pull fetches for itself, uncached
    assert proxied.copy_to_dir(image.ref, tmp_path / "again") == image.digest
    assert f"MISS GET docker.io/{image.repo}@{layer.digest} 307" in regcache.log()[mark:]
    assert f"caching skipped for {layer.digest}, passed through" in regcache.log()[mark:]
    assert cdn.count(layer.digest, since=cdn_mark) == 2 and store.blob_size(layer.digest) is None
