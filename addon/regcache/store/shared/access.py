"""`AccessRecords` (store/access.py) in Redis: one set of access records for the whole cluster.

The same records and semantics as `DiskAccessRecords`, so every node applies the same rules: one
secret (the key of every identity hash, so an identity hashes alike on every node: the configured
`shared.access_secret_file`/`_env`, never stored in Redis next to the hashes it keys), grants with
their expiry as a Redis TTL, `held` per identity (until the latest of its grants expires), token
records expiring with their tokens, the auth realms and the registries' last challenges. Nothing
here is a credential (identities and token keys are keyed hashes), but whoever can write this
Redis can grant access: protect it like a cache_dir (ACL or password, TLS off the host).

The protocol is blocking (callers use `asyncio.to_thread` or `RecordWriter`), so this uses redis-py's
synchronous client; every call raises RedisUnavailable (an OSError, as `RecordWriter` expects of
a failing store) when Redis is unusable.

Keys (under the prefix): access:grant:<identity> <repository> (JSON, TTL),
access:held:<identity> (TTL), access:token:<key> (JSON, TTL), access:realms (set),
access:challenges (hash registry → challenge).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from regcache.config import MIN_ACCESS_SECRET, RedisSettings
from regcache.store.access import ANONYMOUS, AccessRecords, Grant, LocalAccessRecords, TokenRecord
from regcache.store.shared.errors import Breaker, SharedUnavailable
from regcache.store.shared.redis_client import sync_connection, text

T = TypeVar("T")


class RedisAccessRecords:
    """`AccessRecords` on the cluster's Redis."""

    def __init__(self, settings: RedisSettings, secret: bytes, breaker: Breaker | None = None) -> None:
        """`secret`: the cluster's (config: shared.access_secret_*); `breaker`: the node's SharedRedis
        breaker, so that an outage is one outage."""
        if len(secret) < MIN_ACCESS_SECRET:
            raise ValueError("the access records' secret is too short")
        conn = sync_connection(settings, breaker)
        self._r, self._keys, self._guard = conn.client, conn.keys, conn.guarded
        self._secret = secret

    def _key(self, name: str) -> str:
        return self._keys.access(name)

    def secret(self) -> bytes:
        return self._secret

    def grant(self, identity: str, repository: str) -> Grant | None:
        with self._guard("reading an access grant"):
            raw = self._r.get(self._key(f"grant:{identity} {repository}"))
        return None if raw is None else Grant.from_json(raw)

    def put_grant(self, identity: str, repository: str, grant: Grant) -> None:
        if not self._set(f"grant:{identity} {repository}", grant.to_json(), grant.until):
            return
        if identity == ANONYMOUS or grant.until is None:
            return
        left = _milliseconds_left(grant.until)
        if left is None:
            return
        held = self._key(f"held:{identity}")
        with self._guard("saving an access grant"), self._r.pipeline(transaction=True) as pipe:
            pipe.set(held, 1, nx=True, px=left)
            pipe.pexpire(held, left, gt=True)  # until the latest grant expires
            pipe.execute()

    def drop_grant(self, identity: str, repository: str) -> None:
        with self._guard("dropping an access grant"):
            self._r.delete(self._key(f"grant:{identity} {repository}"))

    def holds_grants(self, identity: str) -> bool:
        with self._guard("reading access grants"):
            return bool(self._r.exists(self._key(f"held:{identity}")))

    def token(self, key: str) -> TokenRecord | None:
        with self._guard("reading a token record"):
            raw = self._r.get(self._key(f"token:{key}"))
        return None if raw is None else TokenRecord.from_json(raw)

    def put_token(self, key: str, record: TokenRecord) -> None:
        self._set(f"token:{key}", record.to_json(), record.until)

    def realms(self) -> set[str]:
        with self._guard("reading auth realms"):
            return {text(realm) for realm in self._r.smembers(self._key("realms"))}

    def add_realm(self, realm: str) -> None:
        with self._guard("saving an auth realm"):
            self._r.sadd(self._key("realms"), realm)

    def challenges(self) -> dict[str, str]:
        with self._guard("reading challenges"):
            return {text(k): text(v) for k, v in self._r.hgetall(self._key("challenges")).items()}

    def put_challenge(self, registry: str, challenge: str | None) -> None:
        with self._guard("saving a challenge"):
            if challenge is None:
                self._r.hdel(self._key("challenges"), registry)
            else:
                self._r.hset(self._key("challenges"), registry, challenge)

    def close(self) -> None:
        self._r.close()

    def _set(self, name: str, value: str, until: float | None) -> bool:
        """Store `value` until `until` (None: for good); False (and nothing stored) if that is past."""
        left = _milliseconds_left(until) if until is not None else None
        with self._guard("saving access records"):
            if until is not None and left is None:
                self._r.delete(self._key(name))
                return False
            self._r.set(self._key(name), value, px=left)
        return True


