"""What the rest of regcache asks of a store: small protocols, each one kind of entry or work, and
`Store`, all of them together (what one implementation provides).

`DiskStore` (disk.py, on diskcache) is the embedded implementation; a shared store for several nodes
implements the same protocols. Callers are typed against the protocol they use, never against an
implementation. Every call blocks (SQLite, file I/O, a network round trip): callers on the event loop
use `asyncio.to_thread`. Reads never count as writes: a read that counts as a use (a blob or manifest
served, a tag record or seen entry looked up) notes it, and `flush_uses` writes such notes in batches
(errors.py), so a full disk still serves everything stored. A use (or a write) of a tag record or a
manifest counts for everything it needs too, down to the blobs, and is noted for all of them at once:
an entry's last use is the latest use of anything that needs it (a layer shared by several images
stays while any of them is in use), so `evict` and `expire_unused` take the least recently used
entries without walking the store, their work proportional to what they remove.

Also here: the records these protocols speak in (`TagRecord`, `Entry`) and the tag records' own
rule (`capped_records`), so every implementation keeps the same number per tag.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.store.staging import BlobStaging


@dataclass(frozen=True)
class TagRecord:
    """What a tag resolved to for one set of accepted media types, and when we last saw it."""

    digest: str
    media_type: str
    size: int
    recorded_at: float


def new_tag_record(manifest: Manifest, digest: str) -> TagRecord:
    return TagRecord(digest, manifest.media_type, len(manifest.body), time.time())


# Records per tag: one per distinct Accept list clients send (a handful of known media types, see
# oci.media.accepted_media_types); every request for the tag reads and rewrites them all.
MAX_TAG_RECORDS = 8


def capped_records(records: dict[str, TagRecord], key: str, record: TagRecord) -> dict[str, TagRecord]:
    """`records` with `record` put under `key`, and only the `MAX_TAG_RECORDS` most recently
    recorded of them (the new one always among them: revalidation rewrites a record in use)."""
    others = sorted((item for item in records.items() if item[0] != key), key=lambda item: item[1].recorded_at)
    return dict([*others[-(MAX_TAG_RECORDS - 1) :], (key, record)])


@dataclass(frozen=True)
class Entry:
    """A store entry as the admin tools see it: its size in bytes and its last use (epoch seconds)."""

    size: int
    last_use: float


class BlobStore(Protocol):
    """Blobs by digest: staged while fetched (`staging_dir`), committed only when verified."""

    staging_dir: Path  # fills and imports in progress

    def has_blob(self, digest: str) -> bool: ...
    def blob_size(self, digest: str) -> int | None: ...
    def blob_path(self, digest: str) -> str | None: ...
    def open_blob(self, digest: str) -> BinaryIO | None: ...
    def stage_blob(self, digest: str) -> BlobStaging: ...
    def commit_blob(self, staging: BlobStaging, expected_size: int | None) -> None: ...


class ManifestStore(Protocol):
    """Manifests by digest, byte for byte (`put_manifest` checks the digest)."""

    def get_manifest(self, digest: str) -> Manifest | None: ...
    def has_manifest(self, digest: str) -> bool: ...
    def put_manifest(self, digest: str, manifest: Manifest) -> None: ...
    def peek_manifest(self, digest: str) -> Manifest | None: ...  # read without counting as a use


class TagStore(Protocol):
    """What each tag resolved to, per accepted media types (keyed by `oci.media.accept_key`)."""

    def tag_refs(self) -> list[TagRef]: ...
    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]: ...
    def put_tag(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None: ...


class SeenStore(Protocol):
    """Which repository holds which digest (the access rule's first half, access.py)."""

    def mark_seen(self, repository: str, digests: list[str]) -> None: ...
    def is_seen(self, repository: str, digest: str) -> bool: ...
    def seen_pairs(self) -> list[tuple[str, str]]: ...


class PinStore(Protocol):
    """Images eviction never removes: image reference → the digest pinned."""

    def pins(self) -> dict[str, str]: ...
    def pin(self, ref: TagRef, digest: str) -> None: ...
    def unpin(self, ref: TagRef) -> bool: ...


class UsageStore(Protocol):
    """Bookkeeping: last uses (noted by reads, written in batches), usage counters and totals."""

    def record_uses(self, uses: Mapping[str, float]) -> None: ...
    def flush_uses(self) -> None: ...
    def add_counters(self, deltas: Mapping[str, int]) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def entry_totals(self) -> dict[str, tuple[int, int]]: ...  # (entries, bytes) per kind


class Maintenance(Protocol):
    """What eviction, expiry and the admin tools (`regcache ls/purge/verify/gc`) walk and remove,
    by store key (keys.py); none of it counts as a use. The admin tools walk (`needs`); eviction and
    expiry never do."""

    cache_dir: Path
    size_limit: int

    def entries(self) -> dict[str, Entry]: ...
    def has_entry(self, key: str) -> bool: ...
    def needs(self, key: str) -> list[str]: ...
    def blob_file(self, digest: str) -> Path | None: ...
    def remove(self, entry_keys: Iterable[str]) -> tuple[int, int]: ...
    def evict(self) -> tuple[int, int]: ...
    def expire_unused(self, max_age: float, now: float | None = None) -> tuple[int, int]: ...
    def unused(self, max_age: float, now: float | None = None) -> list[tuple[str, int]]: ...
    def free_space(self) -> int: ...


class Store(BlobStore, ManifestStore, TagStore, SeenStore, PinStore, UsageStore, Maintenance, Protocol):
    """Everything above, from one implementation; `read_only` says why it refuses writes ("": it
    takes them)."""

    read_only: str

    def close(self) -> None: ...


# -- a cluster's shared tier (store/shared/tiered.py), what the services ask of it on the event loop ---


@dataclass(frozen=True)
class SharedBlob:
    """A blob the cluster's bucket holds."""

    digest: str
    size: int


@dataclass(frozen=True)
class FillHolder:
    """The node holding a fill's lease, and where its fill can be followed."""

    node: str
    url: str | None
    token: str  # unique to one holding: a new token is a new holder


class FillLease(Protocol):
    """A lease this node holds: `kept()` renews it while a block runs and releases it after;
    `lost` is set if it was lost meanwhile."""

    @property
    def lost(self) -> asyncio.Event: ...
    def kept(self) -> AbstractAsyncContextManager[object]: ...
    async def release(self) -> bool: ...


class SharedTier(Protocol):
    """The cluster's side of a `TieredStore`: async, on the event loop. Every call may raise
    `SharedUnavailable` (an OSError): the caller goes on as a single node."""

    node: str
    redirect: bool  # blob hits from L2: a 307 to a presigned URL (False: streamed through the node)
    lease_seconds: float

    @property
    def s3_down(self) -> str: ...  # why S3 is considered down ("": it is not)
    async def shared_blob(self, digest: str) -> SharedBlob | None: ...
    async def presigned_url(self, digest: str) -> str: ...
    async def shared_chunks(self, digest: str) -> tuple[int, AsyncIterable[bytes]] | None: ...
    async def upload_blob(self, digest: str) -> bool: ...
    async def acquire(self, name: str, url: Callable[[], str] | None) -> FillLease | None: ...
    async def holder(self, name: str) -> FillHolder | None: ...
