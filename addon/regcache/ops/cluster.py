"""The `regcache` commands against a cluster's shared store (`shared` in the configuration): the
bucket (L2) and Redis as every node sees them, from any machine that reaches both.

Owns: opening the shared store for one command (`opened`: Redis checked; S3 and Redis failures are
`SharedUnavailable`, an OSError, which the command line prints as one line); a `Snapshot` of the
cluster's content (the Redis inventory's sizes and last uses, the tag records, pins, seen pairs, the
bucket's manifests) that the admin walks (admin.py) and export (bundle.py) read as they read a
node's store; carrying a plan out on the bucket and Redis (`remove`); the cluster's and each node's
figures (`cluster_stats`); rehashing the bucket's objects (`verify_bucket`); recounting the inventory
from the bucket's listing (`recount`); taking blobs out of the bucket for an export
(`download_blobs`) and putting a verified local store's content into the cluster (`push`: import and
warm go through a scratch store first, so the bucket only ever gets verified objects).

What leaves the bucket here stays in the nodes' own L1 caches until their own eviction: each node's
L1 is its own (`--local` commands on that node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from regcache.config import SharedSettings
from regcache.oci.digest import DigestMismatch
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.ops.admin import Corrupt, UsageSummary, Verification, new_hasher, summarize_usage
from regcache.ops.bundle import BundleError, is_public, mark_public
from regcache.store import keys
from regcache.store.access import AccessRecords
from regcache.store.base import Entry, Store, TagRecord
from regcache.store.disk import DiskStore
from regcache.store.shared.access import RedisAccessRecords
from regcache.store.shared.errors import SharedUnavailable
from regcache.store.shared.leases import SWEEP_LOCK
from regcache.store.shared.redis import SharedRedis
from regcache.store.shared.s3 import SharedObjects
from regcache.store.shared.tiered import TieredStore
from regcache.store.walk import manifest_needs

_MANIFEST_READS = 16  # manifests read from the bucket at once


@dataclass
class Cluster:
    """One command's connections to the bucket and Redis."""

    settings: SharedSettings
    objects: SharedObjects
    redis: SharedRedis

    def access_records(self) -> RedisAccessRecords:
        return RedisAccessRecords(self.settings.redis, self.settings.access_secret)


@contextlib.asynccontextmanager
async def opened(settings: SharedSettings) -> AsyncIterator[Cluster]:
    """The shared store for one command, Redis checked first (RedisUnavailable saying why not). The
    engines are asked again on every call (no breaker delay: a command is short), and their outage
    warnings are left out: the command's error line says it."""
    quiet = logging.getLogger("regcache")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    objects = SharedObjects(settings.s3, retry_after=0)
    redis = SharedRedis(settings.redis, settings.node, retry_after=0)
    try:
        redis.check()
        yield Cluster(settings, objects, redis)
    finally:
        with contextlib.suppress(Exception):  # closing what could not be used is no news
            await objects.close()
        with contextlib.suppress(Exception):
            await redis.aclose()
        quiet.setLevel(level)


# a snapshot of the cluster's content -------------------------------------------------------------


@dataclass
class Snapshot:
    """The cluster's content as read at one moment, answering the questions the admin walks and export
    ask of a store (entries, needs, pins, seen pairs, tag records, manifests, blob sizes)."""

    sizes: dict[str, int]  # blob and manifest keys of the bucket (the inventory) → bytes
    last_uses: dict[str, float]  # store key → last use (blobs, manifests, tags)
    records: dict[TagRef, dict[str, TagRecord]]
    manifests: dict[str, Manifest]  # digest → manifest, read from the bucket
    pinned: dict[str, str]
    seen: list[tuple[str, str]]
    blob_dir: Path | None = None  # where `download_blobs` put blobs (export)

    def entries(self) -> dict[str, Entry]:
        found = {key: Entry(size, self.last_uses.get(key, 0.0)) for key, size in self.sizes.items()}
        for ref, records in self.records.items():
            key = keys.tag_key(ref)
            recorded = max((record.recorded_at for record in records.values()), default=0.0)
            found[key] = Entry(0, self.last_uses.get(key, recorded))
        return found

    def has_entry(self, key: str) -> bool:
        if keys.is_kind(key, keys.TAG):
            return keys.tag_ref_of(key) in self.records
        return key in self.sizes

    def needs(self, key: str) -> list[str]:
        if keys.is_kind(key, keys.TAG):
            return [keys.manifest_key(record.digest) for record in self.records.get(keys.tag_ref_of(key), {}).values()]
        manifest = self.manifests.get(keys.subject(key)) if keys.is_kind(key, keys.MANIFEST) else None
        return [] if manifest is None else manifest_needs(manifest)

    def pins(self) -> dict[str, str]:
        return dict(self.pinned)

    def seen_pairs(self) -> list[tuple[str, str]]:
        return list(self.seen)

    def tag_refs(self) -> list[TagRef]:
        return sorted(self.records, key=str)

    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]:
        return dict(self.records.get(ref, {}))

    def get_manifest(self, digest: str) -> Manifest | None:
        return self.manifests.get(digest)

    def blob_size(self, digest: str) -> int | None:
        return self.sizes.get(keys.blob_key(digest))

    def blob_path(self, digest: str) -> str | None:
        if self.blob_dir is None or not (path := self.blob_dir / digest.replace(":", "-")).is_file():
            return None
        return str(path)


