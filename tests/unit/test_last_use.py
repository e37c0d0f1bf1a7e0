"""Last uses in the disk store: a use of a tag or manifest counts for everything it needs (noted when
it is served, so eviction and expiry walk nothing), the shared-layer rule, pins, `max_age`, and
stores written before last uses were propagated this way."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bench.store import commit, put_manifest

import regcache.store.disk as disk
import regcache.store.walk as walk
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.store.base import TagRecord
from regcache.store.disk import DiskStore

INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE = "application/vnd.oci.image.manifest.v1+json"
LAYER = 100_000


def blob(store: DiskStore, name: str, size: int = LAYER) -> str:
    return commit(store, (name.encode() * size)[:size])


def image(store: DiskStore, config: str, *layers: str) -> str:
    """An image manifest (config and layers stored before it, as `blob` made them)."""
    document = {"config": {"digest": config, "size": 1}, "layers": [{"digest": d} for d in layers]}
    return put_manifest(store, IMAGE, document)


def index(*manifests: str, store: DiskStore) -> str:
    return put_manifest(store, INDEX, {"manifests": [{"digest": d, "platform": {"os": "linux"}} for d in manifests]})


def tag(store: DiskStore, name: str, digest: str, media_type: str) -> TagRef:
    ref = TagRef("docker.io", f"library/{name}", "1")
    store.put_tag(ref, (media_type,), TagRecord(digest, media_type, 10, time.time()))
    return ref


def connect(store: DiskStore) -> contextlib.closing[sqlite3.Connection]:
    """Another connection to the store's index (what a test changes behind the store's back)."""
    return contextlib.closing(sqlite3.connect(store.cache_dir / "store" / "cache.db", isolation_level=None))


def aged(store: DiskStore, order: list[str]) -> None:
    """Everything stored two hours ago; then the entries in `order` last used an hour ago, a
    second apart (the first least recently)."""
    store.flush_uses()
    with connect(store) as db:
        db.execute("UPDATE Cache SET access_time = access_time - 7200")
    hour_ago = time.time() - 3600
    store.record_uses({key: hour_ago + i for i, key in enumerate(order)})


def limit_to_free(store: DiskStore, size: float) -> None:
    """A size limit that makes `evict` free (at least) `size` bytes."""
    store.size_limit = int((store.volume() - size) / 0.9) + 1


def stored(store: DiskStore, *digests: str) -> set[str]:
    return {digest for digest in digests if store.has_blob(digest)}


def b(digest: str) -> str:
    return f"blob:{digest}"


def m(digest: str) -> str:
    return f"manifest:{digest}"


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[Manifest]:
    """Every manifest the store parses."""
    seen: list[Manifest] = []
    parse = walk.manifest_references

    def counting(manifest: Manifest) -> object:
        seen.append(manifest)
        return parse(manifest)

    monkeypatch.setattr(walk, "manifest_references", counting)
    return seen


def test_a_hit_on_an_index_counts_for_all_it_needs_and_parses_nothing_twice(
    tmp_path: Path, parses: list[Manifest]
) -> None:
    """An index served (by digest or through its tag) is a use of its platform manifests, their
    configs and layers: the store notes them all, in memory, and writes them in one batch."""
    store = DiskStore(tmp_path, 10**9)
    config1, layer1, config2, layer2 = (blob(store, name, 10) for name in ("c1", "l1", "c2", "l2"))
    platform1, platform2 = image(store, config1, layer1), image(store, config2, layer2)
    unpulled = "sha256:" + "e" * 64  # a platform nobody pulled: not stored
    top = index(platform1, platform2, unpulled, store=store)
    ref = tag(store, "x", top, INDEX)
    store.close()

    store = DiskStore(tmp_path, 10**9)  # nothing in memory yet
    parses.clear()
    assert store.get_manifest(top) is not None
    needed = {m(top), m(platform1), m(platform2), m(unpulled), *(b(d) for d in (config1, layer1, config2, layer2))}
    assert set(store.uses.take()) == needed
    assert len(parses) == 3  # the index and its two stored platform manifests, once

    assert store.get_manifest(top) is not None
    assert store.tag_records(ref)
    assert set(store.uses.pending()) == needed | {f"tag:{ref}"}
    assert len(parses) == 3  # from memory

    before = store.entries()[b(layer1)].last_use
    store.flush_uses()
    assert store.entries()[b(layer1)].last_use > before


@pytest.fixture(params=[False, True], ids=["here", "apart"])
def apart(request: pytest.FixtureRequest) -> bool:
    """Remove in this process, or in the helper process the running cache removes in."""
    return bool(request.param)


@pytest.mark.parametrize("used", ["a", "b"])
def test_a_layer_shared_by_two_images_stays_while_either_tag_is_used(tmp_path: Path, used: str, apart: bool) -> None:
    """A and B share a base layer, stored before their own. Only the tag of one is used since (a
    replay: its client had every layer): the other's own layer goes first, the shared one stays."""
    store = DiskStore(tmp_path, 10**9, remove_apart=apart)
    base, a_only, b_only = (blob(store, name) for name in ("base", "a-only", "b-only"))
    config_a, config_b = blob(store, "config-a", 10), blob(store, "config-b", 10)
    refs = {
        "a": tag(store, "a", image(store, config_a, base, a_only), IMAGE),
        "b": tag(store, "b", image(store, config_b, base, b_only), IMAGE),
    }
    aged(store, [b(base), b(a_only), b(b_only)])  # the base layer least recently used of all
    assert store.tag_records(refs[used])  # noted, not written yet: eviction counts it
    limit_to_free(store, LAYER / 2)
    removed, _ = store.evict()
    own = {"a": a_only, "b": b_only}
    other = own["b" if used == "a" else "a"]
    assert stored(store, base, a_only, b_only) == {base, own[used]}
    assert removed == 2  # the other's config (10 B, as old), then its own layer
    assert not store.has_blob(other)


