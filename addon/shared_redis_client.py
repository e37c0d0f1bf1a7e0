"""The Redis connection of the shared store: clients, key names, and one error type.

Owns: the redis-py clients (asyncio, and the synchronous one for the blocking `AccessRecords`
protocol) with explicit timeouts and retries; every Redis key regcache uses (`Keys`, the layout
is in shared_redis.py); and `translated`, which turns every Redis failure into `RedisUnavailable`.

Failure bounds: a refused connection fails at once (one immediate retry, for a pooled connection
a restarted server closed); a hung server after `timeout` seconds (connect and each command;
timeouts are not retried).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from .shared_config import RedisSettings
from .shared_errors import RedisUnavailable
from .store import TagRef


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Any Redis failure inside becomes RedisUnavailable naming `what` (works around awaits too)."""
    try:
        yield
    except RedisError as err:
        raise RedisUnavailable(f"Redis: {what} failed: {err or type(err).__name__}") from err


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
