"""The Redis connection of the shared store: clients, key names, and one error type.

Owns: the redis-py clients (asyncio, and the synchronous one for the blocking `AccessRecords`
protocol) with explicit timeouts and retries; every Redis key regcache uses (`Keys`, the layout
is in redis.py); and `Connection.guarded`, which turns every Redis failure into
`RedisUnavailable` and keeps the connection's `Breaker`.

Failure bounds: a refused connection fails at once (one immediate retry, for a pooled connection
a restarted server closed); a hung server after `timeout` seconds (connect and each command;
timeouts are not retried); after either, calls fail at once for the breaker's `retry_after`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from regcache.config import RedisSettings
from regcache.oci.reference import TagRef
from regcache.store.shared.errors import RETRY_AFTER_SECONDS, Breaker, RedisUnavailable

C = TypeVar("C", aredis.Redis, redis.Redis)


def _client_options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "username": settings.username,
        "password": settings.password,
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "client_name": "regcache",
    }


def async_client(settings: RedisSettings) -> aredis.Redis:
    """redis.asyncio client: one immediate retry on a dropped connection, none on a timeout."""
    retry = AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    return aredis.Redis.from_url(settings.url, retry=retry, **_client_options(settings))


def sync_client(settings: RedisSettings) -> redis.Redis:
    """The blocking client (thread-safe pool), same timeouts and retries."""
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    return redis.Redis.from_url(settings.url, retry=retry, **_client_options(settings))


class Keys:
    """Every Redis key regcache uses, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tags = f"{prefix}tags"
        self.pins = f"{prefix}pins"
        self.seen = f"{prefix}seen"
        self.usage = f"{prefix}usage"
        self.sizes = f"{prefix}sizes"
        self.bytes = f"{prefix}bytes"
        self.uses = f"{prefix}uses"
        self.nodes = f"{prefix}nodes"

    def tag(self, ref: TagRef) -> str:
        return f"{self.prefix}tag:{ref}"

    def node_usage(self, node: str) -> str:
        return f"{self.prefix}usage:{node}"

    def node(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def lease(self, name: str) -> str:
        return f"{self.prefix}lease:{name}"

    def fill(self, token: str) -> str:
        return f"{self.prefix}fill:{token}"

    def access(self, name: str) -> str:
        return f"{self.prefix}access:{name}"


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Connection(Generic[C]):
    """A Redis client with its key names and its breaker."""

    client: C
    keys: Keys
    breaker: Breaker

    @contextlib.contextmanager
    def guarded(self, what: str) -> Iterator[None]:
        """Run the Redis calls inside (awaits included) unless the breaker is open; any Redis failure
        becomes RedisUnavailable naming `what`, and one of availability opens the breaker."""
        self.breaker.check(what)
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as err:
            raise self.breaker.failed(what, str(err) or type(err).__name__) from err
        except RedisError as err:  # Redis answered, with an error (out of memory, read-only replica, …)
            raise RedisUnavailable(f"Redis: {what} failed: {err or type(err).__name__}") from err
        self.breaker.worked()


def async_connection(
    settings: RedisSettings, retry_after: float = RETRY_AFTER_SECONDS
) -> Connection[aredis.Redis]:
    return Connection(async_client(settings), Keys(settings.prefix), Breaker("Redis", RedisUnavailable, retry_after))


def sync_connection(settings: RedisSettings, breaker: Breaker | None = None) -> Connection[redis.Redis]:
    """The blocking client's connection; `breaker`: share another connection's (one outage, one warning)."""
    return Connection(sync_client(settings), Keys(settings.prefix), breaker or Breaker("Redis", RedisUnavailable))

