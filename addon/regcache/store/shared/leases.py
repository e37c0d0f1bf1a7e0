"""Cluster-wide single flight on Redis: leases, and the fill progress their holders publish.

A node about to fetch a blob or a manifest from upstream takes the lease on it (`Leases.acquire`:
SET NX PX). The lease's value names the node, where its fill can be followed (its blob endpoint's
fill URL, short-lived and signed anew at every renewal) and a token unique to this acquisition.
Only the holder renews it (a Lua compare-and-pexpire, or -set with a new URL: a lease that expired and was
taken by another node is not extended by its former holder) and only the holder releases it
(compare-and-delete). The sweep lock is a lease too.

While it fills, the holder publishes progress to a Redis stream named by its token
(`FillEvents`): followers read it from the start, so one that comes late misses nothing (pub/sub
would lose what was said before it subscribed); it ends with `done` (size and digest) or `failed`.
A follower that hears nothing for a while gets `FillStalled` and looks at the lease again: a dead
holder's lease expires, and whoever takes it next has a new token and so a new stream.
Streams are capped (MAXLEN ~) and expire an hour after their last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import redis.asyncio as aredis
from redis.commands.core import AsyncScript

from regcache.store.shared.errors import RedisUnavailable
from regcache.store.shared.redis_client import Connection, text

log = logging.getLogger("regcache")

# Extend a lease only while we still hold it.
RENEW_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  if ARGV[3] then
    return redis.call('set', KEYS[1], ARGV[3], 'PX', ARGV[2]) and 1
  end
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# Delete a lease only while we still hold it.
RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
SWEEP_LOCK = "sweep"
# What XREAD answers: [(stream, [(entry id, {field: value})])].
_XRead = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
_STREAM_MAXLEN = 100
_STREAM_TTL_SECONDS = 3600


@dataclass(frozen=True)
class LeaseHolder:
    node: str
    url: str | None  # where the holder's fill can be followed (None: not followable, e.g. a lock)
    token: str  # unique to one acquisition: names its fill stream

    def value(self) -> str:
        return json.dumps({"node": self.node, "url": self.url, "token": self.token}, sort_keys=True)

    @classmethod
    def of(cls, raw: bytes | str) -> LeaseHolder:
        fields = json.loads(raw)
        return cls(str(fields["node"]), fields.get("url"), str(fields["token"]))


class Lease:
    """A lease this node holds (until it expires, is released, or `kept` finds it lost)."""

    def __init__(
        self, leases: Leases, name: str, holder: LeaseHolder, seconds: float, url: Callable[[], str] | None = None
    ) -> None:
        """`url`: makes the URL it publishes anew at every renewal (a signed URL kept short-lived)."""
        self._leases = leases
        self.name = name
        self.holder = holder
        self.seconds = seconds
        self._url = url
        self.lost = asyncio.Event()  # set by `kept` when renewing finds the lease gone

    @property
    def token(self) -> str:
        return self.holder.token

    async def renew(self) -> bool:
        """Extend it by `seconds` (its URL made anew) if this node still holds it; False if it does not."""
        milliseconds = int(self.seconds * 1000)
        if self._url is None:
            return await self._leases._compare(self, self._leases._renew, milliseconds)
        renewed = replace(self.holder, url=self._url())
        if not await self._leases._compare(self, self._leases._renew, milliseconds, renewed.value()):
            return False
        self.holder = renewed
        return True

    async def release(self) -> bool:
        """Give it up if this node still holds it; False if it did not."""
        return await self._leases._compare(self, self._leases._release)

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[Lease]:
        """Renew it every third of its time while the block runs; release it after. When it is
        lost (taken over after an expiry, or Redis unreachable until it would have expired),
        `lost` is set: the block decides what that means (a fill goes on for its own clients)."""
        task = asyncio.create_task(self._keep())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not self.lost.is_set():
                with contextlib.suppress(RedisUnavailable):
                    await self.release()

    async def _keep(self) -> None:
        deadline = time.monotonic() + self.seconds
        while True:
            await asyncio.sleep(self.seconds / 3)
            try:
                if not await self.renew():
                    break
                deadline = time.monotonic() + self.seconds
            except RedisUnavailable as err:
                if time.monotonic() >= deadline:
                    log.warning("regcache: lease %s lost: %s", self.name, err)
                    break
        self.lost.set()


class Leases:
    """Leases by name (e.g. `blob:sha256:…`, or SWEEP_LOCK), held by node `node`."""

    def __init__(self, conn: Connection[aredis.Redis], node: str) -> None:
        self._r, self._k, self._guard, self._node = conn.client, conn.keys, conn.guarded, node
        self._renew = conn.client.register_script(RENEW_SCRIPT)
        self._release = conn.client.register_script(RELEASE_SCRIPT)

    async def acquire(
        self, name: str, seconds: float, url: str | Callable[[], str] | None = None
    ) -> Lease | None:
        """Take the lease for `seconds` unless another holds it; None if another does. `url`: where
        its fill can be followed, or what makes that URL (anew at every renewal)."""
        making = url if callable(url) else None
        holder = LeaseHolder(self._node, url() if callable(url) else url, uuid.uuid4().hex)
        with self._guard(f"taking the lease {name}"):
            taken = await self._r.set(self._k.lease(name), holder.value(), nx=True, px=int(seconds * 1000))
        return Lease(self, name, holder, seconds, making) if taken else None

    async def holder(self, name: str) -> LeaseHolder | None:
        """Who holds the lease now (None: nobody)."""
        with self._guard(f"reading the lease {name}"):
            raw = await self._r.get(self._k.lease(name))
        return None if raw is None else LeaseHolder.of(raw)

    async def _compare(self, lease: Lease, script: AsyncScript, *args: int | str) -> bool:
        """Run a compare-and-… script on the lease's key with its value (and `args`)."""
        with self._guard(f"the lease {lease.name}"):
            done = await script(keys=[self._k.lease(lease.name)], args=[lease.holder.value(), *args])
        return bool(done)


