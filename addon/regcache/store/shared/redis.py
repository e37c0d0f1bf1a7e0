"""The shared store's Redis tier: what is small and mutable, for every node of the cluster.

Owns: the key layout, the small stores (tag records, pins, seen (repository, digest) pairs, usage
counters per node and in total, the L2 inventory: sizes and last uses of what the bucket holds,
the node registry) and `SharedRedis`, the node's Redis with all of them. The small stores are
blocking (redis-py's synchronous client): they stand behind the blocking store protocols
(store/base.py, called from worker threads) and the synchronous command-line tools. Leases and fill
notifications, which run on the event loop, use the asyncio client (leases.py). Clients, key names
and error translation: redis_client.py; access records: access.py. Every call raises
RedisUnavailable when Redis is unusable.

Key layout (prefix `regcache:` by default; `<ref>` is `namespace/name:tag`, `<key>` a store key
such as `blob:sha256:…`, `manifest:sha256:…`, `tag:<ref>`):
  tag:<ref>            string  JSON {accept key: tag record}, at most MAX_TAG_RECORDS records
  tags                 set     every <ref> with a tag record
  pins                 hash    <ref> → pinned digest
  seen                 set     "<repository>@<digest>"
  usage                hash    counter → cluster total
  usage:<node>         hash    counter → that node's total
  sizes                hash    <key> → bytes, for every object in the bucket
  bytes                string  sum of `sizes`
  uses                 zset    <key> → last use (epoch seconds), blobs, manifests and tags
  nodes                set     every node id that ever registered
  node:<node>          hash    urls (JSON), started, last_seen
  lease:<name>         string  JSON {node, url, token}, with a PX expiry (leases.py)
  fill:<token>         stream  a fill's progress (leases.py)
  access:…             see access.py
Needs Redis >= 7.0 (ZADD GT, PEXPIRE GT): `SharedRedis.check` says so at start-up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis
from redis.exceptions import WatchError

from regcache.config import RedisSettings
from regcache.oci.media import accept_key
from regcache.oci.reference import TagRef
from regcache.store.base import TagRecord, capped_records
from regcache.store.keys import tag_ref_of
from regcache.store.shared.errors import RETRY_AFTER_SECONDS, RedisUnavailable
from regcache.store.shared.leases import FillEvents, Leases
from regcache.store.shared.redis_client import Connection, Keys, async_connection, sync_connection, text

MIN_VERSION = (7, 0)
_BATCH = 500  # members per ZADD / SADD, so no one command holds Redis for long
_WATCH_TRIES = 50  # optimistic transactions retried this often before giving up


def _records_of(raw: bytes | str | None) -> dict[str, TagRecord]:
    if raw is None:
        return {}
    return {accepted: TagRecord(**fields) for accepted, fields in json.loads(raw).items()}


def _batches(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


class SharedTags:
    """Tag records per tag, as DiskStore keeps them (the same cap, the same JSON), for the cluster."""

    def __init__(self, conn: Connection[redis.Redis]) -> None:
        self._r, self._k, self._guard = conn.client, conn.keys, conn.guarded

    def records(self, ref: TagRef) -> dict[str, TagRecord]:
        with self._guard(f"reading the tag records of {ref}"):
            return _records_of(self._r.get(self._k.tag(ref)))

    def put(self, ref: TagRef, accepted: tuple[str, ...], record: TagRecord) -> None:
        """Record what `ref` resolved to for `accepted`, keeping the MAX_TAG_RECORDS most recently
        recorded (store.capped_records), atomically against other nodes (WATCH/MULTI); the tag's
        last use moves to the record's time."""
        key = self._k.tag(ref)
        with self._guard(f"saving a tag record of {ref}"), self._r.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    pipe.watch(key)
                    records = capped_records(_records_of(pipe.get(key)), accept_key(accepted), record)
                    pipe.multi()
                    pipe.set(key, json.dumps({k: asdict(v) for k, v in records.items()}))
                    pipe.sadd(self._k.tags, str(ref))
                    pipe.zadd(self._k.uses, {f"tag:{ref}": record.recorded_at}, gt=True)
                    pipe.execute()
                    return
                except WatchError:
                    continue
        raise RedisUnavailable(f"Redis: the tag records of {ref} kept changing under {_WATCH_TRIES} attempts")

    def refs(self) -> list[TagRef]:
        """Every tag with records."""
        with self._guard("listing tags"):
            return [tag_ref_of(f"tag:{text(ref)}") for ref in self._r.smembers(self._k.tags)]

    def delete(self, ref: TagRef) -> bool:
        """Forget the tag's records (and its last use); True if there were any."""
        with self._guard(f"deleting the tag records of {ref}"), self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self._k.tag(ref))
            pipe.srem(self._k.tags, str(ref))
            pipe.zrem(self._k.uses, f"tag:{ref}")
            deleted, _, _ = pipe.execute()
        return bool(deleted)


