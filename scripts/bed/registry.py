"""The upstream registry: Debian's ``docker-registry`` (distribution 2.8.2).

Owns: the registry's YAML config (filesystem storage, delete enabled, token
auth against :class:`~bed.tokens.TokenServer` with Docker Hub's realm and
service, ``redirect`` storage middleware pointing blobs at Docker Hub's CDN
host), its two processes (start, stop, restart on the same port and storage;
the process mechanics are :mod:`bed._process`'s), and parsing its access log
so tests can count upstream requests.

Logs: the access log (Apache combined format, one line per request, *every*
request including HEAD, 401 and 404) goes to the registry's stdout, which is
appended to ``access.log``; the JSON application log (stderr) goes to
``registry.log``. Both files are appended across restarts so marks stay valid.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import yaml

from . import client
from ._process import Process, ProcessOwner
from .tokens import DEFAULT_SERVICE, TokenServer

REGISTRY_BIN = "/usr/bin/docker-registry"
DOCKER_HUB_REALM = "https://auth.docker.io/token"
DOCKER_HUB_CDN = "https://production.cloudflare.docker.com"
# Requests to this path prefix are the bed's own log barriers; the registry
# answers 404 and they are filtered out of requests().
_SYNC_PREFIX = "/_bed/sync/"

# 127.0.0.1 - - [28/Nov/2026:02:34:35 +0000] "HEAD /v2/x/manifests/1 HTTP/1.1" 404 91 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"'
)
_MANIFEST = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_BLOB = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[0-9a-f]+)$")


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot bind 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class AccessRecord:
    """One line of the registry's access log."""

    method: str
    path: str  # without query string
    query: str
    status: int
    size: int
    user_agent: str

    @property
    def kind(self) -> str:
        """``manifest``, ``blob``, ``base`` (/v2/), or ``other``."""
        if self.path in ("/v2/", "/v2"):
            return "base"
        if _MANIFEST.match(self.path):
            return "manifest"
        if _BLOB.match(self.path):
            return "blob"
        return "other"

    @property
    def repo(self) -> str | None:
        m = _MANIFEST.match(self.path) or _BLOB.match(self.path)
        return m.group("name") if m else None

    @property
    def reference(self) -> str | None:
        """Tag or digest for manifests, digest for blobs."""
        m = _MANIFEST.match(self.path)
        if m:
            return m.group("ref")
        m = _BLOB.match(self.path)
        return m.group("digest") if m else None


def parse_access_line(line: str) -> AccessRecord | None:
    m = _ACCESS_LINE.match(line)
    if not m:
        return None
    path, _, query = m.group("uri").partition("?")
    size = m.group("size")
    return AccessRecord(
        m.group("method"), path, query, int(m.group("status")), int(size) if size != "-" else 0, m.group("agent")
    )