async def snapshot(cluster: Cluster) -> Snapshot:
    """Read the cluster's content: the inventory, every tag record, pins, seen pairs and the manifests
    the inventory or a tag record names (a damaged manifest counts as absent)."""
    inventory = cluster.redis.inventory.everything()
    uses = {key: when for key, (_, when) in inventory.items()}
    sizes = {key: size for key, (size, _) in inventory.items() if keys.is_kind(key, keys.BLOB, keys.MANIFEST)}
    refs = cluster.redis.tags.refs()
    records = {ref: cluster.redis.tags.records(ref) for ref in refs}
    wanted = {keys.subject(key) for key in sizes if keys.is_kind(key, keys.MANIFEST)}
    wanted |= {record.digest for found in records.values() for record in found.values()}
    manifests = await read_manifests(cluster, wanted)
    for digest, manifest in manifests.items():  # in the bucket, whether or not the inventory knew it
        sizes.setdefault(keys.manifest_key(digest), len(manifest.body))
    pins = cluster.redis.pins.pins()
    seen = cluster.redis.seen.pairs()
    return Snapshot(sizes, uses, {ref: found for ref, found in records.items() if found}, manifests, pins, seen)


async def read_manifests(cluster: Cluster, digests: Iterable[str]) -> dict[str, Manifest]:
    """The manifests of `digests` the bucket holds intact, a few read at once."""
    gate = asyncio.Semaphore(_MANIFEST_READS)

    async def read(digest: str) -> tuple[str, Manifest | None]:
        async with gate:
            try:
                return digest, await cluster.objects.manifests.get(digest)
            except DigestMismatch:
                return digest, None

    found = await asyncio.gather(*(read(digest) for digest in sorted(digests)))
    return {digest: manifest for digest, manifest in found if manifest is not None}


# changing the cluster's content --------------------------------------------------------------------


async def remove(cluster: Cluster, entry_keys: Iterable[str]) -> tuple[int, int]:
    """Take entries out of the bucket and Redis, in the order given (a plan's: tag records first);
    (entries, bytes) removed. An object leaves the bucket before the inventory forgets it, so an
    S3 failure half way leaves every remaining object counted."""
    removed = freed = 0
    gone_seen = []
    for key in entry_keys:
        if keys.is_kind(key, keys.TAG):
            removed += cluster.redis.tags.delete(keys.tag_ref_of(key))
        elif keys.is_kind(key, keys.BLOB, keys.MANIFEST):
            objects = cluster.objects.blobs if keys.is_kind(key, keys.BLOB) else cluster.objects.manifests
            await objects.delete(keys.subject(key))
            freed += cluster.redis.inventory.forget([key])
            removed += 1
        elif (pair := keys.seen_pair(key)) is not None:
            gone_seen.append(pair)
    if gone_seen:
        cluster.redis.seen.forget(gone_seen)
    return removed + len(gone_seen), freed


SCRATCH_LIMIT = 1 << 62  # a scratch store never evicts: what is in it is on its way to the bucket


@contextlib.contextmanager
def scratch_store() -> Iterator[DiskStore]:
    """An empty store in a temporary directory, removed after."""
    with tempfile.TemporaryDirectory(prefix="regcache-scratch-") as scratch:
        store = DiskStore(Path(scratch), SCRATCH_LIMIT)
        try:
            yield store
        finally:
            store.close()


@contextlib.contextmanager
def tiered_over_scratch(cluster: Cluster) -> Iterator[TieredStore]:
    """The cluster's store as a node has it (`TieredStore`), over a scratch L1: what the node's own
    code does (warm's fills under the cluster's leases, the bucket's sweep), done from here."""
    with scratch_store() as disk:
        yield TieredStore(disk, cluster.objects, cluster.redis, cluster.settings)


