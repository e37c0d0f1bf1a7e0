"""`regcache warm`: images fetched into the cache with no container runtime, then replayed offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo

from regcache.store.disk import DiskStore

from .conftest import regcache_cli


def test_warm_then_replay_offline(
    images: ImageSet,
    bed_hostmap: dict[str, str],
    upstream_registry: Registry,
    dockerd_factory: Callable[..., Dockerd],
    skopeo_factory: Callable[..., Skopeo],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    cache = tmp_path / "warmed"
    config = tmp_path / "regcache.yaml"
    config.write_text(yaml.safe_dump({"cache_dir": str(cache), "upstreams": bed_hostmap}))
    (tmp_path / "images.txt").write_text(f"# what CI needs\n{images.big.ref}\n\ndocker.io/{images.docker_multi.ref}\n")
    mark = upstream_registry.mark()
    warmed = regcache_cli("warm", "--config", str(config), "-f", str(tmp_path / "images.txt"))
    assert f"warmed docker.io/{images.big.ref} -> {images.big.digest}" in warmed.stdout
    arm = regcache_cli("warm", "--config", str(config), "--platform", "linux/arm64", images.oci_multi.ref)
    assert f"-> {images.oci_multi.digest} (2 manifests," in arm.stdout
    # Each blob fetched once, each via the CDN redirect.
    blob_gets = [r.path for r in upstream_registry.requests(mark) if r.kind == "blob" and r.method == "GET"]
    assert len(blob_gets) == len(set(blob_gets))
    store = DiskStore(cache, 10**12, owner=False)
    assert store.get_manifest(images.oci_multi.children["linux/amd64"]) is None

    upstream_gone()
    offline = offline_regcache(cache)
    dockerd = dockerd_factory(offline.url, offline.ca_cert)
    dockerd.pull(images.big.ref)
    assert dockerd.image_id(images.big.ref) == images.big.config.digest
    skopeo = skopeo_factory(offline.url, offline.ca_cert)
    assert (
        skopeo.copy_to_dir(images.docker_multi.ref, tmp_path / "dm", all_platforms=True) == images.docker_multi.digest
    )
    arm64 = images.oci_multi.children["linux/arm64/v8"]
    assert skopeo.copy_to_dir(images.oci_multi.ref, tmp_path / "arm", arch="arm64") == arm64
    with pytest.raises(Exception, match="not in the offline cache"):
        skopeo.copy_to_dir(images.oci_multi.ref, tmp_path / "amd", arch="amd64")


def test_warm_failure_is_reported(bed_hostmap: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "regcache.yaml"
    config.write_text(yaml.safe_dump({"cache_dir": str(tmp_path / "c"), "upstreams": bed_hostmap}))
    result = regcache_cli("warm", "--config", str(config), "library/does-not-exist:1", check=False)
    assert result.returncode == 1
    assert "FAILED docker.io/library/does-not-exist:1: " in result.stderr
    assert "404" in result.stderr


def test_pinned_image_survives_a_full_cache(images: ImageSet, bed_hostmap: dict[str, str], tmp_path: Path) -> None:
    """size_limit 1 MB: warming the 100 MB image evicts what is not pinned, never the pinned."""
    cache = tmp_path / "small"
    config = tmp_path / "regcache.yaml"
    config.write_text(yaml.safe_dump({"cache_dir": str(cache), "upstreams": bed_hostmap, "size_limit": "1MB"}))
    regcache_cli("warm", "--config", str(config), images.oci_single.ref, images.docker_multi.ref)
    pinned = regcache_cli("pin", "--config", str(config), images.oci_single.ref)
    assert f"pinned docker.io/{images.oci_single.ref} -> {images.oci_single.digest}" in pinned.stdout
    regcache_cli("warm", "--config", str(config), images.big.ref)
    store = DiskStore(cache, 10**6, owner=False)
    assert all(store.blob_size(blob.digest) is not None for blob in images.oci_single.blobs)
    big_layer = max(images.big.layers, key=lambda blob: blob.size)
    assert store.blob_size(big_layer.digest) is None  # over the limit on its own: evicted
    dm_layers = {b.digest for b in images.docker_multi.blobs} - {b.digest for b in images.oci_single.blobs}
    assert any(store.blob_size(d) is None for d in dm_layers)  # unpinned, least recently used
    listed = regcache_cli("pins", "--config", str(config)).stdout
    assert listed == f"docker.io/{images.oci_single.ref} {images.oci_single.digest}\n"
