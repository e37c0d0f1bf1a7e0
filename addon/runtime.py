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
from urllib.parse import urlsplit

from multidict import CIMultiDict

from .access import Access
from .answers import Answer, Decision, error_answer, relay
from .blobs import BlobService, Fills
from .blobserver import BlobServer
from .completion import Completions
from .config import Settings
from .listener import Listener, Timeouts
from .manifests import ManifestService, upstream_failed
from .metrics import flush_usage, flush_usage_periodically
from .mirror import MirrorServer
from .routes import API_VERSION_HEADER, INVALID_MESSAGES, Kind, RegistryRequest
from .store import DiskStore
from .upstream import UpstreamClient, UpstreamUnavailable, bearer_realm_host
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
        self.realm_hosts = self.store.realm_hosts()
        self.upstream = UpstreamClient(settings)
        self.fills = Fills(self.store, self.upstream)
        timeouts = Timeouts(settings.header_timeout, settings.idle_timeout)
        self.blob_server = BlobServer(self.store, self.fills, settings.blob_listen, timeouts)
        self.access = Access(self.store, self.upstream, offline)
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
        for listener in self.listeners():
            await listener.stop()
        await asyncio.to_thread(flush_usage, self.store)
        await asyncio.to_thread(self.store.flush_uses)
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
            except STORE_ERRORS as err:  # known for this run anyway
                log.warning("auth realm %s not saved in the store: %s", realm_host, err)

    def answers_tokens(self, host: str) -> bool:
        """Offline, regcache is the token service of every auth realm it has seen."""
        return self.offline and host in self.realm_hosts
