"""One configuration running: its registry services (`Runtime`) and the servers regcache runs for
them — the blob endpoint and the registry mirrors — bound, started and closed together.

Owns: binding every listening socket while starting up (the blob endpoint or no start at all; a
mirror that cannot listen is left out), taking over the sockets of the configuration it replaces
at the same fixed addresses, serving them once the event loop runs (with the runtime's background
work), the ready line, and closing in the order that lets every piece finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from regcache.config import Settings
from regcache.fronts.blobserver import BlobServer
from regcache.fronts.listener import Listener, Timeouts
from regcache.fronts.mirror import MirrorServer
from regcache.services.blobs import FILL_URL_LEASES
from regcache.services.runtime import Runtime
from regcache.store.shared.errors import BucketUnusable

log = logging.getLogger("regcache")


class StartupError(Exception):
    """Something regcache cannot run without (the blob endpoint's port): one line, and no start."""


class Node:
    """The runtime, blob endpoint and mirrors of one configuration."""

    def __init__(self, settings: Settings, offline: bool, previous: Node | None = None) -> None:
        """Opens the store and binds every listening socket (raises StartupError, StoreError, OSError).
        `previous`: the running configuration this one replaces (its sockets at the same fixed
        addresses are taken over)."""
        try:
            self.runtime = Runtime(settings, offline)
        except BucketUnusable as err:  # the shared bucket is missing or not writable: one line, no start
            raise StartupError(str(err)) from err
        timeouts = Timeouts(settings.header_timeout, settings.idle_timeout)
        self.blob_server = BlobServer(self.runtime.store, self.runtime.fills, settings.blob_listen, timeouts)
        if settings.shared is not None and settings.blob_url:  # where other nodes follow this node's fills
            self.runtime.fills.fill_url = self._fill_url
        mirrors = [
            MirrorServer(self.runtime, self.blob_server, host, listen, timeouts)
            for host, listen in settings.mirrors.items()
        ]
        try:
            self.mirrors = self._bind(mirrors, previous)
        except BaseException:
            for listener in (self.blob_server.listener, *(mirror.listener for mirror in mirrors)):
                listener.stop_accepting()
            self.runtime.store.close()
            raise
        self._started: asyncio.Future[None] | None = None

    def _fill_url(self, digest: str) -> str:
        """The signed URL of this node's fill of `digest`, as other nodes reach it (`blob_url`)."""
        settings = self.runtime.settings
        lifetime = FILL_URL_LEASES * (settings.shared.lease_seconds if settings.shared is not None else 15.0)
        return f"{settings.blob_url}{self.blob_server.urls.path('fills', digest, lifetime)}"

    def listeners(self) -> list[Listener]:
        return [self.blob_server.listener, *(mirror.listener for mirror in self.mirrors)]

    def _bind(self, mirrors: list[MirrorServer], previous: Node | None) -> list[MirrorServer]:
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
        """Serve on every bound socket (once), and start the runtime's background work."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
            self.runtime.start_background()
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        for listener in self.listeners():
            await listener.start()

    def stop_accepting(self) -> None:
        """The synchronous first step of closing: no new connection, no new background work."""
        for listener in self.listeners():
            listener.stop_accepting()
        self.runtime.stop_background()

    async def close(self) -> None:
        self.stop_accepting()
        await self.runtime.stop_services()
        for listener in self.listeners():
            await listener.stop()
        await self.runtime.close_store()

    def ready_line(self, proxy: Iterable[tuple[str, int]], metrics: str | None) -> str:
        """The line that says every listener is up: scripts and service managers wait for it."""
        parts = [f"proxy {host}:{port}" if ":" not in host else f"proxy [{host}]:{port}" for host, port, *_ in proxy]
        parts.append(f"blob endpoint {self.blob_server.listener.url}")
        parts += [f"mirror of {mirror.registry_host} {mirror.url}" for mirror in self.mirrors]
        if metrics:
            parts.append(f"metrics {metrics}")
        return "regcache ready: " + ", ".join(parts)
