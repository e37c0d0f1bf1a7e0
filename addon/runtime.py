"""Everything one configuration builds, and the one entry point both fronts share.

A `Runtime` owns the store, the access records, the upstream client, the services (manifests, blobs,
access, tokens), the blob endpoint and the registry mirror. `decide` turns a parsed registry read
(`RegistryRequest`) into a `Decision`, whether it came through the proxy (cache.py) or to the
mirror's own port (mirror.py), so both apply the same cache, revalidation and access rules.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import diskcache
from multidict import CIMultiDict

from .access import Access
from .access_records import DiskAccessRecords
from .answers import Answer, Decision, error_answer, relay
from .blobs import BlobService, Fills
from .blobserver import BlobServer
from .config import Settings
from .identity import Client
from .manifests import ManifestService, upstream_failed
from .metrics import flush_usage, flush_usage_periodically
from .mirror import MirrorServer
from .routes import API_VERSION_HEADER, INVALID_MESSAGES, Kind, RegistryRequest, error_body
from .store import DiskStore
from .token_service import TokenService
from .upstream import UpstreamClient, UpstreamUnavailable

log = logging.getLogger("regcache")


class Runtime:
    """Store, upstream client, services, blob endpoint and mirrors of one configuration."""

    def __init__(self, settings: Settings, offline: bool) -> None:
        self.settings = settings
        self.offline = offline
        self.store = DiskStore(settings.cache_dir, settings.size_limit)
        self.records = DiskAccessRecords(settings.cache_dir)
        self.upstream = UpstreamClient(settings)
        self.fills = Fills(self.store, self.upstream)
        self.blob_server = BlobServer(self.store, self.fills, settings.blob_listen)
        self.access = Access(self.store, self.records, self.upstream, settings, offline)
        self.tokens = TokenService(self.access, self.records, self.upstream, offline)
        self.manifests = ManifestService(self.store, self.upstream, self.access, offline)
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
        # Fills first: a server's cleanup waits for its handlers, and followers of a running
        # fill would keep it waiting until the fill ends.
        await self.fills.close()
        await self.upstream.close()
        await self.access.close()
        if self._started is not None:
            for mirror in self.mirrors:
                await mirror.stop()
            await self.blob_server.stop()
        if self._usage_flusher is not None:
            self._usage_flusher.cancel()
        await asyncio.to_thread(flush_usage, self.store)
        self.store.close()
        self.records.close()

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
        if client.issued_here:
            return await self._recorded_ping(req, client, "STALE", "a token regcache issued")
        try:
            answer = await self.upstream.fetch(req.method, req.url, CIMultiDict(req.headers))
        except UpstreamUnavailable as err:
            return await self._recorded_ping(req, client, "STALE", str(err))
        if upstream_failed(answer):
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