class SharedPins:
    """Pinned image references → digest, honoured by every node's eviction."""

    def __init__(self, conn: Connection[redis.Redis]) -> None:
        self._r, self._k, self._guard = conn.client, conn.keys, conn.guarded

    def pins(self) -> dict[str, str]:
        with self._guard("reading pins"):
            return {text(k): text(v) for k, v in (self._r.hgetall(self._k.pins)).items()}

    def pin(self, ref: TagRef, digest: str) -> None:
        with self._guard(f"pinning {ref}"):
            self._r.hset(self._k.pins, str(ref), digest)

    def unpin(self, ref: TagRef) -> bool:
        with self._guard(f"unpinning {ref}"):
            return bool(self._r.hdel(self._k.pins, str(ref)))


class SharedSeen:
    """Which repository holds which digest (the access checks of a cached object)."""

    def __init__(self, conn: Connection[redis.Redis]) -> None:
        self._r, self._k, self._guard = conn.client, conn.keys, conn.guarded

    def mark(self, repository: str, digests: Iterable[str]) -> None:
        members = [f"{repository}@{digest}" for digest in digests]
        with self._guard(f"recording what {repository} holds"):
            for batch in _batches(members):
                self._r.sadd(self._k.seen, *batch)

    def is_seen(self, repository: str, digest: str) -> bool:
        with self._guard(f"checking what {repository} holds"):
            return bool(self._r.sismember(self._k.seen, f"{repository}@{digest}"))

    def pairs(self) -> list[tuple[str, str]]:
        """(repository, digest) of every object known to belong to a repository."""
        with self._guard("listing seen objects"):
            members = [text(m) for m in self._r.sscan_iter(self._k.seen, count=1000)]
        return [(m.rpartition("@")[0], m.rpartition("@")[2]) for m in members if "@" in m]

    def forget(self, pairs: Iterable[tuple[str, str]]) -> None:
        members = [f"{repository}@{digest}" for repository, digest in pairs]
        with self._guard("forgetting seen objects"):
            for batch in _batches(members):
                self._r.srem(self._k.seen, *batch)


class SharedUsage:
    """Usage counters (hits, misses, bytes served, …): this node's and the cluster's totals."""

    def __init__(self, conn: Connection[redis.Redis], node: str) -> None:
        self._r, self._k, self._guard, self._node = conn.client, conn.keys, conn.guarded, node

    def add(self, deltas: Mapping[str, int]) -> None:
        """Add to this node's counters and to the totals, in one transaction."""
        if not deltas:
            return
        with self._guard("adding usage counters"), self._r.pipeline(transaction=True) as pipe:
            for name, delta in deltas.items():
                pipe.hincrby(self._k.usage, name, delta)
                pipe.hincrby(self._k.node_usage(self._node), name, delta)
            pipe.sadd(self._k.nodes, self._node)
            pipe.execute()

    def totals(self) -> dict[str, int]:
        with self._guard("reading usage counters"):
            return _counters(self._r.hgetall(self._k.usage))

    def per_node(self) -> dict[str, dict[str, int]]:
        """Every node's counters (nodes that never counted anything: {})."""
        with self._guard("reading usage counters"):
            found = _per_node(self._r, self._k, self._k.node_usage)
        return {node: _counters(raw) for node, raw in found.items()}