def _milliseconds_left(until: float) -> int | None:
    """Whole milliseconds until `until` (epoch seconds), at least 1; None when it is past."""
    left = int((until - time.time()) * 1000)
    return left if left > 0 else None


class ClusterAccessRecords:
    """The cluster's access records (Redis), and this node's own (`local`, on disk) while Redis
    cannot answer: writes go to both; a read takes Redis's answer whenever Redis gives one (so a
    grant another node revoked stays revoked), and the node's own only during an outage. Both are
    keyed by the cluster's configured secret.

    A revocation (`drop_grant`) Redis could not take is owed to it: kept pending with the node's
    own records (so a restart still owes it), replayed before every later call on Redis, and
    until then the grant reads as absent whatever Redis says. Access fails closed."""

    def __init__(self, cluster: RedisAccessRecords, local: LocalAccessRecords) -> None:
        self._cluster = cluster
        self._local = local
        self._lock = threading.Lock()  # calls come from worker threads
        self._pending = local.pending_drops()

    def _on_cluster(self, call: Callable[[AccessRecords], T]) -> T:
        """`call` on Redis once the revocations owed to it are in (raises SharedUnavailable)."""
        with self._lock:
            owed = sorted(self._pending)
        for identity, repository in owed:
            self._cluster.drop_grant(identity, repository)
            with self._lock:
                self._pending.discard((identity, repository))
            self._local.forget_pending_drop(identity, repository)
        return call(self._cluster)

    def _read(self, read: Callable[[AccessRecords], T]) -> T:
        try:
            return self._on_cluster(read)
        except SharedUnavailable:
            return read(self._local)

    def _write(self, write: Callable[[AccessRecords], object]) -> None:
        try:
            write(self._local)
        finally:
            with contextlib.suppress(SharedUnavailable):  # the breaker has said so, once
                self._on_cluster(write)

    def pending(self, identity: str, repository: str) -> bool:
        """Is a revocation of this grant still owed to Redis?"""
        with self._lock:
            return (identity, repository) in self._pending

    def secret(self) -> bytes:
        return self._cluster.secret()  # configured: needs no Redis

    def grant(self, identity: str, repository: str) -> Grant | None:
        found = self._read(lambda records: records.grant(identity, repository))
        return None if self.pending(identity, repository) else found

    def put_grant(self, identity: str, repository: str, grant: Grant) -> None:
        self._write(lambda records: records.put_grant(identity, repository, grant))

    def drop_grant(self, identity: str, repository: str) -> None:
        try:
            self._local.drop_grant(identity, repository)
        finally:
            try:
                self._on_cluster(lambda records: records.drop_grant(identity, repository))
            except SharedUnavailable:  # owed to Redis, on disk too so that a restart still owes it
                with self._lock:
                    self._pending.add((identity, repository))
                self._local.keep_pending_drop(identity, repository)

    def holds_grants(self, identity: str) -> bool:
        return self._read(lambda records: records.holds_grants(identity))

    def token(self, key: str) -> TokenRecord | None:
        return self._read(lambda records: records.token(key))

    def put_token(self, key: str, record: TokenRecord) -> None:
        self._write(lambda records: records.put_token(key, record))

    def realms(self) -> set[str]:
        return self._read(lambda records: records.realms())

    def add_realm(self, realm: str) -> None:
        self._write(lambda records: records.add_realm(realm))

    def challenges(self) -> dict[str, str]:
        return self._read(lambda records: records.challenges())

    def put_challenge(self, registry: str, challenge: str | None) -> None:
        self._write(lambda records: records.put_challenge(registry, challenge))

    def close(self) -> None:
        try:
            self._local.close()
        finally:
            self._cluster.close()


# Both provide the protocol (checked by the type checker).
_CHECKED: type[AccessRecords] = RedisAccessRecords
_CHECKED_CLUSTER: type[AccessRecords] = ClusterAccessRecords