def test_a_platform_manifest_pulled_by_digest_keeps_its_blobs(tmp_path: Path, apart: bool) -> None:
    """dockerd HEADs the tag and GETs the platform manifest by digest; it has the layers and fetches
    none. That manifest's layers stay; those of the platform nobody pulled go first."""
    store = DiskStore(tmp_path, 10**9, remove_apart=apart)
    layer1, layer2, config1, config2 = (blob(store, name) for name in ("l1", "l2", "c1", "c2"))
    platform1, platform2 = image(store, config1, layer1), image(store, config2, layer2)
    tag(store, "x", index(platform1, platform2, store=store), INDEX)
    aged(store, [b(layer1), b(config1), b(layer2), b(config2)])
    assert store.get_manifest(platform1) is not None
    limit_to_free(store, 1.5 * LAYER)
    assert store.evict()[0] == 2
    assert stored(store, layer1, config1, layer2, config2) == {layer1, config1}


def build_pinned(store: DiskStore) -> tuple[TagRef, set[str], set[str]]:
    """A pinned multi-platform image and an unpinned one, the pinned one least recently used;
    (its tag, its blobs, the other's blobs)."""
    pinned_blobs = [blob(store, name) for name in ("pc1", "pl1", "pc2", "pl2")]
    pinned_index = index(image(store, *pinned_blobs[:2]), image(store, *pinned_blobs[2:]), store=store)
    pinned = tag(store, "pinned", pinned_index, INDEX)
    store.pin(pinned, pinned_index)
    other_blobs = [blob(store, name) for name in ("oc", "ol")]
    tag(store, "other", image(store, *other_blobs), IMAGE)
    aged(store, [*map(b, pinned_blobs), m(pinned_index), *map(b, other_blobs)])
    return pinned, set(pinned_blobs), set(other_blobs)


def test_pinned_images_are_never_evicted(tmp_path: Path, apart: bool) -> None:
    store = DiskStore(tmp_path, 10**9, remove_apart=apart)
    _, pinned, others = build_pinned(store)
    store.size_limit = 1  # everything that may go, goes
    removed, freed = store.evict()
    assert (removed, freed) == (2, 2 * LAYER)
    assert stored(store, *pinned, *others) == pinned


