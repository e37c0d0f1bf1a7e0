"""The `shared` configuration: several regcache nodes over one S3 bucket and one Redis.

```yaml
shared:
  node: cache-a                        # this node's id in the cluster (default: the host name)
  size_limit: 2TiB                     # the bucket's share (default: no limit)
  max_age: 30d                         # default: the top-level max_age
  lease_seconds: 15                    # a dead fill holder is replaced after at most this long
  s3:
    endpoint: http://s3.internal:7480  # any S3-compatible store, path-style addressing
    bucket: regcache                   # must exist and be writable (checked at start-up)
    region: us-east-1
    access_key: …                      # or access_key_file / access_key_env
    secret_key: …                      # or secret_key_file / secret_key_env
    prefix: ""                         # keys under this prefix inside the bucket
    redirect: true                     # blob hits: 307 to a presigned URL (false: through the node)
    presign_seconds: 20m
    connect_timeout: 5s
    timeout: 30s                       # a request making no progress for this long fails
    proxy: http://proxy.internal:3128  # default: none (the environment's proxy variables are ignored)
    abandoned_uploads_after: 1d        # incomplete multipart uploads older than this are aborted
  redis: redis://redis.internal:6379/0 # or {url, username, password…, timeout, prefix}
```

Pure parsing: `parse_shared` turns the mapping into `SharedSettings` or raises `ConfigError` naming
the key (`shared.s3.bucket: …`). Secrets are read with config.py's `_secret` (inline, `_file` or
`_env`) and never appear in a repr; a password inside the Redis URL is moved out of it, so
`RedisSettings.url` can be logged.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urlunsplit

from .config import ConfigError, _bool, _secret, _url_parts, parse_duration, parse_size

DEFAULT_REGION = "us-east-1"
DEFAULT_PREFIX = "regcache:"
# SigV4 presigned URLs are valid for at most a week.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600.0

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_S3_PREFIX_RE = re.compile(r"(?:[A-Za-z0-9._-]+/)*")
_REDIS_PREFIX_RE = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # scheme://host[:port], no path
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = DEFAULT_REGION
    prefix: str = ""  # "" or "a/b/": every key of regcache's sits under it
    redirect: bool = True
    presign_seconds: float = 1200.0
    connect_timeout: float = 5.0
    timeout: float = 30.0
    proxy: str | None = None
    abandoned_uploads_after: float = 24 * 3600.0


@dataclass(frozen=True)
class RedisSettings:
    url: str  # without credentials: safe to log
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 2.0  # connect and per-command socket timeout, seconds
    prefix: str = DEFAULT_PREFIX


@dataclass(frozen=True)
class SharedSettings:
    s3: S3Settings
    redis: RedisSettings
    node: str
    max_age: float
    size_limit: int | None = None
    lease_seconds: float = 15.0


_S3_KEYS = {
    "endpoint", "bucket", "region", "prefix", "redirect", "presign_seconds", "connect_timeout", "timeout", "proxy",
    "abandoned_uploads_after",
    *(f"{name}{suffix}" for name in ("access_key", "secret_key") for suffix in ("", "_file", "_env")),
}  # fmt: skip
_REDIS_KEYS = {"url", "timeout", "prefix", "username", "password", "password_file", "password_env"}
_SHARED_KEYS = {"s3", "redis", "node", "size_limit", "max_age", "lease_seconds"}


def _map(key: str, value: object, known: set[str], example: str) -> dict[str, object]:
    """`value` as a mapping with only `known` keys (a ConfigError naming the first unknown one)."""
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a map such as {example}, got {value!r}")
    for name in value:
        if name not in known:
            raise ConfigError(f"{key}.{name}", f"unknown key (known keys: {', '.join(sorted(known))})")
    return value


def _matching(key: str, value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(key, f"expected {what}, got {value!r}")
    return value


def _seconds(key: str, value: object, *, most: float | None = None) -> float:
    """A duration larger than zero (and at most `most`)."""
    seconds = parse_duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, f"must be larger than zero, got {value!r}")
    if most is not None and seconds > most:
        raise ConfigError(key, f"must be at most {most:g} seconds, got {value!r}")
    return seconds


def _base_url(key: str, value: object, example: str) -> SplitResult:
    """An http(s) URL with a host and nothing after it but an optional `/`."""
    parts = _url_parts(key, value, example)
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as err:
        raise ConfigError(key, f"bad port in {value!r}") from err
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(key, f"expected a URL such as {example} (no path), got {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(key, f"expected a URL such as {example} (no query, no credentials), got {value!r}")
    return parts


def _required_secret(key: str, entry: dict[str, object], name: str) -> str:
    value = _secret(key, entry, name)
    if value is None:
        raise ConfigError(f"{key}.{name}", f"required (or {name}_file, {name}_env)")
    return value


def parse_s3(key: str, raw: object) -> S3Settings:
    entry = _map(key, raw, _S3_KEYS, "{endpoint: http://s3.internal:7480, bucket: regcache, access_key: …}")
    for required in ("endpoint", "bucket"):
        if required not in entry:
            raise ConfigError(f"{key}.{required}", "required")
    endpoint = _base_url(f"{key}.endpoint", entry["endpoint"], "http://s3.internal:7480")
    values: dict[str, object] = {
        "endpoint": urlunsplit((endpoint.scheme, endpoint.netloc.lower(), "", "", "")),
        "bucket": _matching(f"{key}.bucket", entry["bucket"], _BUCKET_RE, "an S3 bucket name such as regcache"),
        "access_key": _required_secret(key, entry, "access_key"),
        "secret_key": _required_secret(key, entry, "secret_key"),
    }
    if "region" in entry:
        values["region"] = _matching(f"{key}.region", entry["region"], _REGION_RE, "a region such as us-east-1")
    if "prefix" in entry:
        values["prefix"] = _matching(f"{key}.prefix", entry["prefix"] or "", _S3_PREFIX_RE, "a prefix such as cache/")
    if "redirect" in entry:
        values["redirect"] = _bool(f"{key}.redirect", entry["redirect"])
    if "presign_seconds" in entry:
        values["presign_seconds"] = _seconds(f"{key}.presign_seconds", entry["presign_seconds"],
                                             most=MAX_PRESIGN_SECONDS)
    for name in ("connect_timeout", "timeout", "abandoned_uploads_after"):
        if name in entry:
            values[name] = _seconds(f"{key}.{name}", entry[name])
    if entry.get("proxy") is not None:
        values["proxy"] = urlunsplit(_base_url(f"{key}.proxy", entry["proxy"], "http://proxy.internal:3128"))
    return S3Settings(**values)  # type: ignore[arg-type]


def _redis_url(key: str, value: object) -> tuple[str, str | None, str | None]:
    """(the URL without credentials, username, password) of `redis://[user:pass@]host[:port][/db]`,
    `rediss://…` (TLS) or `unix:///path/to/socket[?db=N]`."""
    example = "redis://redis.internal:6379/0"
    parts = _url_parts(key, value, example)
    if parts.scheme == "unix":
        if not parts.path or parts.netloc or parts.fragment:
            raise ConfigError(key, f"expected unix:///path/to/redis.sock (password: the password key), got {value!r}")
        return str(value), None, None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(key, f"expected a URL such as {example} (rediss:// for TLS), got {value!r}")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as err:
        raise ConfigError(key, f"bad port in {value!r}") from err
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
        raise ConfigError(key, f"expected a database number after the host (/0), got {parts.path!r}")
    netloc = parts.netloc.rpartition("@")[2]
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), username, password


def parse_redis(key: str, raw: object) -> RedisSettings:
    entry: dict[str, object] = (
        {"url": raw} if isinstance(raw, str) else _map(key, raw, _REDIS_KEYS, "{url: redis://redis:6379/0}")
    )
    if "url" not in entry:
        raise ConfigError(f"{key}.url", "required")
    url_key = key if isinstance(raw, str) else f"{key}.url"
    url, username, password = _redis_url(url_key, entry["url"])
    configured = _secret(key, entry, "password")
    if configured is not None and password is not None:
        raise ConfigError(url_key, "has a password, and so has the password key: give it once")
    values: dict[str, object] = {"url": url, "username": username, "password": password or configured}
    if "username" in entry:
        if username is not None:
            raise ConfigError(url_key, "has a user name, and so has the username key: give it once")
        values["username"] = _matching(f"{key}.username", entry["username"], re.compile(r"\S+"), "a user name")
    if "timeout" in entry:
        values["timeout"] = _seconds(f"{key}.timeout", entry["timeout"])
    if "prefix" in entry:
        values["prefix"] = _matching(f"{key}.prefix", entry["prefix"], _REDIS_PREFIX_RE, "a prefix such as regcache:")
    return RedisSettings(**values)  # type: ignore[arg-type]


def default_node() -> str:
    """This machine's host name, shortened to what a node id may hold."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_")[:63]
    return name or "node"


