"""Store writes that must never fail an answer: best-effort writes and batched last uses.

A full disk (or a read-only one) must not stop pulls: what is cached is still served, what is not
is relayed uncached. So on a request path
- a write that only keeps books (a tag record, an access record, a manifest fetched anyway) is
  `best_effort`: a failure is logged once, with one more line when that kind of write works again,
  and the answer goes out;
- reads never write: a use of a store entry (its *last use*, which eviction and `max_age` go by;
  the store notes a use of a tag record or manifest for everything it needs as well, `note_all`)
  is noted in memory by a `UseRecorder` and written in batches, off the event loop, every
  `USE_FLUSH_SECONDS`. A batch the store cannot take is dropped, not kept for later: a last use
  a few seconds out of date costs less than a backlog on a disk that is full.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import ParamSpec

import diskcache

log = logging.getLogger("regcache")

# What a store read or write raises when the disk or the index fails (full, read-only, I/O, locked).


class StoreError(Exception):
    """A cache_dir regcache cannot use as asked (or a write to a store open read-only); the message
    names it and says why."""


STORE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout, StoreError)
USE_FLUSH_SECONDS = 5.0

P = ParamSpec("P")

_failing: set[str] = set()  # kinds of writes that failed last time (warned about once)
_failing_lock = threading.Lock()


def best_effort(what: str, write: Callable[P, object], *args: P.args, **kwargs: P.kwargs) -> str:
    """Run a store write; a store error is logged (once while it keeps failing), not raised.
    Returns why it failed, or "" when it worked. `what` names the kind of write ("tag records")."""
    try:
        write(*args, **kwargs)
    except STORE_ERRORS as err:
        reason = str(err) or type(err).__name__
        with _failing_lock:
            first = what not in _failing
            _failing.add(what)
        if first:
            log.warning("regcache: %s not saved, carrying on without: %s (logged once until it works)", what, reason)
        return reason
    if what in _failing:
        with _failing_lock:
            _failing.discard(what)
        log.info("regcache: %s saved again", what)
    return ""


class UseRecorder:
    """Last uses of store entries (key → epoch seconds), noted by reads, written in batches."""

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()  # noted from worker threads

    def note(self, key: str, when: float | None = None) -> None:
        self.note_all((key,), when)

    def note_all(self, keys: Iterable[str], when: float | None = None) -> None:
        """A use of each of `keys` at `when` (now): one lock for an entry and all it needs."""
        when = time.time() if when is None else when
        with self._lock:
            for key in keys:
                if when > self._pending.get(key, 0.0):
                    self._pending[key] = when

    def pending(self) -> dict[str, float]:
        """The uses noted and not written yet (eviction counts them)."""
        with self._lock:
            return dict(self._pending)

    def take(self) -> dict[str, float]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def flush(self, record: Callable[[Mapping[str, float]], None]) -> int:
        """Hand the uses noted so far to `record` (the store's one writer of last uses, blocking);
        how many it took. A batch it refuses is dropped (`best_effort`): 0."""
        batch = self.take()
        if not batch or best_effort("last uses", record, batch):
            return 0
        return len(batch)