async def sweep(cluster: Cluster) -> tuple[int, int] | None:
    """The bucket's sweep, as the nodes run it (shared.max_age, shared.size_limit, pins kept, then
    abandoned uploads aborted); None if another node is sweeping."""
    with tiered_over_scratch(cluster) as tiered:
        return await tiered.sweep()


@contextlib.asynccontextmanager
async def sweep_lock(cluster: Cluster) -> AsyncIterator[None]:
    """The cluster's sweep lock (the one a node's bucket sweep takes), kept while the block runs;
    SharedUnavailable if another node or command holds it."""
    lock = await cluster.redis.leases.acquire(SWEEP_LOCK, max(cluster.settings.lease_seconds, 30.0))
    if lock is None:
        held = await cluster.redis.leases.holder(SWEEP_LOCK)
        who = f" (node {held.node})" if held is not None else ""
        raise SharedUnavailable(f"another node is sweeping the bucket{who}: try again in a minute")
    async with lock.kept():
        yield


async def recount(cluster: Cluster) -> tuple[int, int]:
    """Make the inventory match the bucket's listing: objects it did not count (Redis lost them, or a
    node died between upload and count) are counted, their last use their upload; entries whose
    object is gone are forgotten. (counted, forgotten)."""
    inventory = cluster.redis.inventory
    listed: set[str] = set()
    counted = 0
    for objects in (cluster.objects.blobs, cluster.objects.manifests):
        kind = keys.BLOB if objects is cluster.objects.blobs else keys.MANIFEST
        async for page in objects.pages():
            page_keys = [f"{kind}:{stored.digest}" for stored in page]
            listed.update(page_keys)
            known = inventory.sizes(page_keys)
            for stored, key in zip(page, page_keys, strict=True):
                if key not in known:
                    inventory.added(key, stored.size, stored.last_modified)
                    counted += 1
    gone = [key for key in inventory.everything() if keys.is_kind(key, keys.BLOB, keys.MANIFEST) and key not in listed]
    if gone:
        inventory.forget(gone)
    return counted, len(gone)


# stats -----------------------------------------------------------------------------------------------


@dataclass
class NodeStats:
    node: str
    urls: dict[str, str]
    started: float | None  # None: it counted usage but never registered (or was forgotten)
    last_seen: float | None
    usage: UsageSummary


@dataclass
class ClusterStats:
    objects: int  # in the bucket
    bytes: int
    tags: int
    size_limit: int | None
    usage: UsageSummary  # every node's, added up
    nodes: list[NodeStats] = field(default_factory=list)


async def cluster_stats(cluster: Cluster) -> ClusterStats:
    """The bucket's totals (the inventory), the usage counters in total and per node, the nodes."""
    redis = cluster.redis
    objects, size = redis.inventory.totals()
    tags = len(redis.tags.refs())
    per_node = redis.usage.per_node()
    registered = {info.node: info for info in redis.nodes.nodes()}
    nodes = []
    for node in sorted(per_node.keys() | registered.keys()):
        info = registered.get(node)
        usage = summarize_usage(per_node.get(node, {}))
        if info is None:
            nodes.append(NodeStats(node, {}, None, None, usage))
        else:
            nodes.append(NodeStats(node, info.urls, info.started, info.last_seen, usage))
    usage = summarize_usage(redis.usage.totals())
    return ClusterStats(objects, size, tags, cluster.settings.size_limit, usage, nodes)


# verify ----------------------------------------------------------------------------------------------


async def bucket_objects(cluster: Cluster) -> list[str]:
    """Every blob and manifest in the bucket's listing, as store keys."""
    found = []
    for kind, objects in ((keys.BLOB, cluster.objects.blobs), (keys.MANIFEST, cluster.objects.manifests)):
        async for page in objects.pages():
            found += [f"{kind}:{stored.digest}" for stored in page]
    return found


async def verify_bucket(
    cluster: Cluster, sample: int | None, progress: Callable[[int], None] = lambda _: None
) -> Verification:
    """Rehash the bucket's objects, every one, or `sample` of them picked at random; blobs streamed,
    so memory stays bounded whatever their size."""
    found = await bucket_objects(cluster)
    chosen = sorted(random.sample(found, min(sample, len(found)))) if sample is not None else found
    result = Verification()
    for key in chosen:
        digest = keys.subject(key)
        if keys.is_kind(key, keys.MANIFEST):
            size, problem = await _manifest_problem(cluster, digest)
            result.manifests += 1
        else:
            size, problem = await _blob_problem(cluster, digest, progress)
            result.blobs += 1
        result.bytes += size
        if problem:
            result.corrupt.append(Corrupt(key, problem))
    return result


