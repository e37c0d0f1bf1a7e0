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
  served.

Besides content, the store keeps small bookkeeping entries that are never evicted: `pins` and
`usage-counters` (the totals `regcache stats` shows, added to in batches). What regcache knows about
access (grants, tokens, realms) is kept apart, in access_records.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import diskcache
from diskcache.core import MODE_BINARY


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


def manifest_references(manifest: Manifest) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(child manifest descriptors, blob descriptors) of an index or an image manifest.
    Raises ValueError when the body is not a JSON object."""
    document = json.loads(manifest.body)
    if not isinstance(document, dict):
        raise ValueError("manifest is not a JSON object")
    if "manifests" in document:
        return [d for d in document.get("manifests") or [] if isinstance(d, dict)], []
    blobs = [document["config"]] if isinstance(document.get("config"), dict) else []
    return [], blobs + [d for d in document.get("layers") or [] if isinstance(d, dict)]


def referenced_digests(manifest: Manifest) -> list[str]:
    """Every digest a manifest refers to (platform manifests, config, layers); [] if unparsable."""
    try:
        child_manifests, blobs = manifest_references(manifest)
    except ValueError:
        return []
    return [d["digest"] for d in child_manifests + blobs if isinstance(d.get("digest"), str)]


def _manifest_of(raw: object) -> Manifest | None:
    """A stored manifest value (media type, newline, the manifest's bytes) as a Manifest."""
    if not isinstance(raw, bytes):
        return None
    media_type, _, body = raw.partition(b"\n")
    return Manifest(media_type.decode(), body)


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
    """A blob being fetched: appended to a temp file and hashed as it arrives."""

    def __init__(self, directory: Path, digest: str) -> None:
        self.digest = digest
        self._hash = hashlib.new(digest.split(":", 1)[0])
        fd, name = tempfile.mkstemp(dir=directory, prefix="fill-")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

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


class DiskStore:
    """`Store` on diskcache: one SQLite index, blob and large manifest bodies as files."""

    def __init__(self, cache_dir: Path, size_limit: int, *, owner: bool = True) -> None:
        """`owner`: this process runs the cache (and may clear `staging/`); tools that only look
        at a store another process is using pass False."""
        self.cache_dir = cache_dir
        self.staging_dir = cache_dir / "staging"
        if owner:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.size_limit = size_limit
        self._cache = diskcache.Cache(
            str(cache_dir / "store"),
            disk=_AdoptingDisk,
            # diskcache's own culling knows no pins: `evict` does it instead, so diskcache's limit
            # is set out of reach. Its LRU policy still keeps every entry's last access time.
            size_limit=2**62,
            eviction_policy="least-recently-used",
        )

    # blobs ---------------------------------------------------------------------------------
    def open_blob(self, digest: str) -> BinaryIO | None:
        handle = self._cache.get(f"blob:{digest}", read=True)
        return handle  # type: ignore[no-any-return]

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
        return f"blob:{digest}" in self._cache

    def stage_blob(self, digest: str) -> BlobStaging:
        return BlobStaging(self.staging_dir, digest)

    def commit_blob(self, staging: BlobStaging, expected_size: int | None) -> None:
        """Verify, then move the staged file into the store. On any failure nothing is stored."""
        staged = _StagedFile(staging.path, staging.size)
        try:
            staging.verify(expected_size)
            self._cache.set(f"blob:{staging.digest}", staged)
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
        return _manifest_of(self._cache.get(f"manifest:{digest}"))

    def put_manifest(self, digest: str, manifest: Manifest) -> None:
        verify_digest(digest, manifest.body)
        self._cache.set(f"manifest:{digest}", manifest.media_type.encode() + b"\n" + manifest.body)

    # tags ----------------------------------------------------------------------------------
    def tag_refs(self) -> list[TagRef]:
        return [tag_ref_of(key) for key in self._cache.iterkeys() if isinstance(key, str) and key.startswith("tag:")]

    # One entry per tag, holding what it resolved to for each set of accepted media types, so a
    # replay can fall back to another client's record of the same tag.
    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]:
        raw = self._cache.get(f"tag:{ref}")
        if not isinstance(raw, str):
            return {}
        return {accepted: TagRecord(**fields) for accepted, fields in json.loads(raw).items()}

    def put_tag(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None:
        with self._cache.transact():
            records = self.tag_records(ref)
            records[accept_key(accepted)] = record
            self._cache.set(f"tag:{ref}", json.dumps({k: asdict(v) for k, v in records.items()}))

    # which repository holds which digest (for access checks) ------------------------------
    def mark_seen(self, repository: str, digests: list[str]) -> None:
        with self._cache.transact():
            for digest in digests:
                self._cache.set(f"seen:{repository}@{digest}", 1)

    def is_seen(self, repository: str, digest: str) -> bool:
        return self._cache.get(f"seen:{repository}@{digest}") is not None

    # pins and eviction ---------------------------------------------------------------------
    def pins(self) -> dict[str, str]:
        """Pinned image references → the digest pinned."""
        raw = self._cache.get("pins")
        return dict(json.loads(raw)) if isinstance(raw, str) else {}

    def pin(self, ref: TagRef, digest: str) -> None:
        with self._cache.transact():
            self._cache.set("pins", json.dumps({**self.pins(), str(ref): digest}, sort_keys=True))

    def unpin(self, ref: TagRef) -> bool:
        with self._cache.transact():
            pins = self.pins()
            found = pins.pop(str(ref), None) is not None
            self._cache.set("pins", json.dumps(pins, sort_keys=True))
        return found

    def protected_digests(self, needs: Callable[[str], list[str]] | None = None) -> set[str]:
        """Every manifest and blob a pinned image needs (`needs`: a walker already at hand)."""
        pinned = reachable((f"manifest:{digest}" for digest in self.pins().values()), needs or self.needs)
        return {key.partition(":")[2] for key in pinned}

    def evict(self) -> tuple[int, int]:
        """Bring the store under `size_limit` (to 90 % of it, so that not every commit evicts):
        least recently used first, pinned content never. Returns (entries, bytes) removed."""
        if self._cache.volume() <= self.size_limit:
            return 0, 0
        target = int(self.size_limit * 0.9)
        removed = freed = 0
        for key, size, _ in sorted(self._evictable(), key=lambda entry: entry[2]):
            # Re-read: another process (import, warm) may be evicting or adding at the same time.
            if self._cache.volume() <= target:
                break
            if size and self._cache.delete(key):
                removed, freed = removed + 1, freed + size
        return removed, freed

    def expire_unused(self, max_age: float, now: float | None = None) -> tuple[int, int]:
        """Remove blobs, manifests and tag records unused for `max_age` seconds, pinned content
        never. Returns (entries, bytes) removed."""
        removed = freed = 0
        for key, size in self.unused(max_age, now):
            if self._cache.delete(key):
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
        # diskcache has no public listing with access times; its Cache table is stable in 5.x.
        rows = self._cache._sql("SELECT key, size, access_time FROM Cache WHERE raw = 1").fetchall()
        sizes = {key: size for key, size, _ in rows if isinstance(key, str)}
        last_use = {key: access for key, _, access in rows if isinstance(key, str)}
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
            if key.startswith("tag:") and isinstance(raw := self._peek(key), str):
                return [f"manifest:{record['digest']}" for record in json.loads(raw).values()]
            if key.startswith("manifest:") and (manifest := _manifest_of(self._peek(key))) is not None:
                child_manifests, blobs = manifest_references(manifest)
                return [f"manifest:{d.get('digest')}" for d in child_manifests] + [
                    f"blob:{d.get('digest')}" for d in blobs
                ]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return []

    def _peek(self, key: str) -> object:
        """A value without updating its access time (diskcache's `get` would)."""
        row = self._cache._sql("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        if row is None:
            return None
        try:
            return self._cache._disk.fetch(row[0], row[1], row[2], False)
        except OSError:
            return None

    # usage counters ------------------------------------------------------------------------
    # One entry of running totals (name → count). The proxy adds its deltas every few seconds,
    # never once per request.
    def add_counters(self, deltas: Mapping[str, int]) -> None:
        with self._cache.transact():
            totals = self.counters()
            for name, delta in deltas.items():
                totals[name] = totals.get(name, 0) + delta
            self._cache.set("usage-counters", json.dumps(totals, sort_keys=True))

    def counters(self) -> dict[str, int]:
        raw = self._peek("usage-counters")
        return dict(json.loads(raw)) if isinstance(raw, str) else {}

    # size and contents, read without counting as a use ---------------------------------------
    # Inline values (small manifests, tag records) have size 0 in diskcache's table: count their length.
    _ENTRY_SIZE = "CASE WHEN filename IS NULL THEN coalesce(length(value), 0) ELSE size END"

    def entry_totals(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) per entry type (`ENTRY_TYPES`, plus `other`), from one aggregate query."""
        kind = "substr(key, 1, instr(key, ':') - 1)"
        rows = self._cache._sql(
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
        rows = self._cache._sql(
            f"SELECT key, {self._ENTRY_SIZE}, access_time FROM Cache WHERE raw = 1 "
            "AND (key LIKE 'blob:%' OR key LIKE 'manifest:%' OR key LIKE 'tag:%')"
        ).fetchall()
        return {key: Entry(size, access) for key, size, access in rows}

    def peek_manifest(self, digest: str) -> Manifest | None:
        return _manifest_of(self._peek(f"manifest:{digest}"))

    def blob_file(self, digest: str) -> Path | None:
        """Where a stored blob's bytes are (the file itself may be gone from a damaged store)."""
        row = self._cache._sql("SELECT filename FROM Cache WHERE key = ? AND raw = 1", (f"blob:{digest}",)).fetchone()
        return Path(self._cache.directory) / row[0] if row and row[0] else None

    def seen_pairs(self) -> list[tuple[str, str]]:
        """(repository, digest) of every object known to belong to a repository (access checks)."""
        rows = self._cache._sql("SELECT key FROM Cache WHERE raw = 1 AND key LIKE 'seen:%'").fetchall()
        return [(key[5:].rpartition("@")[0], key.rpartition("@")[2]) for (key,) in rows if "@" in key]

    def remove(self, keys: Iterable[str]) -> tuple[int, int]:
        """Delete these entries (bookkeeping entries never); (entries, bytes) removed."""
        removed = freed = 0
        for key in keys:
            row = self._cache._sql(f"SELECT {self._ENTRY_SIZE} FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
            if key not in BOOKKEEPING_KEYS and row is not None and self._cache.delete(key):
                removed, freed = removed + 1, freed + row[0]
        return removed, freed

    def close(self) -> None:
        self._cache.close()


def new_tag_record(manifest: Manifest, digest: str) -> TagRecord:
    return TagRecord(digest, manifest.media_type, len(manifest.body), time.time())