def _per_node(client: redis.Redis, keys: Keys, key_of: Callable[[str], str]) -> dict[str, dict[Any, Any]]:
    """node → the hash at `key_of(node)`, for every node id in the registry's set, in one round trip."""
    nodes = sorted(text(n) for n in client.smembers(keys.nodes))
    with client.pipeline(transaction=False) as pipe:
        for node in nodes:
            pipe.hgetall(key_of(node))
        found = pipe.execute()
    return dict(zip(nodes, found, strict=True))


def _counters(raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    return {text(k): int(v) for k, v in raw.items()}


# KEYS: sizes, bytes, uses. ARGV: store key, size, time. Counted once however often it is added.
_ADDED = """
if redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('incrby', KEYS[2], ARGV[2])
end
redis.call('zadd', KEYS[3], 'GT', ARGV[3], ARGV[1])
return 1
"""
# KEYS: sizes, bytes, uses. ARGV: store keys. Returns the bytes no longer counted.
_FORGET = """
local freed = 0
for _, key in ipairs(ARGV) do
  local size = redis.call('hget', KEYS[1], key)
  if size then
    redis.call('hdel', KEYS[1], key)
    freed = freed + tonumber(size)
  end
  redis.call('zrem', KEYS[3], key)
end
if freed > 0 then redis.call('decrby', KEYS[2], freed) end
return freed
"""


class Inventory:
    """What the bucket holds (store key → size, and their total) and the last use of every shared
    entry (blobs, manifests, tags): what `shared.size_limit` and `max_age` sweep by."""

    def __init__(self, conn: Connection[redis.Redis]) -> None:
        self._r, self._k, self._guard = conn.client, conn.keys, conn.guarded
        self._added = conn.client.register_script(_ADDED)
        self._forget = conn.client.register_script(_FORGET)

    def added(self, key: str, size: int, when: float | None = None) -> None:
        """An object is in the bucket now (after its upload): count it, its last use `when`."""
        with self._guard(f"recording {key}"):
            self._added(keys=[self._k.sizes, self._k.bytes, self._k.uses],
                              args=[key, size, time.time() if when is None else when])

    def record_uses(self, uses: Mapping[str, float]) -> None:
        """Move last uses forward (never back: ZADD XX GT), for entries the inventory knows only."""
        items = list(uses.items())
        with self._guard("recording last uses"):
            for batch in _batches(items):
                self._r.zadd(self._k.uses, dict(batch), xx=True, gt=True)

    def last_uses(self, keys: list[str]) -> dict[str, float]:
        """Last use of each of `keys` the inventory knows."""
        if not keys:
            return {}
        with self._guard("reading last uses"):
            scores = self._r.zmscore(self._k.uses, keys)
        return {key: score for key, score in zip(keys, scores, strict=True) if score is not None}

    def least_recent(self, count: int, before: float | None = None) -> list[tuple[str, float]]:
        """The `count` least recently used entries (only those last used before `before`)."""
        high = "+inf" if before is None else f"({before}"
        with self._guard("reading last uses"):
            found = self._r.zrangebyscore(self._k.uses, "-inf", high, start=0, num=count, withscores=True)
        return [(text(key), float(score)) for key, score in cast("list[tuple[bytes, float]]", found)]

    def everything(self) -> dict[str, tuple[int, float]]:
        """Every entry the inventory knows: store key → (size, last use); tags have size 0."""
        with self._guard("reading the bucket's inventory"):
            sizes = {text(k): int(v) for k, v in self._r.hgetall(self._k.sizes).items()}
            scored = cast("list[tuple[bytes, float]]", self._r.zrange(self._k.uses, 0, -1, withscores=True))
        uses = {text(k): float(v) for k, v in scored}
        return {key: (sizes.get(key, 0), when) for key, when in uses.items() if key in sizes or key.startswith("tag:")}

    def sizes(self, keys: list[str]) -> dict[str, int]:
        if not keys:
            return {}
        with self._guard("reading sizes"):
            found = self._r.hmget(self._k.sizes, keys)
        return {key: int(size) for key, size in zip(keys, found, strict=True) if size is not None}

    def totals(self) -> tuple[int, int]:
        """(objects, bytes) in the bucket."""
        with self._guard("reading the bucket's totals"), self._r.pipeline(transaction=True) as pipe:
            pipe.hlen(self._k.sizes)
            pipe.get(self._k.bytes)
            count, size = pipe.execute()
        return int(count), int(size or 0)

    def forget(self, keys: list[str]) -> int:
        """These entries left the bucket (or Redis): not counted, no last use. Bytes uncounted."""
        freed = 0
        with self._guard("forgetting entries"):
            for batch in _batches(keys):
                freed += int(self._forget(keys=[self._k.sizes, self._k.bytes, self._k.uses], args=batch))
        return freed


@dataclass(frozen=True)
class NodeInfo:
    node: str
    urls: dict[str, str]  # what other nodes and `stats` reach it at, e.g. {"blob_url": …}
    started: float
    last_seen: float


class NodeRegistry:
    """The nodes of the cluster: each one's id, URLs, start and last heartbeat (for `stats`)."""

    def __init__(self, conn: Connection[redis.Redis], node: str) -> None:
        self._r, self._k, self._guard, self._node = conn.client, conn.keys, conn.guarded, node

    def heartbeat(self, urls: Mapping[str, str], started: float, now: float | None = None) -> None:
        fields: dict[Any, Any] = {"urls": json.dumps(dict(urls), sort_keys=True), "started": started,
                                  "last_seen": time.time() if now is None else now}
        with self._guard("registering this node"), self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._k.node(self._node), mapping=fields)
            pipe.sadd(self._k.nodes, self._node)
            pipe.execute()

    def nodes(self) -> list[NodeInfo]:
        """Every node that registered, by id (a node that stopped keeps its last `last_seen`)."""
        with self._guard("listing nodes"):
            found = _per_node(self._r, self._k, self._k.node)
        infos = []
        for node, raw in found.items():
            fields = {text(k): text(v) for k, v in raw.items()}
            if fields:
                infos.append(NodeInfo(node, json.loads(fields["urls"]), float(fields["started"]),
                                      float(fields["last_seen"])))
        return infos

    def forget(self, node: str) -> None:
        with self._guard(f"forgetting node {node}"), self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self._k.node(node))
            pipe.srem(self._k.nodes, node)
            pipe.execute()


