"""Concurrent pulls and bounded disk, with real clients (issue: single-flight fills, LRU, disk full).

Upstream traffic is counted from the registry's access log and the CDN's request log.
"""

from __future__ import annotations

import hashlib
import http.client
import signal
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from regcache.store.disk import DiskStore


def test_concurrent_cold_pulls_fetch_each_blob_once(
    images: ImageSet,
    regcache: Mitmdump,
    skopeo_factory: Callable[..., Skopeo],
    dockerd_factory: Callable[..., Dockerd],
    upstream_registry: Registry,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    """8 skopeo processes and 2 dockerd pull the 100 MB image at once, cold."""
    image = images.big
    daemons = [dockerd_factory(regcache.url, regcache.ca_cert) for _ in range(2)]
    clients = [skopeo_factory(regcache.url, regcache.ca_cert) for _ in range(8)]
    registry_mark, cdn_mark = upstream_registry.mark(), cdn.mark()
    with ThreadPoolExecutor(max_workers=10) as pool:
        copies = [pool.submit(c.copy_to_dir, image.ref, tmp_path / f"skopeo{i}") for i, c in enumerate(clients)]
        pulls = [pool.submit(d.pull, image.ref) for d in daemons]
        assert [copy.result() for copy in copies] == [image.digest] * 8
        for pull in pulls:
            pull.result()
    assert [d.image_id(image.ref) for d in daemons] == [image.config.digest] * 2

    blob_gets = Counter(r.path for r in upstream_registry.requests(registry_mark) if r.kind == "blob")
    assert set(blob_gets.values()) == {1}, blob_gets
    assert len(blob_gets) == len(image.blobs)
    cdn_gets = Counter(r.digest for r in cdn.requests(cdn_mark))
    assert cdn_gets == Counter({blob.digest: 1 for blob in image.blobs})
    manifest_gets = Counter(
        r.path for r in upstream_registry.requests(registry_mark) if r.kind == "manifest" and r.method == "GET"
    )
    assert set(manifest_gets.values()) <= {1}, manifest_gets
    assert regcache.peak_rss() < 200 * 2**20


def test_killed_client_does_not_break_the_others(
    images: ImageSet,
    regcache: Mitmdump,
    store: DiskStore,
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    image = images.big
    layer = max(image.layers, key=lambda blob: blob.size)
    cdn.throttle(25 * 10**6)  # ~4 s for the 100 MB layer: time to kill a client midway
    cdn_mark = cdn.mark()
    victim = skopeo_factory(regcache.url, regcache.ca_cert).start_copy(image.ref, tmp_path / "victim")
    survivor = skopeo_factory(regcache.url, regcache.ca_cert)
    with ThreadPoolExecutor(max_workers=1) as pool:
        copy = pool.submit(survivor.copy_to_dir, image.ref, tmp_path / "survivor")
        wait_for_staging(store, at_least=20 * 10**6)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert copy.result() == image.digest
    eventually(lambda: store.blob_size(layer.digest) == layer.size, "the layer was not stored")
    assert cdn.count(layer.digest, since=cdn_mark) == 1


def test_fill_nobody_waits_for_still_completes(
    images: ImageSet,
    regcache: Mitmdump,
    store: DiskStore,
    skopeo_factory: Callable[..., Skopeo],
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    """The only client goes away mid-blob: the fill runs on (bounded by the upstream time-out if it
    stalls), is verified and stored, so the next pull is a hit."""
    layer = max(images.big.layers, key=lambda blob: blob.size)
    cdn.throttle(25 * 10**6)
    cdn_mark = cdn.mark()
    victim = skopeo_factory(regcache.url, regcache.ca_cert).start_copy(images.big.ref, tmp_path / "victim")
    wait_for_staging(store, at_least=20 * 10**6)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    eventually(lambda: store.blob_size(layer.digest) is not None, "the orphaned fill was not stored", timeout=60)
    assert cdn.count(layer.digest, since=cdn_mark) == 1


def test_followers_of_a_fill_that_stop_reading_hold_little_memory(
    images: ImageSet, regcache: Mitmdump, token_server: TokenServer
) -> None:
    """48 clients follow the 100 MB layer's fill from the mirror and stop reading after a byte: what
    regcache keeps for each is the chunk it was sending when the client's socket filled up, so
    that chunk is small (48 x 1 MiB chunks took the proxy over its 200 MB in the load benchmark)."""
    image = images.big
    layer = max(image.layers, key=lambda blob: blob.size)
    headers = {"Authorization": f"Bearer {token_server.mint(image.repo)}", "Connection": "close"}
    mirror = urllib.parse.urlsplit(regcache.mirror_url())
    mark, startup_peak = regcache.mark(), regcache.peak_rss()
    followers = []
    for _ in range(48):
        connection = http.client.HTTPConnection(mirror.hostname or "", mirror.port, timeout=60)
        connection.request("GET", f"/v2/{image.repo}/blobs/{layer.digest}", headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        first = response.read(1)
        followers.append((connection, response, first))
    eventually(lambda: f"STORED blob {layer.digest}" in regcache.log()[mark:], "the fill was not stored", 60)
    time.sleep(1)  # every follower sends what its socket takes, and stops with one chunk left in hand
    held = regcache.peak_rss() - startup_peak
    for connection, response, first in followers:
        assert hashlib.sha256(first + response.read()).hexdigest() == layer.digest.removeprefix("sha256:")
        connection.close()
    # 256 KiB chunks: 25-28 MiB more than at start-up here; 1 MiB chunks read in worker threads: 97 MiB.
    assert held < 48 * 2**20, f"{held / 2**20:.0f} MiB more than at start-up for 48 idle followers"


def eventually(condition: Callable[[], bool], failure: str, timeout: float = 10) -> None:
    """Poll a store condition that a background step (commit, eviction) makes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.02)


def wait_for_staging(store: DiskStore, at_least: int, timeout: float = 60) -> None:
    """Until a fill in progress has written `at_least` bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.stat().st_size >= at_least for p in store.staging_dir.glob("fill-*")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no fill reached {at_least} B")


def test_size_limit_keeps_the_store_under_it_and_a_repull_refetches(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    tmp_path: Path,
) -> None:
    limit = 20 * 10**6
    regcache = regcache_with(size_limit=limit)
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    image = images.big
    layer = max(image.layers, key=lambda blob: blob.size)
    assert skopeo.copy_to_dir(image.ref, tmp_path / "first") == image.digest
    # Eviction follows the commit, which can come a moment after the client has its last byte.
    eventually(lambda: store_bytes(regcache.workdir / "cache") <= limit, "the store stayed over size_limit")
    mark = upstream_registry.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "again") == image.digest
    assert upstream_registry.blob_requests(mark, method="GET") >= 1
    assert any(r.reference == layer.digest for r in upstream_registry.requests(mark) if r.kind == "blob")
    assert "EVICTED" in regcache.log()
    assert "helper" not in regcache.log()  # evicted by the helper process, not after its failure


def store_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in (cache_dir / "store").rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 90 MB file system: too small for the 100 MB layer (plus regcache's free-space reserve)."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=90m", "tmpfs", str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


def test_disk_full_still_serves_the_client_uncached(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    small_disk: Path,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    regcache = regcache_with(cache_dir=str(small_disk / "cache"))
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    image = images.big
    layer = max(image.layers, key=lambda blob: blob.size)
    cdn_mark = cdn.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "pulled") == image.digest
    assert f"caching skipped for {layer.digest}, passed through" in regcache.log()
    assert cdn.requests(cdn_mark) and not any(r.has_authorization for r in cdn.requests(cdn_mark))
    store = DiskStore(small_disk / "cache", 10**12, owner=False)
    assert store.blob_size(layer.digest) is None
    assert store.blob_size(image.config.digest) is not None  # small blobs still cached
    assert list(store.staging_dir.iterdir()) == []
