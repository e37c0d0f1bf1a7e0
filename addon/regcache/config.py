"""regcache's YAML configuration, turned into typed settings.

Every key has a default, so no file at all is a working configuration. Anything wrong (unknown
key, wrong type, unparsable size or URL, unreadable file) raises `ConfigError` naming the key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit, urlunsplit

import yaml

from regcache.oci.reference import DOCKER_HUB

T = TypeVar("T")

# Docker Hub answers under two names (crane uses index.docker.io); both are one cache namespace.
DEFAULT_REGISTRIES: dict[str, str] = {
    "registry-1.docker.io": DOCKER_HUB,
    "index.docker.io": DOCKER_HUB,
    "ghcr.io": "ghcr.io",
    "quay.io": "quay.io",
    "gcr.io": "gcr.io",
    "registry.k8s.io": "registry.k8s.io",
    "public.ecr.aws": "public.ecr.aws",
    "mcr.microsoft.com": "mcr.microsoft.com",
}

# The registry mirror (fronts/mirror.py) that serves Docker Hub by default: dockerd's `registry-mirrors`
# mirror Docker Hub only.
DEFAULT_MIRRORS: dict[str, tuple[str, int]] = {"registry-1.docker.io": ("127.0.0.1", 5055)}

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]+(?::\d+)?")
_LISTEN_HOST_RE = re.compile(r"[A-Za-z0-9.-]+|[0-9A-Fa-f:.]+")
_PLATFORM_RE = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True)
class Upstream:
    """Where a host's traffic really goes: scheme, host, port and an optional path prefix."""

    scheme: str
    host: str
    port: int
    path_prefix: str = ""


@dataclass(frozen=True)
class Credential:
    """regcache's own credentials for one registry: HTTP Basic (username + secret), or a static
    bearer token (no username). The secret never appears in a repr or a log line."""

    username: str
    secret: str = field(repr=False)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/regcache").expanduser())
    size_limit: int = 50 * 1024**3
    registries: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_REGISTRIES))
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    upstream_timeout: float = 30.0
    offline: bool = False
    max_age: float = 7 * 24 * 3600.0  # seconds; 0: never expire
    credentials: Mapping[str, Credential] = field(default_factory=dict)
    # Blob bytes: a 307 to regcache's own blob endpoint (see fronts/bloburls.py), or through the proxy.
    blob_redirect: bool = True
    blob_listen: tuple[str, int] = ("127.0.0.1", 0)
    blob_url: str | None = None
    # Where the Prometheus endpoint listens (host, port); None: no endpoint.
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9464)
    # Registry host → where its plain-HTTP registry mirror listens (fronts/mirror.py).
    mirrors: Mapping[str, tuple[str, int]] = field(default_factory=lambda: dict(DEFAULT_MIRRORS))
    # Connections to the blob endpoint and the mirrors: seconds to send a request head after
    # connecting, and seconds a keep-alive connection may sit idle.
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    # The platforms of multi-arch images this cache serves (services/completion.py): `auto`, `all`, or a
    # tuple such as ("linux/amd64", "linux/arm64").
    platforms: str | tuple[str, ...] = "auto"
    # Offline, who gets cached private content: `recorded` (clients with credentials the upstream
    # accepted for it, services/access.py) or `open` (every client of the proxy).
    offline_access: str = "recorded"
    # How long a credential the upstream accepted for a repository lets regcache serve it without a
    # fresh upstream answer (outage, 429, 5xx, offline); seconds.
    access_grant_ttl: float = 24 * 3600.0
    # Several nodes over one S3 bucket + Redis (`shared`, below); None: this node's disk alone.
    shared: SharedSettings | None = None

    def namespace_for(self, host: str, port: int | None = None) -> str | None:
        """The cache namespace of a registry host, or None when the host is not cached.
        An entry `host:port` matches that port only, a plain `host` port 443 (HTTPS's default) only."""
        return _lookup(self.registries, host, port)

    def upstream_for(self, host: str, port: int | None = None) -> Upstream | None:
        return _lookup(self.upstreams, host, port)

    def credential_for(self, host: str, port: int | None = None) -> Credential | None:
        return _lookup(self.credentials, host, port)

    def registry_host(self, name: str) -> str | None:
        """The registry host a name stands for: a cached host itself, or the first host of a cache
        namespace (`docker.io` → `registry-1.docker.io`); None if regcache does not cache it."""
        name = name.lower()
        if name in self.registries:
            return name
        return next((host for host, namespace in self.registries.items() if namespace == name), None)

    def intercepts(self, host: str, port: int | None = None) -> bool:
        """Should TLS to this host be opened at all? Registries and re-targeted hosts only."""
        return self.namespace_for(host, port) is not None or self.upstream_for(host, port) is not None


