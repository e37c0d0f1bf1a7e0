"""`TieredStore`: a node's own disk (L1, `DiskStore`) over the cluster's bucket (L2) and Redis,
behind the same store protocols (store/base.py) the services use, plus `SharedTier`, what the
services ask of the cluster on the event loop (L2 blobs, presigned URLs, uploads, fill leases).

What goes where:
- blobs: L1 as before (staged, verified, committed; sendfile); a committed L1 blob is uploaded to
  L2 by `upload_blob` (the fill that fetched it calls it); L2 blobs are served by presigned URL or
  streamed into L1 by a fill (services/blobs.py), never read here;
- manifests: `get_manifest` reads L1, then L2 (a manifest found there is copied into L1);
  `put_manifest` writes both (L2 only if absent: content-addressed, immutable);
- tag records, seen pairs: written to L1 and Redis; read from both (a tag record per accept key,
  the newer wins; seen: either) — so a node keeps its own records through a Redis outage, and a
  new node replays every tag the cluster recorded;
- pins: Redis (the cluster's; the last ones read are kept in memory for an outage);
- last uses: L1's and Redis's (the inventory zset: what the L2 sweep goes by); usage counters: this
  node's in L1, and per node and in total in Redis (a batch Redis refused is added to the next).
Eviction, expiry and the admin walks of `Maintenance` see L1 only: L1 is each node's business
(its `size_limit`); the bucket is swept by `sweep` (one node at a time, under SWEEP_LOCK).

Faults: every Redis or S3 call may raise SharedUnavailable; here it is caught and the node goes on
with L1 alone (the breakers log an outage once). Calls run where the protocols say: blocking ones in
worker threads (redis-py's blocking client, obstore's blocking calls), `SharedTier`'s on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, TypeVar

from regcache.config import SharedSettings
from regcache.oci.digest import DigestMismatch, verify_digest
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.store import keys
from regcache.store.base import Entry, FillHolder, SharedBlob, SharedTier, Store, TagRecord
from regcache.store.disk import DiskStore
from regcache.store.shared.errors import BucketUnusable, SharedUnavailable
from regcache.store.shared.leases import SWEEP_LOCK, Lease, LeaseHolder
from regcache.store.shared.redis import SharedRedis
from regcache.store.shared.s3 import SharedObjects
from regcache.store.staging import BlobStaging
from regcache.store.walk import manifest_needs, reachable

log = logging.getLogger("regcache")
T = TypeVar("T")


@contextlib.contextmanager
def _carry_on() -> Iterator[None]:
    """The shared tier failed: this node goes on alone (the breaker has said so, once)."""
    try:
        yield
    except SharedUnavailable as err:
        log.debug("shared store: %s", err)


def _shared(call: Callable[[], T]) -> T | None:
    """`call()`, or None while the shared tier cannot answer."""
    try:
        return call()
    except SharedUnavailable as err:
        log.debug("shared store: %s", err)
        return None


def newest(*sources: Mapping[str, TagRecord]) -> dict[str, TagRecord]:
    """Tag records per accept key from several sources: for each key the most recently recorded."""
    merged: dict[str, TagRecord] = {}
    for records in sources:
        for key, record in records.items():
            if key not in merged or record.recorded_at > merged[key].recorded_at:
                merged[key] = record
    return merged


class TieredStore:
    """`Store` on this node's `DiskStore` (L1), the cluster's bucket (L2) and Redis; and `SharedTier`."""

    def __init__(self, disk: DiskStore, objects: SharedObjects, redis: SharedRedis, settings: SharedSettings) -> None:
        self.disk = disk
        self.objects = objects
        self.redis = redis
        self.settings = settings
        self.node = settings.node
        self.redirect = settings.s3.redirect
        self.lease_seconds = settings.lease_seconds
        self.cache_dir = disk.cache_dir
        self.staging_dir = disk.staging_dir
        self.size_limit = disk.size_limit
        self.read_only = disk.read_only
        self._pins: dict[str, str] = {}  # the cluster's, as last read
        self._unsent_counters: dict[str, int] = {}  # added to L1, not yet to Redis

    # blobs: L1 ------------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.disk.has_blob(digest)

    def blob_size(self, digest: str) -> int | None:
        return self.disk.blob_size(digest)

    def blob_path(self, digest: str) -> str | None:
        return self.disk.blob_path(digest)

    def open_blob(self, digest: str) -> BinaryIO | None:
        return self.disk.open_blob(digest)

    def stage_blob(self, digest: str) -> BlobStaging:
        return self.disk.stage_blob(digest)

    def commit_blob(self, staging: BlobStaging, expected_size: int | None) -> None:
        self.disk.commit_blob(staging, expected_size)

    # manifests: L1, then L2 ----------------------------------------------------------------------
    def get_manifest(self, digest: str) -> Manifest | None:
        found = self.disk.get_manifest(digest)
        if found is not None:
            return found
        found = self._shared_manifest(digest)
        if found is not None:
            with contextlib.suppress(Exception):  # L1 is a copy: a full disk serves from L2
                self.disk.put_manifest(digest, found)
            self.disk.uses.note(keys.manifest_key(digest))
        return found

    def peek_manifest(self, digest: str) -> Manifest | None:
        return self.disk.peek_manifest(digest) or self._shared_manifest(digest)

    def has_manifest(self, digest: str) -> bool:
        if self.disk.has_manifest(digest):
            return True
        return _shared(lambda: self.objects.manifests.size_blocking(digest)) is not None

    def _shared_manifest(self, digest: str) -> Manifest | None:
        try:
            return _shared(lambda: self.objects.manifests.get_blocking(digest))
        except DigestMismatch as err:  # damaged in the bucket: never served
            log.warning("shared store: manifest %s in the bucket is damaged, not served: %s", digest, err)
            return None

    def put_manifest(self, digest: str, manifest: Manifest) -> None:
        """Into L1 and L2 (raises DigestMismatch, or L1's error once L2 has it)."""
        verify_digest(digest, manifest.body)
        try:
            self.disk.put_manifest(digest, manifest)
        finally:
            with _carry_on():
                if self.objects.manifests.put_blocking(digest, manifest):
                    self.redis.inventory.added(keys.manifest_key(digest), len(manifest.body))

    # tags: L1 and Redis --------------------------------------------------------------------------
    def tag_refs(self) -> list[TagRef]:
        shared = _shared(self.redis.tags.refs) or []
        return sorted(set(shared) | set(self.disk.tag_refs()), key=str)

    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]:
        records = newest(self.disk.tag_records(ref), _shared(lambda: self.redis.tags.records(ref)) or {})
        if records:
            self.disk.uses.note(keys.tag_key(ref))
        return records

    def put_tag(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None:
        try:
            self.disk.put_tag(ref, accepted, record)
        finally:
            with _carry_on():
                self.redis.tags.put(ref, accepted, record)

    # seen pairs: L1 and Redis --------------------------------------------------------------------
    def mark_seen(self, repository: str, digests: list[str]) -> None:
        try:
            self.disk.mark_seen(repository, digests)
        finally:
            with _carry_on():
                self.redis.seen.mark(repository, digests)

    def is_seen(self, repository: str, digest: str) -> bool:
        if self.disk.is_seen(repository, digest):
            return True
        return bool(_shared(lambda: self.redis.seen.is_seen(repository, digest)))

    def seen_pairs(self) -> list[tuple[str, str]]:
        return sorted(set(self.disk.seen_pairs()) | set(_shared(self.redis.seen.pairs) or []))

    # pins: the cluster's ---------------------------------------------------------------------------
    def pins(self) -> dict[str, str]:
        with _carry_on():
            self._pins = self.redis.pins.pins()
        return dict(self._pins)

    def pin(self, ref: TagRef, digest: str) -> None:
        self.redis.pins.pin(ref, digest)  # raises: a pin nobody else sees is no pin

    def unpin(self, ref: TagRef) -> bool:
        return self.redis.pins.unpin(ref)

    # last uses and counters ----------------------------------------------------------------------
    def record_uses(self, uses: Mapping[str, float]) -> None:
        try:
            self.disk.record_uses(uses)
        finally:
            with _carry_on():
                self.redis.inventory.record_uses(uses)

    def flush_uses(self) -> None:
        self.disk.uses.flush(self.record_uses)

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        """This node's totals in L1; this node's and the cluster's in Redis (kept for the next
        batch while Redis refuses them, so L1 and Redis count each delta once)."""
        self.disk.add_counters(deltas)
        for name, delta in deltas.items():
            self._unsent_counters[name] = self._unsent_counters.get(name, 0) + delta
        with _carry_on():
            self.redis.usage.add(self._unsent_counters)
            self._unsent_counters = {}

    def counters(self) -> dict[str, int]:
        """The cluster's totals (this node's own while Redis cannot say)."""
        return _shared(self.redis.usage.totals) or self.disk.counters()

    def entry_totals(self) -> dict[str, tuple[int, int]]:
        return self.disk.entry_totals()

    # maintenance: L1 (the bucket: `sweep`) ----------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        return self.disk.entries()

    def has_entry(self, key: str) -> bool:
        return self.disk.has_entry(key)

    def needs(self, key: str) -> list[str]:
        return self.disk.needs(key)

    def blob_file(self, digest: str) -> Path | None:
        return self.disk.blob_file(digest)

    def remove(self, entry_keys: Iterable[str]) -> tuple[int, int]:
        return self.disk.remove(entry_keys)

    def evict(self) -> tuple[int, int]:
        return self.disk.evict()

    def expire_unused(self, max_age: float, now: float | None = None) -> tuple[int, int]:
        return self.disk.expire_unused(max_age, now)

    def unused(self, max_age: float, now: float | None = None) -> list[tuple[str, int]]:
        return self.disk.unused(max_age, now)

    def free_space(self) -> int:
        return self.disk.free_space()

    def close(self) -> None:
        try:
            self.disk.close()
        finally:
            self.redis.close()

    # SharedTier: on the event loop ------------------------------------------------------------------
    @property
    def s3_down(self) -> str:
        return self.objects.breaker.down

    async def shared_blob(self, digest: str) -> SharedBlob | None:
        """The blob in L2 (its size), or None; SharedUnavailable when S3 cannot say."""
        size = await self.objects.blobs.size(digest)
        if size is None:
            return None
        self.disk.uses.note(keys.blob_key(digest))  # an L2 hit is a use (the sweep goes by it)
        return SharedBlob(digest, size)

    async def presigned_url(self, digest: str) -> str:
        return await self.objects.blobs.presigned_url(digest)

    async def shared_chunks(self, digest: str) -> tuple[int, AsyncIterable[bytes]] | None:
        """The L2 blob's size and its bytes (SharedUnavailable if S3 fails, also mid-stream), or
        None if absent."""
        stream = await self.objects.blobs.open(digest)
        return None if stream is None else (stream.size, stream)

    async def upload_blob(self, digest: str) -> bool:
        """Copy a committed L1 blob into L2 (unless there) and count it; False if not uploaded
        (gone from L1, or S3 unusable: the breaker has said so)."""
        path = await asyncio.to_thread(self.disk.blob_file, digest)
        size = await asyncio.to_thread(self.disk.blob_size, digest)
        if path is None or size is None:
            return False
        try:
            uploaded = await self.objects.blobs.put_file(digest, path, size)
        except SharedUnavailable as err:  # the breaker has warned, once
            log.debug("shared store: %s not uploaded to the bucket: %s", digest, err)
            return False
        except (DigestMismatch, OSError) as err:  # evicted from L1 meanwhile: no object
            log.warning("shared store: %s not uploaded to the bucket: %s", digest, err)
            return False
        if uploaded:
            log.info("SHARED blob %s %d B uploaded to %s", digest, size, self.settings.s3.bucket)
        with _carry_on():  # Redis down: the sweep does not know this object (known limit)
            await asyncio.to_thread(self.redis.inventory.added, keys.blob_key(digest), size)
        return True

    async def acquire(self, name: str, url: Callable[[], str] | None) -> Lease | None:
        """The cluster lease `name` (e.g. `blob:<digest>`) for this node; None if another node holds
        it. `url` makes the URL its fill is followed at (anew at every renewal). SharedUnavailable
        while Redis is down (the caller goes on alone)."""
        return await self.redis.leases.acquire(name, self.lease_seconds, url)

    async def holder(self, name: str) -> FillHolder | None:
        found: LeaseHolder | None = await self.redis.leases.holder(name)
        return None if found is None else FillHolder(found.node, found.url, found.token)

    async def heartbeat(self, urls: Mapping[str, str], started: float) -> None:
        await asyncio.to_thread(self.redis.nodes.heartbeat, urls, started)

    async def aclose(self) -> None:
        await self.objects.close()
        await self.redis.aclose()

    # the bucket's sweep ----------------------------------------------------------------------------
    async def sweep(self, now: float | None = None) -> tuple[int, int] | None:
        """Bring the bucket under `shared.size_limit` (to 90 %) and drop what nobody used for
        `shared.max_age`, least recently used first, pinned images and what they need never; then
        abort abandoned multipart uploads. One node at a time (SWEEP_LOCK); None if another node is
        sweeping. (entries, bytes) removed."""
        lock = await self.redis.leases.acquire(SWEEP_LOCK, max(self.lease_seconds, 30.0))
        if lock is None:
            return None
        async with lock.kept():
            plan = await asyncio.to_thread(self._sweep_plan, time.time() if now is None else now)
            removed = freed = 0
            for key, size in plan:
                if lock.lost.is_set():
                    break
                await self._remove_shared(key)
                removed, freed = removed + 1, freed + size
            await self.objects.abort_abandoned_uploads(now=now)
        if removed:
            log.info("SWEPT %d entries, %d B from the bucket %s (shared)", removed, freed, self.settings.s3.bucket)
        return removed, freed

    def _sweep_plan(self, now: float) -> list[tuple[str, int]]:
        """(key, size) to remove from the bucket, in order: blocking (Redis and S3 reads)."""
        inventory = self.redis.inventory.everything()
        last_use = {key: when for key, (_, when) in inventory.items()}
        needs: dict[str, list[str]] = {}

        def needs_of(key: str) -> list[str]:
            """Also of manifests the inventory lacks (written while Redis was down): a pin on one
            still protects what it needs."""
            if key not in needs:
                needs[key] = self._shared_needs(key) if keys.is_kind(key, keys.TAG, keys.MANIFEST) else []
            return needs[key]

        for key in inventory:
            needs_of(key)
        for _ in range(3):  # tag → index → platform manifest → blobs: in use while what needs it is
            for key, needed in needs.items():
                for other in needed:
                    if other in last_use and last_use[other] < last_use[key]:
                        last_use[other] = last_use[key]
        pins = self.redis.pins.pins()
        pinned = reachable((keys.manifest_key(d) for d in pins.values()), needs_of)
        pinned |= {keys.tag_key(ref) for ref in pins}
        # Least recently used first; among equals what needs the others first (tag, manifest, blobs),
        # so a sweep that stops half-way leaves no manifest without its blobs.
        rank = {keys.TAG: 0, keys.MANIFEST: 1}
        candidates = sorted(
            ((key, size, last_use[key]) for key, (size, _) in inventory.items() if key not in pinned),
            key=lambda entry: (entry[2], rank.get(entry[0].partition(":")[0], 2)),
        )
        cutoff = now - self.settings.max_age if self.settings.max_age else None
        total = sum(size for size, _ in inventory.values())
        limit = self.settings.size_limit
        target = int(limit * 0.9) if limit is not None and total > limit else None
        plan = []
        for key, size, when in candidates:
            expired = cutoff is not None and when < cutoff
            over = target is not None and total > target
            if not expired and not over:
                continue
            plan.append((key, size))
            total -= size
        return plan

    def _shared_needs(self, key: str) -> list[str]:
        """What a tag record or manifest of the cluster refers to (L1's copy, else Redis or L2)."""
        if keys.is_kind(key, keys.TAG):
            records = _shared(lambda: self.redis.tags.records(keys.tag_ref_of(key))) or {}
            return [keys.manifest_key(record.digest) for record in records.values()]
        manifest = self.peek_manifest(keys.subject(key))
        return [] if manifest is None else manifest_needs(manifest)

    async def _remove_shared(self, key: str) -> None:
        """One entry out of the bucket and Redis (tags: Redis only)."""
        if keys.is_kind(key, keys.TAG):
            await asyncio.to_thread(self.redis.tags.delete, keys.tag_ref_of(key))
        elif keys.is_kind(key, keys.BLOB):
            await self.objects.blobs.delete(keys.subject(key))
        elif keys.is_kind(key, keys.MANIFEST):
            await self.objects.manifests.delete(keys.subject(key))
        await asyncio.to_thread(self.redis.inventory.forget, [key])


def open_tiered(disk: DiskStore, settings: SharedSettings) -> TieredStore:
    """The tiered store over `disk`, its bucket and Redis checked (blocking, at start-up).
    BucketUnusable (the bucket is missing or not writable) stops start-up; S3 or Redis not
    answering: a warning, and the node starts on L1 (the tiers are asked again as it runs)."""
    objects = SharedObjects(settings.s3)
    redis = SharedRedis(settings.redis, settings.node)
    try:
        objects.check_bucket()
    except BucketUnusable:
        redis.close()
        raise
    except SharedUnavailable as err:  # the breaker's one warning for this outage
        objects.breaker.failed("checking the bucket at start-up", str(err))
    with contextlib.suppress(SharedUnavailable):  # its breaker has warned, once
        redis.check()
    return TieredStore(disk, objects, redis, settings)


# TieredStore provides every store protocol and the shared tier's (checked by the type checker here).
_CHECKED: type[Store] = TieredStore
_CHECKED_TIER: type[SharedTier] = TieredStore
