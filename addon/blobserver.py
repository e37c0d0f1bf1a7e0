"""The loopback blob server: streams blob bytes to mitmproxy with bounded memory.

mitmproxy sends an addon-made response as one buffer (a 1 GiB blob would cost GBs of RAM), so blob
flows are re-targeted here instead and mitmproxy streams our answer through to the client.
It runs on mitmproxy's own event loop and serves:
- `/<secret>/blobs/<digest>`: a stored blob via sendfile (aiohttp's FileResponse: Range → 206);
- `/<secret>/fills/<digest>`: a blob still being fetched, following the staging file as it grows,
  and breaking the connection if the fill fails so the client never takes a partial blob as whole.
"""

from __future__ import annotations

import asyncio
import os
import secrets

from aiohttp import web

from .blobs import BlobPaths, Fill, Fills
from .metrics import METRICS
from .routes import API_VERSION_HEADER, error_body
from .store import Store

READ_CHUNK = 1024 * 1024


def _blob_headers(digest: str) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest, **API_VERSION_HEADER}


class BlobServer:
    def __init__(self, store: Store, fills: Fills) -> None:
        self._store = store
        self._fills = fills
        self.paths = BlobPaths(secrets.token_hex(16))
        self.port = 0
        app = web.Application()
        app.on_response_prepare.append(METRICS.count_stored_blob_response)
        app.router.add_get(f"/{self.paths.secret}/blobs/{{digest}}", self._stored_blob)
        app.router.add_get(f"/{self.paths.secret}/fills/{{digest}}", self._filling_blob, allow_head=False)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _stored_blob(self, request: web.Request, retryable: bool = False) -> web.StreamResponse:
        """A stored blob. Gone (evicted, or a fill that failed meanwhile): 503 where the client was
        sent to a fill, since a 404 would tell it the blob does not exist at all."""
        digest = request.match_info["digest"]
        path = await asyncio.to_thread(self._store.blob_path, digest)
        if path is None:
            status, code = (503, "UNAVAILABLE") if retryable else (404, "BLOB_UNKNOWN")
            return web.Response(
                status=status,
                body=error_body(code, "blob not available from the cache, retry", digest),
                content_type="application/json",
            )
        return web.FileResponse(path, headers=_blob_headers(digest))

    async def _filling_blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        fill = self._fills.get(digest)
        if fill is None or fill.committed or fill.staging_path is None:
            return await self._stored_blob(request, retryable=True)
        try:
            source = open(fill.staging_path, "rb")  # noqa: SIM115 - closed below, after streaming
        except FileNotFoundError:  # committed (moved) or discarded meanwhile
            await fill.wait_beyond(2**62)
            return await self._stored_blob(request, retryable=True)
        with source:
            response = web.StreamResponse(headers=_blob_headers(digest))
            if fill.expected_size is not None:
                response.content_length = fill.expected_size
            await response.prepare(request)
            try:
                complete = await self._follow(fill, source.fileno(), response)
            except ConnectionError:  # the client went away; the fill goes on for the others
                return response
        if not complete and request.transport is not None:
            # The status line has gone out already: dropping the connection mid-body is the only
            # honest signal left, so the client never takes a short blob for a whole one.
            request.transport.abort()
            return response  # aiohttp's final write_eof sees the closed transport, as on a hang-up
        await response.write_eof()
        return response

    @staticmethod
    async def _follow(fill: Fill, fd: int, response: web.StreamResponse) -> bool:
        """Stream the staging file as the fill writes it; False if the fill failed.

        The last byte is held back until the fill is committed: a client that has the whole blob
        can count on the cache having it too (and a blob that fails verification never reaches
        a client complete)."""
        offset = 0
        while True:
            finished = fill.finished  # read before `written`: a fill ends only after its last write
            sendable = fill.written if finished and fill.committed else fill.written - 1
            if sendable > offset:
                chunk = await asyncio.to_thread(os.pread, fd, min(sendable - offset, READ_CHUNK), offset)
                await response.write(chunk)
                offset += len(chunk)
            elif finished:
                return fill.committed
            else:
                await fill.wait_beyond(offset + 1)
