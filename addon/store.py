"""The content-addressed store: blobs, manifests and tag records.

`Store` is the interface the rest of regcache uses; `DiskStore` is the embedded implementation on
diskcache. A shared backend for several nodes can implement the same interface later.

Every call here blocks (SQLite, file I/O): callers on the event loop use `asyncio.to_thread`.

Consistency rules:
- a blob is staged in `<cache_dir>/staging/` while it is fetched and hashed, and enters the store
  only through `commit`, which checks size and digest, fsyncs, *renames* the file into diskcache's
  directory (same file system, no copy) and then inserts its row; if the insert fails, the moved
  file is removed again;
- a manifest is stored only when the sha256/sha512 of its exact bytes equals its digest;
- leftovers in `staging/` after a crash are deleted at start-up, so a half-written fill is never
  served;
- reads never write: a read that counts as a use (a blob or manifest served, a tag record or an
  access record looked up) notes it in `uses`, and `record_uses` writes such notes in batches
  (see writes.py), so a full disk still serves everything stored;
- diskcache writes its settings whenever it opens a store: where that fails (a full disk, a
  read-only file system) the store is opened read-only, with a connection of its own: reads work,
  writes fail as they would on that disk (`read_only` says why).
- one running cache per cache_dir: the process that runs it holds an exclusive `flock` on
  `<cache_dir>/regcache.lock` (which names its PID), so a second one can neither clear the first's
  `staging/` nor fill beside it. Admin tools open the store without it. The running cache makes
  the store's directories (and cache_dir, if it owns it) 0700: private content stays its owner's.

Besides content, the store keeps small bookkeeping entries that are never evicted: `pins` and
`usage-counters` (the totals `regcache stats` shows, added to in batches). What regcache knows about
access (grants, tokens, realms) is kept apart, in access_records.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
from typing import BinaryIO, Protocol

import diskcache
from diskcache.core import DBNAME, MODE_BINARY

from .writes import StoreError, UseRecorder


class DigestMismatch(ValueError):
    """Content whose bytes do not hash to the digest they were fetched under."""


@dataclass(frozen=True)
class Manifest:
    media_type: str
    body: bytes


@dataclass(frozen=True)
class TagRecord:
    """What a tag resolved to for one set of accepted media types, and when we last saw it."""

    digest: str
    media_type: str
    size: int
    recorded_at: float


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def verify_digest(digest: str, data: bytes) -> None:
    algorithm = digest.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512") or digest_of(data, algorithm) != digest:
        raise DigestMismatch(f"content does not match {digest}")


@dataclass(frozen=True)
class TagRef:
    """A tag in one registry's cache namespace, e.g. docker.io / library/alpine / 3.20."""

    namespace: str
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.tag}"


def tag_ref_of(key: str) -> TagRef:
    """The tag of a `tag:<namespace>/<name>:<tag>` store key."""
    namespace, _, rest = key.removeprefix("tag:").partition("/")
    name, _, tag = rest.rpartition(":")
    return TagRef(namespace, name, tag)


def accept_key(accepted: tuple[str, ...]) -> str:
    """Tags resolve per registry, repository, tag *and* accepted media types."""
    return ",".join(accepted)


# Records per tag: one per distinct Accept list clients send (a handful of known media types, see
# routes.accepted_media_types); every request for the tag reads and rewrites them all.
MAX_TAG_RECORDS = 8


def capped_records(records: dict[str, TagRecord], key: str, record: TagRecord) -> dict[str, TagRecord]:
    """`records` with `record` put under `key`, and only the `MAX_TAG_RECORDS` most recently
    recorded of them (the new one always among them: revalidation rewrites a record in use)."""
    others = sorted((item for item in records.items() if item[0] != key), key=lambda item: item[1].recorded_at)
    return dict([*others[-(MAX_TAG_RECORDS - 1) :], (key, record)])