def test_max_age_removes_what_no_use_reached_pins_excepted(tmp_path: Path, apart: bool) -> None:
    """An hour later, with a max_age of half an hour: the image whose tag was used keeps every
    entry it needs (its blobs were not read themselves); the pinned one stays; the other image goes
    whole, tag, manifests, blobs and access records."""
    store = DiskStore(tmp_path, 10**9, remove_apart=apart)
    pinned, pinned_blobs, other_blobs = build_pinned(store)
    used_blobs = {blob(store, name) for name in ("uc", "ul")}
    used_image = image(store, *sorted(used_blobs))
    used = tag(store, "used", used_image, IMAGE)
    store.mark_seen("docker.io/library/other", sorted(other_blobs))
    aged(store, [*map(b, sorted(used_blobs)), m(used_image)])
    later = time.time() + 1800
    assert store.tag_records(used)  # half an hour from "later"

    before = set(store.entries())
    would_go = dict(store.unused(2700, now=later))
    removed, freed = store.expire_unused(2700, now=later)
    after = set(store.entries())
    assert (removed, freed) == (len(would_go), sum(would_go.values()))
    assert stored(store, *pinned_blobs, *used_blobs, *other_blobs) == pinned_blobs | used_blobs
    assert {key.partition(":")[0] for key in before - after} == {"tag", "manifest", "blob"}
    assert before - after == set(would_go) - {key for key in would_go if key.startswith("seen:")}
    assert not [pair for pair in store.seen_pairs() if pair[0] == "docker.io/library/other"]
    assert f"tag:{pinned}" in after and f"tag:{used}" in after


def test_a_store_written_by_the_old_code_keeps_its_last_uses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, last uses were propagated by every eviction; a store written then holds each entry's
    own last use only. On its first open its last uses are propagated, once: eviction and expiry
    go by them as they went before."""
    store = DiskStore(tmp_path, 10**9)
    layers = [blob(store, name) for name in ("l1", "l2")]
    manifest = image(store, *layers)
    ref = tag(store, "x", manifest, IMAGE)
    fresh = blob(store, "unused")
    store.close()
    with connect(store) as db:  # as the old code left it: no index, and the layers' own last uses
        db.execute("DROP INDEX IF EXISTS regcache_last_use")
        db.execute("DROP INDEX IF EXISTS regcache_file_last_use")
        db.execute("PRAGMA user_version = 0")
        db.execute("UPDATE Cache SET access_time = ? WHERE key NOT LIKE 'blob:%'", (time.time() - 60,))
        db.execute("UPDATE Cache SET access_time = ? WHERE key LIKE 'blob:%'", (time.time() - 7200,))

    caplog.set_level("INFO", logger="regcache")
    store = DiskStore(tmp_path, 10**9)
    entries = store.entries()
    assert entries[b(layers[0])].last_use == entries[b(layers[1])].last_use == entries[f"tag:{ref}"].last_use
    assert entries[b(fresh)].last_use < time.time() - 7000  # nothing needs it: as it was
    assert "last uses of 2 entries propagated once" in caplog.text  # the layers: tag → manifest → layers
    assert store.expire_unused(3600) == (1, LAYER)
    store.close()
    with connect(store) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (disk.LAST_USE_SCHEMA,)
        names = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"regcache_last_use", "regcache_file_last_use"} <= names
    caplog.clear()
    DiskStore(tmp_path, 10**9).close()
    assert "propagated" not in caplog.text  # once


@contextlib.contextmanager
def statements(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple[object, ...]]]]:
    """Every SQL statement the store runs on its own connection meanwhile."""
    ran: list[tuple[str, tuple[object, ...]]] = []
    sql = DiskStore._sql

    def recording(self: DiskStore, statement: str, args: tuple[object, ...]) -> sqlite3.Cursor:
        ran.append((statement, args))
        return sql(self, statement, args)

    with monkeypatch.context() as patch:
        patch.setattr(DiskStore, "_sql", recording)
        yield ran


def plans(store: DiskStore, ran: list[tuple[str, tuple[object, ...]]]) -> list[str]:
    """SQLite's query plan for each statement on the Cache table."""
    with connect(store) as db:
        return [
            detail
            for statement, args in ran
            if " Cache " in f"{statement} " and not statement.startswith("PRAGMA")
            for *_, detail in db.execute(f"EXPLAIN QUERY PLAN {statement}", args).fetchall()
        ]


