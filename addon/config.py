"""regcache's YAML configuration, turned into typed settings.

Every key has a default, so no file at all is a working configuration. Anything wrong (unknown
key, wrong type, unparsable size or URL, unreadable file) raises `ConfigError` naming the key.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml

if TYPE_CHECKING:
    from .shared_config import SharedSettings

DOCKER_HUB = "docker.io"
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

# The registry mirror (mirror.py) that serves Docker Hub by default: dockerd's `registry-mirrors`
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
    # Blob bytes: a 307 to regcache's own blob endpoint (see bloburls.py), or through the proxy.
    blob_redirect: bool = True
    blob_listen: tuple[str, int] = ("127.0.0.1", 0)
    blob_url: str | None = None
    # Where the Prometheus endpoint listens (host, port); None: no endpoint.
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9464)
    # Registry host → where its plain-HTTP registry mirror listens (mirror.py).
    mirrors: Mapping[str, tuple[str, int]] = field(default_factory=lambda: dict(DEFAULT_MIRRORS))
    # Connections to the blob endpoint and the mirrors: seconds to send a request head after
    # connecting, and seconds a keep-alive connection may sit idle.
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    # The platforms of multi-arch images this cache serves (completion.py): `auto`, `all`, or a
    # tuple such as ("linux/amd64", "linux/arm64").
    platforms: str | tuple[str, ...] = "auto"
    # Offline, who gets cached private content: `recorded` (clients with credentials the upstream
    # accepted for it, access.py) or `open` (every client of the proxy).
    offline_access: str = "recorded"
    # How long a credential the upstream accepted for a repository lets regcache serve it without a
    # fresh upstream answer (outage, 429, 5xx, offline); seconds.
    access_grant_ttl: float = 24 * 3600.0
    # Several nodes over one S3 bucket + Redis (shared_config.py); None: this node's disk alone.
    shared: SharedSettings | None = None

    def namespace_for(self, host: str, port: int | None = None) -> str | None:
        """The cache namespace of a registry host, or None when the host is not cached.
        An entry `host:port` matches that port only, a plain `host` any port."""
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
    host = host.lower()
    if port is not None and (found := table.get(f"{host}:{port}")) is not None:
        return found
    return table.get(host)


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
    from .shared_config import shared_from_mapping  # it builds on this module

    values["shared"] = shared_from_mapping(raw, values.get("max_age", Settings.max_age))  # type: ignore[arg-type]
    cached = Settings(**values)  # type: ignore[arg-type]
    if "mirrors" in raw:
        mirrors = parse_mirrors("mirrors", raw["mirrors"] or {}, cached)
    else:  # the default mirrors of the registries that are cached
        mirrors = {host: listen for host, listen in DEFAULT_MIRRORS.items() if host in cached.registries}
    return replace(cached, mirrors=mirrors)


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
