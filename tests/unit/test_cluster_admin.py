"""The admin walks over a cluster's content (ops/cluster.py `Snapshot`): listing, purge and orphan
plans read the bucket's inventory, Redis's tag records and pins as they read a node's store.
(On real engines, with the command line: tests/e2e/test_cluster.py.)"""

from __future__ import annotations

import json

from regcache.oci.digest import digest_of
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.ops.admin import list_images, parse_ref_pattern, plan_orphans, plan_purge
from regcache.ops.cluster import Snapshot
from regcache.store import keys
from regcache.store.base import new_tag_record

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NOW = 1_000_000.0


def image(name: str, layers: list[bytes]) -> tuple[str, Manifest, dict[str, int]]:
    """An image manifest over these layers (config first): its digest, itself, its blobs' sizes."""
    blobs = [f"config {name}".encode(), *layers]
    descriptors = [{"mediaType": "application/octet-stream", "digest": digest_of(b), "size": len(b)} for b in blobs]
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptors[0],
                       "layers": descriptors[1:]}).encode()  # fmt: skip
    return digest_of(body), Manifest(OCI_MANIFEST, body), {digest_of(b): len(b) for b in blobs}


def cluster_content() -> tuple[Snapshot, dict[str, tuple[str, dict[str, int]]]]:
    """Two tagged images sharing a layer, and an orphan manifest nobody tags; all in the bucket."""
    shared = b"shared layer"
    made = {"a": image("a", [shared, b"only a"]), "b": image("b", [shared, b"only b"]),
            "orphan": image("orphan", [b"only orphan"])}  # fmt: skip
    sizes: dict[str, int] = {}
    manifests = {}
    records = {}
    for name, (digest, manifest, blobs) in made.items():
        manifests[digest] = manifest
        sizes[keys.manifest_key(digest)] = len(manifest.body)
        sizes.update({keys.blob_key(d): size for d, size in blobs.items()})
        if name != "orphan":
            records[TagRef("docker.io", f"library/{name}", "1")] = {"": new_tag_record(manifest, digest)}
    uses = {key: NOW - 7200 for key in sizes}
    content = Snapshot(sizes, uses, records, manifests, pinned={}, seen=[])
    return content, {name: (digest, blobs) for name, (digest, _, blobs) in made.items()}


def test_ls_lists_the_clusters_tags_with_what_they_need_from_the_bucket() -> None:
    content, made = cluster_content()
    rows = {row.ref: row for row in list_images(content)}
    assert set(rows) == {"docker.io/library/a:1", "docker.io/library/b:1"}
    digest, blobs = made["a"]
    assert rows["docker.io/library/a:1"].digest == digest
    assert rows["docker.io/library/a:1"].size == sum(blobs.values()) + content.sizes[keys.manifest_key(digest)]
    assert rows["docker.io/library/a:1"].missing == ()
    # A blob the bucket lost: the image is incomplete.
    lost = keys.blob_key(next(iter(blobs)))
    del content.sizes[lost]
    assert {row.ref: row.missing for row in list_images(content)}["docker.io/library/a:1"] == (lost,)


def test_purge_keeps_what_another_tag_or_a_pin_needs() -> None:
    content, made = cluster_content()
    plan = plan_purge(content, parse_ref_pattern("docker.io/library/a"))
    a_digest, a_blobs = made["a"]
    _, b_blobs = made["b"]
    only_a = {keys.blob_key(d) for d in a_blobs.keys() - b_blobs.keys()}
    assert set(plan.keys) == {"tag:docker.io/library/a:1", keys.manifest_key(a_digest), *only_a}
    content.pinned["docker.io/library/a:1"] = a_digest
    pinned = plan_purge(content, parse_ref_pattern("docker.io/library/a"))
    assert pinned.keys == [] and pinned.kept_pinned == ["docker.io/library/a:1"]


def test_orphans_are_what_no_tag_and_no_pin_needs_once_old_enough() -> None:
    content, made = cluster_content()
    orphan_digest, orphan_blobs = made["orphan"]
    orphans = {keys.manifest_key(orphan_digest), *(keys.blob_key(d) for d in orphan_blobs)}
    assert set(plan_orphans(content, min_age=3600, now=NOW).keys) == orphans
    assert plan_orphans(content, min_age=3 * 3600, now=NOW).keys == []  # used too recently: a pull may be on
