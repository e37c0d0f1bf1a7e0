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
- an entry's last use (diskcache's `access_time`) is the latest use of anything that needs it: a
  use, or a write, of a tag record or manifest is noted for everything it needs too (its manifests,
  an index's platform manifests, their config and layers: `_note_with_needs`), so a layer shared by
  several images stays while any of them is in use. What a manifest needs never changes (it is
  content-addressed): it is kept in memory (`_NeedsCache`), and a hit parses nothing. So eviction
  and expiry need no walk: they take the least recently used entries from an index on last use,
  in short transactions, and their work is proportional to what they remove;
- a store written before last uses were propagated this way (`PRAGMA user_version` below
  `LAST_USE_SCHEMA`) is brought up to date once, when it is first opened for writing;
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
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
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

log = logging.getLogger("regcache")

# `PRAGMA user_version` of a store whose last uses are propagated when noted, with the indexes on
# last use below (0: written by an earlier version, whose eviction propagated them on every run).
LAST_USE_SCHEMA = 1
# On last use: every entry (expiry), and the entries with a file, the only ones eviction removes (an
# inline value, size 0 in diskcache's table, frees no file). Partial, so that tag records and
# manifests kept long after their blobs went are not walked past by every eviction.
LAST_USE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS regcache_last_use ON Cache (access_time)",
    "CREATE INDEX IF NOT EXISTS regcache_file_last_use ON Cache (access_time) WHERE size > 0",
)
# Entries one eviction or expiry transaction looks at: short (about a millisecond with the files'
# removal), so that writers on the request path (tag records, access records, last uses) wait
# little for it, and so that the pause after it (`_pause`) comes soon.
REMOVAL_BATCH = 16
# The helper process `remove_apart` runs (its module; the package root goes on its path, so that
# it runs this very code).
REMOVER = "regcache.store.remover"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Manifests whose needs are kept in memory (a few hundred bytes each: some MB in all).
NEEDS_CACHE_SIZE = 8192
# Keys per `IN (...)` query (SQLite's limit on parameters is 999 in old versions).
QUERY_CHUNK = 500

# An entry as eviction and expiry read it: rowid, key, size, filename (None: inline), last use.
_Row = tuple[int, str, int, str | None, float]
_OLDEST = (float("-inf"), 0)  # the position in the order of last use before every entry
# What eviction and expiry never remove: the digests pinned images need, and the pinned tags' keys.
_Kept = tuple[set[str], set[str]]


def _position(row: _Row) -> tuple[float, int]:
    """Where an entry is in the order of last use: (last use, rowid)."""
    return row[4], row[0]


def _pause(busy: float) -> None:
    """Between two batches of an eviction or expiry (no transaction open), as long as the last
    one took: removal takes at most half of the time from the threads serving requests. Without
    it, these wait for the GIL: a thread that keeps taking it back after each short release (an
    SQLite statement, an unlink) makes the others wait for Python's switch interval, 5 ms, each
    time (measured: request p99 4-5 ms during an eviction, 0.2 ms idle; with the pause 0.3 ms)."""
    time.sleep(busy)


def _manifest_of(raw: object) -> Manifest | None:
    """A stored manifest value (media type, newline, the manifest's bytes) as a Manifest."""
    if not isinstance(raw, bytes):
        return None
    media_type, _, body = raw.partition(b"\n")
    return Manifest(media_type.decode(), body)