async def _manifest_problem(cluster: Cluster, digest: str) -> tuple[int, str]:
    try:
        manifest = await cluster.objects.manifests.get(digest)
    except DigestMismatch as err:
        return 0, f"its bytes do not hash to its digest ({err})"
    return (0, "") if manifest is None else (len(manifest.body), "")  # None: gone since the listing


async def _blob_problem(cluster: Cluster, digest: str, progress: Callable[[int], None]) -> tuple[int, str]:
    stream = await cluster.objects.blobs.open(digest)
    if stream is None:
        return 0, ""  # gone since the listing
    hasher = new_hasher(digest)
    read = 0
    async for chunk in stream:
        hasher.update(chunk)
        read += len(chunk)
        progress(len(chunk))
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    return read, "" if actual == digest else f"its bytes hash to {actual}"


# export: blobs out of the bucket; import and warm: a verified local store into the cluster ----------


async def download_blobs(cluster: Cluster, blobs: dict[str, int], into: Path) -> None:
    """Stream each blob (digest → size) from the bucket into `into`, hashing it on the way: a blob
    gone or damaged stops the export (BundleError), nothing half-checked goes into a bundle."""
    into.mkdir(parents=True, exist_ok=True)
    for digest, size in sorted(blobs.items()):
        stream = await cluster.objects.blobs.open(digest)
        if stream is None:
            raise BundleError(f"{digest} left the bucket during export; export again")
        hasher, read = new_hasher(digest), 0
        with (into / digest.replace(":", "-")).open("wb") as out:
            async for chunk in stream:
                hasher.update(chunk)
                read += len(chunk)
                out.write(chunk)
        if read != size or f"{hasher.name}:{hasher.hexdigest()}" != digest:
            raise BundleError(f"{digest} in the bucket is damaged ({read} bytes): run regcache verify")


@dataclass
class Pushed:
    blobs: int = 0  # uploaded (the bucket lacked them)
    manifests: int = 0
    tags: int = 0
    bytes: int = 0


async def push(cluster: Cluster, local: Store, records: AccessRecords) -> Pushed:
    """Put everything a verified local store holds into the cluster: blobs and manifests into the
    bucket (each counted in the inventory), then what refers to them in Redis — seen pairs, tag
    records, pins, and public repositories (`records`, the local store's access records) — so no
    node ever finds a record of something the bucket lacks."""
    pushed = Pushed()
    inventory = cluster.redis.inventory
    entries = local.entries()
    for key in sorted(k for k in entries if keys.is_kind(k, keys.BLOB, keys.MANIFEST)):
        digest = keys.subject(key)
        if keys.is_kind(key, keys.BLOB):
            path = local.blob_file(digest)
            if path is None:
                continue
            if await cluster.objects.blobs.put_file(digest, path, entries[key].size):
                pushed.blobs += 1
                pushed.bytes += entries[key].size
        elif (manifest := local.peek_manifest(digest)) is not None and await cluster.objects.manifests.put(
            digest, manifest
        ):
            pushed.manifests += 1
        inventory.added(key, entries[key].size)
    by_repository: dict[str, list[str]] = {}
    for repository, digest in local.seen_pairs():
        by_repository.setdefault(repository, []).append(digest)
    for repository, digests in sorted(by_repository.items()):
        cluster.redis.seen.mark(repository, digests)
    refs = local.tag_refs()
    for ref in refs:
        for accepted, record in local.tag_records(ref).items():
            cluster.redis.tags.put(ref, tuple(accepted.split(",")) if accepted else (), record)
            pushed.tags += 1
    for ref_text, digest in local.pins().items():
        cluster.redis.pins.pin(keys.tag_ref_of(keys.tag_key(ref_text)), digest)
    public = sorted({ref.repository for ref in refs if is_public(records, ref.repository)})
    mark_public(cluster.access_records(), public)
    return pushed


async def newest_stored(cluster: Cluster, ref: TagRef) -> TagRecord | None:
    """The most recently recorded of the tag's records whose manifest the bucket holds."""
    stored = []
    for record in (cluster.redis.tags.records(ref)).values():
        with contextlib.suppress(DigestMismatch):
            if await cluster.objects.manifests.get(record.digest) is not None:
                stored.append(record)
    return max(stored, key=lambda record: record.recorded_at, default=None)
