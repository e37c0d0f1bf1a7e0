"""The admin walks on a small store: reference patterns, purge and gc plans, verify, usage totals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from regcache.config import DEFAULT_REGISTRIES
from regcache.oci.digest import digest_of
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.ops.admin import (
    RefPattern,
    carry_out,
    find_corrupt,
    parse_ref_pattern,
    plan_gc,
    plan_purge,
    summarize_usage,
)
from regcache.ops.bundle import BundleError
from regcache.store.base import new_tag_record
from regcache.store.disk import DiskStore

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("docker.io", RefPattern("docker.io")),
        ("ghcr.io", RefPattern("ghcr.io")),
        ("localhost:5000/", RefPattern("localhost:5000")),
        ("registry-1.docker.io", RefPattern("docker.io")),
        ("alpine", RefPattern("docker.io", "library/alpine")),
        ("alpine:3.19", RefPattern("docker.io", "library/alpine", "3.19")),
        ("docker.io/library/alpine:3.19", RefPattern("docker.io", "library/alpine", "3.19")),
        ("index.docker.io/bitnami/redis", RefPattern("docker.io", "bitnami/redis")),
        ("ghcr.io/org/app:1", RefPattern("ghcr.io", "org/app", "1")),
        ("localhost:5000/app", RefPattern("localhost:5000", "app")),
    ],
)
def test_ref_patterns(text: str, pattern: RefPattern) -> None:
    assert parse_ref_pattern(text, DEFAULT_REGISTRIES) == pattern


def test_bad_ref_pattern() -> None:
    with pytest.raises(BundleError, match="not a registry, repository or image"):
        parse_ref_pattern("docker.io/Not Valid")


def test_pattern_covers() -> None:
    alpine = TagRef("docker.io", "library/alpine", "3.19")
    assert RefPattern("docker.io").covers(alpine)
    assert RefPattern("docker.io", "library/alpine").covers(alpine)
    assert not RefPattern("docker.io", "library/alpine", "3.20").covers(alpine)
    assert not RefPattern("docker.io", "library/alp").covers(alpine)
    assert not RefPattern("ghcr.io").covers(alpine)


def put_blob(store: DiskStore, data: bytes) -> dict[str, object]:
    digest = digest_of(data)
    staging = store.stage_blob(digest)
    staging.write(data)
    store.commit_blob(staging, len(data))
    return {"mediaType": "application/octet-stream", "digest": digest, "size": len(data)}


def put_image(store: DiskStore, ref: TagRef, *blobs: dict[str, object]) -> str:
    body = json.dumps({"schemaVersion": 2, "config": blobs[0], "layers": list(blobs[1:])}).encode()
    digest = digest_of(body)
    manifest = Manifest(OCI_MANIFEST, body)
    store.put_manifest(digest, manifest)
    store.put_tag(ref, (OCI_MANIFEST,), new_tag_record(manifest, digest))
    store.mark_seen(f"{ref.namespace}/{ref.name}", [digest, *(str(b["digest"]) for b in blobs)])
    return digest


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    """Two repositories whose images share a base layer."""
    store = DiskStore(tmp_path, 10**9)
    base = put_blob(store, b"base layer" * 100)
    put_image(store, TagRef("docker.io", "library/a", "1"), put_blob(store, b"config a"), base)
    put_image(store, TagRef("docker.io", "library/b", "1"), put_blob(store, b"config b"), base)
    return store


def test_purge_keeps_what_others_need(store: DiskStore) -> None:
    base = digest_of(b"base layer" * 100)
    plan = plan_purge(store, RefPattern("docker.io", "library/a"))
    assert plan.count("tag") == 1 and plan.count("manifest") == 1 and plan.count("blob") == 1
    assert f"blob:{base}" not in plan.keys
    assert f"blob:{digest_of(b'config a')}" in plan.keys
    assert plan.count("seen") == 3  # library/a's access records
    carry_out(store, plan)
    assert store.blob_size(base) is not None and store.blob_size(digest_of(b"config a")) is None

    store.pin(
        TagRef("docker.io", "library/b", "1"),
        store.tag_records(TagRef("docker.io", "library/b", "1")).popitem()[1].digest,
    )
    plan = plan_purge(store, RefPattern("docker.io"))
    assert plan.keys == [] and plan.kept_pinned == ["docker.io/library/b:1"]


def test_gc_removes_orphans_once_old_enough(store: DiskStore) -> None:
    orphan = put_blob(store, b"nobody needs me")
    assert plan_gc(store, min_age=3600).keys == []
    plan = plan_gc(store, min_age=0, now=time.time() + 1)
    assert plan.keys == [f"blob:{orphan['digest']}"]
    carry_out(store, plan)
    assert store.blob_size(str(orphan["digest"])) is None
    assert plan_gc(store, min_age=0, now=time.time() + 1).keys == []


def test_verify_finds_rot(store: DiskStore) -> None:
    assert find_corrupt(store).corrupt == []
    base = digest_of(b"base layer" * 100)
    path = store.blob_file(base)
    assert path is not None
    path.write_bytes(b"rotten" + path.read_bytes()[6:])
    verification = find_corrupt(store)
    assert [c.key for c in verification.corrupt] == [f"blob:{base}"]
    assert (verification.manifests, verification.blobs) == (2, 3)


def test_usage_summary() -> None:
    summary = summarize_usage(
        {
            "requests docker.io manifest MISS": 1,
            "requests docker.io manifest REVALIDATED": 1,
            "requests docker.io blob HIT": 2,
            "requests docker.io ping PASS": 5,  # pings are no cache results
            "pulls_saved docker.io": 1,
            "repository docker.io/library/a pulls": 2,
            "repository docker.io/library/a requests": 4,
            "repository docker.io/library/b pulls": 3,
            "bytes cache": 100,
        }
    )
    assert summary.hit_ratio == 0.75
    assert summary.pulls_saved == {"docker.io": 1}
    assert [r.repository for r in summary.repositories] == ["docker.io/library/b", "docker.io/library/a"]
    assert summary.bytes_cache == 100 and summary.bytes_upstream == 0
    assert summarize_usage({}).hit_ratio is None