def _lookup(table: Mapping[str, T], host: str, port: int | None) -> T | None:
    """The entry for `host:port`, else, on port 443 (None: no port named, HTTPS's default), for the
    plain `host`: `registry-1.docker.io:8443` is another registry, with a namespace, grants,
    credentials and re-targeting of its own."""
    host, port = host.lower(), port or 443
    if (found := table.get(f"{host}:{port}")) is not None:
        return found
    return table.get(host) if port == 443 else None


def parse_size(key: str, value: object) -> int:
    """`50GiB`, `500 MB`, `1.5g` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size such as 50GiB, got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value)):
        number, unit = float(match[1]), match[2].lower()
    else:
        raise ConfigError(key, f"expected a size such as 50GiB, got {value!r}")
    if unit not in _SIZE_UNITS:
        raise ConfigError(key, f"unknown size unit {unit!r} in {value!r} (use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)")
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(key, f"must be larger than zero, got {value!r}")
    return size


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


def parse_duration(key: str, value: object) -> float:
    """`7d`, `12h`, `30m`, `90s`, `2w` or a number of seconds; 0 means never."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as 7d, got {value!r}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    if isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.lower())):
        return float(match[1]) * _DURATION_UNITS[match[2]]
    raise ConfigError(key, f"expected a duration such as 7d, 12h, 30m, 90s or 0 (never), got {value!r}")


def _secret(key: str, entry: dict[str, object], name: str) -> str | None:
    """`name`, `name_file` or `name_env`: inline, read from a file, or from the environment."""
    given = [k for k in (name, f"{name}_file", f"{name}_env") if k in entry]
    if len(given) > 1:
        raise ConfigError(f"{key}.{given[1]}", f"give only one of {', '.join(given)}")
    if not given:
        return None
    source = entry[given[0]]
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{key}.{given[0]}", "expected a non-empty string")
    if given[0].endswith("_file"):
        try:
            return read_text(source).strip()
        except OSError as err:
            raise ConfigError(f"{key}.{given[0]}", f"cannot read {source}: {err.strerror or err}") from err
        except ValueError as err:
            raise ConfigError(f"{key}.{given[0]}", str(err)) from err
    if given[0].endswith("_env"):
        if not os.environ.get(source):
            raise ConfigError(f"{key}.{given[0]}", f"environment variable {source} is not set")
        return os.environ[source]
    return source


