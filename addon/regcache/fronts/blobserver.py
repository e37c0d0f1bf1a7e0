"""The blob endpoint: blob bytes with bounded memory, straight from the store's files.

Clients get here by a `307` to a signed URL (see bloburls.py; Go clients on this host then fetch
directly, past mitmproxy), or — for clients that cannot reach it — mitmproxy re-targets their flow
here and streams the answer through (an addon-made response would be one buffer in memory).
It runs on mitmproxy's own event loop and serves, for a valid signature only:
- `/blobs/<digest>`: a stored blob via sendfile (aiohttp's FileResponse: Range → 206);
- `/fills/<digest>`: a blob still being fetched, following the staging file as it grows (past
  what the disk took, from the fill's memory), and breaking the connection if the fill fails so
  the client never takes a partial blob as whole. Both fronts follow fills here. A signed fill
  URL serves only while this node's fill of the digest runs or has just committed (other nodes
  read these URLs from Redis: never a pass to the stored copy); otherwise `404 BLOB_UNKNOWN`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping

from aiohttp import typedefs, web
from aiohttp.abc import AbstractStreamWriter

from regcache.fronts.bloburls import BlobUrls
from regcache.fronts.listener import Listener, Timeouts, application
from regcache.metrics import METRICS
from regcache.oci.api import API_VERSION_HEADER, error_body
from regcache.services.answers import BlobSource
from regcache.services.blobs import Fills, FillView
from regcache.store.base import Store

log = logging.getLogger(__name__)

# A follower of a fill reads the staging file this much at a time, on the event loop: the bytes
# were just written, so they come from the page cache, and a read that small costs less than a trip
# to a worker thread. It is also what a follower holds while its client's socket is full (the chunk
# waits in the transport's buffer): 48 followers of 1 MiB reads took the proxy from 130 MB to 240-270.
READ_CHUNK = 256 * 1024


def _blob_headers(digest: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest, **API_VERSION_HEADER, **extra}


def _error(status: int, code: str, message: str, digest: str) -> web.Response:
    return web.Response(status=status, body=error_body(code, message, digest), content_type="application/json")


class BlobServer:
    def __init__(self, store: Store, fills: Fills, listen: tuple[str, int], timeouts: Timeouts) -> None:
        self._store = store
        self._fills = fills
        self.urls = BlobUrls()
        app = application(self._signed_only)
        app.router.add_get("/blobs/{digest}", self._signed_blob)
        app.router.add_get("/fills/{digest}", self._signed_blob, allow_head=False)
        self.listener = Listener("blob endpoint", app, listen, timeouts)

    @property
    def host(self) -> str:
        return self.listener.host

    @property
    def port(self) -> int:
        return self.listener.port

    @web.middleware
    async def _signed_only(self, request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
        source = request.path.split("/", 2)[1]
        digest = request.match_info.get("digest", "")
        query = request.query
        if not self.urls.valid(source, digest, query.get("expires", ""), query.get("signature", "")):
            return _error(403, "DENIED", "blob URL is not signed by this cache, or has expired", digest)
        return await handler(request)

    async def respond(
        self,
        request: web.Request,
        source: BlobSource,
        digest: str,
        headers: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> web.StreamResponse:
        """`digest`'s bytes from `source`, with extra `headers` (`path`: the stored blob's file, if
        known). The caller has checked the request (the signature here; regcache's services for the
        registry mirror)."""
        if source == "fills":
            return await self._filling_blob(request, digest, headers or {})
        return await self._stored_blob(digest, headers or {}, path=path)

    async def _signed_blob(self, request: web.Request) -> web.StreamResponse:
        source: BlobSource = "fills" if request.path.startswith("/fills/") else "blobs"
        digest = request.match_info["digest"]
        if source == "fills" and self._fills.get(digest) is None:
            # A fill URL (other nodes read it from Redis) is no pass to this node's copy of the
            # blob: it serves only while the fill runs, or for COMMITTED_GRACE_SECONDS after.
            return _error(404, "BLOB_UNKNOWN", "no fill of this blob is running on this node", digest)
        return await self.respond(request, source, digest)

    async def _stored_blob(
        self, digest: str, headers: Mapping[str, str], from_fill: bool = False, path: str | None = None
    ) -> web.StreamResponse:
        """A stored blob. Gone (evicted, or a fill that failed meanwhile): 503 where the client was
        sent to a fill, since a 404 would tell it the blob does not exist at all."""
        if path is None or not os.path.exists(path):  # evicted since it was looked up: ask again
            path = await asyncio.to_thread(self._store.blob_path, digest)
        if path is None:
            status, code = (503, "UNAVAILABLE") if from_fill else (404, "BLOB_UNKNOWN")
            return _error(status, code, "blob not available from the cache, retry", digest)
        return _LoggedFileResponse(digest, path, _blob_headers(digest, headers), from_cache=not from_fill)

    async def _filling_blob(self, request: web.Request, digest: str, headers: Mapping[str, str]) -> web.StreamResponse:
        fill = self._fills.get(digest)
        if fill is not None and not fill.started.is_set():  # another node, following before upstream answered
            await fill.started.wait()  # bounded: the upstream client times out
        if fill is None or fill.committed or fill.staging_path is None:
            return await self._stored_blob(digest, headers, from_fill=True)
        try:
            source = open(fill.staging_path, "rb")  # noqa: SIM115 - closed below, after streaming
        except FileNotFoundError:  # committed (moved) or discarded meanwhile
            await fill.wait_beyond(2**62)
            return await self._stored_blob(digest, headers, from_fill=True)
        follower = fill.follow()
        if follower is None:  # relayed from memory past the bytes this client needs: 503, retry
            source.close()
            return await self._stored_blob(digest, headers, from_fill=True)
        started = time.monotonic()
        with source:
            response = web.StreamResponse(headers=_blob_headers(digest, headers))
            if fill.expected_size is not None:
                response.content_length = fill.expected_size
            try:
                await response.prepare(request)
                complete = await self._follow(fill, follower, source.fileno(), response)
            except ConnectionError:  # the client went away; the fill goes on for the others
                return response
            finally:
                fill.unfollow(follower)
        if not complete and request.transport is not None:
            # The status line has gone out already: dropping the connection mid-body is the only
            # honest signal left, so the client never takes a short blob for a whole one.
            request.transport.abort()
            return response  # aiohttp's final write_eof sees the closed transport, as on a hang-up
        await response.write_eof()
        _log_delivery(request, digest, fill.written, started)
        return response

    @staticmethod
    async def _follow(fill: FillView, follower: object, fd: int, response: web.StreamResponse) -> bool:
        """Stream the fill's bytes as they come; False if the fill failed.

        The last byte is held back until the fill has checked size and digest, so a blob that
        fails verification never reaches a client complete. (Not until the commit: its fsync and
        index write would delay every cold blob, and a client with a verified blob is served.)"""
        offset = 0
        while True:
            verified, finished = fill.verified, fill.finished  # a fill verifies after its last write
            sendable = fill.written if verified else fill.written - 1
            if sendable > offset:
                chunk = _next_chunk(fill, fd, offset, min(sendable - offset, READ_CHUNK))
                await response.write(chunk)
                offset += len(chunk)
                fill.advance(follower, offset)  # a fill relaying from memory goes at this pace
            elif verified or finished:
                return verified
            else:
                await fill.wait_beyond(offset + 1)


def _next_chunk(fill: FillView, fd: int, offset: int, size: int) -> bytes:
    """Up to `size` bytes at `offset`: from the staging file, or past what it took, from memory."""
    if offset >= fill.on_disk:
        return fill.held(offset, size)
    return os.pread(fd, min(size, fill.on_disk - offset), offset)


class _LoggedFileResponse(web.FileResponse):
    """aiohttp's sendfile response, logged and counted once the whole body is out."""

    def __init__(self, digest: str, path: str, headers: dict[str, str], from_cache: bool) -> None:
        super().__init__(path, headers=headers)
        self._digest = digest
        self._from_cache = from_cache

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        started = time.monotonic()
        writer = await super().prepare(request)  # sends the body (sendfile) before it returns
        if request.method == "GET" and self.status in (200, 206):
            _log_delivery(request, self._digest, self.content_length or 0, started)
            # A client sent here from its own fill got those bytes from upstream: counted once, there.
            if self._from_cache:
                METRICS.cache_bytes_sent(self.content_length or 0)
        return writer


def _log_delivery(request: web.BaseRequest, digest: str, size: int, started: float) -> None:
    seconds = max(time.monotonic() - started, 1e-6)
    peer = request.remote or "?"
    log.info("SENT blob %s %d B to %s in %.0f ms (%.0f MB/s)", digest, size, peer, seconds * 1000, size / seconds / 1e6)
