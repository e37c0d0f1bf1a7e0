"""What regcache remembers about access, across restarts: `AccessRecords`.

- the store's secret (the key of every identity hash, services/identity.py);
- grants: (identity, repository) → when the upstream last accepted a request made with that
  identity for that repository, and until when that counts; the `anonymous` identity's grant is
  "readable anonymously" and never expires;
- token records: a token (or refresh token) regcache saw being issued → the identity that obtained it;
- the auth realms cached registries named, and each registry's last `/v2/` challenge.

Nothing here is a credential: identities and token keys are keyed hashes. `DiskAccessRecords` keeps
them in a diskcache of their own (public API only) (`<cache_dir>/access/`, mode 0700), apart from the content store,
so eviction, expiry, `ls` and `purge` never see them. Every call blocks: on the event loop, go through
`RecordWriter` (writes) or `asyncio.to_thread` (reads).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import diskcache

from regcache.store.errors import STORE_ERRORS

log = logging.getLogger("regcache")

# The identity of requests without credentials; its grant on a repository means "readable
# anonymously" and never expires.
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Grant:
    accepted_at: float  # epoch seconds
    until: float | None  # None: never expires (anonymous: the repository is readable anonymously)

    def valid(self, now: float) -> bool:
        return self.until is None or self.until > now

    def to_json(self) -> str:
        return json.dumps({"accepted_at": self.accepted_at, "until": self.until})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Grant:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class TokenRecord:
    identity: str  # who obtained the token
    until: float
    repositories: tuple[str, ...] = ()  # the repository names it was asked for

    def to_json(self) -> str:
        return json.dumps({"identity": self.identity, "until": self.until, "repositories": self.repositories})

    @classmethod
    def from_json(cls, raw: str | bytes) -> TokenRecord:
        fields = json.loads(raw)
        return cls(fields["identity"], fields["until"], tuple(fields.get("repositories", ())))


class AccessRecords(Protocol):
    def secret(self) -> bytes: ...
    def grant(self, identity: str, repository: str) -> Grant | None: ...
    def put_grant(self, identity: str, repository: str, grant: Grant) -> None: ...
    def drop_grant(self, identity: str, repository: str) -> None: ...
    def holds_grants(self, identity: str) -> bool: ...
    def token(self, key: str) -> TokenRecord | None: ...
    def put_token(self, key: str, record: TokenRecord) -> None: ...
    def realms(self) -> set[str]: ...
    def add_realm(self, realm: str) -> None: ...
    def challenges(self) -> dict[str, str]: ...
    def put_challenge(self, registry: str, challenge: str | None) -> None: ...
    def close(self) -> None: ...


class LocalAccessRecords(AccessRecords, Protocol):
    """A node's own records, which also keep the revocations the cluster's records have not taken
    yet (store/shared/access.py), so that a restart still owes them."""

    def pending_drops(self) -> set[tuple[str, str]]: ...
    def keep_pending_drop(self, identity: str, repository: str) -> None: ...
    def forget_pending_drop(self, identity: str, repository: str) -> None: ...


class DiskAccessRecords:
    """`AccessRecords` in `<cache_dir>/access/` (diskcache: SQLite, expiring keys)."""

    def __init__(self, cache_dir: Path) -> None:
        directory = cache_dir / "access"
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # identity hashes under the secret next to them: the owner's only
        # Never culled for size: a lost grant would only refuse someone, but a lost secret everyone.
        self._cache = diskcache.Cache(str(directory), eviction_policy="none")

    def secret(self) -> bytes:
        self._cache.add("secret", secrets.token_bytes(32))  # once per store, whoever comes first
        value = self._cache.get("secret")
        assert isinstance(value, bytes)
        return value

    def grant(self, identity: str, repository: str) -> Grant | None:
        raw = self._cache.get(f"grant {identity} {repository}")
        return Grant.from_json(raw) if isinstance(raw, str) else None

    def put_grant(self, identity: str, repository: str, grant: Grant) -> None:
        if not self._set(f"grant {identity} {repository}", grant.to_json(), grant.until):
            return
        if identity == ANONYMOUS or grant.until is None:
            return
        with self._cache.transact():
            held = self._cache.get(f"held {identity}")
            until = max(grant.until, held if isinstance(held, float) else 0.0)
            self._set(f"held {identity}", until, until)

    def drop_grant(self, identity: str, repository: str) -> None:
        key = f"grant {identity} {repository}"
        if key in self._cache:  # a read: refusals of made-up credentials write nothing
            self._cache.delete(key)

    def holds_grants(self, identity: str) -> bool:
        """Has the upstream accepted this identity for some repository (unexpired)? A revoked
        grant may still count here until its own expiry: only token issuance asks this."""
        return self._cache.get(f"held {identity}") is not None

    def token(self, key: str) -> TokenRecord | None:
        raw = self._cache.get(f"token {key}")
        return TokenRecord.from_json(raw) if isinstance(raw, str) else None

    def put_token(self, key: str, record: TokenRecord) -> None:
        self._set(f"token {key}", record.to_json(), record.until)

    def realms(self) -> set[str]:
        raw = self._cache.get("realms")
        return set(json.loads(raw)) if isinstance(raw, str) else set()

    def add_realm(self, realm: str) -> None:
        with self._cache.transact():
            realms = self.realms()
            if realm not in realms:
                self._cache.set("realms", json.dumps(sorted(realms | {realm})))

    def challenges(self) -> dict[str, str]:
        raw = self._cache.get("challenges")
        return dict(json.loads(raw)) if isinstance(raw, str) else {}

    def put_challenge(self, registry: str, challenge: str | None) -> None:
        with self._cache.transact():
            challenges = self.challenges()
            if challenge is None:
                challenges.pop(registry, None)
            else:
                challenges[registry] = challenge
            self._cache.set("challenges", json.dumps(challenges, sort_keys=True))

    def pending_drops(self) -> set[tuple[str, str]]:
        found = set()
        for key in self._cache.iterkeys():  # read once, at start
            if isinstance(key, str) and key.startswith("pending "):
                identity, _, repository = key.removeprefix("pending ").partition(" ")
                found.add((identity, repository))
        return found

    def keep_pending_drop(self, identity: str, repository: str) -> None:
        self._cache.set(f"pending {identity} {repository}", 1)  # never expires: owed until paid

    def forget_pending_drop(self, identity: str, repository: str) -> None:
        self._cache.delete(f"pending {identity} {repository}")

    def close(self) -> None:
        self._cache.close()

    def _set(self, key: str, value: object, until: float | None) -> bool:
        """Store `value` until `until` (None: for good); False (nothing stored) if that is past."""
        left = None if until is None else until - time.time()
        if left is not None and left <= 0:
            self._cache.delete(key)
            return False
        self._cache.set(key, value, expire=left)
        return True


class RecordWriter:
    """Writes to the access records one after another, off the event loop: in order, except that
    a write marked `first` (a revocation) goes ahead of those still queued, so a crash or a backlog
    loses it last. A failed write is logged and dropped (and `failed` called): this run goes on
    from memory."""

    def __init__(self) -> None:
        self._queue: asyncio.PriorityQueue[_Write] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._order = itertools.count()

    def write(
        self, what: str, work: Callable[[], None], first: bool = False, failed: Callable[[], None] | None = None
    ) -> None:
        if self._queue is None:
            self._queue = asyncio.PriorityQueue()
            self._worker = asyncio.create_task(self._run(self._queue))
        self._queue.put_nowait((0 if first else 1, next(self._order), what, work, failed))

    async def _run(self, queue: asyncio.PriorityQueue[_Write]) -> None:
        while True:
            _, _, what, work, failed = await queue.get()
            try:
                await asyncio.to_thread(work)
            except STORE_ERRORS as err:
                log.warning("regcache: %s not saved in the store: %s", what, err)
                if failed is not None:
                    failed()
            finally:
                queue.task_done()

    async def flush(self) -> None:
        """Wait for every write queued so far, then stop the worker."""
        if self._queue is None or self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        self._queue = self._worker = None


# DiskAccessRecords provides the protocols (checked by the type checker).
_CHECKED: type[LocalAccessRecords] = DiskAccessRecords

# (priority, order queued, what, work, called if it fails)
_Write = tuple[int, int, str, Callable[[], None], Callable[[], None] | None]