@dataclass(frozen=True)
class FillEvent:
    """A fill's progress: `size` bytes so far; the last event is `done` (with the digest) or `failed`."""

    size: int
    done: bool = False
    digest: str | None = None
    failed: str | None = None

    @property
    def final(self) -> bool:
        return self.done or self.failed is not None

    def fields(self) -> dict[str, str | int]:
        fields: dict[str, str | int] = {"size": self.size}
        if self.done:
            fields["done"] = 1
        if self.digest:
            fields["digest"] = self.digest
        if self.failed is not None:
            fields["failed"] = self.failed
        return fields

    @classmethod
    def of(cls, fields: dict[bytes, bytes]) -> FillEvent:
        found = {text(k): text(v) for k, v in fields.items()}
        return cls(int(found.get("size", 0)), "done" in found, found.get("digest"), found.get("failed"))


class FillStalled(Exception):
    """No event from a fill for the follower's `stall_seconds`: its holder may be gone."""


class FillEvents:
    """Progress of fills, one stream per lease token."""

    def __init__(self, conn: Connection[aredis.Redis], socket_timeout: float) -> None:
        self._r, self._k, self._guard = conn.client, conn.keys, conn.guarded
        # A blocking XREAD longer than the socket timeout would time out on the client side.
        self._block_ms = max(1, int(socket_timeout * 500))

    async def publish(self, token: str, event: FillEvent) -> None:
        key = self._k.fill(token)
        with self._guard("publishing fill progress"):
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.xadd(key, cast("dict[Any, Any]", event.fields()), maxlen=_STREAM_MAXLEN, approximate=True)
                pipe.expire(key, _STREAM_TTL_SECONDS)
                await pipe.execute()

    async def follow(self, token: str, stall_seconds: float) -> AsyncIterator[FillEvent]:
        """Every event of the fill from its first, as they come; ends after the final one.
        FillStalled after `stall_seconds` without an event."""
        key, last = self._k.fill(token), "0-0"
        quiet_since = time.monotonic()
        while True:
            left = stall_seconds - (time.monotonic() - quiet_since)
            if left <= 0:
                raise FillStalled(f"no progress from fill {token} for {stall_seconds:g} s")
            block = min(self._block_ms, max(1, int(left * 1000)))
            with self._guard("following a fill"):
                found = cast("_XRead", await self._r.xread({key: last}, block=block, count=100))
            for _, entries in found:
                for entry_id, fields in entries:
                    last = text(entry_id)
                    quiet_since = time.monotonic()
                    event = FillEvent.of(fields)
                    yield event
                    if event.final:
                        return
