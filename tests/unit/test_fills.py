"""A fill whose disk refused its bytes relays the rest from memory: no more than RELAY_BUFFER held,
at the pace of its slowest follower, and the bytes of a client still on its way kept. Offline, a
fill in a cluster comes from the bucket or fails, never from upstream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from regcache.config import load_settings
from regcache.fronts.blobserver import BlobServer
from regcache.fronts.listener import Timeouts
from regcache.oci.digest import digest_of
from regcache.services.blobs import RELAY_BUFFER, Fill, Fills, RelayStalled
from regcache.services.upstream import UpstreamClient
from regcache.store.base import FillHolder, FillLease, SharedBlob
from regcache.store.disk import DiskStore
from regcache.store.shared.errors import S3Unavailable

from .flows import serving

CHUNK = b"x" * (RELAY_BUFFER // 4)


async def held_in_full(fill: Fill) -> None:
    """Hold RELAY_BUFFER bytes, as the fill does with what upstream sends after the spill."""
    for _ in range(4):
        await fill.hold(CHUNK, stall_seconds=5)
        fill.written += len(CHUNK)


async def blocks(pending: asyncio.Task[None]) -> bool:
    await asyncio.sleep(0.05)
    return not pending.done()


def test_a_spilled_fill_reads_upstream_at_the_pace_of_its_slowest_follower() -> None:
    async def go() -> None:
        fill = Fill("sha256:" + "0" * 64)
        fast, slow = fill.follow(), fill.follow()
        fill.spill("No space left on device")
        await held_in_full(fill)
        more = asyncio.create_task(fill.hold(CHUNK, stall_seconds=5))
        assert await blocks(more)
        fill.advance(fast, RELAY_BUFFER)  # everything, but the slow one still needs it all
        assert await blocks(more)
        fill.advance(slow, len(CHUNK))  # room for one chunk more
        await asyncio.wait_for(more, timeout=1)
        assert fill.held(len(CHUNK), 3) == b"xxx"
        assert fill.follow() is None  # a client coming now would miss the bytes let go
        fill.unfollow(fast)
        with pytest.raises(RelayStalled, match="took any"):  # the slow one takes nothing more
            await fill.hold(CHUNK, stall_seconds=0.2)
        fill.unfollow(slow)
        with pytest.raises(RelayStalled, match="no client follows"):  # nothing to store, nobody to send to
            await fill.hold(CHUNK, stall_seconds=5)

    asyncio.run(go())


def test_the_bytes_of_a_client_on_its_way_are_kept() -> None:
    async def go() -> None:
        fill = Fill("sha256:" + "0" * 64)
        first = fill.follow()
        fill.promise()  # sent here by a redirect, not following yet
        fill.spill("No space left on device")
        await held_in_full(fill)
        fill.advance(first, RELAY_BUFFER)
        more = asyncio.create_task(fill.hold(CHUNK, stall_seconds=5))
        assert await blocks(more)
        late = fill.follow()
        assert late is not None
        fill.advance(late, RELAY_BUFFER)
        await asyncio.wait_for(more, timeout=1)

    asyncio.run(go())


class BucketFailing:
    """A cluster tier whose bucket says it holds every blob but fails to send it (S3 stopped
    between the HEAD and the GET), and whose lease is always free: a fill that may go upstream does."""

    node, redirect, lease_seconds, s3_down = "n", False, 1.0, ""

    async def shared_blob(self, digest: str) -> SharedBlob | None:
        return SharedBlob(digest, 4)

    async def shared_chunks(self, digest: str) -> tuple[int, AsyncIterable[bytes]] | None:
        raise S3Unavailable("S3: connection refused")

    async def acquire(self, name: str, url: Callable[[], str] | None) -> FillLease | None:
        return Lease()

    async def holder(self, name: str) -> FillHolder | None:
        return None

    async def upload_blob(self, digest: str) -> bool:
        return False

    async def presigned_url(self, digest: str) -> str:
        raise AssertionError("not with redirect off")


class Lease:
    lost = asyncio.Event()

    def kept(self) -> contextlib.AbstractAsyncContextManager[object]:
        return contextlib.nullcontext()

    async def release(self) -> bool:
        return True


def test_offline_a_fill_the_bucket_cannot_send_never_goes_upstream(tmp_path: Path) -> None:
    """Offline (shared.s3.redirect false): the bucket's GET failing fails the fill, with no lease
    taken and no upstream request (the upstream here is a real HTTP server counting requests)."""
    body = b"blob"
    digest = digest_of(body)
    asked: list[str] = []

    async def upstream(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(body=body)

    async def go() -> None:
        async with serving(upstream, "GET") as port:
            store = DiskStore(tmp_path / "store", 10**9)
            client = UpstreamClient(load_settings(None))
            fills = Fills(store, client, BucketFailing(), offline=True)
            fill = fills.join(digest, f"http://127.0.0.1:{port}/v2/x/blobs/{digest}", CIMultiDict(), "x")
            await asyncio.wait_for(fill.started.wait(), timeout=5)
            assert fill.error is not None and "offline" in fill.error
            assert asked == [] and not store.has_blob(digest)
            await fills.close(wait=True)
            await client.close()
            store.close()

    asyncio.run(go())


def test_a_fill_url_serves_only_while_the_fill_runs_or_just_committed(tmp_path: Path) -> None:
    """A signed /fills/ URL (other nodes read it from Redis) gives nothing of this node's stored copy
    once no fill of it runs here: 404 with a registry error; a signed /blobs/ URL still serves."""
    body = b"private layer"
    digest = digest_of(body)

    async def go() -> None:
        store = DiskStore(tmp_path / "store", 10**9)
        staging = store.stage_blob(digest)
        staging.write(body)
        store.commit_blob(staging, len(body))
        client = UpstreamClient(load_settings(None))
        server = BlobServer(store, Fills(store, client), ("127.0.0.1", 0), Timeouts(5, 5))
        server.listener.bind()
        await server.listener.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(server.listener.url + server.urls.path("fills", digest, 60)) as fill:
                    assert fill.status == 404 and body not in await fill.read()
                    assert (await fill.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
                async with session.get(server.listener.url + server.urls.path("blobs", digest)) as stored:
                    assert stored.status == 200 and await stored.read() == body
        finally:
            await server.listener.stop()
            await client.close()
            store.close()

    asyncio.run(go())
