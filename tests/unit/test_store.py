"""The content-addressed store: verified commits, no partial entries, survives reopening."""

import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bed.tmpfs import Tmpfs

from regcache.oci.digest import DigestMismatch, digest_of
from regcache.oci.manifest import Manifest, referenced_digests
from regcache.oci.media import ACCEPT_KEY_TYPES, accept_key
from regcache.oci.reference import TagRef
from regcache.store.base import MAX_TAG_RECORDS, TagRecord
from regcache.store.disk import DiskStore
from regcache.store.errors import StoreError, best_effort
from regcache.store.lock import CacheDirBusy

DATA = b"layer bytes " * 10_000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def fill(store: DiskStore, digest: str, data: bytes, expected: int | None) -> None:
    staging = store.stage_blob(digest)
    for i in range(0, len(data), 4096):
        staging.write(data[i : i + 4096])
    store.commit_blob(staging, expected)


def test_blob_commit_moves_the_file_and_reopens(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    fill(store, DIGEST, DATA, len(DATA))
    assert store.blob_size(DIGEST) == len(DATA)
    assert list((tmp_path / "staging").iterdir()) == []  # moved, not copied
    path = store.blob_path(DIGEST)
    assert path is not None and Path(path).read_bytes() == DATA
    store.close()
    reopened = DiskStore(tmp_path, 10**9)
    handle = reopened.open_blob(DIGEST)
    assert handle is not None
    with handle:
        assert handle.read() == DATA


@pytest.mark.parametrize(
    ("data", "expected"),
    [(DATA[:-1], len(DATA)), (DATA[:-1] + b"X", len(DATA)), (DATA, len(DATA) + 1)],
    ids=["truncated", "corrupt", "wrong-length"],
)
def test_bad_blob_is_not_stored(tmp_path: Path, data: bytes, expected: int) -> None:
    store = DiskStore(tmp_path, 10**9)
    with pytest.raises(DigestMismatch):
        fill(store, DIGEST, data, expected)
    assert store.blob_size(DIGEST) is None
    assert list((tmp_path / "staging").iterdir()) == []


def test_leftover_staging_is_removed_at_start(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    staging = store.stage_blob(DIGEST)
    staging.write(b"half")
    staging.flush()
    store.close()  # a crash mid-fill: the staged file is still there
    DiskStore(tmp_path, 10**9)
    assert list((tmp_path / "staging").iterdir()) == []


def test_manifests_are_verified_and_byte_exact(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    body = b'{"schemaVersion": 2,  "odd":   "spacing"}'
    digest = digest_of(body)
    store.put_manifest(digest, Manifest("application/vnd.oci.image.manifest.v1+json", body))
    assert store.get_manifest(digest) == Manifest("application/vnd.oci.image.manifest.v1+json", body)
    with pytest.raises(DigestMismatch):
        store.put_manifest(digest_of(b"other"), Manifest("application/json", body))
    assert store.get_manifest(digest_of(b"other")) is None


def descriptor(n: int, **extra: object) -> dict[str, object]:
    return {"mediaType": "application/octet-stream", "digest": f"sha256:{n:064x}", "size": 1, **extra}


def test_references_are_read_by_the_declared_media_type_only() -> None:
    """What a manifest vouches for in its repository: an index its platform manifests, an image
    manifest its config and layers, never foreign layers (`urls`) or any other member."""
    image = {
        "schemaVersion": 2,
        "config": descriptor(1),
        "layers": [descriptor(2), descriptor(3, urls=["https://x.invalid/l"])],
        "manifests": [descriptor(4)],  # an unknown member of an image manifest
        "subject": descriptor(5),
        "annotations": {"x": f"sha256:{6:064x}"},
    }
    index = {**image, "manifests": [descriptor(7), descriptor(8, urls=["https://x"])]}  # and config, layers
    digests = lambda n: [f"sha256:{i:064x}" for i in n]  # noqa: E731
    images = ("application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json")
    indexes = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
    for media_type in images:
        assert referenced_digests(Manifest(media_type, json.dumps(image).encode())) == digests([1, 2])
    for media_type in indexes:
        assert referenced_digests(Manifest(media_type, json.dumps(index).encode())) == digests([7])
    assert referenced_digests(Manifest("application/vnd.oci.image.index.v1+json; x=y", json.dumps(index).encode()))
    for media_type in ("application/json", "", "application/vnd.oci.artifact.manifest.v1+json"):
        assert referenced_digests(Manifest(media_type, json.dumps(index).encode())) == []
    assert referenced_digests(Manifest("application/vnd.oci.image.index.v1+json", b"[1]")) == []


def test_tag_records_are_keyed_by_registry_and_accept(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    oci = ("application/vnd.oci.image.index.v1+json",)
    docker = ("application/vnd.docker.distribution.manifest.v2+json",)
    hub, ghcr = TagRef("docker.io", "library/x", "1"), TagRef("ghcr.io", "library/x", "1")
    index = TagRecord(DIGEST, "application/vnd.oci.image.index.v1+json", 10, 1.0)
    single = TagRecord("sha256:" + "c" * 64, docker[0], 20, 2.0)
    store.put_tag(hub, oci, index)
    store.put_tag(hub, docker, single)
    assert store.tag_records(hub) == {accept_key(oci): index, accept_key(docker): single}
    assert store.tag_records(ghcr) == {}


def test_tag_records_are_capped_least_recently_recorded_first(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    ref = TagRef("docker.io", "library/x", "1")
    keys = list(itertools.combinations(sorted(ACCEPT_KEY_TYPES), 2))[: MAX_TAG_RECORDS + 3]  # different lists
    for when, accepted in enumerate(keys):
        store.put_tag(ref, accepted, TagRecord(DIGEST, "application/vnd.oci.image.index.v1+json", 10, float(when)))
    records = store.tag_records(ref)
    assert len(records) == MAX_TAG_RECORDS
    assert set(records) == {accept_key(accepted) for accepted in keys[-MAX_TAG_RECORDS:]}  # the oldest went
    # Re-recording the oldest kept one makes it the newest: the next new list drops the next oldest.
    index = "application/vnd.oci.image.index.v1+json"
    store.put_tag(ref, keys[-MAX_TAG_RECORDS], TagRecord(DIGEST, index, 10, 99.0))
    # A record with an older time than all the others is still the one just recorded: it stays.
    store.put_tag(ref, ("*/*",), TagRecord(DIGEST, index, 10, 0.0))
    kept = [keys[-MAX_TAG_RECORDS], *keys[-MAX_TAG_RECORDS + 2 :], ("*/*",)]
    assert set(store.tag_records(ref)) == {accept_key(accepted) for accepted in kept}


def manifest_for(*blob_digests: str) -> tuple[str, Manifest]:
    body = json.dumps({"schemaVersion": 2, "layers": [{"digest": d, "size": 1} for d in blob_digests]}).encode()
    return digest_of(body), Manifest("application/vnd.oci.image.manifest.v1+json", body)


def test_eviction_is_lru_and_spares_pins(tmp_path: Path) -> None:
    """Four 100 kB blobs in a store limited to 300 kB: the least recently used unpinned go."""
    store = DiskStore(tmp_path, 300_000)
    blobs = {}
    for name in "abcd":
        data = name.encode() * 100_000
        blobs[name] = "sha256:" + hashlib.sha256(data).hexdigest()
        fill(store, blobs[name], data, len(data))
        time.sleep(0.01)  # distinct access times
    pinned_digest, pinned = manifest_for(blobs["a"])
    store.put_manifest(pinned_digest, pinned)
    store.pin(TagRef("docker.io", "library/pinned", "1"), pinned_digest)
    store.open_blob(blobs["b"]).close()  # type: ignore[union-attr]  # b is now the most recently used
    removed, freed = store.evict()
    assert (removed, freed) == (2, 200_000)
    assert {n for n, d in blobs.items() if store.blob_size(d) is not None} == {"a", "b"}
    assert store.pins() == {"docker.io/library/pinned:1": pinned_digest}
    assert store.unpin(TagRef("docker.io", "library/pinned", "1"))
    assert store.pins() == {}


def test_expiry_removes_what_nobody_used_except_pins(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    kept, other, another = (b"kept" * 10_000, b"other" * 10_000, b"another" * 10_000)
    digests = {}
    for data in (kept, other, another):
        digests[data] = "sha256:" + hashlib.sha256(data).hexdigest()
        fill(store, digests[data], data, len(data))
    pinned_digest, pinned = manifest_for(digests[kept])
    store.put_manifest(pinned_digest, pinned)
    store.pin(TagRef("docker.io", "library/kept", "1"), pinned_digest)
    later = time.time() + 3600
    assert store.expire_unused(1800, now=later)[0] == 2  # an hour later: the two unpinned blobs
    assert store.blob_size(digests[kept]) is not None
    assert store.get_manifest(pinned_digest) is not None
    assert store.expire_unused(1800)[0] == 0  # nothing is 30 min old yet


def test_a_blob_stays_while_a_recently_used_manifest_needs_it(tmp_path: Path) -> None:
    """Images A and B share a base layer. A's manifest was used last (a client that had the
    layers already only fetched the manifest): B's own layer goes first, the shared one stays."""
    store = DiskStore(tmp_path, 280_000)  # three 100 kB layers (+ the index) are over it, two are not
    layers = {name: (name.encode() * 100_000)[:100_000] for name in ("base", "a-only", "b-only")}
    digest = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in layers.items()}
    for name in ("base", "a-only", "b-only"):
        fill(store, digest[name], layers[name], len(layers[name]))
        time.sleep(0.01)
    image_a, manifest_a = manifest_for(digest["base"], digest["a-only"])
    image_b, manifest_b = manifest_for(digest["base"], digest["b-only"])
    store.put_manifest(image_b, manifest_b)
    time.sleep(0.01)
    store.put_manifest(image_a, manifest_a)
    removed, _ = store.evict()
    assert removed == 1
    assert store.blob_size(digest["b-only"]) is None
    assert store.blob_size(digest["base"]) is not None
    assert store.blob_size(digest["a-only"]) is not None


def stored_image(store: DiskStore) -> tuple[str, Manifest, TagRef]:
    """A blob, a manifest that needs it and a tag record naming the manifest; the manifest's digest."""
    fill(store, DIGEST, DATA, len(DATA))
    digest, manifest = manifest_for(DIGEST)
    store.put_manifest(digest, manifest)
    ref = TagRef("docker.io", "library/x", "1")
    store.put_tag(ref, (manifest.media_type,), TagRecord(digest, manifest.media_type, len(manifest.body), 1.0))
    store.mark_seen("docker.io/library/x", [digest, DIGEST])
    return digest, manifest, ref


def read_like_a_hit(store: DiskStore, digest: str, ref: TagRef) -> None:
    """Every read a tag pull served from the store makes, and what the admin tools read."""
    assert store.tag_records(ref) and store.get_manifest(digest) is not None
    handle = store.open_blob(DIGEST)
    assert handle is not None
    with handle:
        assert handle.read() == DATA
    assert store.is_seen("docker.io/library/x", DIGEST) and store.has_blob(DIGEST)
    assert store.blob_size(DIGEST) == len(DATA) and store.blob_path(DIGEST) is not None
    assert store.tag_refs() == [ref] and store.entries() and store.entry_totals()["blob"] == (1, len(DATA))
    assert store.pins() == {} and store.counters() == {}


def test_reads_never_write(tmp_path: Path) -> None:
    """Another connection to the index sees no commit while the store serves hits: a full disk
    cannot fail them. The uses are noted, and written later in one batch."""
    store = DiskStore(tmp_path, 10**9)
    digest, _, ref = stored_image(store)
    observer = sqlite3.connect(tmp_path / "store" / "cache.db")
    version = observer.execute("PRAGMA data_version").fetchone()
    last_use = store.entries()[f"manifest:{digest}"].last_use

    read_like_a_hit(store, digest, ref)
    assert observer.execute("PRAGMA data_version").fetchone() == version
    assert store.entries()[f"manifest:{digest}"].last_use == last_use

    store.flush_uses()
    assert observer.execute("PRAGMA data_version").fetchone() != version
    entries = store.entries()
    assert entries[f"manifest:{digest}"].last_use > last_use
    assert entries[f"blob:{DIGEST}"].last_use > last_use and entries[f"tag:{ref}"].last_use > last_use


def test_a_last_use_never_moves_back(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    fill(store, DIGEST, DATA, len(DATA))
    stored_at = store.entries()[f"blob:{DIGEST}"].last_use
    store.record_uses({f"blob:{DIGEST}": stored_at - 3600})  # another process's older use
    assert store.entries()[f"blob:{DIGEST}"].last_use == stored_at
    store.record_uses({f"blob:{DIGEST}": stored_at + 3600, "blob:sha256:gone": 1.0})
    assert store.entries()[f"blob:{DIGEST}"].last_use == stored_at + 3600


def test_a_full_disk_serves_every_read_and_opens_read_only(tmpfs: Tmpfs, caplog: pytest.LogCaptureFixture) -> None:
    """diskcache writes its settings when it opens a store: on a full disk the store opens
    read-only, reads work, writes (and the uses noted) are refused, and nothing breaks."""
    best_effort("last uses", lambda: None)  # the warning comes once per run of failures: none yet
    disk = tmpfs.mount("8m")
    store = DiskStore(disk / "cache", 10**9)
    digest, _, ref = stored_image(store)
    filler = tmpfs.fill(disk)
    read_like_a_hit(store, digest, ref)

    looking = DiskStore(disk / "cache", 10**9, owner=False)  # `regcache stats` on a full disk
    assert "full" in looking.read_only
    read_like_a_hit(looking, digest, ref)
    with pytest.raises(StoreError, match="read-only"):
        looking.pin(ref, digest)
    looking.flush_uses()
    assert looking.get_manifest(digest) is not None
    looking.flush_uses()
    looking.close()
    assert looking.uses.pending() == {}  # dropped, not kept for later
    assert caplog.text.count("last uses not saved") == 1

    filler.unlink()
    store.flush_uses()  # room again
    assert "last uses saved again" in caplog.text


def test_a_tool_reads_a_full_disk_store_that_no_process_has_open(tmpfs: Tmpfs) -> None:
    """No room even for SQLite's WAL index: `regcache stats` reads the database file as it is.
    regcache itself refuses to start on it (with a one-line error), as others may write meanwhile."""
    disk = tmpfs.mount("8m")
    store = DiskStore(disk / "cache", 10**9)
    digest, _, ref = stored_image(store)
    store.close()
    tmpfs.fill(disk)
    looking = DiskStore(disk / "cache", 10**9, owner=False)
    assert looking.read_only
    read_like_a_hit(looking, digest, ref)
    looking.close()
    with pytest.raises((OSError, sqlite3.Error)):
        DiskStore(disk / "cache", 10**9)


def test_the_running_cache_keeps_its_store_to_its_owner(tmp_path: Path) -> None:
    """Under umask 022 an index and blob files are 0644: their directories keep other local users
    out (cached private manifests, the seen records), also for a store created before."""
    old = os.umask(0o022)
    try:
        DiskStore(tmp_path / "cache", 10**9, owner=False).close()  # a tool made it: 0755
        assert (tmp_path / "cache" / "store").stat().st_mode & 0o077 == 0o055
        running = DiskStore(tmp_path / "cache", 10**9)
        fill(running, DIGEST, DATA, len(DATA))
        for directory in ("", "store", "staging"):
            assert (tmp_path / "cache" / directory).stat().st_mode & 0o777 == 0o700, directory
        running.close()
    finally:
        os.umask(old)


def test_one_running_cache_per_cache_dir(tmp_path: Path) -> None:
    """Another process's owner store refuses, naming the holder; this process may hold it twice
    (a configuration reload), and the second one keeps the first one's staging files."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_STORE, str(tmp_path)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with pytest.raises(CacheDirBusy, match=rf"^in use by another regcache \(pid {holder.pid}\); stop it"):
            DiskStore(tmp_path, 10**9)
        DiskStore(tmp_path, 10**9, owner=False).close()  # admin tools go on
    finally:
        holder.communicate("")  # it closes its store and exits
    first = DiskStore(tmp_path, 10**9)
    staging = first.stage_blob(DIGEST)
    staging.write(b"in progress")
    staging.flush()
    second = DiskStore(tmp_path, 10**9)
    assert staging.path.exists()
    first.close()
    assert f"in use by another regcache (pid {os.getpid()})" in hold_briefly(tmp_path).stderr  # `second` holds it
    second.close()
    assert hold_briefly(tmp_path).returncode == 0


def hold_briefly(cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """Another process opens the store as its owner, and closes it again."""
    command = [sys.executable, "-c", HOLD_THE_STORE, str(cache_dir)]
    return subprocess.run(command, input="", capture_output=True, text=True, timeout=60, check=False)


HOLD_THE_STORE = """
import sys
from pathlib import Path
from regcache.store.disk import DiskStore
store = DiskStore(Path(sys.argv[1]), 10**9)
print("holding", flush=True)
sys.stdin.read()
store.close()
"""


def files(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `directory`: its bytes and mtime."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in directory.rglob("*") if p.is_file()}


# Another process with the store open: it writes, says so, and on the next line exits without
# closing the store (as a killed regcache would), leaving its write-ahead log behind.
WRITER = """
import os, sys
from pathlib import Path
from regcache.store.disk import DiskStore
DiskStore(Path(sys.argv[1]), 10**9, owner=False).add_counters({"requests": 1})
print("written", flush=True)
sys.stdin.readline()
os._exit(0)
"""


def test_a_read_only_store_reads_everything_and_changes_nothing(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    fill(store, DIGEST, DATA, len(DATA))
    digest, manifest = manifest_for(DIGEST)
    store.put_manifest(digest, manifest)
    ref = TagRef("docker.io", "library/x", "1")
    record = TagRecord(digest, manifest.media_type, len(manifest.body), 1.0)
    store.put_tag(ref, (), record)
    store.pin(ref, digest)
    store.close()

    def look() -> None:
        before = files(tmp_path)
        looking = DiskStore(tmp_path, 10**9, read_only=True)
        assert looking.tag_refs() == [ref]
        assert looking.tag_records(ref) == {"": record}
        assert looking.get_manifest(digest) == manifest
        assert looking.pins() == {str(ref): digest}
        assert looking.has_blob(DIGEST) and looking.blob_size(DIGEST) == len(DATA)
        assert looking.needs(f"tag:{ref}") == [f"manifest:{digest}"]
        assert set(looking.entries()) == {f"blob:{DIGEST}", f"manifest:{digest}", f"tag:{ref}"}
        assert looking.counters() == {"requests": 1}  # the other process's write
        with pytest.raises(StoreError, match="open read-only"):
            looking.unpin(ref)
        looking.close()
        assert files(tmp_path) == before

    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdin is not None
    assert writer.stdout.readline() == "written\n"
    look()  # while it has the store open
    writer.communicate("\n", timeout=30)
    assert (tmp_path / "store" / "cache.db-wal").stat().st_size > 0
    look()  # its log left behind
    DiskStore(tmp_path, 10**9).close()
    assert not (tmp_path / "store" / "cache.db-wal").exists()
    look()  # closed cleanly: the database file alone


def test_a_read_only_store_must_exist(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist: there is no cache there"):
        DiskStore(tmp_path / "typo", 10**9, read_only=True)
    with pytest.raises(StoreError, match="holds no regcache store"):
        DiskStore(tmp_path, 10**9, read_only=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    for read_only in (True, False):
        with pytest.raises(StoreError, match="is not a directory"):
            DiskStore(tmp_path / "file", 10**9, read_only=read_only)