def base_config(storage_root: Path, port: int) -> dict[str, object]:
    """A ``docker-registry`` configuration: filesystem storage at ``storage_root``, 127.0.0.1:``port``,
    every request in the access log; no auth, no middleware, no proxy (callers add those)."""
    return {
        "version": 0.1,
        "log": {
            "level": "info",
            "formatter": "json",
            # The combined-format access log (stdout) lists every request;
            # the JSON "response completed" lines skip 4xx answers.
            "accesslog": {"disabled": False},
        },
        "storage": {
            "filesystem": {"rootdirectory": str(storage_root)},
            "delete": {"enabled": True},
            # No background upload purging in the middle of a test.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            # Same secret for both instances and across restarts, so upload
            # state stays valid.
            "secret": "bed-registry-secret",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }


class RegistryError(RuntimeError):
    pass


class _Instance:
    """One ``docker-registry serve`` process: config file, logs, port."""

    def __init__(self, workdir: Path, name: str, port: int, ready_status: int) -> None:
        self.name = name
        self.port = port or free_port()
        self.config_path = workdir / f"{name}.yml"
        self.access_log = workdir / f"{name}-access.log"
        self.app_log = workdir / f"{name}.log"
        self.ready_status = ready_status
        self.process = Process(f"docker-registry ({name}) on {self.url}", self.access_log, err_path=self.app_log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: dict[str, object], timeout: float) -> None:
        if self.process.running:
            return
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # REGISTRY_* variables would override the config file.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        cmd = [REGISTRY_BIN, "serve", str(self.config_path)]
        self.process.start(cmd, env, self._ready, timeout=timeout, error=RegistryError, interval=0.02)

    def _ready(self) -> bool | str:
        try:
            status = client.request("GET", f"{self.url}/v2/", timeout=1).status
        except OSError as e:
            return str(e)
        return status == self.ready_status or f"HTTP {status}"


class Registry(ProcessOwner):
    """``docker-registry serve`` with Docker-Hub-like auth and CDN redirects.

    Two processes share one filesystem storage (distribution is stateless
    over its storage; no blob-descriptor cache is configured, so each sees the
    other's writes at once):

    * the *public* instance (:attr:`url`, :attr:`port`): token auth and CDN
      redirects, what clients reach through the proxy; its access log is what
      tests count. :meth:`stop` / :meth:`start` act on it.
    * the *admin* instance (:attr:`admin_url`): no auth, no redirect, used
      to push and inspect images. It exists because with the redirect
      middleware a blob ``HEAD`` answers 307 to the CDN host name, which
      skopeo follows while pushing and cannot resolve; it also keeps pushes
      out of the public access log.
    """

    def __init__(
        self,
        workdir: str | Path,
        token_server: TokenServer,
        *,
        port: int = 0,
        cdn_baseurl: str = DOCKER_HUB_CDN,
        realm: str = DOCKER_HUB_REALM,
        service: str = DEFAULT_SERVICE,
        htpasswd: Path | None = None,
        storage_root: Path | None = None,
    ) -> None:
        """`htpasswd`: basic auth against that file (bcrypt) instead of token auth.

        `storage_root`: another registry's storage to serve (default: its own, `workdir/storage`),
        e.g. the same images under other auth and redirect host names.
        """
        self.htpasswd = htpasswd
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_server = token_server
        self.storage_root = storage_root or self.workdir / "storage"
        self.storage_root.mkdir(exist_ok=True)
        self.realm = realm
        self.service = service
        self.cdn_baseurl = cdn_baseurl
        self._public = _Instance(self.workdir, "registry", port, ready_status=401)
        self._admin = _Instance(self.workdir, "admin", 0, ready_status=200)
        self._process = self._public.process  # pid, running, log_tail
        self.access_log = self._public.access_log
        self.app_log = self._public.app_log
        self.config_path = self._public.config_path

    @property
    def port(self) -> int:
        return self._public.port

    @property
    def url(self) -> str:
        return self._public.url

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` of the public instance."""
        return f"127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return self._admin.url

    @property
    def admin_host(self) -> str:
        """``127.0.0.1:PORT`` of the admin instance (push here)."""
        return f"127.0.0.1:{self._admin.port}"

    def config(self) -> dict[str, object]:
        """The public instance's configuration."""
        cfg = base_config(self.storage_root, self.port)
        if self.htpasswd is not None:
            cfg["auth"] = {"htpasswd": {"realm": "bed-registry", "path": str(self.htpasswd)}}
        else:
            cfg["auth"] = self._token_auth()
        cfg["middleware"] = {"storage": [{"name": "redirect", "options": {"baseurl": self.cdn_baseurl}}]}
        return cfg

    def _token_auth(self) -> dict[str, object]:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.token_server.issuer,
                "rootcertbundle": str(self.token_server.cert_path),
            }
        }

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port and storage; wait until /v2/ answers 401."""
        self._public.start(self.config(), timeout)
        self.start_admin(timeout)

    def start_admin(self, timeout: float = 10.0) -> None:
        self._admin.start(base_config(self.storage_root, self._admin.port), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the public instance (SIGTERM by PID); the admin one keeps running."""
        self._process.stop(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop both instances."""
        self._public.process.stop(timeout)
        self._admin.process.stop(timeout)

    # -- access log --------------------------------------------------------------

    def mark(self) -> int:
        """Position in the access log; pass to ``requests(since=...)``."""
        self.sync()
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def sync(self, timeout: float = 5.0) -> None:
        """Barrier: wait until requests finished before this call are logged.

        The registry writes an access line after its handler returns, which for
        small bodies is before the client sees the response, but not for every
        response. A request of our own that shows up in the log orders us
        after everything already answered. No-op while stopped.
        """
        if not self.running:
            return
        token = uuid.uuid4().hex
        try:
            client.request("GET", f"{self.url}{_SYNC_PREFIX}{token}", timeout=timeout)
        except OSError:
            return
        needle = f"{_SYNC_PREFIX}{token}".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.access_log.read_bytes()[-65536:]:
                return
            time.sleep(0.01)
        raise RegistryError(f"access log barrier not seen after {timeout}s")

    def requests(self, since: int = 0, *, sync: bool = True) -> list[AccessRecord]:
        """Parsed access records after ``since`` (a :meth:`mark`), barrier lines excluded."""
        if sync:
            self.sync()
        if not self.access_log.exists():
            return []
        with self.access_log.open("rb") as f:
            f.seek(since)
            data = f.read()
        records = []
        for raw in data.decode(errors="replace").splitlines():
            rec = parse_access_line(raw)
            if rec is not None and not rec.path.startswith(_SYNC_PREFIX):
                records.append(rec)
        return records

    def count(
        self,
        since: int = 0,
        *,
        method: str | None = None,
        kind: str | None = None,
        repo: str | None = None,
        reference: str | None = None,
        status: int | None = None,
    ) -> int:
        """Count access records matching every given filter."""
        return sum(
            1
            for r in self.requests(since)
            if (method is None or r.method == method)
            and (kind is None or r.kind == kind)
            and (repo is None or r.repo == repo)
            and (reference is None or r.reference == reference)
            and (status is None or r.status == status)
        )

    def manifest_gets(self, since: int = 0, repo: str | None = None) -> int:
        """Manifest GETs: what Docker Hub counts against the pull rate limit."""
        return self.count(since, method="GET", kind="manifest", repo=repo)

    def manifest_heads(self, since: int = 0, repo: str | None = None) -> int:
        return self.count(since, method="HEAD", kind="manifest", repo=repo)

    def blob_requests(self, since: int = 0, repo: str | None = None, method: str | None = None) -> int:
        return self.count(since, kind="blob", repo=repo, method=method)

    def app_records(self) -> list[dict[str, object]]:
        """The JSON application log, parsed (for debugging failing tests)."""
        if not self.app_log.exists():
            return []
        out = []
        for line in self.app_log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
