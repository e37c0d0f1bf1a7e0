"""`DiskStore`: the `Store` protocols (base.py) on diskcache — one SQLite index, blob and large
manifest bodies as files in `<cache_dir>/store/`. The only module that touches diskcache's internals
(its `Cache` table, read without updating access times, and its `Disk`).

Consistency rules:
- a blob is staged in `<cache_dir>/staging/` while it is fetched and hashed (staging.py), and enters
  the store only through `commit_blob`, which checks size and digest, fsyncs, *renames* the file into
  diskcache's directory (same file system, no copy) and then inserts its row; if the insert fails,
  the moved file is removed again;
- a manifest is stored only when the sha256/sha512 of its exact bytes equals its digest;
- leftovers in `staging/` after a crash are deleted at start-up, so a half-written fill is never
  served;
- reads never write: a read that counts as a use notes it in `uses`, and `record_uses` writes such
  notes in batches (errors.py), so a full disk still serves everything stored;
- diskcache writes its settings whenever it opens a store: where that fails (a full disk, a
  read-only file system) the store is opened read-only, with a connection of its own: reads work,
  writes fail as they would on that disk (`read_only` says why);
- one running cache per cache_dir (lock.py); the running cache makes the store's directories (and
  cache_dir, if it owns it) 0700: private content stays its owner's.

Besides content, the store keeps small bookkeeping entries that are never evicted (keys.py): `pins`
and `usage-counters` (the totals `regcache stats` shows, added to in batches). What regcache knows
about access (grants, tokens, realms) is kept apart, in access.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import diskcache
from diskcache.core import DBNAME, MODE_BINARY

from regcache.oci.digest import verify_digest
from regcache.oci.manifest import Manifest
from regcache.oci.media import accept_key
from regcache.oci.reference import TagRef
from regcache.store import keys
from regcache.store.base import Entry, Store, TagRecord, capped_records
from regcache.store.errors import StoreError, UseRecorder
from regcache.store.lock import lock_cache_dir, unlock_cache_dir
from regcache.store.staging import BlobStaging
from regcache.store.walk import manifest_needs, reachable


def _manifest_of(raw: object) -> Manifest | None:
    """A stored manifest value (media type, newline, the manifest's bytes) as a Manifest."""
    if not isinstance(raw, bytes):
        return None
    media_type, _, body = raw.partition(b"\n")
    return Manifest(media_type.decode(), body)


def require_store(cache_dir: Path) -> Path:
    """The index directory of the existing store in `cache_dir` (StoreError if there is none):
    for the tools that look at a cache, so a mistyped path is an error, not a new empty cache."""
    if not cache_dir.exists():
        raise StoreError(f"cache_dir {cache_dir} does not exist: there is no cache there")
    if not cache_dir.is_dir():
        raise StoreError(f"cache_dir {cache_dir} is not a directory")
    if not (cache_dir / "store" / "cache.db").is_file():
        raise StoreError(f"cache_dir {cache_dir} holds no regcache store (no store/cache.db)")
    return cache_dir / "store"


def require_writable(cache_dir: Path) -> None:
    """Create the store's directories in `cache_dir` if missing, and check that this process can
    write there (StoreError naming cache_dir if not). Up front, because SQLite and diskcache fail
    only at the first write, with errors that do not say where."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise StoreError(f"cache_dir {cache_dir} is not a directory")
    index = cache_dir / "store"
    try:
        for directory in (cache_dir, index, cache_dir / "staging"):
            directory.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()
        if (index / "cache.db").exists():
            os.close(os.open(index / "cache.db", os.O_RDWR))
    except OSError as err:
        raise StoreError(f"cache_dir {cache_dir} is not writable: {err.strerror or err}") from err


def restrict_to_owner(cache_dir: Path) -> None:
    """Cached private manifests and blobs, and the index naming them, readable by the owner only,
    whatever the umask: the store's directories 0700 (StoreError naming cache_dir if that fails),
    and cache_dir itself where this user owns it (a mounted volume may belong to another)."""
    try:
        for directory in (cache_dir / "store", cache_dir / "staging"):
            os.chmod(directory, 0o700)
    except OSError as err:
        raise StoreError(f"cache_dir {cache_dir} cannot be made private to its owner: {err.strerror or err}") from err
    with contextlib.suppress(PermissionError):
        os.chmod(cache_dir, 0o700)


@dataclass
class _StagedFile:
    path: Path
    size: int
    adopted_as: str = ""  # where _AdoptingDisk moved it, so a failed insert can remove it


class _AdoptingDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache ships no type hints
    """diskcache's Disk, plus: a staged, verified blob file is moved in, not copied."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # type: ignore[no-untyped-def]
        if not isinstance(value, _StagedFile):
            return super().store(value, read, key=key)
        filename, full_path = self.filename(key, value)
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        os.rename(value.path, full_path)
        value.adopted_as = full_path
        return value.size, MODE_BINARY, filename, None


# SQLite's extended code for "no room for the WAL index" (`-shm`), which a full disk gives a store
# that no process has open.
SQLITE_IOERR_SHMSIZE = 4874


def _write_refused(err: sqlite3.Error) -> bool:
    """Did SQLite refuse a write because the disk is full or read-only (reading may still work)?"""
    code = getattr(err, "sqlite_errorcode", None) or 0
    return (code & 0xFF) in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY) or code == SQLITE_IOERR_SHMSIZE


