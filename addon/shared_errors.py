"""The errors of the shared store (S3 + Redis), one type for "the shared tier cannot be used now".

`SharedUnavailable` is what every call of shared_s3.py and shared_redis.py raises when its engine
is down, hung, refuses us or answers nonsense: callers catch that one type and fall back to
single-node behaviour (their own disk, their own single flight), never an outage. It is an
`OSError`, so the paths that already carry on past a failing disk (writes.best_effort,
access_records.RecordWriter) carry on past an unreachable shared store the same way.

`BucketUnusable` is the start-up check's verdict (the bucket is missing or not writable): it
stops start-up with a message naming the bucket, like a bad configuration.
"""

from __future__ import annotations


class SharedUnavailable(OSError):
    """The shared store (S3 or Redis) did not answer as it must; the message says which and why."""


class S3Unavailable(SharedUnavailable):
    """S3 is down, too slow, refuses our credentials, or answered with an error."""


class RedisUnavailable(SharedUnavailable):
    """Redis is down, too slow, or refused the command."""


class BucketUnusable(Exception):
    """The configured bucket does not exist, or these credentials cannot write it (found at
    start-up). Not a `SharedUnavailable`: falling back would hide a configuration mistake."""
