"""Everything one configuration builds, and the one entry point both fronts share.

A `Runtime` owns the store, the access records, the upstream client, the services (manifests, blobs,
access, tokens), the background completion of tags clients only `HEAD`ed (completion.py), the blob
endpoint and the registry mirror. `decide` turns a parsed registry read (`RegistryRequest`) into a
`Decision`, whether it came through the proxy (cache.py) or to the mirror's own port (mirror.py),
so both apply the same cache, revalidation and access rules.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from multidict import CIMultiDict

from .access import Access
from .access_records import DiskAccessRecords
from .answers import Answer, Decision, error_answer, relay
from .blobs import BlobService, Fills
from .blobserver import BlobServer
from .completion import Completions
from .config import Settings
from .identity import Client
from .listener import Listener, Timeouts
from .manifests import ManifestService, upstream_failed
from .metrics import flush_usage, flush_usage_periodically
from .mirror import MirrorServer
from .routes import API_VERSION_HEADER, INVALID_MESSAGES, Kind, RegistryRequest, error_body
from .store import DiskStore
from .token_service import TokenService
from .upstream import UpstreamClient, UpstreamUnavailable
from .writes import STORE_ERRORS, USE_FLUSH_SECONDS

log = logging.getLogger("regcache")


class StartupError(Exception):
    """Something regcache cannot run without (the blob endpoint's port): one line, and no start."""


class Runtime:
    """Store, upstream client, services, blob endpoint and mirrors of one configuration."""

    def __init__(self, settings: Settings, offline: bool, previous: Runtime | None = None) -> None:
        """Opens the store and binds every listening socket (raises StartupError, OSError).
        `previous`: the running configuration this one replaces (its sockets at the same fixed
        addresses are taken over)."""
        self.settings = settings
        self.offline = offline
        self.store = DiskStore(settings.cache_dir, settings.size_limit)
        if self.store.read_only:
            log.warning(
                "regcache: the store in %s is read-only (%s): serving what it holds, caching nothing new until "
                "regcache is restarted with room on its disk",
                settings.cache_dir,
                self.store.read_only,
            )
        self.records = DiskAccessRecords(settings.cache_dir)
        self.upstream = UpstreamClient(settings)
        self.fills = Fills(self.store, self.upstream)
        timeouts = Timeouts(settings.header_timeout, settings.idle_timeout)
        self.blob_server = BlobServer(self.store, self.fills, settings.blob_listen, timeouts)
        self.access = Access(self.store, self.records, self.upstream, settings, offline)
        self.tokens = TokenService(self.access, self.records, self.upstream, offline)
        self.manifests = ManifestService(self.store, self.upstream, self.access, offline)
        self.completions = Completions(self.store, self.manifests, self.fills, settings.platforms)
        self.manifests.complete_later = self.completions.schedule
        self.blobs = BlobService(self.store, self.upstream, self.fills, self.access, offline)
        mirrors = [MirrorServer(self, host, listen, timeouts) for host, listen in settings.mirrors.items()]
        try:
            self.mirrors = self._bind(mirrors, previous)
        except BaseException:
            for listener in (self.blob_server.listener, *(mirror.listener for mirror in mirrors)):
                listener.stop_accepting()
            self.store.close()
            raise
        self._started: asyncio.Future[None] | None = None
        self._sweeper: asyncio.Future[None] | None = None
        self._usage_flusher: asyncio.Future[None] | None = None
        self._use_flusher: asyncio.Future[None] | None = None

    def listeners(self) -> list[Listener]:
        return [self.blob_server.listener, *(mirror.listener for mirror in self.mirrors)]

    def _bind(self, mirrors: list[MirrorServer], previous: Runtime | None) -> list[MirrorServer]:
        """Listen on every port now, while starting up: the blob endpoint or nothing; a mirror
        that cannot listen is left out (the proxy works without it). The mirrors that listen."""
        current = {listener.address: listener for listener in previous.listeners()} if previous else {}
        blob = self.blob_server.listener
        try:
            blob.bind(current)
        except OSError as err:
            raise StartupError(f"blob endpoint not started: cannot listen on {blob.url} (blob_listen): {err}") from err
        listening = []
        for mirror in mirrors:
            try:
                mirror.listener.bind(current)
            except OSError as err:
                log.warning(
                    "regcache: WARNING: mirror of %s not started: cannot listen on %s (mirrors): %s; "
                    "the proxy works without it",
                    mirror.registry_host,
                    mirror.url,
                    err,
                )
                continue
            log.info("regcache: registry mirror of %s at %s", mirror.registry_host, mirror.url)
            mirror.warn_if_exposed()
            listening.append(mirror)
        return listening

    async def started(self) -> None:
        """Serve on every bound socket (once), and start the background work."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
            if self.settings.max_age and not self.offline:  # a replayed cache is kept whole
                self._sweeper = asyncio.ensure_future(self._expire_unused())
            self._usage_flusher = asyncio.ensure_future(flush_usage_periodically(self.store))
            self._use_flusher = asyncio.ensure_future(self._flush_uses())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        for listener in self.listeners():
            await listener.start()

    async def _flush_uses(self) -> None:
        """Last uses into the store every few seconds, off the event loop: reads never write."""
        while True:
            await asyncio.sleep(USE_FLUSH_SECONDS)
            await asyncio.to_thread(self.store.flush_uses)

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

    def stop_accepting(self) -> None:
        """The synchronous first step of closing: no new connection, no new background work."""
        for listener in self.listeners():
            listener.stop_accepting()
        for task in (self._sweeper, self._usage_flusher, self._use_flusher):
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        self.stop_accepting()
        # Fills first (after the completions that start them): a server's cleanup waits for its
        # handlers, and followers of a running fill would keep it waiting until the fill ends.
        await self.completions.close()
        await self.fills.close()
        await self.upstream.close()
        await self.access.close()
        for listener in self.listeners():
            await listener.stop()
        await asyncio.to_thread(flush_usage, self.store)
        await asyncio.to_thread(self.store.flush_uses)
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
