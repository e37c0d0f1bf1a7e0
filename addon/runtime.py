"""Everything one configuration builds, and the one entry point both fronts share.

A `Runtime` owns the store, the upstream client, the services (manifests, blobs, access), the
background completion of tags clients only `HEAD`ed (completion.py), the blob endpoint and the
registry mirror. `decide` turns a parsed registry read (`RegistryRequest`) into a
`Decision`, whether it came through the proxy (cache.py) or to the mirror's own port (mirror.py),
so both apply the same cache, revalidation and access rules.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from urllib.parse import urlsplit

import diskcache
from multidict import CIMultiDict

from .access import Access
from .answers import Answer, Decision, error_answer, relay
from .blobs import BlobService, Fills
from .blobserver import BlobServer
from .completion import Completions
from .config import Settings
from .manifests import ManifestService, upstream_failed
from .metrics import flush_usage, flush_usage_periodically
from .mirror import MirrorServer
from .routes import API_VERSION_HEADER, INVALID_MESSAGES, Kind, RegistryRequest
from .store import DiskStore
from .upstream import UpstreamClient, UpstreamUnavailable, bearer_realm_host

log = logging.getLogger("regcache")


class Runtime:
    """Store, upstream client, services, blob endpoint and mirrors of one configuration."""

    def __init__(self, settings: Settings, offline: bool) -> None:
        self.settings = settings
        self.offline = offline
        self.store = DiskStore(settings.cache_dir, settings.size_limit)
        self.realm_hosts = self.store.realm_hosts()
        self.upstream = UpstreamClient(settings)
        self.fills = Fills(self.store, self.upstream)
        self.blob_server = BlobServer(self.store, self.fills, settings.blob_listen)
        self.access = Access(self.store, self.upstream, offline)
        self.manifests = ManifestService(self.store, self.upstream, self.access, offline)
        self.completions = Completions(self.store, self.manifests, self.fills, settings.platforms)
        self.manifests.complete_later = self.completions.schedule
        self.blobs = BlobService(self.store, self.upstream, self.fills, self.access, offline)
        self.mirrors = [MirrorServer(self, host, listen) for host, listen in settings.mirrors.items()]
        self._started: asyncio.Future[None] | None = None
        self._sweeper: asyncio.Future[None] | None = None
        self._usage_flusher: asyncio.Future[None] | None = None

    async def started(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
            if self.settings.max_age and not self.offline:  # a replayed cache is kept whole
                self._sweeper = asyncio.ensure_future(self._expire_unused())
            self._usage_flusher = asyncio.ensure_future(flush_usage_periodically(self.store))
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        await self.blob_server.start()
        for mirror in self.mirrors:
            await mirror.start()

    async def _expire_unused(self) -> None:
        """Every max_age/10 (at most hourly): drop what nobody used for max_age."""
        max_age = self.settings.max_age
        while True:
            try:
                removed, freed = await asyncio.to_thread(self.store.expire_unused, max_age)
            except (OSError, diskcache.Timeout) as err:
                log.warning("expiry skipped: %s", err)
            else:
                if removed:
                    log.info("EXPIRED %d entries, %d B, unused for %.0f s (max_age)", removed, freed, max_age)
            await asyncio.sleep(min(3600.0, max(1.0, max_age / 10)))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Fills first (after the completions that start them): a server's cleanup waits for its
        # handlers, and followers of a running fill would keep it waiting until the fill ends.
        await self.completions.close()
        await self.fills.close()
        await self.upstream.close()
        if self._started is not None:
            for mirror in self.mirrors:
                await mirror.stop()
            await self.blob_server.stop()
        if self._usage_flusher is not None:
            self._usage_flusher.cancel()
        await asyncio.to_thread(flush_usage, self.store)
        self.store.close()

    async def decide(self, req: RegistryRequest, ranged: bool) -> Decision:
        """What a registry read gets; a bug or a broken store becomes a 503, never an exception."""
        try:
            match req.route.kind:
                case Kind.INVALID:
                    return error_answer(400, req.route.error_code, INVALID_MESSAGES[req.route.error_code])
                case Kind.MANIFEST:
                    return await self.manifests.serve(req)
                case Kind.BLOB:
                    return await self.blobs.serve(req, ranged)
                case _:
                    return await self._ping(req)
        except Exception as err:
            log.exception("regcache: %s %s failed", req.method, req.describe())
            return error_answer(503, "UNAVAILABLE", "regcache failed on this request; retry", note=repr(err))

    async def _ping(self, req: RegistryRequest) -> Answer:
        """`/v2/` is always asked upstream (never cached); if the upstream cannot answer, or we
        are offline, say "no auth needed" so clients go on to stored content."""
        no_auth_needed = [("Content-Type", "application/json"), *API_VERSION_HEADER.items()]
        if self.offline:
            return Answer(200, no_auth_needed, b"{}", "HIT", note="offline")
        url = urlsplit(req.url)
        if "Authorization" not in req.headers and self.settings.credential_for(url.hostname or "", url.port):
            # regcache authenticates to this registry itself: clients need not.
            return Answer(200, no_auth_needed, b"{}", "PASS", note="regcache's own credentials")
        try:
            answer = await self.upstream.fetch(req.method, req.url, CIMultiDict(req.headers))
        except UpstreamUnavailable as err:
            return Answer(200, no_auth_needed, b"{}", "STALE", note=str(err))
        if upstream_failed(answer):
            return Answer(200, no_auth_needed, b"{}", "STALE", note=f"upstream answered {answer.status}")
        await self.learn_realm(bearer_realm_host(answer.headers.get("WWW-Authenticate", "")))
        return relay(answer, "PASS")

    async def learn_realm(self, realm_host: str | None) -> None:
        """A cached registry named this auth realm: offline, regcache answers for it; the mirror
        relays token requests to it (and to no other host)."""
        if realm_host and realm_host not in self.realm_hosts:
            self.realm_hosts.add(realm_host)
            try:
                await asyncio.to_thread(self.store.add_realm_host, realm_host)
            except (OSError, sqlite3.Error, diskcache.Timeout) as err:  # known for this run anyway
                log.warning("auth realm %s not saved in the store: %s", realm_host, err)

    def answers_tokens(self, host: str) -> bool:
        """Offline, regcache is the token service of every auth realm it has seen."""
        return self.offline and host in self.realm_hosts