class SharedRedis:
    """The cluster's Redis for node `node`: the records on the blocking client (`tags`, `pins`,
    `seen`, `usage`, `inventory`, `nodes`: the store protocols call them from worker threads, and
    the command-line tools are synchronous), and on the asyncio client what runs on the event loop
    (`leases` with their renewal tasks, `fills`' blocking stream reads). One breaker for both: an
    outage is one outage, logged once."""

    def __init__(self, settings: RedisSettings, node: str, *, retry_after: float = RETRY_AFTER_SECONDS) -> None:
        self.settings = settings
        self.node = node
        self.conn = async_connection(settings, retry_after)
        self.breaker = self.conn.breaker
        self.sync = sync_connection(settings, self.breaker)
        self.client, self.keys = self.sync.client, self.sync.keys
        self.tags = SharedTags(self.sync)
        self.pins = SharedPins(self.sync)
        self.seen = SharedSeen(self.sync)
        self.usage = SharedUsage(self.sync, node)
        self.inventory = Inventory(self.sync)
        self.nodes = NodeRegistry(self.sync, node)
        self.leases = Leases(self.conn, node)
        self.fills = FillEvents(self.conn, settings.timeout)

    def check(self) -> None:
        """Redis answers and is new enough (RedisUnavailable saying why not)."""
        with self.sync.guarded(f"connecting to {self.settings.url}"):
            info = self.client.info("server")
        version = tuple(int(part) for part in str(info.get("redis_version", "0")).split(".")[:2])
        if version < MIN_VERSION:
            found = info.get("redis_version")
            raise RedisUnavailable(f"Redis at {self.settings.url} is {found}: regcache needs 7.0 or later")

    def close(self) -> None:
        """Let go of the blocking client (the asyncio one: `aclose`)."""
        self.client.close()

    async def aclose(self) -> None:
        """Let go of both clients (on the event loop)."""
        self.close()
        await self.conn.client.aclose()
