"""A fill whose disk refused its bytes relays the rest from memory: no more than RELAY_BUFFER held,
at the pace of its slowest follower, and the bytes of a client still on its way kept."""

from __future__ import annotations

import asyncio

import pytest

from regcache.services.blobs import RELAY_BUFFER, Fill, RelayStalled

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