def many_images(store: DiskStore, count: int) -> list[tuple[str, str]]:
    """`count` one-layer images, last used in an order unlike the order they were stored in:
    (manifest key, layer key) of each, least recently used first."""
    images = []
    for number in range(count):
        layer = blob(store, f"layer {number}", 1000)
        images.append((m(put_manifest(store, IMAGE, {"layers": [{"digest": layer}]})), b(layer)))
    random.Random(15).shuffle(images)
    aged(store, [key for pair in images for key in pair])
    return images


@pytest.mark.parametrize("removal", ["evict", "expire"])
def test_eviction_and_expiry_take_the_least_recently_used_from_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parses: list[Manifest], removal: str
) -> None:
    """No manifest read, no statement that scans the store: the least recently used entries come
    from an index on last use, so the work is what is removed, whatever the store's size."""
    store = DiskStore(tmp_path, 10**9)
    images = many_images(store, 200)
    store.close()
    store = DiskStore(tmp_path, 10**9)  # nothing in memory
    remove: Callable[[], tuple[int, int]]
    expected: list[str]
    if removal == "evict":
        store.size_limit = store.volume() - 1  # down to 90 %: a few dozen layers of 1000 B go
        remove = store.evict
    else:
        cutoff = store.entries()[images[2][1]].last_use + 0.5  # the first three images, whole
        remove = lambda: store.expire_unused(3600, now=cutoff + 3600)  # noqa: E731
    parses.clear()
    before = set(store.entries())
    with statements(monkeypatch) as ran:
        removed, _ = remove()
    if removal == "evict":
        assert removed >= 10 and store.volume() <= store.size_limit * 0.9
        expected = [layer for _, layer in images[:removed]]  # only layers: manifests have no file
    else:
        expected = [key for pair in images[:3] for key in pair]
    assert before - set(store.entries()) == set(expected)
    assert parses == []
    assert [plan for plan in plans(store, ran) if plan.startswith("SCAN")] == []


def test_eviction_lets_others_write_between_its_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eviction removes in short transactions: between two, another process (or the request path)
    gets the write lock at once."""
    store = DiskStore(tmp_path, 10**9)
    many_images(store, 20)
    monkeypatch.setattr(disk, "REMOVAL_BATCH", 4)
    writes = []

    def another_writer(busy: float) -> None:
        with connect(store) as db:
            db.execute("PRAGMA busy_timeout = 0")
            db.execute("BEGIN IMMEDIATE")  # "database is locked" if eviction held the lock
            db.execute("ROLLBACK")
        writes.append(True)

    monkeypatch.setattr(disk, "_pause", another_writer)
    store.size_limit = 1
    removed, _ = store.evict()
    assert removed == 20
    assert len(writes) >= 20 // 4 - 1


def test_the_running_cache_removes_in_a_helper_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`remove_apart`: the removing is done by another process (this one's removal fails if
    called), and its files and rows are gone as this process sees them."""
    store = DiskStore(tmp_path, 10**9, remove_apart=True)
    old, new = blob(store, "old"), blob(store, "new")
    aged(store, [b(old), b(new)])
    old_file = store.blob_file(old)

    def not_here(*args: object) -> tuple[int, int]:
        raise AssertionError("removed in this process")

    monkeypatch.setattr(DiskStore, "_remove_oldest", not_here)
    limit_to_free(store, LAYER / 2)
    assert store.evict() == (1, LAYER)
    assert stored(store, old, new) == {new}
    assert old_file is not None and not old_file.exists()
    assert store.expire_unused(0.0, now=time.time() + 10) == (1, LAYER)
    assert not store.entries()


def test_a_failing_helper_leaves_the_removing_to_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = DiskStore(tmp_path, 10**9, remove_apart=True)
    old, new = blob(store, "old"), blob(store, "new")
    aged(store, [b(old), b(new)])
    monkeypatch.setattr(disk, "REMOVER", "regcache.store.no_such_module")
    limit_to_free(store, LAYER / 2)
    assert store.evict() == (1, LAYER)
    assert stored(store, old, new) == {new}
    assert "the evict helper failed" in caplog.text and "removing in this process" in caplog.text