# What a manifest may reference, by its declared media type: an index its platform manifests, an
# image manifest its config and layers. Nothing else in a document counts (unknown members,
# `subject`, annotations): a registry checks only these against what the repository holds.
INDEX_MEDIA_TYPES = frozenset(
    {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
)
IMAGE_MEDIA_TYPES = frozenset(
    {"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
)


def manifest_references(manifest: Manifest) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(child manifest descriptors, blob descriptors) of an index or an image manifest, read by
    its media type only (anything else references nothing). Raises ValueError when the body is
    not a JSON object."""
    document = json.loads(manifest.body)
    if not isinstance(document, dict):
        raise ValueError("manifest is not a JSON object")
    media_type = manifest.media_type.split(";", 1)[0].strip().lower()
    if media_type in INDEX_MEDIA_TYPES:
        return _descriptors(document.get("manifests")), []
    if media_type not in IMAGE_MEDIA_TYPES:
        return [], []
    config = document.get("config")
    return [], ([config] if isinstance(config, dict) else []) + _descriptors(document.get("layers"))


def _descriptors(value: object) -> list[dict[str, object]]:
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []


def referenced_digests(manifest: Manifest) -> list[str]:
    """The digests a manifest of a repository vouches for in that repository (platform manifests,
    config, layers); [] if unparsable. Foreign layers (descriptors with `urls`) are left out: a
    registry does not check that the repository holds them."""
    try:
        child_manifests, blobs = manifest_references(manifest)
    except ValueError:
        return []
    return [
        d["digest"] for d in child_manifests + blobs if isinstance(d.get("digest"), str) and "urls" not in d
    ]


def _manifest_of(raw: object) -> Manifest | None:
    """A stored manifest value (media type, newline, the manifest's bytes) as a Manifest."""
    if not isinstance(raw, bytes):
        return None
    media_type, _, body = raw.partition(b"\n")
    return Manifest(media_type.decode(), body)


def lacking(root: str, needs: Callable[[str], list[str]], present: Callable[[str], bool]) -> list[str]:
    """The store keys an image lacks, from its manifest `root` (`manifest:<digest>`) down: that
    manifest; an image manifest's blobs; for an index, what its platform manifests that are stored
    lack, or all of them when none is (a platform nobody pulled is not missing while another is
    there)."""
    if not present(root):
        return [root]
    needed = needs(root)
    platforms = [key for key in needed if key.startswith("manifest:")]
    held = [key for key in platforms if present(key)]
    missing = [key for key in needed if key.startswith("blob:") and not present(key)]
    if platforms and not held:
        return missing + platforms
    for platform in held:
        missing += lacking(platform, needs, present)
    return missing


def reachable(roots: Iterable[str], needs: Callable[[str], list[str]]) -> set[str]:
    """Every store key reachable from `roots` (tag records, manifests) through `needs`: a tag
    record needs its manifests, an index its platform manifests, an image manifest its blobs."""
    found: set[str] = set()
    pending = list(roots)
    while pending:
        key = pending.pop()
        if key not in found:
            found.add(key)
            pending += needs(key)
    return found


# The entry kinds in the store, by key prefix (`blob:<digest>`, `tag:<ref>`, ...).
ENTRY_TYPES = ("blob", "manifest", "tag", "seen")
# Bookkeeping entries: never evicted, expired or purged (`realm-hosts`: stores written before the
# access records had them).
BOOKKEEPING_KEYS = ("pins", "realm-hosts", "usage-counters")


@dataclass(frozen=True)
class Entry:
    """A store entry as the admin tools see it: its size in bytes and its last use (epoch seconds)."""

    size: int
    last_use: float


class BlobStaging:
    """A blob being fetched: appended to a temp file and hashed as it arrives.

    Once the file refuses a write (disk full, I/O error), the rest is only hashed: such a staging
    can still be checked (for clients it is relayed to), never committed."""

    def __init__(self, directory: Path, digest: str) -> None:
        self.digest = digest
        self._hash = hashlib.new(digest.split(":", 1)[0])
        fd, name = tempfile.mkstemp(dir=directory, prefix="fill-")
        self.path = Path(name)
        # Unbuffered: a chunk is in the file (for readers with their own descriptors) once `write`
        # returns, and a refused write leaves nothing buffered for `close` to fail on again.
        self._file = os.fdopen(fd, "wb", buffering=0)
        self.size = 0  # bytes taken and hashed
        self.on_disk = 0  # how many of them are in the file
        self.spilled = False  # the file refused a write: it holds only the first `on_disk` bytes

    def write(self, chunk: bytes) -> None:
        """Hash `chunk` and append it to the file. The first write the file refuses raises its
        OSError, with the chunk hashed all the same; later chunks are only hashed."""
        self._hash.update(chunk)
        self.size += len(chunk)
        if self.spilled:
            return
        try:
            view = memoryview(chunk)
            while view:
                view = view[self._file.write(view) :]
        except OSError:
            self.spilled = True
            raise
        self.on_disk = self.size

    def flush(self) -> None:
        self._file.flush()

    def check(self, expected_size: int | None) -> None:
        """Are the bytes written so far the whole blob (size and digest)? No I/O."""
        if expected_size is not None and self.size != expected_size:
            raise DigestMismatch(f"{self.digest}: got {self.size} bytes, expected {expected_size}")
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self.digest:
            raise DigestMismatch(f"{self.digest}: bytes hash to {actual}")

    def verify(self, expected_size: int | None) -> None:
        """`check`, then the file on disk before the index says it is there."""
        self.check(expected_size)
        if self.spilled:
            raise OSError(f"{self.digest}: the staging file lacks the bytes the disk refused")
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Store(Protocol):
    staging_dir: Path  # fills and imports in progress

    def has_blob(self, digest: str) -> bool: ...
    def blob_size(self, digest: str) -> int | None: ...
    def blob_path(self, digest: str) -> str | None: ...
    def open_blob(self, digest: str) -> BinaryIO | None: ...
    def stage_blob(self, digest: str) -> BlobStaging: ...
    def commit_blob(self, staging: BlobStaging, expected_size: int | None) -> None: ...
    def get_manifest(self, digest: str) -> Manifest | None: ...
    def has_manifest(self, digest: str) -> bool: ...
    def has_entry(self, key: str) -> bool: ...
    def put_manifest(self, digest: str, manifest: Manifest) -> None: ...
    def tag_refs(self) -> list[TagRef]: ...
    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]: ...
    def put_tag(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None: ...
    def mark_seen(self, repository: str, digests: list[str]) -> None: ...
    def is_seen(self, repository: str, digest: str) -> bool: ...
    def pins(self) -> dict[str, str]: ...
    def pin(self, ref: TagRef, digest: str) -> None: ...
    def unpin(self, ref: TagRef) -> bool: ...
    def evict(self) -> tuple[int, int]: ...
    def expire_unused(self, max_age: float, now: float | None = None) -> tuple[int, int]: ...
    def unused(self, max_age: float, now: float | None = None) -> list[tuple[str, int]]: ...
    # last uses: noted by reads, written in batches
    def record_uses(self, uses: Mapping[str, float]) -> None: ...
    def flush_uses(self) -> None: ...
    # usage counters and size, for metrics and `regcache stats`
    def add_counters(self, deltas: Mapping[str, int]) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def entry_totals(self) -> dict[str, tuple[int, int]]: ...
    # what the admin tools (`regcache ls/purge/verify/gc`) walk and remove; none of it counts as a use
    def entries(self) -> dict[str, Entry]: ...
    def needs(self, key: str) -> list[str]: ...
    def peek_manifest(self, digest: str) -> Manifest | None: ...
    def blob_file(self, digest: str) -> Path | None: ...
    def seen_pairs(self) -> list[tuple[str, str]]: ...
    def remove(self, keys: Iterable[str]) -> tuple[int, int]: ...
    def close(self) -> None: ...


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


class _AdoptingDisk(diskcache.Disk):
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


class CacheDirBusy(OSError):
    """Another process runs a cache on this cache_dir."""


LOCK_FILE = "regcache.lock"
_held_locks: dict[Path, tuple[int, int]] = {}  # this process's cache_dir locks: dir → (fd, users)


def lock_cache_dir(cache_dir: Path) -> bool:
    """Hold `cache_dir` for this process (an exclusive flock on its lock file, which names our
    PID); True if this call took it, False if this process held it already. Raises CacheDirBusy
    naming the PID of the process that holds it."""
    key = cache_dir.resolve()
    if key in _held_locks:
        fd, users = _held_locks[key]
        _held_locks[key] = (fd, users + 1)
        return False
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        message = f"in use by another regcache (pid {holder}); stop it, or give this one another cache_dir"
        raise CacheDirBusy(message) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = (fd, 1)
    return True


def unlock_cache_dir(cache_dir: Path) -> None:
    key = cache_dir.resolve()
    fd, users = _held_locks.pop(key)
    if users > 1:
        _held_locks[key] = (fd, users - 1)
    else:
        os.close(fd)  # releases the flock


class DiskStore:
    """`Store` on diskcache: one SQLite index, blob and large manifest bodies as files."""

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

    def _query(self, statement: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """A read, on diskcache's connection (inside its transaction, when one is open), or on a
        read-only connection of this thread's when the store could be opened only for reading.
        diskcache has no public reads that leave access times alone; its Cache table is stable in 5.x."""
        if self._cache is not None:
            return self._cache._sql(statement, args)  # type: ignore[no-any-return]
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
        key = f"blob:{digest}"
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
        return self._has(f"blob:{digest}")

    def _has(self, key: str) -> bool:
        return self._query("SELECT 1 FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone() is not None

    def stage_blob(self, digest: str) -> BlobStaging:
        return BlobStaging(self.staging_dir, digest)

    def commit_blob(self, staging: BlobStaging, expected_size: int | None) -> None:
        """Verify, then move the staged file into the store. On any failure nothing is stored."""
        staged = _StagedFile(staging.path, staging.size)
        try:
            staging.verify(expected_size)
            self._writer.set(f"blob:{staging.digest}", staged)
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
        key = f"manifest:{digest}"
        return _manifest_of(self._used(key, self._value(key)))

    def has_manifest(self, digest: str) -> bool:
        """Is it stored? (Not read, and not counted as a use.)"""
        return self.has_entry(f"manifest:{digest}")

    def has_entry(self, key: str) -> bool:
        """Is there an entry under this store key (`blob:…`, `manifest:…`, `tag:…`)? Not a use."""
        return self._has(key)

    def put_manifest(self, digest: str, manifest: Manifest) -> None:
        verify_digest(digest, manifest.body)
        self._writer.set(f"manifest:{digest}", manifest.media_type.encode() + b"\n" + manifest.body)

    # tags ----------------------------------------------------------------------------------
    def tag_refs(self) -> list[TagRef]:
        rows = self._query("SELECT key FROM Cache WHERE raw = 1 AND key LIKE 'tag:%'").fetchall()
        return [tag_ref_of(key) for (key,) in rows if isinstance(key, str)]

    # One entry per tag, holding what it resolved to for each set of accepted media types, so a
    # replay can fall back to another client's record of the same tag.
    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]:
        key = f"tag:{ref}"
        raw = self._used(key, self._value(key))
        if not isinstance(raw, str):
            return {}
        return {accepted: TagRecord(**fields) for accepted, fields in json.loads(raw).items()}

    def put_tag(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None:
        with self._writer.transact():
            records = capped_records(self.tag_records(ref), accept_key(accepted), record)
            self._writer.set(f"tag:{ref}", json.dumps({k: asdict(v) for k, v in records.items()}))

    # which repository holds which digest (for access checks) ------------------------------
    def mark_seen(self, repository: str, digests: list[str]) -> None:
        with self._writer.transact():
            for digest in digests:
                self._writer.set(f"seen:{repository}@{digest}", 1)

    def is_seen(self, repository: str, digest: str) -> bool:
        key = f"seen:{repository}@{digest}"
        return self._used(key, self._has(key) or None) is not None

    # pins and eviction ---------------------------------------------------------------------
    def pins(self) -> dict[str, str]:
        """Pinned image references → the digest pinned."""
        raw = self._value("pins")
        return dict(json.loads(raw)) if isinstance(raw, str) else {}

    def pin(self, ref: TagRef, digest: str) -> None:
        with self._writer.transact():
            self._writer.set("pins", json.dumps({**self.pins(), str(ref): digest}, sort_keys=True))

    def unpin(self, ref: TagRef) -> bool:
        with self._writer.transact():
            pins = self.pins()
            found = pins.pop(str(ref), None) is not None
            if found:
                self._writer.set("pins", json.dumps(pins, sort_keys=True))
        return found

    def protected_digests(self, needs: Callable[[str], list[str]] | None = None) -> set[str]:
        """Every manifest and blob a pinned image needs (`needs`: a walker already at hand)."""
        pinned = reachable((f"manifest:{digest}" for digest in self.pins().values()), needs or self.needs)
        return {key.partition(":")[2] for key in pinned}

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
        needs = {key: self.needs(key) for key in sizes if key.startswith(("tag:", "manifest:"))}
        for _ in range(3):  # tag → index → platform manifest → blobs
            for key, needed in needs.items():
                for other in needed:
                    if other in last_use and last_use[other] < last_use[key]:
                        last_use[other] = last_use[key]
        protected = self.protected_digests(lambda key: needs.get(key, []))
        pinned_tags = {f"tag:{ref}" for ref in self.pins()}
        return [
            (key, sizes[key], last_use[key])
            for key in sizes
            if key not in BOOKKEEPING_KEYS and key not in pinned_tags and key.partition(":")[2] not in protected
        ]

    def needs(self, key: str) -> list[str]:
        """The entries a tag record or manifest refers to (read without counting as a use).
        Anything else needs nothing and is not read at all (a blob's value is its whole file)."""
        try:
            if key.startswith("tag:") and isinstance(raw := self._value(key), str):
                return [f"manifest:{record['digest']}" for record in json.loads(raw).values()]
            if key.startswith("manifest:") and (manifest := _manifest_of(self._value(key))) is not None:
                child_manifests, blobs = manifest_references(manifest)
                return [f"manifest:{d.get('digest')}" for d in child_manifests] + [
                    f"blob:{d.get('digest')}" for d in blobs
                ]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return []

    # last uses -----------------------------------------------------------------------------
    def record_uses(self, uses: Mapping[str, float]) -> None:
        """The one place last uses are written: each entry's last use (its access time) moves
        forward to the use noted, never back (another process may have recorded a later one)."""
        with self._writer.transact():
            for key, when in uses.items():
                self._writer._sql(
                    "UPDATE Cache SET access_time = max(access_time, ?) WHERE key = ? AND raw = 1", (when, key)
                )

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
            self._writer.set("usage-counters", json.dumps(totals, sort_keys=True))

    def counters(self) -> dict[str, int]:
        raw = self._value("usage-counters")
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
        totals = dict.fromkeys((*ENTRY_TYPES, "other"), (0, 0))
        for prefix, count, size in rows:
            entry_type = prefix if prefix in ENTRY_TYPES else "other"
            before = totals[entry_type]
            totals[entry_type] = (before[0] + count, before[1] + (size or 0))
        return totals

    def entries(self) -> dict[str, Entry]:
        """Every blob, manifest and tag record: key → size and last use."""
        rows = self._query(
            f"SELECT key, {self._ENTRY_SIZE}, access_time FROM Cache WHERE raw = 1 "
            "AND (key LIKE 'blob:%' OR key LIKE 'manifest:%' OR key LIKE 'tag:%')"
        ).fetchall()
        return {key: Entry(size, access) for key, size, access in rows}

    def peek_manifest(self, digest: str) -> Manifest | None:
        return _manifest_of(self._value(f"manifest:{digest}"))

    def blob_file(self, digest: str) -> Path | None:
        """Where a stored blob's bytes are (the file itself may be gone from a damaged store)."""
        row = self._query("SELECT filename FROM Cache WHERE key = ? AND raw = 1", (f"blob:{digest}",)).fetchone()
        return self._directory / row[0] if row and row[0] else None

    def seen_pairs(self) -> list[tuple[str, str]]:
        """(repository, digest) of every object known to belong to a repository (access checks)."""
        rows = self._query("SELECT key FROM Cache WHERE raw = 1 AND key LIKE 'seen:%'").fetchall()
        return [(key[5:].rpartition("@")[0], key.rpartition("@")[2]) for (key,) in rows if "@" in key]

    def remove(self, keys: Iterable[str]) -> tuple[int, int]:
        """Delete these entries (bookkeeping entries never); (entries, bytes) removed."""
        removed = freed = 0
        for key in keys:
            row = self._query(f"SELECT {self._ENTRY_SIZE} FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
            if key not in BOOKKEEPING_KEYS and row is not None and self._writer.delete(key):
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


def new_tag_record(manifest: Manifest, digest: str) -> TagRecord:
    return TagRecord(digest, manifest.media_type, len(manifest.body), time.time())
