"""Blobs: hits streamed from the store, misses fetched once upstream while clients stream the fill.

A miss starts a `Fill`: one upstream `GET` (redirects to a CDN followed by `UpstreamClient`),
written to a staging file and hashed as it arrives, committed to the store only when size and
digest match. Clients are sent to the blob endpoint, which streams the staging file as it grows
(`BlobServer`), so the first pull is never held back until the whole blob is in.
Concurrent requests for the same digest join the running fill instead of fetching again.

When the disk refuses a write mid-fill (full, I/O error), the fill goes on: the bytes the staging
file could not take are relayed to the clients already following it from memory, at the pace of
the slowest (at most `RELAY_BUFFER` held), still verified before the last byte goes out, and
nothing is stored. New requests for blobs are passed through uncached while the disk is in trouble.

In a cluster (`shared`, store/shared/tiered.py) a fill's bytes come from one of three places
(`Fill.origin`): `upstream` for the node holding the cluster's lease `blob:<digest>` (taken before
the upstream fetch, renewed while it runs; the blob is uploaded to the bucket after its commit,
then the lease is released); `node`, the lease holder's fill followed over HTTP at the signed URL
it published (another node's `/fills/`), hashed and verified here as from upstream; or `bucket`, a
blob the bucket holds, streamed through this node (`shared.s3.redirect: false`; with redirects, an
L2 hit is a `307` to a presigned URL and no fill at all). A followed holder that dies (its stream
breaks, or stalls past the read time-out) is replaced: the bytes after those already taken come
from the bucket if the blob got there, else from the new lease holder, else this node takes the
lease and fetches upstream itself. Only the node that fetched a blob upstream uploads it, once
committed (verified), before it lets go of the lease. A follower's client that did not fetch
through upstream itself is checked as for a hit (access.py), and such bytes never mark the blob as
seen in a repository. Redis down: every node fills alone (local single flight); S3 down: the
leases still hold, blobs are cached in the nodes' own disks only (not uploaded), and L1 hits go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from multidict import CIMultiDict

from regcache.metrics import METRICS
from regcache.oci.api import API_VERSION_HEADER, RegistryRequest
from regcache.oci.digest import DigestMismatch
from regcache.services.access import Access
from regcache.services.answers import Answer, Decision, LocalStream, PassThrough, blob_head_answer, relay
from regcache.services.identity import Client
from regcache.services.manifests import not_in_offline_cache, unavailable
from regcache.services.upstream import (
    MAX_ERROR_BODY,
    TRANSFER_ERRORS,
    UpstreamAnswer,
    UpstreamClient,
    UpstreamUnavailable,
    describe_error,
    read_limited,
    shown,
)
from regcache.store.base import FillLease, SharedTier, Store
from regcache.store.errors import STORE_ERRORS, best_effort
from regcache.store.shared.errors import SharedUnavailable
from regcache.store.staging import BlobStaging

log = logging.getLogger(__name__)

# Never fill the disk to the last byte: the store's index and other writers need room too.
FREE_SPACE_RESERVE = 64 * 1024 * 1024
# Blobs up to this size are written to their staging file on the event loop (see Fills._run).
SMALL_BLOB = 1024 * 1024
# After a write to the store failed (disk full, I/O error), relay blobs uncached for this long.
DISK_TROUBLE_PAUSE = 60.0
# A committed fill stays visible this long, so a request that missed the store just before the
# commit joins it instead of fetching the blob a second time.
COMMITTED_GRACE_SECONDS = 30.0
# A fill relaying from memory (the disk refused its bytes) holds at most this much for its slowest
# follower; it reads from upstream no faster than that follower takes the bytes.
RELAY_BUFFER = 4 * 1024 * 1024
# A client sent to a fill is waited for this long: until it follows, the relay keeps every byte.
PROMISE_SECONDS = 10.0


class RelayStalled(Exception):
    """A fill relaying from memory waited too long for its followers to take the bytes held."""


class HolderGone(Exception):
    """A fill followed from a node that died could not go on: the source that took over refused."""


# Where a fill's bytes come from (module docstring).
FillOrigin = Literal["upstream", "node", "bucket"]
# A fill URL a lease publishes stays valid this many lease times (signed anew at every renewal,
# every third of one), and the blob endpoint serves it only while the fill runs or just committed.
FILL_URL_LEASES = 4
# While another node holds a blob's lease but its fill cannot be followed yet (starting, ending,
# dead until its lease expires): look again after this long.
CLUSTER_RETRY_SECONDS = 0.1


@dataclass
class Opened:
    """A fill's source, opened: its answer (`status`, `refusal` for anything but 200), size, and
    bytes; `release` lets go of it."""

    status: int | None
    content_length: int | None
    chunks: AsyncIterable[bytes]
    release: Callable[[], None]
    refusal: UpstreamAnswer | None = None


class FillView(Protocol):
    """What the fill's followers (the blob endpoint, completion) read of a `Fill`: its progress and
    outcome, read-only, and the follower's own calls. Only `Fills` moves a fill on."""

    @property
    def digest(self) -> str: ...
    @property
    def started(self) -> asyncio.Event: ...
    @property
    def expected_size(self) -> int | None: ...
    @property
    def staging_path(self) -> Path | None: ...
    @property
    def written(self) -> int: ...  # bytes received from upstream (and hashed)
    @property
    def on_disk(self) -> int: ...  # how many of them the staging file holds
    @property
    def verified(self) -> bool: ...
    @property
    def finished(self) -> bool: ...
    @property
    def committed(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
    @property
    def pass_through(self) -> str: ...
    @property
    def upstream_refusal(self) -> UpstreamAnswer | None: ...

    def follow(self) -> object | None: ...
    def advance(self, follower: object, sent: int) -> None: ...
    def unfollow(self, follower: object) -> None: ...
    def held(self, offset: int, size: int) -> bytes: ...
    async def wait_beyond(self, offset: int) -> None: ...


class Fill:
    """One upstream fetch of one blob, shared by every client that asked for it meanwhile. Its
    fields are written by `Fills` only (through the methods under "progress"); everyone else
    gets a `FillView`."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.started = asyncio.Event()  # the upstream status is known (or the fill failed)
        self.upstream_status: int | None = None  # the upstream's answer (None: it was not asked, or gave none)
        self.upstream_refusal: UpstreamAnswer | None = None  # a non-200 upstream answer
        self.error: str | None = None
        self.expected_size: int | None = None
        self.staging_path: Path | None = None
        self.written = 0  # bytes received from upstream (and hashed)
        self.on_disk = 0  # how many of them followers can read from the staging file
        self.finished = False
        self.verified = False  # every byte is in and matches the digest (committed a moment later)
        self.committed = False
        self.pass_through = ""  # why this blob is relayed uncached (disk full, write errors)
        self.spilled = ""  # why the staging file stopped taking bytes: the rest comes from memory
        self.origin: FillOrigin = "upstream"  # where the bytes come from (known once `started`)
        self.lease: FillLease | None = None  # the cluster's lease on this blob, if this node holds it
        self._changed = asyncio.Event()
        # Relaying from memory: the bytes from `_held_from` on that some follower has yet to send.
        self._held = bytearray()
        self._held_from = 0
        self._followers: dict[object, int] = {}  # follower → bytes it has sent
        self._promised: list[float] = []  # when clients were sent here that do not follow yet
        self._moved = asyncio.Event()  # a follower moved on, or gave up

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # progress (Fills._run's) -------------------------------------------------------------------
    def took(self, size: int, on_disk: int) -> None:
        """`size` more bytes came from upstream; the staging file holds `on_disk` of all of them."""
        self.written += size
        self.on_disk = on_disk
        self._notify()

    def mark_verified(self) -> None:
        """Every byte is in and matches the digest: followers may send the last one."""
        self.verified = True
        self._notify()

    def mark_committed(self) -> None:
        self.committed = True
        self._notify()

    def end(self) -> None:
        """The fill is over (committed, relayed, refused or failed)."""
        self.finished = True
        self.started.set()
        self._notify()

    # followers ------------------------------------------------------------------------------
    def promise(self) -> None:
        """A client is on its way here (to follow by a redirect or the mirror's stream): keep what
        it will need."""
        self._promised.append(time.monotonic())

    def unpromise(self) -> None:
        """A promised client is not coming after all (refused, or sent elsewhere)."""
        if self._promised:
            self._promised.pop()
        self._moved_on()

    def follow(self) -> object | None:
        """A new follower (from byte 0); None if it came too late: a fill relaying from memory
        has let go of bytes it needs."""
        if self._held_from > self.on_disk:
            return None
        if self._promised:
            self._promised.pop(0)
        follower = object()
        self._followers[follower] = 0
        self._moved_on()
        return follower

    def advance(self, follower: object, sent: int) -> None:
        self._followers[follower] = sent
        self._moved_on()

    def unfollow(self, follower: object) -> None:
        self._followers.pop(follower, None)
        self._moved_on()

    def _moved_on(self) -> None:
        self._let_go()
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def held(self, offset: int, size: int) -> bytes:
        """Bytes from memory, past what the staging file took (`offset` >= `on_disk`)."""
        start = offset - self._held_from
        return bytes(self._held[start : start + size])

    def _let_go(self) -> None:
        """Drop the held bytes every follower has sent, unless a promised client is still to come."""
        now = time.monotonic()
        self._promised = [when for when in self._promised if now - when < PROMISE_SECONDS]
        if not self.spilled or self._promised or not self._followers:
            return
        done = min(self._followers.values()) - self._held_from
        if done > 0:
            del self._held[:done]
            self._held_from += done

    # relaying from memory -------------------------------------------------------------------
    def spill(self, reason: str) -> None:
        """The staging file took its last byte: from here on the fill relays from memory."""
        self.spilled = reason
        self._held_from = self.on_disk

    async def hold(self, chunk: bytes, stall_seconds: float) -> None:
        """Keep `chunk` for the followers, once the slowest has made room for it (back-pressure
        on the upstream). Raises RelayStalled when no follower moves on for `stall_seconds`."""
        deadline = time.monotonic() + stall_seconds
        while True:
            self._let_go()  # promises expire
            if not self._followers and not self._promised:  # nothing to store, nobody to send to
                raise RelayStalled("no client follows the fill")
            if not self._held or len(self._held) + len(chunk) <= RELAY_BUFFER:
                break
            if time.monotonic() >= deadline:
                raise RelayStalled(f"no client took any of the blob's bytes for {stall_seconds:.0f} s")
            if await self._moved_within(min(1.0, deadline - time.monotonic())):  # each second: promises expire
                deadline = time.monotonic() + stall_seconds
        self._held += chunk

    async def promises_kept(self) -> None:
        """Until every client sent here follows, or has been waited for PROMISE_SECONDS: a fill
        relaying from memory keeps its staging file (the first bytes) until then."""
        self._let_go()
        while self._promised:
            await self._moved_within(1.0)
            self._let_go()

    async def _moved_within(self, seconds: float) -> bool:
        """Wait (at most `seconds`) for a follower to move on, come or go; whether one did."""
        moved = self._moved
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(moved.wait(), timeout=seconds)
        return moved.is_set()

    async def wait_beyond(self, offset: int) -> None:
        """Return once more than `offset` bytes are written, or the fill has ended."""
        changed = self._changed
        if self.written > offset or self.finished:
            return
        await changed.wait()


class Fills:
    """The running fills, by digest (single flight)."""

    def __init__(
        self, store: Store, upstream: UpstreamClient, shared: SharedTier | None = None, offline: bool = False
    ) -> None:
        """`offline`: never upstream; a fill comes from the cluster's bucket or fails."""
        self._store = store
        self._upstream = upstream
        self._shared = shared  # the cluster (store/shared/tiered.py); None: this node alone
        self._offline = offline
        # This node's signed URL where other nodes follow its fill of a digest (set by the fronts).
        self.fill_url: Callable[[str], str] | None = None
        self._fills: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._disk_trouble_until = 0.0
        self._evicting = asyncio.Lock()

    def get(self, digest: str) -> FillView | None:
        """The running (or just committed) fill of `digest`, as its followers see it."""
        return self._fills.get(digest)

    def running(self, digest: str) -> Fill | None:
        """The fill itself, for the blob service that starts and joins fills."""
        return self._fills.get(digest)

    def join(self, digest: str, url: str, headers: CIMultiDict[str], repository: str) -> FillView:
        """`start`, for a caller that only follows the fill (completion, warm)."""
        return self.start(digest, url, headers, repository)[0]

    def start(self, digest: str, url: str, headers: CIMultiDict[str], repository: str) -> tuple[Fill, bool]:
        """Join the running fill of `digest`, or start one (fetched through `repository`);
        True if this call started it."""
        fill = self._fills.get(digest)
        if fill is not None:
            return fill, False
        fill = self._fills[digest] = Fill(digest)
        # The fill belongs to no flow: a client that goes away does not abort it for the others.
        task = asyncio.create_task(self._run(fill, url, headers, repository))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill, True

    async def _run(self, fill: Fill, url: str, headers: CIMultiDict[str], repository: str) -> None:
        """The fill, holding the cluster's lease on the blob (if this node fetches it upstream) until
        its bytes are in the bucket too; then this node's eviction."""
        async with contextlib.AsyncExitStack() as leased:
            await self._fill(fill, url, headers, repository, leased)
            # The node that fetched it upstream uploads it (a follower's copy is the holder's to upload).
            if fill.committed and self._shared is not None and fill.origin == "upstream":
                await self._shared.upload_blob(fill.digest)  # verified and committed: never partial
        if fill.committed:
            await self._evict()

    async def _fill(
        self, fill: Fill, url: str, headers: CIMultiDict[str], repository: str, leased: contextlib.AsyncExitStack
    ) -> None:
        started_at = time.monotonic()
        opened: Opened | None = None
        staging: BlobStaging | None = None
        try:
            if skip := self._no_room(None):  # known before asking upstream: no fetch wasted
                fill.pass_through = skip
                return
            opened = await self._open(fill, url, headers, leased)
            fill.upstream_status = opened.status
            if opened.refusal is not None:
                fill.upstream_refusal = opened.refusal
                return
            fill.expected_size = opened.content_length
            if skip := self._no_room(fill.expected_size):
                fill.pass_through = skip
                return
            # A small blob is written on the event loop: a page-cache write of it costs less than
            # the trip to a worker thread (which waits for the GIL). Larger ones, and any blob that
            # turns out larger than announced, go through threads, so a stalled disk stalls no one.
            small = fill.expected_size is not None and fill.expected_size <= SMALL_BLOB
            try:
                staging = (
                    self._store.stage_blob(fill.digest)
                    if small
                    else await asyncio.to_thread(self._store.stage_blob, fill.digest)
                )
            except OSError as err:
                fill.pass_through = f"cannot stage it: {describe_error(err)}"
                self._disk_failed()
                return
            fill.staging_path = staging.path
            fill.started.set()
            async for chunk in self._taken_over(fill, opened, url, headers, leased):
                await self._take(fill, staging, chunk, inline=small and fill.written + len(chunk) <= SMALL_BLOB)
            staging.check(fill.expected_size)
            # Verified: followers may send the last byte now, not after the fsync and the index.
            fill.mark_verified()
            if fill.spilled:
                await fill.promises_kept()
                return  # relayed; the staging file is discarded below
            committing, staging = staging, None
            # Only an upstream answer through `repository` says the blob belongs to it (access.py).
            seen_in = repository if fill.origin == "upstream" else None
            await asyncio.to_thread(self._commit, committing, fill.expected_size, seen_in)
            fill.mark_committed()
        except (UpstreamUnavailable, DigestMismatch, RelayStalled, HolderGone, SharedUnavailable) as err:
            fill.error = str(err)
        except TRANSFER_ERRORS as err:  # before OSError: some are OSErrors too
            fill.error = f"GET {shown(url)}: {describe_error(err)}"
        except STORE_ERRORS as err:
            fill.error = f"writing {fill.digest} to the store: {describe_error(err)}"
            self._disk_failed()
        except BaseException as err:  # cancelled (shutdown, reload) or a bug: never looks complete
            fill.error = fill.error or f"fill stopped: {describe_error(err)}"
            raise
        finally:
            # Bytes from the cluster (another node, the bucket) are the cache's, not the upstream's.
            upstream_bytes = fill.written if fill.origin == "upstream" else 0
            METRICS.fill_ended(repository, upstream_bytes, failed=fill.error is not None)
            if fill.origin != "upstream":
                METRICS.cache_bytes_sent(fill.written)
            if staging is not None:
                staging.discard()
            if opened is not None:
                opened.release()
            fill.end()
            self._retire(fill)
            self._log(fill, time.monotonic() - started_at)

    # where the bytes come from (module docstring) -------------------------------------------------
    async def _open(
        self, fill: Fill, url: str, headers: CIMultiDict[str], leased: contextlib.AsyncExitStack
    ) -> Opened:
        """The fill's source, `fill.origin` set: upstream on a single node; in a cluster the bucket,
        the lease holder's fill, or upstream under this node's lease (Redis down: upstream alone).
        Offline: the bucket's copy only (no lease: this node would fetch nothing under it)."""
        if self._offline:
            opened = await self._from_bucket(fill) if self._shared is not None else None
            if opened is None:
                raise UpstreamUnavailable("offline: not in the shared bucket (or S3 unavailable)")
            return opened
        if self._shared is not None:
            try:
                found = await self._cluster_source(fill, leased)
            except SharedUnavailable as err:
                log.debug("cluster single flight not available for %s: %s", fill.digest, err)
                found = None
            if found is not None:
                return found
        fill.origin = "upstream"
        return await self._open_upstream(url, headers)

    async def _cluster_source(self, fill: Fill, leased: contextlib.AsyncExitStack) -> Opened | None:
        """The bucket's copy, the holder's fill, or None with this node holding the lease (None
        also when the lease stays unobtainable past its time: then upstream without one)."""
        assert self._shared is not None
        shared, name = self._shared, f"blob:{fill.digest}"
        deadline = time.monotonic() + 3 * shared.lease_seconds + (self._upstream.blob_timeout().sock_read or 30.0)
        while time.monotonic() < deadline:
            if (opened := await self._from_bucket(fill)) is not None:
                return opened
            lease = await shared.acquire(name, self._fill_url_of(fill.digest))
            if lease is not None:
                # A holder uploads before it lets go: the lease may be free because the blob is there now.
                if (opened := await self._from_bucket(fill)) is not None:
                    with contextlib.suppress(SharedUnavailable):  # it expires by itself
                        await lease.release()
                    return opened
                await leased.enter_async_context(lease.kept())  # renewed until the upload is done
                fill.lease = lease
                return None
            holder = await shared.holder(name)
            if holder is not None and holder.url and (opened := await self._from_node(holder.url)) is not None:
                fill.origin = "node"
                log.info("FOLLOWING blob %s from node %s", fill.digest, holder.node)
                return opened
            await asyncio.sleep(CLUSTER_RETRY_SECONDS)  # the holder is starting, ending or dead
        log.warning("cluster lease of %s not obtainable: fetching upstream without it", fill.digest)
        return None

    def _fill_url_of(self, digest: str) -> Callable[[], str] | None:
        """What makes this node's fill URL of `digest` (signed anew at each lease renewal)."""
        make = self.fill_url
        return None if make is None else lambda: make(digest)

    async def _from_bucket(self, fill: Fill) -> Opened | None:
        """The bucket's copy (`fill.origin` then `bucket`), None if it has none or S3 is down."""
        assert self._shared is not None
        if self._shared.s3_down:
            return None
        try:
            found = await self._shared.shared_chunks(fill.digest)
        except SharedUnavailable:
            return None
        if found is None:
            return None
        size, chunks = found
        fill.origin = "bucket"
        return Opened(200, size, chunks, lambda: None)

    async def _from_node(self, url: str) -> Opened | None:
        """The lease holder's fill, followed at the URL it published; None unless it serves it."""
        try:
            response = await self._upstream.open("GET", url, CIMultiDict(), self._upstream.blob_timeout(),
                                                 own_credentials=False)  # fmt: skip
        except UpstreamUnavailable as err:
            log.debug("the lease holder's fill at %s: %s", shown(url), err)
            return None
        if response.status != 200:
            response.release()
            return None
        return Opened(200, response.content_length, response.content.iter_any(), response.release)

    async def _open_upstream(self, url: str, headers: CIMultiDict[str]) -> Opened:
        response = await self._upstream.open("GET", url, headers, self._upstream.blob_timeout())
        if response.status != 200:
            try:
                body = await read_limited(response, MAX_ERROR_BODY)
            finally:
                response.release()
            refusal = UpstreamAnswer(response.status, response.headers, body)
            return Opened(response.status, None, _no_chunks(), lambda: None, refusal)
        return Opened(200, response.content_length, response.content.iter_any(), response.release)

    async def _taken_over(
        self, fill: Fill, opened: Opened, url: str, headers: CIMultiDict[str], leased: contextlib.AsyncExitStack
    ) -> AsyncIterator[bytes]:
        """The source's bytes; when a followed holder dies mid-fill, the rest from a new source (the
        bucket, the new holder, or upstream under this node's lease), its first bytes skipped."""
        current, taken = opened, 0
        try:
            while True:
                try:
                    async for chunk in _after(current.chunks, taken):
                        taken += len(chunk)
                        yield chunk
                    return
                except (*TRANSFER_ERRORS, SharedUnavailable) as err:
                    if fill.origin != "node":
                        raise
                    log.warning("the followed fill of %s broke after %d B (%s): taking over", fill.digest, taken,
                                describe_error(err))  # fmt: skip
                if current is not opened:
                    current.release()
                current = await self._open(fill, url, headers, leased)
                if current.refusal is not None:
                    raise HolderGone(f"taking over {fill.digest}: upstream answered {current.status}")
        finally:
            if current is not opened:
                current.release()

    async def _take(self, fill: Fill, staging: BlobStaging, chunk: bytes, inline: bool) -> None:
        """One chunk from upstream: into the staging file (`inline`: on the event loop), or, once
        the disk has refused one, hashed and held in memory for the followers."""
        if not staging.spilled:
            try:
                if inline:
                    staging.write(chunk)
                else:
                    await asyncio.to_thread(staging.write, chunk)
            except OSError as err:  # the chunk is hashed all the same
                fill.spill(f"writing {fill.digest} to {staging.path.parent}: {describe_error(err)}")
                self._disk_failed()
        else:
            staging.write(chunk)  # hashing only
        if fill.spilled:
            await fill.hold(chunk, self._upstream.blob_timeout().sock_read or DISK_TROUBLE_PAUSE)
        fill.took(len(chunk), staging.on_disk)

    def _disk_failed(self) -> None:
        """The disk, not the upstream, failed: stop caching blobs for a while, keep serving."""
        self._disk_trouble_until = time.monotonic() + DISK_TROUBLE_PAUSE

    def _commit(self, staging: BlobStaging, expected_size: int | None, repository: str | None) -> None:
        """Into the store, and known to belong to `repository` (access.py): one thread trip."""
        self._store.commit_blob(staging, expected_size)
        if repository is not None:
            best_effort("access records", self._store.mark_seen, repository, [staging.digest])

    async def _evict(self) -> None:
        """One eviction at a time: concurrent ones would each free the whole excess."""
        if self._evicting.locked():
            return  # the running one re-reads the store's volume as it goes
        async with self._evicting:
            try:
                removed, freed = await asyncio.to_thread(self._store.evict)
            except STORE_ERRORS as err:
                log.warning("eviction skipped: %s", err)
                return
        if removed:
            log.info("EVICTED %d entries, %d B, least recently used first (size_limit)", removed, freed)

    def _no_room(self, size: int | None) -> str:
        """Why this blob must not be cached now (empty: it may be)."""
        if time.monotonic() < self._disk_trouble_until:
            return "a recent write to the store failed"
        free = shutil.disk_usage(self._store.staging_dir).free
        if free < (size or 0) + FREE_SPACE_RESERVE:
            return f"{free} B free in {self._store.staging_dir}, blob is {size} B"
        return ""

    def _retire(self, fill: Fill) -> None:
        if not fill.committed:
            self._fills.pop(fill.digest, None)
            return
        asyncio.get_running_loop().call_later(COMMITTED_GRACE_SECONDS, self.forget, fill)

    def forget(self, fill: FillView) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]

    @staticmethod
    def _log(fill: Fill, seconds: float) -> None:
        if fill.pass_through:
            log.warning("caching skipped for %s, passed through: %s", fill.digest, fill.pass_through)
        elif fill.committed:
            log.info("STORED blob %s %d B in %.0f ms", fill.digest, fill.written, seconds * 1000)
        elif fill.error:
            log.warning("fill of %s failed after %d B, nothing stored: %s", fill.digest, fill.written, fill.error)
        elif fill.spilled:
            log.warning(
                "fill of %s relayed from memory after the first %d B, nothing stored: %s",
                fill.digest,
                fill.on_disk,
                fill.spilled,
            )

    async def close(self, wait: bool = False) -> None:
        """Stop: cancel running fills (nothing partial is stored), or with `wait` let them end."""
        if not wait:
            for task in list(self._tasks):
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class BlobService:
    def __init__(
        self,
        store: Store,
        upstream: UpstreamClient,
        fills: Fills,
        access: Access,
        offline: bool,
        shared: SharedTier | None = None,
    ) -> None:
        self._access = access
        self._store = store
        self._upstream = upstream
        self._fills = fills
        self._offline = offline
        self._shared = shared

    async def serve(self, req: RegistryRequest, ranged: bool) -> Decision:
        digest = req.route.reference
        client = await self._access.client(req)
        fill = self._fills.running(digest)
        if fill is None or fill.committed:
            if stored := await asyncio.to_thread(find_stored, self._store, digest, req.repository):
                return await self._access.check(req, client, digest, "blobs", stored.seen) or self._hit(req, stored)
            if fill is not None:  # committed, and evicted since
                self._fills.forget(fill)
                fill = None
        if fill is None and (shared := await self._shared_hit(req, client, digest, ranged)) is not None:
            return shared
        if self._offline:
            return not_in_offline_cache(req, "BLOB_UNKNOWN")
        if req.head:
            try:
                answer = await self._upstream.fetch("HEAD", req.url, CIMultiDict(req.headers))
            except UpstreamUnavailable as err:
                return unavailable(req, str(err))
            self._access.observe_answer(req, client, answer)
            return relay(answer, "PASS")
        if ranged:
            return PassThrough(note="range request for an uncached blob")
        return await self._fill_and_join(req, client)

    async def _fill_and_join(self, req: RegistryRequest, client: Client) -> Decision:
        """Start the blob's fill (or join the running one) and follow it."""
        fill, started = self._fills.start(req.route.reference, req.url, CIMultiDict(req.headers), req.repository)
        fill.promise()  # before the fill runs: should its disk fail, it keeps its bytes for this client
        decision: Decision | None = None
        try:
            decision = await self._join(req, client, fill, started)
            return decision
        finally:
            if not isinstance(decision, LocalStream):  # refused, sent elsewhere, or gone
                fill.unpromise()

    async def _join(self, req: RegistryRequest, client: Client, fill: Fill, started: bool) -> Decision:
        """Follow the fill (`started`: this request started it), or what this client gets instead."""
        digest = req.route.reference
        if not started and (denied := await self._access.check(req, client, digest, "blobs")):
            return denied  # someone else's fill: this client must be allowed too
        await fill.started.wait()  # bounded: the upstream client times out
        if started and fill.origin != "upstream" and (denied := await self._access.check(req, client, digest, "blobs")):
            return denied  # bytes from the cluster, not from upstream for this client: checked as a hit
        if fill.upstream_refusal is not None:
            if started:
                self._access.observe_answer(req, client, fill.upstream_refusal)
            return relay(fill.upstream_refusal, "PASS")
        # Only what the upstream said to this client: a skip, or bytes from the cluster, say nothing.
        if started and fill.origin == "upstream" and fill.upstream_status == 200:
            self._access.observe(req, client, 200)
        if fill.pass_through:
            return PassThrough("MISS", note=f"not cached: {fill.pass_through}")
        if fill.spilled and not started:  # the disk is in trouble: this client fetches for itself
            return PassThrough("MISS", note=f"not cached: {fill.spilled}")
        if fill.error is not None:
            return unavailable(req, fill.error)
        if fill.origin == "bucket":  # no upstream contact: a hit, streamed through this node
            return LocalStream("fills", digest, "HIT", note="from the shared bucket, through this node")
        return LocalStream("fills", digest, "MISS", note="" if started else "joined a running fill")

    async def _shared_hit(self, req: RegistryRequest, client: Client, digest: str, ranged: bool) -> Decision | None:
        """A blob the cluster's bucket holds, after the checks a local hit gets: a `307` to a
        presigned URL (`shared.s3.redirect`), or with redirects off a fill from the bucket through
        this node (also offline); None when the bucket lacks it or S3 is down (then a miss), or
        for a range without redirects."""
        if self._shared is None or self._shared.s3_down:
            return None
        try:
            blob = await self._shared.shared_blob(digest)
            if blob is None:
                return None
            if denied := await self._access.check(req, client, digest, "blobs"):
                return denied
            if req.head:
                return blob_head_answer(digest, blob.size, "HIT")
            if not self._shared.redirect:
                return None if ranged else await self._fill_and_join(req, client)
            url = await self._shared.presigned_url(digest)
        except SharedUnavailable:
            return None
        METRICS.cache_bytes_sent(blob.size)
        headers = [("Location", url), ("Docker-Content-Digest", digest), *API_VERSION_HEADER.items()]
        return Answer(307, headers, b"", "HIT", note="from the shared bucket")

    @staticmethod
    def _hit(req: RegistryRequest, stored: StoredBlob) -> Decision:
        if req.head:
            return blob_head_answer(stored.digest, stored.size, "HIT")
        return LocalStream("blobs", stored.digest, "HIT", path=stored.path)


@dataclass(frozen=True)
class StoredBlob:
    digest: str
    path: str
    size: int
    seen: bool  # known to belong to the repository it was asked through (access.py)


def find_stored(store: Store, digest: str, repository: str) -> StoredBlob | None:
    """Everything a blob hit needs from the store, in one trip to a worker thread: thread hops
    wait for the GIL, and concurrent hits made several each."""
    handle = store.open_blob(digest)
    if handle is None:
        return None
    with handle:
        path, size = str(handle.name), os.fstat(handle.fileno()).st_size
    return StoredBlob(digest, path, size, store.is_seen(repository, digest))


async def _after(chunks: AsyncIterable[bytes], skip: int) -> AsyncIterator[bytes]:
    """`chunks` without their first `skip` bytes (those a fill took from a source before this one)."""
    async for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        yield chunk[skip:] if skip else chunk
        skip = 0


async def _no_chunks() -> AsyncIterator[bytes]:
    empty: tuple[bytes, ...] = ()
    for chunk in empty:  # an async generator that yields nothing
        yield chunk