def parse_shared(key: str, raw: object, max_age: float) -> SharedSettings:
    """The `shared` section; `max_age`: the top-level one, the default of `shared.max_age`."""
    entry = _map(key, raw, _SHARED_KEYS, "{s3: {…}, redis: redis://redis:6379/0}")
    for required in ("s3", "redis"):
        if required not in entry:
            raise ConfigError(f"{key}.{required}", "required")
    values: dict[str, object] = {
        "s3": parse_s3(f"{key}.s3", entry["s3"]),
        "redis": parse_redis(f"{key}.redis", entry["redis"]),
        "node": _matching(f"{key}.node", entry["node"], _NODE_RE, "letters, digits, . _ - (at most 63)")
        if "node" in entry
        else default_node(),
        "max_age": parse_duration(f"{key}.max_age", entry["max_age"]) if "max_age" in entry else max_age,
    }
    if entry.get("size_limit") is not None:
        values["size_limit"] = parse_size(f"{key}.size_limit", entry["size_limit"])
    if "lease_seconds" in entry:
        values["lease_seconds"] = _seconds(f"{key}.lease_seconds", entry["lease_seconds"])
    return SharedSettings(**values)  # type: ignore[arg-type]


def shared_from_mapping(raw: Mapping[str, object], max_age: float) -> SharedSettings | None:
    """`parse_shared` of `raw["shared"]`; None when there is no such section (or it is empty)."""
    section = raw.get("shared")
    return None if section is None else parse_shared("shared", section, max_age)
