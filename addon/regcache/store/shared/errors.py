"""The errors of the shared store (S3 + Redis), one type for "the shared tier cannot be used now".

`SharedUnavailable` is what every call of s3.py and redis.py raises when its engine
is down, hung, refuses us or answers nonsense: callers catch that one type and fall back to
single-node behaviour (their own disk, their own single flight), never an outage. It is an
`OSError`, so the paths that already carry on past a failing disk (store.errors.best_effort,
store.access.RecordWriter) carry on past an unreachable shared store the same way.

`BucketUnusable` is the start-up check's verdict (the bucket is missing or not writable): it
stops start-up with a message naming the bucket, like a bad configuration.

`Breaker` makes "down" fail fast however the engine fails (refused at once, or hung until a
timeout) and logs an outage once.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("regcache")


class SharedUnavailable(OSError):
    """The shared store (S3 or Redis) did not answer as it must; the message says which and why."""


class S3Unavailable(SharedUnavailable):
    """S3 is down, too slow, refuses our credentials, or answered with an error."""


class RedisUnavailable(SharedUnavailable):
    """Redis is down, too slow, or refused the command."""


class BucketUnusable(Exception):
    """The configured bucket does not exist, or these credentials cannot write it (found at
    start-up). Not a `SharedUnavailable`: falling back would hide a configuration mistake."""


# After a failure, an engine is not asked again for this long: calls fail at once instead (a hung
# server would otherwise cost every request its full timeout).
RETRY_AFTER_SECONDS = 5.0


class Breaker:
    """Whether an engine (S3, Redis) is usable, as the last call found it.

    After an availability failure the breaker opens: for `retry_after` seconds every call fails at
    once, without asking the engine; the first call after that asks again. One warning when it
    opens, one line when a call works again, nothing in between: an outage is logged once.
    """

    def __init__(self, engine: str, error: type[SharedUnavailable], retry_after: float = RETRY_AFTER_SECONDS) -> None:
        self.engine = engine
        self.retry_after = retry_after
        self._error = error
        self._reason = ""  # why it is down ("": it is not)
        self._since = 0.0
        self._ask_again_at = 0.0

    @property
    def down(self) -> str:
        """Why the engine is considered down ("" while it is not)."""
        return self._reason

    def check(self, what: str) -> None:
        """Raise at once while the breaker is open."""
        if self._reason and time.monotonic() < self._ask_again_at:
            ago = time.monotonic() - self._since
            raise self._error(f"{self.engine}: {what} not tried: unavailable for {ago:.0f} s ({self._reason})")

    def failed(self, what: str, reason: str) -> SharedUnavailable:
        """Note an availability failure (open the breaker); the error to raise."""
        now = time.monotonic()
        if not self._reason:
            self._since = now
            log.warning("regcache: %s unavailable, carrying on without it (asking again every %g s): %s",
                        self.engine, self.retry_after, reason)  # fmt: skip
        self._reason = reason or "no answer"
        self._ask_again_at = now + self.retry_after
        return self._error(f"{self.engine}: {what} failed: {reason}")

    def worked(self) -> None:
        """Note a call that worked (close the breaker)."""
        if self._reason:
            log.info("regcache: %s available again after %.0f s", self.engine, time.monotonic() - self._since)
            self._reason = ""