def parse_credential(key: str, entry: object) -> Credential:
    if not isinstance(entry, dict):
        raise ConfigError(key, "expected {username, password | password_file | password_env} or {token…}")
    unknown = set(entry) - {"username", "password", "password_file", "password_env", "token", "token_file", "token_env"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
    password, token = _secret(key, entry, "password"), _secret(key, entry, "token")
    username = entry.get("username")
    if token is not None and (password is not None or username is not None):
        raise ConfigError(key, "give either username and password, or a token")
    if token is not None:
        return Credential("", token)
    if not isinstance(username, str) or not username or password is None:
        raise ConfigError(key, "needs username and one of password, password_file, password_env")
    return Credential(username, password)


def _url_parts(key: str, value: object, example: str) -> SplitResult:
    """`value` split as a URL; a ConfigError naming `key` for anything that is not one (urlsplit
    itself refuses some, such as `http://[::1`)."""
    problem = f"expected a base URL such as {example}, got {value!r}"
    if not isinstance(value, str):
        raise ConfigError(key, problem)
    try:
        return urlsplit(value)
    except ValueError as err:
        raise ConfigError(key, f"{problem} ({err})") from err


def parse_upstream(key: str, value: object) -> Upstream:
    parts = _url_parts(key, value, "http://127.0.0.1:5000")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(key, f"expected a base URL such as http://127.0.0.1:5000, got {value!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise ConfigError(key, f"bad port in {value!r}") from err
    return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def _host(key: str, value: object) -> str:
    if not isinstance(value, str) or not _HOST_RE.fullmatch(value):
        raise ConfigError(key, f"expected a host name, got {value!r}")
    return value.lower()


def parse_registries(key: str, value: object) -> dict[str, str]:
    """A list of hosts, or a map host → cache namespace (hosts sharing a namespace share a cache)."""
    if isinstance(value, list):
        hosts = [_host(f"{key}[{i}]", item) for i, item in enumerate(value)]
        return {host: DEFAULT_REGISTRIES.get(host, host) for host in hosts}
    if isinstance(value, dict):
        return {_host(key, host): _host(f"{key}.{host}", ns) for host, ns in value.items()}
    raise ConfigError(key, f"expected a list of hosts or a map host → namespace, got {value!r}")


def parse_listen(key: str, value: object, example: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`); port 0 picks a free one."""
    host, port = None, None
    # urlsplit refuses some values (`[::1`); .port others (not a number, out of range).
    with contextlib.suppress(ValueError):
        if isinstance(value, str):
            parts = urlsplit(f"//{value.strip()}")
            host = None if parts.path or parts.username else parts.hostname
            port = parts.port
    if host is None or port is None or not _LISTEN_HOST_RE.fullmatch(host):
        raise ConfigError(key, f"expected HOST:PORT such as {example} (port 0: any free port), got {value!r}")
    return host, port


def parse_optional_listen(key: str, value: object, example: str) -> tuple[str, int] | None:
    """As `parse_listen`; empty, `off` or false: disabled (None)."""
    if value is False or value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return None
    return parse_listen(key, value, f"{example}, or off")


def parse_mirrors(key: str, value: object, settings: Settings) -> dict[str, tuple[str, int]]:
    """A map registry (host or namespace, e.g. `docker.io`) → `HOST:PORT` (or `off`)."""
    if not isinstance(value, dict):
        example = "{docker.io: 127.0.0.1:5055}"
        raise ConfigError(key, f"expected a map registry → HOST:PORT such as {example}, got {value!r}")
    mirrors: dict[str, tuple[str, int]] = {}
    for name, listen in value.items():
        entry = f"{key}.{name}"
        host = settings.registry_host(str(name))
        if host is None:
            raise ConfigError(entry, "not a registry regcache caches (add it to registries)")
        address = parse_optional_listen(entry, listen, "127.0.0.1:5055")
        if address is None:
            continue
        if address[1] != 0 and address in mirrors.values():
            raise ConfigError(entry, f"{address[0]}:{address[1]} is already another mirror's address")
        if host in mirrors:
            raise ConfigError(entry, f"{host} has a mirror already (under another name)")
        mirrors[host] = address
    return mirrors


def parse_blob_url(key: str, value: object) -> str:
    parts = _url_parts(key, value, "http://cache.example:5080")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(key, f"expected a base URL such as http://cache.example:5080, got {value!r}")
    return str(value).rstrip("/")


def parse_platforms(key: str, value: object) -> str | tuple[str, ...]:
    """`auto`, `all`, or a list of platforms such as `[linux/amd64, linux/arm64/v8]`."""
    if value in ("auto", "all"):
        return str(value)
    if isinstance(value, list) and value:
        for i, item in enumerate(value):
            if not isinstance(item, str) or not _PLATFORM_RE.fullmatch(item):
                raise ConfigError(f"{key}[{i}]", f"expected OS/ARCH[/VARIANT] such as linux/amd64, got {item!r}")
        return tuple(value)
    raise ConfigError(key, f"expected auto, all or a list such as [linux/amd64, linux/arm64], got {value!r}")


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


OFFLINE_ACCESS = ("recorded", "open")


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _positive_number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(key, f"expected a number of seconds larger than zero, got {value!r}")
    return float(value)


def settings_from_mapping(raw: Mapping[str, object]) -> Settings:
    known = {
        "cache_dir",
        "size_limit",
        "registries",
        "upstreams",
        "upstream_timeout",
        "offline",
        "max_age",
        "credentials",
        "blob_redirect",
        "blob_listen",
        "blob_url",
        "metrics_listen",
        "mirrors",
        "header_timeout",
        "idle_timeout",
        "platforms",
        "offline_access",
        "access_grant_ttl",
        "shared",
    }
    for key in raw:
        if key not in known:
            raise ConfigError(str(key), f"unknown key (known keys: {', '.join(sorted(known))})")
    values: dict[str, object] = {}
    if "cache_dir" in raw:
        if not isinstance(raw["cache_dir"], str) or not raw["cache_dir"]:
            raise ConfigError("cache_dir", f"expected a directory path, got {raw['cache_dir']!r}")
        values["cache_dir"] = Path(raw["cache_dir"]).expanduser()
    if "size_limit" in raw:
        values["size_limit"] = parse_size("size_limit", raw["size_limit"])
    if "registries" in raw:
        values["registries"] = parse_registries("registries", raw["registries"])
    if "upstreams" in raw:
        upstreams = raw["upstreams"]
        if not isinstance(upstreams, dict):
            raise ConfigError("upstreams", f"expected a map host → base URL, got {upstreams!r}")
        values["upstreams"] = {
            _host("upstreams", host): parse_upstream(f"upstreams.{host}", url) for host, url in upstreams.items()
        }
    for key in ("upstream_timeout", "header_timeout", "idle_timeout"):
        if key in raw:
            values[key] = _positive_number(key, raw[key])
    if "credentials" in raw:
        entries = raw["credentials"]
        if not isinstance(entries, dict):
            raise ConfigError("credentials", "expected a map registry host → {username, password…} or {token…}")
        values["credentials"] = {
            _host("credentials", host): parse_credential(f"credentials.{host}", entry)
            for host, entry in entries.items()
        }
    if "max_age" in raw:
        values["max_age"] = parse_duration("max_age", raw["max_age"])
    if "metrics_listen" in raw:
        values["metrics_listen"] = parse_optional_listen("metrics_listen", raw["metrics_listen"], "127.0.0.1:9464")
    if "offline" in raw:
        values["offline"] = _bool("offline", raw["offline"])
    if "offline_access" in raw:
        values["offline_access"] = _choice("offline_access", raw["offline_access"], OFFLINE_ACCESS)
    if "access_grant_ttl" in raw:
        values["access_grant_ttl"] = parse_duration("access_grant_ttl", raw["access_grant_ttl"])
    if "blob_redirect" in raw:
        values["blob_redirect"] = _bool("blob_redirect", raw["blob_redirect"])
    if "blob_listen" in raw:
        values["blob_listen"] = parse_listen("blob_listen", raw["blob_listen"], "127.0.0.1:5080")
    if raw.get("blob_url") is not None:
        values["blob_url"] = parse_blob_url("blob_url", raw["blob_url"])
    if "platforms" in raw:
        values["platforms"] = parse_platforms("platforms", raw["platforms"])
    if raw.get("shared") is not None:
        values["shared"] = parse_shared("shared", raw["shared"], values.get("max_age", Settings.max_age))  # type: ignore[arg-type]
        if "blob_url" not in values:
            # Other nodes stream this node's fills from its blob endpoint: it must be reachable.
            raise ConfigError("blob_url", "required with shared: the URL other nodes reach this node's blob "
                              "endpoint at (e.g. http://cache-a.internal:5080, with blob_listen: 0.0.0.0:5080)")
    cached = Settings(**values)  # type: ignore[arg-type]
    if "mirrors" in raw:
        mirrors = parse_mirrors("mirrors", raw["mirrors"] or {}, cached)
    else:  # the default mirrors of the registries that are cached
        mirrors = {host: listen for host, listen in DEFAULT_MIRRORS.items() if host in cached.registries}
    return replace(cached, mirrors=mirrors)


# -- shared: several regcache nodes over one S3 bucket and one Redis ---------------------------------
#
# ```yaml
# shared:
#   node: cache-a                        # this node's id in the cluster (default: the host name)
#   size_limit: 2TiB                     # the bucket's share (default: no limit)
#   max_age: 30d                         # default: the top-level max_age
#   lease_seconds: 15                    # a dead fill holder is replaced after at most this long (1 s to 1 h)
#   access_secret_file: /etc/regcache/access-secret  # or access_secret_env: the same ≥ 32 characters on
#                                        # every node, keying the access records' identity hashes
#                                        # (default: derived from s3.secret_key)
#   s3:
#     endpoint: http://s3.internal:7480  # any S3-compatible store, path-style addressing
#     bucket: regcache                   # must exist and be writable (checked at start-up)
#     region: us-east-1
#     access_key: …                      # or access_key_file / access_key_env
#     secret_key: …                      # or secret_key_file / secret_key_env
#     prefix: ""                         # keys under this prefix inside the bucket
#     redirect: true                     # blob hits: 307 to a presigned URL (false: through the node)
#     presign_seconds: 20m
#     connect_timeout: 5s
#     timeout: 30s                       # a request making no progress for this long fails
#     proxy: http://proxy.internal:3128  # default: none (the environment's proxy variables are ignored)
#     abandoned_uploads_after: 1d        # incomplete multipart uploads older than this are aborted
#   redis: redis://redis.internal:6379/0 # or {url, username, password…, timeout, prefix}
# ```
#
# Pure parsing: `parse_shared` turns the mapping into `SharedSettings` or raises `ConfigError` naming
# the key (`shared.s3.bucket: …`). Secrets are read with `_secret` (inline, `_file` or
# `_env`) and never appear in a repr; a password inside the Redis URL is moved out of it, so
# `RedisSettings.url` can be logged.

DEFAULT_REGION = "us-east-1"
DEFAULT_PREFIX = "regcache:"
# SigV4 presigned URLs are valid for at most a week.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600.0
MAX_TIMEOUT_SECONDS = 24 * 3600.0  # S3 and Redis timeouts
MAX_ABANDONED_SECONDS = 365 * 24 * 3600.0
LEASE_SECONDS_RANGE = (1.0, 3600.0)  # shorter: Redis hammered by renewals; longer: a dead holder blocks for long

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
    # The key of the access records' identity hashes, the same on every node (from a file or the
    # environment, never from Redis: whoever reads Redis must not be able to test guesses).
    access_secret: bytes = field(repr=False)
    size_limit: int | None = None
    lease_seconds: float = 15.0


_S3_KEYS = {
    "endpoint", "bucket", "region", "prefix", "redirect", "presign_seconds", "connect_timeout", "timeout", "proxy",
    "abandoned_uploads_after",
    *(f"{name}{suffix}" for name in ("access_key", "secret_key") for suffix in ("", "_file", "_env")),
}  # fmt: skip
_REDIS_KEYS = {"url", "timeout", "prefix", "username", "password", "password_file", "password_env"}
_SHARED_KEYS = {
    "s3", "redis", "node", "size_limit", "max_age", "lease_seconds", "access_secret_file", "access_secret_env",
}  # fmt: skip
MIN_ACCESS_SECRET = 32  # characters


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


def _seconds(key: str, value: object, *, most: float, least: float = 0.0) -> float:
    """A duration larger than zero (and than `least`, if given), at most `most`: finite, so that
    timers and Redis expiries take it."""
    seconds = parse_duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, f"must be larger than zero, got {value!r}")
    if seconds < least:
        raise ConfigError(key, f"must be at least {least:g} seconds, got {value!r}")
    if not seconds <= most:  # also infinity
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
    for name, most in (("connect_timeout", MAX_TIMEOUT_SECONDS), ("timeout", MAX_TIMEOUT_SECONDS),
                       ("abandoned_uploads_after", MAX_ABANDONED_SECONDS)):  # fmt: skip
        if name in entry:
            values[name] = _seconds(f"{key}.{name}", entry[name], most=most)
    if entry.get("proxy") is not None:
        values["proxy"] = urlunsplit(_base_url(f"{key}.proxy", entry["proxy"], "http://proxy.internal:3128"))
    return S3Settings(**values)  # type: ignore[arg-type]


def _redis_url(key: str, value: object) -> tuple[str, str | None, str | None]:
    """(the URL without credentials, username, password) of `redis://[user:pass@]host[:port][/db]`,
    `rediss://…` (TLS) or `unix:///path/to/socket[?db=N]`."""
    example = "redis://redis.internal:6379/0"
    parts = _url_parts(key, value, example)
    if parts.scheme == "unix":
        return _unix_redis_url(key, parts)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query or parts.fragment:
        shown = "(not shown: it may hold a secret)" if parts.query or parts.password else repr(value)
        raise ConfigError(key, f"expected a URL such as {example} (rediss:// for TLS, no query), got {shown}")
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


def _unix_redis_url(key: str, parts: SplitResult) -> tuple[str, str | None, str | None]:
    """`unix:///path/to/socket[?db=N][&password=…]`: the URL keeps only `db`, the password moves out
    (the URL is logged); any other query is an error (never echoed: it may hold a secret)."""
    example = "unix:///path/to/redis.sock?db=0"
    if not parts.path or parts.netloc or parts.fragment:
        raise ConfigError(key, f"expected a socket URL such as {example} (password: the password key)")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as err:
        raise ConfigError(key, f"expected a socket URL such as {example}: bad query") from err
    unknown = sorted(set(query) - {"db", "password"})
    if unknown or any(len(values) > 1 for values in query.values()):
        raise ConfigError(key, f"a socket URL takes only db= and password= in its query, got {unknown or 'repeats'}")
    db = query.get("db", [None])[0]
    if db is not None and not db.isdigit():
        raise ConfigError(key, "db= must be a database number such as 0")
    password = query.get("password", [None])[0] or None
    url = f"unix://{parts.path}" + (f"?db={db}" if db is not None else "")
    return url, None, password


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
        values["timeout"] = _seconds(f"{key}.timeout", entry["timeout"], most=MAX_TIMEOUT_SECONDS)
    if "prefix" in entry:
        values["prefix"] = _matching(f"{key}.prefix", entry["prefix"], _REDIS_PREFIX_RE, "a prefix such as regcache:")
    return RedisSettings(**values)  # type: ignore[arg-type]


# What the default access secret is derived for (`_access_secret`): a new label, a new secret.
ACCESS_SECRET_LABEL = b"regcache shared access secret v1"


def _access_secret(key: str, entry: dict[str, object], s3: S3Settings) -> bytes:
    """The key of the access records' identity hashes: `access_secret_file`/`_env` when given, else
    derived from the S3 secret key (HMAC-SHA256 under it). Every node has that key, it is never in
    Redis, and whoever holds it can read every cached blob from the bucket anyway, so the hashes in
    Redis stay unforgeable for whoever can only read Redis. Rotating the S3 key (or changing the
    configured secret) makes recorded credentials unknown: clients are asked upstream again."""
    value = _secret(key, entry, "access_secret")
    if value is None:
        return hmac.new(s3.secret_key.encode(), ACCESS_SECRET_LABEL, hashlib.sha256).hexdigest().encode()
    if len(value) < MIN_ACCESS_SECRET:
        given = "access_secret_file" if "access_secret_file" in entry else "access_secret_env"
        raise ConfigError(f"{key}.{given}", f"must be at least {MIN_ACCESS_SECRET} characters, got {len(value)}")
    return value.encode()


def unprotected_redis(settings: RedisSettings) -> bool:
    """Is this Redis reached without a password over the network? (Whoever can write it can grant access.)"""
    if settings.password is not None or settings.url.startswith("unix:"):
        return False
    host = urlsplit(settings.url).hostname or ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


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
    s3 = parse_s3(f"{key}.s3", entry["s3"])
    values: dict[str, object] = {
        "s3": s3,
        "redis": parse_redis(f"{key}.redis", entry["redis"]),
        "node": _matching(f"{key}.node", entry["node"], _NODE_RE, "letters, digits, . _ - (at most 63)")
        if "node" in entry
        else default_node(),
        "max_age": parse_duration(f"{key}.max_age", entry["max_age"]) if "max_age" in entry else max_age,
        "access_secret": _access_secret(key, entry, s3),
    }
    if entry.get("size_limit") is not None:
        values["size_limit"] = parse_size(f"{key}.size_limit", entry["size_limit"])
    if "lease_seconds" in entry:
        least, most = LEASE_SECONDS_RANGE
        values["lease_seconds"] = _seconds(f"{key}.lease_seconds", entry["lease_seconds"], least=least, most=most)
    return SharedSettings(**values)  # type: ignore[arg-type]


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents; ValueError saying so when it is not UTF-8 text."""
    data = Path(path).expanduser().read_bytes()
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})") from err


def load_settings(path: str | None) -> Settings:
    """Read the YAML file at `path` (None or empty: all defaults)."""
    if not path:
        return Settings()
    try:
        text = read_text(path)
    except OSError as err:
        raise ConfigError("regcache_config", f"cannot read {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise ConfigError("regcache_config", str(err)) from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("regcache_config", f"{path} is not valid YAML: {err}") from err
    if raw is None:
        return Settings()
    if not isinstance(raw, dict):
        raise ConfigError("regcache_config", f"{path} must hold a YAML map of settings")
    return settings_from_mapping(raw)
