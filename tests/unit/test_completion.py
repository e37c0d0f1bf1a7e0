"""Which platforms a cache completes, and what an image lacks."""

import json
from pathlib import Path

import pytest

from regcache.oci.digest import digest_of
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.services.completion import held_platforms, host_platform, platform_wanted, selected_platforms
from regcache.store.base import TagRecord
from regcache.store.disk import DiskStore
from regcache.store.walk import lacking

INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE = "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize(
    ("machine", "platform"),
    [("x86_64", "linux/amd64"), ("AMD64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7")],
)
def test_host_platform(machine: str, platform: str) -> None:
    assert host_platform(machine) == platform


def test_platform_selection() -> None:
    assert platform_wanted("linux/arm64/v8", {"linux/arm64"})
    assert not platform_wanted("linux/arm64/v8", {"linux/amd64"})
    assert platform_wanted("windows/amd64", None)
    assert selected_platforms("all", set) is None
    assert selected_platforms(("linux/s390x",), set) == {"linux/s390x"}
    assert selected_platforms("auto", lambda: {"linux/arm64/v8"}) == {"linux/arm64/v8", host_platform()}


def image(*blobs: str) -> tuple[str, Manifest]:
    layers = [{"digest": blob} for blob in blobs[1:]]
    body = json.dumps({"schemaVersion": 2, "config": {"digest": blobs[0]}, "layers": layers}).encode()
    return digest_of(body), Manifest(IMAGE, body)


def index(**children: str) -> tuple[str, Manifest]:
    platforms = [{"os": p.split("/")[0], "architecture": p.split("/")[1]} for p in children]
    entries = [{"digest": d, "platform": p} for d, p in zip(children.values(), platforms, strict=True)]
    body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}).encode()
    return digest_of(body), Manifest(INDEX, body)


BLOBS = ["sha256:" + str(n) * 64 for n in range(3)]


def multi_arch(store: DiskStore) -> tuple[str, str, str]:
    """An index (amd64: config and a layer, arm64: config) and its platform manifests, stored."""
    amd64, amd64_manifest = image(BLOBS[0], BLOBS[1])
    arm64, arm64_manifest = image(BLOBS[2])
    top, top_manifest = index(**{"linux/amd64": amd64, "linux/arm64": arm64})
    for digest, manifest in ((top, top_manifest), (amd64, amd64_manifest), (arm64, arm64_manifest)):
        store.put_manifest(digest, manifest)
    return top, amd64, arm64


def test_what_an_image_lacks(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    top, amd64, arm64 = multi_arch(store)
    root = f"manifest:{top}"

    def missing(*present: str) -> list[str]:
        return lacking(root, store.needs, set(present).__contains__)

    assert missing() == [root]
    assert missing(root) == [f"manifest:{amd64}", f"manifest:{arm64}"]  # no platform at all
    # amd64 is there without its layer: that layer is missing; arm64, never pulled, is not.
    assert missing(root, f"manifest:{amd64}", f"blob:{BLOBS[0]}") == [f"blob:{BLOBS[1]}"]
    assert missing(root, f"manifest:{amd64}", f"blob:{BLOBS[0]}", f"blob:{BLOBS[1]}") == []


def test_held_platforms_are_the_stored_platform_manifests_of_the_repository(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    top, amd64, _ = multi_arch(store)
    store.remove([f"manifest:{amd64}"])
    store.put_tag(TagRef("docker.io", "library/x", "1"), (), TagRecord(top, INDEX, 1, 1.0))
    assert held_platforms(store, "docker.io", "library/x") == {"linux/arm64"}
    assert held_platforms(store, "docker.io", "library/y") == set()
    assert held_platforms(store, "ghcr.io", "library/x") == set()