def _tag_needs(raw: str) -> tuple[str, ...]:
    """The manifests a stored tag entry's records name."""
    try:
        return tuple(keys.manifest_key(record["digest"]) for record in json.loads(raw).values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return ()


def _needs_of(key: str, raw: object) -> tuple[str, ...]:
    """What the entry `key` with the stored value `raw` refers to (nothing, but for tags and manifests)."""
    if keys.is_kind(key, keys.TAG) and isinstance(raw, str):
        return _tag_needs(raw)
    if keys.is_kind(key, keys.MANIFEST) and (manifest := _manifest_of(raw)) is not None:
        return tuple(manifest_needs(manifest))
    return ()


def _propagated_last_uses(last_use: Mapping[str, float], needs: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """The entries whose last use is earlier than that of something that needs them, with the
    latest such use: what a store written by an earlier version lacks (which computed this on
    every eviction). Pure; over the whole store, once."""
    effective = dict(last_use)
    changed: dict[str, float] = {}
    pending = [key for key in needs if key in effective]
    while pending:  # as deep as the graph (tag → index → platform manifest → blobs), then done
        later = []
        for key in pending:
            for other in needs.get(key, ()):
                if other in effective and effective[other] < effective[key]:
                    effective[other] = changed[other] = effective[key]
                    later.append(other)
        pending = later
    return changed


class _NeedsCache:
    """What manifests need (store keys), for the `capacity` most recently asked: a manifest is
    content-addressed, so what it needs never changes. Absent manifests are not kept (they may be
    stored later). Shared by the worker threads."""

    def __init__(self, capacity: int = NEEDS_CACHE_SIZE) -> None:
        self._needs: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[str, ...] | None:
        with self._lock:
            needed = self._needs.get(key)
            if needed is not None:
                self._needs.move_to_end(key)
            return needed

    def put(self, key: str, needed: tuple[str, ...]) -> None:
        with self._lock:
            self._needs[key] = needed
            self._needs.move_to_end(key)
            if len(self._needs) > self._capacity:
                self._needs.popitem(last=False)


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

    def __init__(
        self, cache_dir: Path, size_limit: int, *, owner: bool = True, read_only: bool = False,
        remove_apart: bool = False,
    ) -> None:
        """`owner`: this process runs the cache: it holds the cache_dir's lock until `close`
        (CacheDirBusy if another process does) and clears `staging/` when it takes the lock
        (a reload in the same process keeps the running fills' files); tools that only look at
        a store another process is using pass False. `read_only`: only read an existing store,
        changing nothing in it, not even SQLite's own files (writes raise StoreError). Close it
        before opening a writable store of the same cache in this process: SQLite shares one
        mapping of the `-shm` file per process. A cache_dir that cannot be used raises StoreError
        naming it. `remove_apart`: `evict` and `expire_unused` do their removing in a helper process
        (remover.py), as the running cache does; else in the calling thread."""
        self.cache_dir = cache_dir
        self.remove_apart = remove_apart
        self.staging_dir = cache_dir / "staging"
        self._owner = owner and not read_only
        self.size_limit = size_limit
        self.uses = UseRecorder()
        self._needs = _NeedsCache()
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
        if self._cache is not None:
            try:
                self._index_last_uses()
            except BaseException:
                self._cache.close()
                self._release_lock()
                raise

    def _release_lock(self) -> None:
        if self._holds_lock:
            self._holds_lock = False
            unlock_cache_dir(self.cache_dir)

    def _index_last_uses(self) -> None:
        """Make sure the indexes on last use exist and last uses are propagated (`LAST_USE_SCHEMA`):
        a store written by an earlier version gets both once, here. A disk with no room for them
        leaves the store as it was (eviction is slower, but right), and the next start tries again."""
        if self._sql("PRAGMA user_version", ()).fetchone()[0] >= LAST_USE_SCHEMA:
            return
        started = time.monotonic()
        if entries := len(self._writer):
            log.info("regcache: the store in %s (%d entries) was written by an earlier version: indexing its last "
                     "uses, once", self.cache_dir, entries)
        try:
            with self._writer.transact():
                if self._sql("PRAGMA user_version", ()).fetchone()[0] >= LAST_USE_SCHEMA:
                    return  # another process did it meanwhile
                for statement in LAST_USE_INDEXES:
                    self._sql(statement, ())
                changed = self._propagate_last_uses()
                self._sql(f"PRAGMA user_version = {LAST_USE_SCHEMA}", ())
        except sqlite3.OperationalError as err:
            if not _write_refused(err):
                raise
            log.warning("regcache: the store in %s keeps its old index: %s (tried again at the next start)",
                        self.cache_dir, err)
            return
        if entries:
            log.info("regcache: the store in %s is indexed; last uses of %d entries propagated once, in %.1f s",
                     self.cache_dir, changed, time.monotonic() - started)

    def _propagate_last_uses(self) -> int:
        """Move each entry's last use forward to the latest of anything that needs it (in the
        caller's transaction), as an earlier version's eviction computed it; how many moved."""
        last_use = dict(self._sql("SELECT key, access_time FROM Cache WHERE raw = 1", ()).fetchall())
        needs: dict[str, tuple[str, ...]] = {}
        rows = self._sql(
            "SELECT key, mode, filename, value FROM Cache WHERE raw = 1 AND (key LIKE ? OR key LIKE ?)",
            (keys.like(keys.TAG), keys.like(keys.MANIFEST)),
        ).fetchall()
        for key, mode, filename, value in rows:
            needs[key] = _needs_of(key, self._fetch(mode, filename, value))
        changed = _propagated_last_uses(last_use, needs)
        for key, when in changed.items():
            self._sql("UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1", (when, key))
        return len(changed)

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
        return None if row is None else self._fetch(row[0], row[1], row[2], read)

    def _fetch(self, mode: int, filename: str | None, value: object, read: bool = False) -> object:
        """The value of a row read from the Cache table (mode, filename, value), or None."""
        try:
            return self._disk.fetch(mode, filename, value, read)
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
        """The manifest; a use of it and of everything it needs (an index's platform manifests,
        their config and layers), so its layers stay while it is in use even when clients that
        have them skip downloading them."""
        key = keys.manifest_key(digest)
        manifest = _manifest_of(self._value(key))
        if manifest is not None:
            self._note_with_needs([key], {key: self._remembered_needs(key, manifest)})
        return manifest

    def has_manifest(self, digest: str) -> bool:
        """Is it stored? (Not read, and not counted as a use.)"""
        return self.has_entry(keys.manifest_key(digest))

    def has_entry(self, key: str) -> bool:
        """Is there an entry under this store key (`blob:…`, `manifest:…`, `tag:…`)? Not a use."""
        return self._has(key)

    def put_manifest(self, digest: str, manifest: Manifest) -> None:
        """Store it (its last use: now); what it needs counts as used now too."""
        verify_digest(digest, manifest.body)
        key = keys.manifest_key(digest)
        self._writer.set(key, manifest.media_type.encode() + b"\n" + manifest.body)
        self._note_with_needs(self._remembered_needs(key, manifest))

    # tags ----------------------------------------------------------------------------------
    def tag_refs(self) -> list[TagRef]:
        rows = self._query("SELECT key FROM Cache WHERE raw = 1 AND key LIKE ?", (keys.like(keys.TAG),)).fetchall()
        return [keys.tag_ref_of(key) for (key,) in rows if isinstance(key, str)]

    # One entry per tag, holding what it resolved to for each set of accepted media types, so a
    # replay can fall back to another client's record of the same tag.
    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]:
        """The tag's records; a use of the tag and of everything its manifests need."""
        key = keys.tag_key(ref)
        records = self._tag_records(key)
        if records:
            self._note_with_needs([key, *_record_needs(records)])
        return records

    def _tag_records(self, key: str) -> dict[str, TagRecord]:
        raw = self._value(key)
        if not isinstance(raw, str):
            return {}
        return {accepted: TagRecord(**fields) for accepted, fields in json.loads(raw).items()}

    def put_tag(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None:
        """Record what the tag resolved to (its last use: now); what its manifests need counts as
        used now too."""
        key = keys.tag_key(ref)
        with self._writer.transact():
            records = capped_records(self._tag_records(key), accept_key(accepted), record)
            self._writer.set(key, json.dumps({k: asdict(v) for k, v in records.items()}))
        self._note_with_needs(_record_needs(records))

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
        """Every manifest and blob a pinned image needs (`needs`: a walker already at hand). Pins
        are few, and what their manifests need is in memory after the first time."""
        pinned = reachable((keys.manifest_key(digest) for digest in self.pins().values()), needs or self.needs)
        return {keys.subject(key) for key in pinned}

    def evict(self, down_to: int | None = None) -> tuple[int, int]:
        """Bring the store under `size_limit` (to 90 % of it, so that not every commit evicts; or
        to `down_to` bytes): least recently used first, pinned content never. Returns (entries,
        bytes) removed. Only entries with a file go (removing an inline one frees no file)."""
        if down_to is None and self.volume() <= self.size_limit:
            return 0, 0
        target = int(self.size_limit * 0.9) if down_to is None else down_to
        if (apart := self._remove_in_helper("evict", target)) is not None:
            return apart
        # Re-read per batch: another process (import, warm) may be evicting or adding meanwhile.
        return self._remove_oldest("size > 0", (), lambda: self.volume() - target)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The writes made inside (by this thread) as one transaction: a bulk load commits once.
        Other writers wait until it ends: keep it short."""
        with self._writer.transact():
            yield

    def volume(self) -> int:
        """Bytes the store takes, as `size_limit` counts them: the index and the files."""
        return self._writer.volume()  # type: ignore[no-any-return]

    def expire_unused(self, max_age: float, now: float | None = None) -> tuple[int, int]:
        """Remove blobs, manifests, tag records and seen entries unused for `max_age` seconds,
        pinned content never. Returns (entries, bytes) removed."""
        cutoff = (time.time() if now is None else now) - max_age
        if self.read_only and not self.unused(max_age, now):
            return 0, 0  # nothing to refuse
        if (apart := self._remove_in_helper("expire", cutoff)) is not None:
            return apart
        return self._remove_oldest("access_time < ?", (cutoff,))

    def _remove_in_helper(self, action: str, limit: float) -> tuple[int, int] | None:
        """With `remove_apart`: an eviction down to `limit` bytes or an expiry of what was last
        used before `limit`, in a helper process; None: do it here (not asked for, a read-only
        store, or the helper failed: it says why, and removing here then fails, or works, as
        it always did — a full disk's store may refuse the helper's opening write).

        Why: in a thread, the removal's Python and its SQLite calls keep taking the GIL from the
        threads and the event loop serving requests, and those pay for each hand-over (request
        p99 during an eviction 2.0-3.1x idle in a thread, 1.3-1.8x with the helper, from 10k to
        1M entries: scripts/bench-store, docs/benchmarks.md)."""
        if not self.remove_apart or self.read_only:
            return None
        self.flush_uses()  # the helper sees only the uses written
        command = [sys.executable, "-m", REMOVER, str(self.cache_dir), action, repr(limit)]
        path = os.pathsep.join(filter(None, (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH"))))
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, check=False
            )
            if done.returncode == 0:
                removed, freed = json.loads(done.stdout)
                return int(removed), int(freed)
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        except (OSError, ValueError) as err:  # could not start; said something else than its answer
            why = str(err)
        log.warning("regcache: the %s helper failed (%s): removing in this process", action, why)
        return None

    def unused(self, max_age: float, now: float | None = None) -> list[tuple[str, int]]:
        """(key, size) of what `expire_unused` would remove (changing nothing: the uses noted and
        not written yet count as `expire_unused` writes them)."""
        cutoff = (time.time() if now is None else now) - max_age
        kept, pending = self._kept(), self.uses.pending()
        found: list[tuple[str, int]] = []
        after = _OLDEST
        while rows := self._oldest("access_time < ?", (cutoff,), after):
            found += [
                (key, size) for _, key, size, _, _ in rows if self._may_go(key, kept) and pending.get(key, 0) < cutoff
            ]
            after = _position(rows[-1])
        return found

    def _remove_oldest(
        self, where: str, args: tuple[object, ...], excess: Callable[[], int] | None = None
    ) -> tuple[int, int]:
        """Remove the entries matching `where`, least recently used first, pinned ones and
        bookkeeping never; with `excess`, only until it says no more bytes need to go. The uses
        noted so far count (they are written first). Each batch is one short transaction, its
        files removed after it, then a pause as long: the work is proportional to what is removed,
        and others write, and serve requests, in between."""
        self.flush_uses()
        kept = self._kept()
        removed = freed = 0
        after = _OLDEST
        while True:
            started = time.monotonic()
            with self._writer.transact():
                left = excess() if excess is not None else None
                rows = self._oldest(where, args, after) if left is None or left > 0 else []
                gone = self._delete(rows, kept, left)
            for _, filename in gone:
                self._remove_file(filename)
            removed, freed = removed + len(gone), freed + sum(size for size, _ in gone)
            if not rows or (left is not None and left <= sum(size for size, _ in gone)):
                return removed, freed
            after = _position(rows[-1])
            _pause(time.monotonic() - started)

    def _remove_file(self, filename: str | None) -> None:
        """Remove an entry's file (its row is gone). Its directory stays, even if empty: diskcache
        puts files in 65,536 directories and creates them again as needed, and pruning them
        (diskcache's `Disk.remove`) doubled the file system work of each entry removed."""
        if filename:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._directory / filename)

    def _oldest(self, where: str, args: tuple[object, ...], after: tuple[float, int]) -> list[_Row]:
        """The next batch of entries matching `where`, least recently used first, after the
        position `after` (last use, rowid): from the index on last use, never a walk of the store."""
        return self._query(
            "SELECT rowid, key, size, filename, access_time FROM Cache "
            f"WHERE raw = 1 AND {where} AND (access_time, rowid) > (?, ?) ORDER BY access_time, rowid LIMIT ?",
            (*args, *after, REMOVAL_BATCH),
        ).fetchall()

    def _delete(self, rows: list[_Row], kept: _Kept, left: int | None) -> list[tuple[int, str | None]]:
        """Delete the rows that may go (in the caller's transaction, one statement), in order,
        until `left` bytes are freed (None: all of them); (size, filename) of each deleted."""
        doomed: list[int] = []
        gone: list[tuple[int, str | None]] = []
        for rowid, key, size, filename, _ in rows:
            if left is not None and left <= 0:
                break
            if self._may_go(key, kept):
                doomed.append(rowid)
                gone.append((size, filename))
                left = None if left is None else left - size
        if doomed:
            self._sql(f"DELETE FROM Cache WHERE rowid IN ({', '.join('?' * len(doomed))})", tuple(doomed))
        return gone

    def _kept(self) -> _Kept:
        """(digests, tag keys) eviction and expiry never remove: pinned images."""
        return self.protected_digests(), {keys.tag_key(ref) for ref in self.pins()}

    @staticmethod
    def _may_go(key: str, kept: _Kept) -> bool:
        protected, pinned_tags = kept
        return key not in keys.BOOKKEEPING_KEYS and key not in pinned_tags and keys.subject(key) not in protected

    def needs(self, key: str) -> list[str]:
        """The entries a tag record or manifest refers to (read without counting as a use).
        Anything else needs nothing and is not read at all (a blob's value is its whole file)."""
        if keys.is_kind(key, keys.MANIFEST):
            return list(self._manifests_needs([key]).get(key, ()))
        if keys.is_kind(key, keys.TAG):
            return list(_needs_of(key, self._value(key)))
        return []

    def _remembered_needs(self, key: str, manifest: Manifest) -> tuple[str, ...]:
        """What a manifest at hand needs: from memory, or parsed once and kept."""
        needed = self._needs.get(key)
        if needed is None:
            needed = tuple(manifest_needs(manifest))
            self._needs.put(key, needed)
        return needed

    def _manifests_needs(self, manifest_keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """What these manifests need, for those stored: from memory, the others read in one query
        (without counting as a use) and kept."""
        found: dict[str, tuple[str, ...]] = {}
        unknown = []
        for key in manifest_keys:
            needed = self._needs.get(key)
            if needed is None:
                unknown.append(key)
            else:
                found[key] = needed
        for start in range(0, len(unknown), QUERY_CHUNK):
            chunk = unknown[start : start + QUERY_CHUNK]
            placeholders = ", ".join("?" * len(chunk))
            rows = self._query(
                f"SELECT key, mode, filename, value FROM Cache WHERE raw = 1 AND key IN ({placeholders})", tuple(chunk)
            ).fetchall()
            for key, mode, filename, value in rows:
                if (manifest := _manifest_of(self._fetch(mode, filename, value))) is not None:
                    found[key] = self._remembered_needs(key, manifest)
        return found

    def _note_with_needs(self, roots: Iterable[str], known: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """Note a use of `roots` and of everything they need, down to the blobs (`known`: what some
        of them need, at hand). Manifests not stored need nothing (their keys are noted all the
        same: a use of a key not stored writes nothing)."""
        found: set[str] = set()
        level = list(roots)
        known = dict(known or {})
        while level:
            fresh = [key for key in dict.fromkeys(level) if key not in found]
            found.update(fresh)
            manifests = [key for key in fresh if keys.is_kind(key, keys.MANIFEST)]
            needs = {**self._manifests_needs(key for key in manifests if key not in known), **known}
            level = [other for key in manifests for other in needs.get(key, ())]
        self.uses.note_all(found)

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


def _record_needs(records: Mapping[str, TagRecord]) -> list[str]:
    """The manifests tag records name."""
    return [keys.manifest_key(record.digest) for record in records.values()]


# DiskStore provides every store protocol (checked by the type checker here, where it is built).
_CHECKED: type[Store] = DiskStore