class DiskStore:
    """`Store` on diskcache: one SQLite index, blob and large manifest bodies as files."""

    read_only: str

    def __init__(self, cache_dir: Path, size_limit: int, *, owner: bool = True, read_only: bool = False) -> None:
        """`owner`: this process runs the cache: it holds the cache_dir's lock until `close`
        (CacheDirBusy if another process does) and clears `staging/` when it takes the lock
        (a reload in the same process keeps the running fills' files); tools that only look at
        a store another process is using pass False. `read_only`: only read an existing store,
        changing nothing in it, not even SQLite's own files (writes raise StoreError). Close it
        before opening a writable store of the same cache in this process: SQLite shares one
        mapping of the `-shm` file per process. A cache_dir that cannot be used raises StoreError
        naming it."""
        self.cache_dir = cache_dir
        self.staging_dir = cache_dir / "staging"
        self._owner = owner and not read_only
        self.size_limit = size_limit
        self.uses = UseRecorder()
        self.read_only = ""  # why the store is open for reading only ("": it is writable)
        self._directory = cache_dir / "store"
        self._disk = diskcache.Disk(str(self._directory))  # reads values (public Disk API)
        self._readers = threading.local()  # read-only connections, one per thread
        self._cache: diskcache.Cache | None = None
        self._holds_lock = False
        if read_only:
            require_store(cache_dir)
            self.read_only = "opened for reading only"
            self._readers.connection = self._read_only_connection()
            return
        require_writable(cache_dir)
        took_lock = owner and lock_cache_dir(cache_dir)  # False: this process held it already
        self._holds_lock = owner
        try:
            if took_lock:
                shutil.rmtree(self.staging_dir, ignore_errors=True)
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            if owner:
                restrict_to_owner(cache_dir)
            self._cache = diskcache.Cache(
                str(self._directory),
                disk=_AdoptingDisk,
                # diskcache's own culling knows no pins: `evict` does it instead, so diskcache's
                # limit is set out of reach. No eviction policy: with one, every read would write
                # the entry's access time; `record_uses` keeps last uses instead.
                size_limit=2**62,
                eviction_policy="none",
            )
        except sqlite3.OperationalError as err:
            if not _write_refused(err) or not (self._directory / DBNAME).is_file():
                self._release_lock()
                raise
            self.read_only = str(err)
            try:
                self._readers.connection = self._read_only_connection()  # raises if it cannot be read either
            except BaseException:
                self._release_lock()
                raise
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._holds_lock:
            self._holds_lock = False
            unlock_cache_dir(self.cache_dir)

    @property
    def _writer(self) -> diskcache.Cache:
        """diskcache, for writes; a store opened read-only refuses them as its disk did."""
        if self._cache is None:
            raise StoreError(f"the store in {self.cache_dir} is open read-only: {self.read_only}")
        return self._cache

    def _sql(self, statement: str, args: tuple[object, ...]) -> sqlite3.Cursor:
        """A statement on diskcache's own connection (inside its transaction, when one is open):
        the one use of its private `_sql`. diskcache has no public reads that leave access times
        alone, nor a public way to move them; its Cache table is stable in 5.x."""
        return self._writer._sql(statement, args)  # type: ignore[no-any-return]

    def _query(self, statement: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """A read, on diskcache's connection (inside its transaction, when one is open), or on a
        read-only connection of this thread's when the store could be opened only for reading."""
        if self._cache is not None:
            return self._sql(statement, args)
        connection: sqlite3.Connection | None = getattr(self._readers, "connection", None)
        if connection is None:
            connection = self._readers.connection = self._read_only_connection()
        return connection.execute(statement, args)

    def _read_only_connection(self) -> sqlite3.Connection:
        """A connection to the index that writes nothing, not even SQLite's own files.

        With a write-ahead log (`-wal`: kept by a running regcache, and by a stopped one until the
        next opens it), the log is read with a read-only `-shm` index (`readonly_shm`; a plain
        read-only reader would update `-shm`). Without one no process has the store open, and a
        tool reads the database file as it is (`immutable`, which creates no files; also what is
        left when a full disk has no room even for the `-shm` index). regcache itself never reads
        immutably: others may write to the store while it runs."""
        database = self._directory / DBNAME
        uri = database.resolve().as_uri()
        wal = database.with_name(f"{DBNAME}-wal")
        immutable = [] if self._owner else ["immutable=1"]
        if not wal.exists() or not wal.stat().st_size:
            attempts = ["mode=ro", *immutable] if self._owner else immutable
        else:
            shm = database.with_name(f"{DBNAME}-shm")
            attempts = ["mode=ro&readonly_shm=1"] if shm.exists() else []
            attempts.append("mode=ro")  # creates a missing -shm: only if it must
        failure: sqlite3.Error | None = None
        for parameters in attempts:
            try:
                return _connect(f"{uri}?{parameters}")
            except sqlite3.Error as err:
                failure = err
        raise failure or StoreError(f"the store in {self.cache_dir} cannot be read")

    def _value(self, key: str, read: bool = False) -> object:
        """A value, or None; `read`: a file's value as an open file. Never counts as a use."""
        row = self._query("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        if row is None:
            return None
        try:
            return self._disk.fetch(row[0], row[1], row[2], read)
        except OSError:  # its file was removed (evicted by another process) after the row was read
            return None

    def _used(self, key: str, value: object) -> object:
        """`value`, with a use of `key` noted if it was found."""
        if value is not None:
            self.uses.note(key)
        return value

    # blobs ---------------------------------------------------------------------------------
    def open_blob(self, digest: str) -> BinaryIO | None:
        key = keys.blob_key(digest)
        return self._used(key, self._value(key, read=True))  # type: ignore[return-value]

    def blob_path(self, digest: str) -> str | None:
        handle = self.open_blob(digest)
        if handle is None:
            return None
        with handle:
            return str(handle.name)

    def blob_size(self, digest: str) -> int | None:
        handle = self.open_blob(digest)
        if handle is None:
            return None
        with handle:
            return os.fstat(handle.fileno()).st_size

    def has_blob(self, digest: str) -> bool:
        """Is it stored? (No file is opened and it does not count as a use.)"""
        return self._has(keys.blob_key(digest))

    def _has(self, key: str) -> bool:
        return self._query("SELECT 1 FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone() is not None

    def stage_blob(self, digest: str) -> BlobStaging:
        return BlobStaging(self.staging_dir, digest)

    def commit_blob(self, staging: BlobStaging, expected_size: int | None) -> None:
        """Verify, then move the staged file into the store. On any failure nothing is stored."""
        staged = _StagedFile(staging.path, staging.size)
        try:
            staging.verify(expected_size)
            self._writer.set(keys.blob_key(staging.digest), staged)
        except BaseException:
            # diskcache moves the file in before its transaction; if the insert fails, the file
            # would stay behind with no row pointing at it.
            if staged.adopted_as:
                Path(staged.adopted_as).unlink(missing_ok=True)
            raise
        finally:
            staging.discard()  # no-op after a successful move

    # manifests -----------------------------------------------------------------------------
    def get_manifest(self, digest: str) -> Manifest | None:
        key = keys.manifest_key(digest)
        return _manifest_of(self._used(key, self._value(key)))

    def has_manifest(self, digest: str) -> bool:
        """Is it stored? (Not read, and not counted as a use.)"""
        return self.has_entry(keys.manifest_key(digest))

    def has_entry(self, key: str) -> bool:
        """Is there an entry under this store key (`blob:…`, `manifest:…`, `tag:…`)? Not a use."""
        return self._has(key)

    def put_manifest(self, digest: str, manifest: Manifest) -> None:
        verify_digest(digest, manifest.body)
        self._writer.set(keys.manifest_key(digest), manifest.media_type.encode() + b"\n" + manifest.body)

    # tags ----------------------------------------------------------------------------------
    def tag_refs(self) -> list[TagRef]:
        rows = self._query("SELECT key FROM Cache WHERE raw = 1 AND key LIKE ?", (keys.like(keys.TAG),)).fetchall()
        return [keys.tag_ref_of(key) for (key,) in rows if isinstance(key, str)]

    # One entry per tag, holding what it resolved to for each set of accepted media types, so a
    # replay can fall back to another client's record of the same tag.
    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]:
        key = keys.tag_key(ref)
        raw = self._used(key, self._value(key))
        if not isinstance(raw, str):
            return {}
        return {accepted: TagRecord(**fields) for accepted, fields in json.loads(raw).items()}

    def put_tag(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None:
        with self._writer.transact():
            records = capped_records(self.tag_records(ref), accept_key(accepted), record)
            self._writer.set(keys.tag_key(ref), json.dumps({k: asdict(v) for k, v in records.items()}))

    # which repository holds which digest (for access checks) ------------------------------
    def mark_seen(self, repository: str, digests: list[str]) -> None:
        with self._writer.transact():
            for digest in digests:
                self._writer.set(keys.seen_key(repository, digest), 1)

    def is_seen(self, repository: str, digest: str) -> bool:
        key = keys.seen_key(repository, digest)
        return self._used(key, self._has(key) or None) is not None

    # pins and eviction ---------------------------------------------------------------------
    def pins(self) -> dict[str, str]:
        """Pinned image references → the digest pinned."""
        raw = self._value(keys.PINS)
        return dict(json.loads(raw)) if isinstance(raw, str) else {}

    def pin(self, ref: TagRef, digest: str) -> None:
        with self._writer.transact():
            self._writer.set(keys.PINS, json.dumps({**self.pins(), str(ref): digest}, sort_keys=True))

    def unpin(self, ref: TagRef) -> bool:
        with self._writer.transact():
            pins = self.pins()
            found = pins.pop(str(ref), None) is not None
            if found:
                self._writer.set(keys.PINS, json.dumps(pins, sort_keys=True))
        return found

    def protected_digests(self, needs: Callable[[str], list[str]] | None = None) -> set[str]:
        """Every manifest and blob a pinned image needs (`needs`: a walker already at hand)."""
        pinned = reachable((keys.manifest_key(digest) for digest in self.pins().values()), needs or self.needs)
        return {keys.subject(key) for key in pinned}

    def evict(self) -> tuple[int, int]:
        """Bring the store under `size_limit` (to 90 % of it, so that not every commit evicts):
        least recently used first, pinned content never. Returns (entries, bytes) removed."""
        if self._writer.volume() <= self.size_limit:
            return 0, 0
        target = int(self.size_limit * 0.9)
        removed = freed = 0
        for key, size, _ in sorted(self._evictable(), key=lambda entry: entry[2]):
            # Re-read: another process (import, warm) may be evicting or adding at the same time.
            if self._writer.volume() <= target:
                break
            if size and self._writer.delete(key):
                removed, freed = removed + 1, freed + size
        return removed, freed

    def expire_unused(self, max_age: float, now: float | None = None) -> tuple[int, int]:
        """Remove blobs, manifests and tag records unused for `max_age` seconds, pinned content
        never. Returns (entries, bytes) removed."""
        removed = freed = 0
        for key, size in self.unused(max_age, now):
            if self._writer.delete(key):
                removed, freed = removed + 1, freed + size
        return removed, freed

    def unused(self, max_age: float, now: float | None = None) -> list[tuple[str, int]]:
        """(key, size) of what `expire_unused` would remove."""
        cutoff = (time.time() if now is None else now) - max_age
        return [(key, size) for key, size, last_use in self._evictable() if last_use < cutoff]

    def _evictable(self) -> list[tuple[str, int, float]]:
        """(key, size, last use) of every entry that may go. An entry's last use is the latest
        use of anything that needs it: a tag record's use counts for its manifests, a manifest's
        for its platform manifests and blobs. So a layer shared by several repositories stays
        while any of them is in use, even when clients that already have it skip downloading it.
        """
        rows = self._query("SELECT key, size, access_time FROM Cache WHERE raw = 1").fetchall()
        sizes = {key: size for key, size, _ in rows if isinstance(key, str)}
        last_use = {key: access for key, _, access in rows if isinstance(key, str)}
        for key, when in self.uses.pending().items():  # noted, not written yet
            if key in last_use and when > last_use[key]:
                last_use[key] = when
        needs = {key: self.needs(key) for key in sizes if keys.is_kind(key, keys.TAG, keys.MANIFEST)}
        for _ in range(3):  # tag → index → platform manifest → blobs
            for key, needed in needs.items():
                for other in needed:
                    if other in last_use and last_use[other] < last_use[key]:
                        last_use[other] = last_use[key]
        protected = self.protected_digests(lambda key: needs.get(key, []))
        pinned_tags = {keys.tag_key(ref) for ref in self.pins()}
        return [
            (key, sizes[key], last_use[key])
            for key in sizes
            if key not in keys.BOOKKEEPING_KEYS and key not in pinned_tags and keys.subject(key) not in protected
        ]

    def needs(self, key: str) -> list[str]:
        """The entries a tag record or manifest refers to (read without counting as a use).
        Anything else needs nothing and is not read at all (a blob's value is its whole file)."""
        try:
            if keys.is_kind(key, keys.TAG) and isinstance(raw := self._value(key), str):
                return [keys.manifest_key(record["digest"]) for record in json.loads(raw).values()]
            if keys.is_kind(key, keys.MANIFEST) and (manifest := _manifest_of(self._value(key))) is not None:
                return manifest_needs(manifest)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return []

    # last uses -----------------------------------------------------------------------------
    def record_uses(self, uses: Mapping[str, float]) -> None:
        """The one place last uses are written: each entry's last use (its access time) moves
        forward to the use noted, never back (another process may have recorded a later one)."""
        with self._writer.transact():
            for key, when in uses.items():
                self._sql("UPDATE Cache SET access_time = max(access_time, ?) WHERE key = ? AND raw = 1", (when, key))

    def flush_uses(self) -> None:
        """Write the uses noted since the last flush (blocking); a batch the store refuses is
        dropped with one warning (writes.py)."""
        self.uses.flush(self.record_uses)

    # usage counters ------------------------------------------------------------------------
    # One entry of running totals (name → count). The proxy adds its deltas every few seconds,
    # never once per request.
    def add_counters(self, deltas: Mapping[str, int]) -> None:
        with self._writer.transact():
            totals = self.counters()
            for name, delta in deltas.items():
                totals[name] = totals.get(name, 0) + delta
            self._writer.set(keys.USAGE_COUNTERS, json.dumps(totals, sort_keys=True))

    def counters(self) -> dict[str, int]:
        raw = self._value(keys.USAGE_COUNTERS)
        return dict(json.loads(raw)) if isinstance(raw, str) else {}

    # size and contents, read without counting as a use ---------------------------------------
    # Inline values (small manifests, tag records) have size 0 in diskcache's table: count their length.
    _ENTRY_SIZE = "CASE WHEN filename IS NULL THEN coalesce(length(value), 0) ELSE size END"

    def entry_totals(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) per entry type (`ENTRY_TYPES`, plus `other`), from one aggregate query."""
        kind = "substr(key, 1, instr(key, ':') - 1)"
        rows = self._query(
            f"SELECT {kind}, count(*), sum({self._ENTRY_SIZE}) FROM Cache WHERE raw = 1 GROUP BY {kind}"
        ).fetchall()
        totals = dict.fromkeys((*keys.ENTRY_TYPES, "other"), (0, 0))
        for prefix, count, size in rows:
            entry_type = prefix if prefix in keys.ENTRY_TYPES else "other"
            before = totals[entry_type]
            totals[entry_type] = (before[0] + count, before[1] + (size or 0))
        return totals

    def entries(self) -> dict[str, Entry]:
        """Every blob, manifest and tag record: key → size and last use."""
        rows = self._query(
            f"SELECT key, {self._ENTRY_SIZE}, access_time FROM Cache WHERE raw = 1 "
            "AND (key LIKE ? OR key LIKE ? OR key LIKE ?)",
            tuple(keys.like(kind) for kind in (keys.BLOB, keys.MANIFEST, keys.TAG)),
        ).fetchall()
        return {key: Entry(size, access) for key, size, access in rows}

    def peek_manifest(self, digest: str) -> Manifest | None:
        return _manifest_of(self._value(keys.manifest_key(digest)))

    def blob_file(self, digest: str) -> Path | None:
        """Where a stored blob's bytes are (the file itself may be gone from a damaged store)."""
        row = self._query("SELECT filename FROM Cache WHERE key = ? AND raw = 1", (keys.blob_key(digest),)).fetchone()
        return self._directory / row[0] if row and row[0] else None

    def seen_pairs(self) -> list[tuple[str, str]]:
        """(repository, digest) of every object known to belong to a repository (access checks)."""
        rows = self._query("SELECT key FROM Cache WHERE raw = 1 AND key LIKE ?", (keys.like(keys.SEEN),)).fetchall()
        return [pair for (key,) in rows if (pair := keys.seen_pair(key)) is not None]

    def remove(self, entry_keys: Iterable[str]) -> tuple[int, int]:
        """Delete these entries (bookkeeping entries never); (entries, bytes) removed."""
        removed = freed = 0
        for key in entry_keys:
            row = self._query(f"SELECT {self._ENTRY_SIZE} FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
            if key not in keys.BOOKKEEPING_KEYS and row is not None and self._writer.delete(key):
                removed, freed = removed + 1, freed + row[0]
        return removed, freed

    def free_space(self) -> int:
        """Bytes free on the cache directory's file system."""
        return shutil.disk_usage(self.cache_dir).free

    def close(self) -> None:
        """Write the uses not written yet (best effort), then let go of the index."""
        self.flush_uses()
        if self._cache is not None:
            self._cache.close()
        connection = getattr(self._readers, "connection", None)
        if connection is not None:
            connection.close()
            self._readers.connection = None
        self._release_lock()


def _connect(uri: str) -> sqlite3.Connection:
    """A connection that has read the index once: SQLite opens lazily, and a store that cannot be
    read should say so here."""
    connection = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
    try:
        connection.execute("SELECT 1 FROM Cache LIMIT 1")
    except sqlite3.Error:
        connection.close()
        raise
    return connection


# DiskStore provides every store protocol (checked by the type checker here, where it is built).
_CHECKED: type[Store] = DiskStore
