"""Bundles for CI caches: `regcache export` / `regcache import`, replayed offline with real clients."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from regcache.store.disk import DiskStore

from .conftest import regcache_cli
from .scenario import record, replay


def test_export_import_replay(
    images: ImageSet,
    regcache: Mitmdump,
    token_server: TokenServer,
    dockerd_factory: Callable[..., Dockerd],
    skopeo_factory: Callable[..., Skopeo],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    """The CI recipe: record online, export to a tar, import into a fresh cache, replay offline."""
    record(images, regcache, token_server, dockerd_factory, skopeo_factory, tmp_path)
    bundle = tmp_path / "ci-cache" / "images.tar"
    regcache_cli("export", "--cache-dir", str(regcache.workdir / "cache"), "-o", str(bundle))
    regcache.stop()
    upstream_gone()
    fresh = tmp_path / "fresh-cache"
    imported = regcache_cli("import", "--cache-dir", str(fresh), str(bundle))
    assert f"docker.io/{images.oci_multi.ref} -> {images.oci_multi.digest}" in imported.stdout
    offline = offline_regcache(fresh)
    replay(images, offline, dockerd_factory(offline.url, offline.ca_cert), skopeo_factory, tmp_path)


def test_export_named_images_only(images: ImageSet, regcache: Mitmdump, skopeo: Skopeo, tmp_path: Path) -> None:
    skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "a")
    skopeo.copy_to_dir(images.docker_multi.ref, tmp_path / "b", all_platforms=True)
    cache = str(regcache.workdir / "cache")
    regcache_cli("export", "--cache-dir", cache, "-o", str(tmp_path / "layout"), f"docker.io/{images.oci_single.ref}")
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    names = {entry["annotations"]["org.opencontainers.image.ref.name"] for entry in index["manifests"]}
    assert names == {f"docker.io/{images.oci_single.ref}"}
    assert {entry["digest"] for entry in index["manifests"]} == {images.oci_single.digest}

    missing = regcache_cli("export", "--cache-dir", cache, "-o", str(tmp_path / "x"), "library/big:1", check=False)
    assert missing.returncode == 1
    assert "docker.io/library/big:1 is not in the cache" in missing.stderr


def test_corrupt_bundle_is_rejected_and_cache_unchanged(
    images: ImageSet, regcache: Mitmdump, skopeo: Skopeo, tmp_path: Path
) -> None:
    skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "a")
    skopeo.copy_to_dir(images.docker_multi.ref, tmp_path / "b", all_platforms=True)
    cache = str(regcache.workdir / "cache")
    regcache_cli("export", "--cache-dir", cache, "-o", str(tmp_path / "good"), f"docker.io/{images.oci_single.ref}")
    regcache_cli("export", "--cache-dir", cache, "-o", str(tmp_path / "bad"), f"docker.io/{images.docker_multi.ref}")
    layer = max(images.docker_multi.layers, key=lambda blob: blob.size)
    corrupt = tmp_path / "bad" / "blobs" / "sha256" / layer.digest.split(":")[1]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    target = tmp_path / "target"
    regcache_cli("import", "--cache-dir", str(target), str(tmp_path / "good"))
    before = snapshot(target)
    result = regcache_cli("import", "--cache-dir", str(target), str(tmp_path / "bad"), check=False)
    assert result.returncode == 1
    assert f"blob {layer.digest} is corrupt" in result.stderr
    assert "the cache is unchanged" in result.stderr
    assert snapshot(target) == before
    store = DiskStore(target, 10**12, owner=False)
    assert store.get_manifest(images.docker_multi.digest) is None
    assert store.tag_records(store.tag_refs()[0]) and len(store.tag_refs()) == 1


def snapshot(cache_dir: Path) -> dict[str, int]:
    """Every file of the store but SQLite's own, with its size."""
    return {
        str(p.relative_to(cache_dir)): p.stat().st_size
        for p in cache_dir.rglob("*")
        if p.is_file() and not p.name.startswith("cache.db")
    }


def test_skopeo_oci_layout_seeds_the_cache(
    images: ImageSet,
    upstream_registry: Registry,
    skopeo_factory: Callable[..., Skopeo],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    """A layout written by `skopeo copy --all docker://… oci:DIR:TAG`, named on import with --as:
    private unless imported with --public (it says nothing about access)."""
    direct = skopeo_factory(None)
    source = f"docker://{upstream_registry.admin_host}/{images.oci_multi.ref}"
    direct.run("copy", "--all", "--src-tls-verify=false", source, f"oci:{tmp_path / 'layout'}:1")
    layout_digest = json.loads((tmp_path / "layout" / "index.json").read_text())["manifests"][0]["digest"]
    reference = f"docker.io/{images.oci_multi.ref}"
    for cache, public in ((tmp_path / "seeded-private", []), (tmp_path / "seeded", ["--public"])):
        regcache_cli("import", "--cache-dir", str(cache), str(tmp_path / "layout"), "--as", reference, *public)
    upstream_gone()
    private = offline_regcache(tmp_path / "seeded-private")
    with pytest.raises(Exception, match=r"unauthorized|401"):
        skopeo_factory(private.url, private.ca_cert).copy_to_dir(images.oci_multi.ref, tmp_path / "refused")
    offline = offline_regcache(tmp_path / "seeded")
    skopeo = skopeo_factory(offline.url, offline.ca_cert)
    assert skopeo.copy_to_dir(images.oci_multi.ref, tmp_path / "out", all_platforms=True) == layout_digest
    assert layout_digest == images.oci_multi.digest  # an OCI index survives skopeo's oci: byte for byte
