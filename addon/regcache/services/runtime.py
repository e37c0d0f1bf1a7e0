"""Everything one configuration builds of the registry services, and `decide`, the one entry point
both fronts (fronts/proxy.py, fronts/mirror.py) share.

A `Runtime` owns the store, the access records, the upstream client, the services (manifests, blobs
and their fills, access, tokens), the background completion of tags clients only `HEAD`ed
(completion.py) and the background upkeep of the store (expiry, last uses, usage counts; in a
cluster also this node's heartbeat and the bucket's sweep, store/shared/tiered.py). It knows
no front: the servers a configuration runs (blob endpoint, mirrors) are fronts/node.py's.
`decide` turns a parsed registry read (`RegistryRequest`) into a `Decision`, whether it came through
the proxy or to the mirror's own port, so both apply the same cache, revalidation and access rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from multidict import CIMultiDict

from regcache.config import Settings, unprotected_redis
from regcache.metrics import METRICS
from regcache.oci.api import API_VERSION_HEADER, INVALID_MESSAGES, Kind, RegistryRequest, error_body
from regcache.services.access import Access
from regcache.services.answers import Answer, Decision, error_answer, relay
from regcache.services.blobs import BlobService, Fills
from regcache.services.completion import Completions
from regcache.services.identity import Client
from regcache.services.manifests import ManifestService
from regcache.services.tokens import TokenService
from regcache.services.upstream import UpstreamClient, UpstreamUnavailable, upstream_failed
from regcache.store.access import AccessRecords, DiskAccessRecords
from regcache.store.base import Store, UsageStore
from regcache.store.disk import DiskStore
from regcache.store.errors import STORE_ERRORS, USE_FLUSH_SECONDS, best_effort
from regcache.store.shared.access import ClusterAccessRecords, RedisAccessRecords
from regcache.store.shared.errors import SharedUnavailable
from regcache.store.shared.tiered import TieredStore, open_tiered

log = logging.getLogger("regcache")

USAGE_FLUSH_SECONDS = 5.0
# In a cluster: how often this node says it is alive (for `stats`), and tries to sweep the bucket
# (one node at a time does: the others find the sweep lock taken).
HEARTBEAT_SECONDS = 10.0
SWEEP_SECONDS = 300.0


class Runtime:
    """Store, upstream client and services of one configuration."""

    def __init__(self, settings: Settings, offline: bool) -> None:
        """Opens the store (raises StoreError, OSError, sqlite3.Error; with `shared`, BucketUnusable)."""
        self.settings = settings
        self.offline = offline
        # Evictions and expiry sweeps in a helper process: in a thread they slow requests (disk.py).
        disk = DiskStore(settings.cache_dir, settings.size_limit, remove_apart=True)
        # A cluster's node: its disk as L1 under the shared bucket and Redis (store/shared/tiered.py).
        self.tiered: TieredStore | None = None
        if settings.shared is not None:
            try:
                self.tiered = open_tiered(disk, settings.shared)
            except BaseException:
                disk.close()
                raise
        self.store: Store = self.tiered or disk
        if self.store.read_only:
            log.warning(
                "regcache: the store in %s is read-only (%s): serving what it holds, caching nothing new until "
                "regcache is restarted with room on its disk",
                settings.cache_dir,
                self.store.read_only,
            )
        self.records: AccessRecords = DiskAccessRecords(settings.cache_dir)
        if self.tiered is not None and settings.shared is not None:  # grants are the cluster's, as strict
            shared = settings.shared
            if unprotected_redis(shared.redis):
                log.warning(
                    "regcache: shared.redis %s has no password and is not on this host: whoever can reach it can "
                    "grant access to private images; give it a password (and TLS, rediss://)",
                    shared.redis.url,
                )
            shared_records = RedisAccessRecords(shared.redis, shared.access_secret, breaker=self.tiered.redis.breaker)
            self.records = ClusterAccessRecords(shared_records, self.records)
        self.upstream = UpstreamClient(settings)
        self.fills = Fills(self.store, self.upstream, self.tiered, offline)
        self.access = Access(self.store, self.records, self.upstream, settings, offline, self.tiered is not None)
        self.tokens = TokenService(self.access, self.records, self.upstream, offline)
        self.manifests = ManifestService(self.store, self.upstream, self.access, offline, self.tiered)
        self.completions = Completions(self.store, self.manifests, self.fills, settings.platforms)
        self.manifests.complete_later = self.completions.schedule
        self.blobs = BlobService(self.store, self.upstream, self.fills, self.access, offline, self.tiered)
        self._background: list[asyncio.Future[None]] = []

    def start_background(self) -> None:
        """The store's upkeep while this configuration runs (once)."""
        if self._background:
            return
        if self.settings.max_age and not self.offline:  # a replayed cache is kept whole
            self._background.append(asyncio.ensure_future(self._expire_unused()))
        self._background.append(asyncio.ensure_future(flush_usage_periodically(self.store)))
        self._background.append(asyncio.ensure_future(self._flush_uses()))
        if self.tiered is not None:
            self._background.append(asyncio.ensure_future(self._heartbeat(self.tiered)))
            if not self.offline:
                self._background.append(asyncio.ensure_future(self._sweep(self.tiered)))

    def stop_background(self) -> None:
        for task in self._background:
            task.cancel()

    async def _flush_uses(self) -> None:
        """Last uses into the store every few seconds, off the event loop: reads never write."""
        while True:
            await asyncio.sleep(USE_FLUSH_SECONDS)
            await asyncio.to_thread(self.store.flush_uses)

    async def _heartbeat(self, tiered: TieredStore) -> None:
        """This node in the cluster's registry (its blob endpoint, when it started, last seen)."""
        started = time.time()
        urls = {"blob": self.settings.blob_url or ""}
        while True:
            with contextlib.suppress(SharedUnavailable):  # the breaker has said so, once
                await tiered.heartbeat(urls, started)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _sweep(self, tiered: TieredStore) -> None:
        """The bucket's sweep (shared.size_limit, shared.max_age), by one node at a time."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await tiered.sweep()
            except (SharedUnavailable, *STORE_ERRORS) as err:
                log.warning("shared store: the bucket's sweep skipped: %s", err)

    async def _expire_unused(self) -> None:
        """Every max_age/10 (at most hourly): drop what nobody used for max_age."""
        max_age = self.settings.max_age
        while True:
            try:
                removed, freed = await asyncio.to_thread(self.store.expire_unused, max_age)
            except STORE_ERRORS as err:
                log.warning("expiry skipped: %s", err)
            else:
                if removed:
                    log.info("EXPIRED %d entries, %d B, unused for %.0f s (max_age)", removed, freed, max_age)
            await asyncio.sleep(min(3600.0, max(1.0, max_age / 10)))

    async def stop_services(self) -> None:
        """The first half of closing: no more background work, fills or upstream requests.
        Fills after the completions that start them; before the servers stop (a server's cleanup
        waits for its handlers, and followers of a running fill would keep it waiting)."""
        self.stop_background()
        await self.completions.close()
        await self.fills.close()
        await self.upstream.close()
        await self.access.close()

    async def close_store(self) -> None:
        """The last half: what was counted and used into the store, then let go of it."""
        await asyncio.to_thread(flush_usage, self.store)
        await asyncio.to_thread(self.store.flush_uses)
        self.store.close()
        self.records.close()
        if self.tiered is not None:
            await self.tiered.aclose()

    def store_totals(self) -> Mapping[str, tuple[int, int]] | None:
        """(entries, bytes) per kind for the metrics' store gauges; None (and a warning) when the
        store cannot say (called from the scrape's thread)."""
        try:
            return self.store.entry_totals()
        except STORE_ERRORS as err:
            log.warning("metrics: store size not available: %s", err)
            return None

    async def decide(self, req: RegistryRequest, ranged: bool) -> Decision:
        """What a registry read gets; a bug or a broken store becomes a 503, never an exception."""
        try:
            match req.route.kind:
                case Kind.INVALID:
                    return error_answer(400, req.route.error_code, INVALID_MESSAGES[req.route.error_code])
                case Kind.MANIFEST:
                    decision: Decision = await self.manifests.serve(req)
                case Kind.BLOB:
                    decision = await self.blobs.serve(req, ranged)
                case _:
                    decision = await self._ping(req)
        except Exception as err:
            log.exception("regcache: %s %s failed", req.method, req.describe())
            return error_answer(503, "UNAVAILABLE", "regcache failed on this request; retry", note=repr(err))
        if isinstance(decision, Answer):  # a cached registry's challenge names its auth realm
            for name, value in decision.headers:
                if name.lower() == "www-authenticate":
                    self.tokens.learn_realm(value)
        return decision

    async def _ping(self, req: RegistryRequest) -> Answer:
        """`/v2/` is always asked upstream (never cached). If the upstream cannot answer, or we are
        offline, the registry's last challenge, so that clients with credentials present them;
        "no auth needed" when it asked for none (or regcache authenticates itself)."""
        if self.access.open_offline:
            return no_auth_needed("HIT", "offline")
        url = urlsplit(req.url)
        if "Authorization" not in req.headers and self.settings.credential_for(url.hostname or "", url.port):
            # regcache authenticates to this registry itself: clients need not.
            return no_auth_needed("PASS", "regcache's own credentials")
        client = await self.access.client(req)
        if self.offline:
            return await self._recorded_ping(req, client, "HIT", "offline")
        try:
            answer = await self.upstream.fetch(req.method, req.url, CIMultiDict(req.headers))
        except UpstreamUnavailable as err:
            return await self._recorded_ping(req, client, "STALE", str(err))
        if upstream_failed(answer.status):
            return await self._recorded_ping(req, client, "STALE", f"upstream answered {answer.status}")
        self.access.learn_challenge(req.url, answer, authorized="Authorization" in req.headers)
        return relay(answer, "PASS")

    async def _recorded_ping(self, req: RegistryRequest, client: Client, result: str, note: str) -> Answer:
        """`/v2/` without the upstream: 200 for clients regcache can serve something, else the
        registry's recorded challenge (none recorded: the registry asks for no credentials)."""
        challenge = self.access.challenge(req.url)
        if challenge is None:
            return no_auth_needed(result, note)
        if "Authorization" in req.headers and await self.access.recognised(client):
            return no_auth_needed(result, note)
        headers = [("Content-Type", "application/json"), ("WWW-Authenticate", challenge), *API_VERSION_HEADER.items()]
        return Answer(401, headers, error_body("UNAUTHORIZED", "authentication required"), result, note=note)


def no_auth_needed(result: str, note: str) -> Answer:
    """`/v2/` answered here: the registry API, no credentials asked."""
    headers = [("Content-Type", "application/json"), *API_VERSION_HEADER.items()]
    return Answer(200, headers, b"{}", result, note=note)


async def flush_usage_periodically(store: UsageStore) -> None:
    """The running cache's loop: counts go into the store every few seconds, off the event loop."""
    while True:
        await asyncio.sleep(USAGE_FLUSH_SECONDS)
        # Kept for the next flush when the store refuses them; on a full disk, warned about once.
        await asyncio.to_thread(best_effort, "usage counts", METRICS.usage.flush, store)


def flush_usage(store: UsageStore) -> None:
    """The last flush, at shutdown or when a configuration replaces the store (blocking)."""
    try:
        METRICS.usage.flush(store)
    except STORE_ERRORS as err:
        log.warning("usage counts since the last save are lost: %s", err)
