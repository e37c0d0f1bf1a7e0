"""CDN stand-in for ``production.cloudflare.docker.com``.

Owns: serving blob bytes that the registry's ``redirect`` storage middleware
points at (``/docker/registry/v2/blobs/sha256/<2hex>/<hex>/data``) straight
from the registry's filesystem storage, streaming with Range support; the
failure controls (truncated bodies; the forced error status and the request
log come from :class:`~bed._http.BackgroundHTTPServer`).
The query string is ignored: Docker Hub's real CDN URLs carry a signed,
expiring one, the bed's registry adds none.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import BinaryIO

from ._http import BackgroundHTTPServer

_BLOB_PATH = re.compile(r"^/docker/registry/v2/blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})/data$")
_CHUNK = 256 * 1024


def blob_path(digest: str) -> str:
    """URL path (and storage-relative path) of a blob, as the registry redirects."""
    algo, _, hexd = digest.partition(":")
    if algo != "sha256":
        raise ValueError(f"unsupported digest {digest!r}")
    return f"/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"


@dataclass(frozen=True)
class CdnRequest:
    """One request the CDN saw. ``digest`` is None for paths that are not blobs."""

    method: str
    path: str
    query: str
    digest: str | None
    authorization: str | None
    range: str | None
    status: int
    time: float

    @property
    def has_authorization(self) -> bool:
        return self.authorization is not None


class _Handler(BaseHTTPRequestHandler):
    # Headers and a small body go out as separate writes: without TCP_NODELAY, Nagle holds the
    # body until the client's delayed ACK (40 ms), a stall no real server adds.
    disable_nagle_algorithm = True

    protocol_version = "HTTP/1.1"
    server_version = "bed-cdn/1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    @property
    def owner(self) -> Cdn:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _record(self, path: str, query: str, digest: str | None, status: int) -> None:
        self.owner._record(
            CdnRequest(
                self.command,
                path,
                query,
                digest,
                self.headers.get("Authorization"),
                self.headers.get("Range"),
                status,
                time.time(),
            )
        )

    def _error(self, status: int, path: str, query: str, digest: str | None) -> None:
        self._record(path, query, digest, status)
        body = f"{status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path, query = parts.path, parts.query
        m = _BLOB_PATH.match(path)
        if not m or m.group(1) != m.group(2)[:2]:
            self._error(404, path, query, None)
            return
        digest = f"sha256:{m.group(2)}"
        failing = self.owner._failing
        if failing is not None:
            self._error(failing, path, query, digest)
            return
        file = self.owner.storage_root / path.lstrip("/")
        try:
            fh = file.open("rb")
        except OSError:
            self._error(404, path, query, digest)
            return
        with fh:
            size = file.stat().st_size
            start, end = 0, size - 1
            status = 200
            rng = self.headers.get("Range")
            if rng and not head:
                parsed = _parse_range(rng, size)
                if parsed is None:
                    self._record(path, query, digest, 416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = parsed
                status = 206
            length = end - start + 1
            truncate = not head and self.owner._truncated == digest
            self._record(path, query, digest, status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{digest}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            fh.seek(start)
            if truncate:
                self._send_truncated(fh, length)
                return
            _copy(fh, self.wfile, length, self.owner._rate)

    def _send_truncated(self, fh: BinaryIO, length: int) -> None:
        """Send half the promised bytes, then reset the connection."""
        _copy(fh, self.wfile, length // 2)
        self.wfile.flush()
        self.close_connection = True
        sock: socket.socket = self.connection
        # SO_LINGER 0 makes close() send RST: an abrupt end, not a clean FIN
        # that a lenient client might read as end-of-body.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _copy(src: BinaryIO, dst: BinaryIO | io.BufferedIOBase, length: int, rate: int | None = None) -> None:
    # Fixed-size chunks: blobs of 100+ MB must never sit in memory whole.
    remaining = length
    started = time.monotonic()
    while remaining > 0:
        chunk = src.read(min(_CHUNK, remaining))
        if not chunk:
            break
        dst.write(chunk)
        remaining -= len(chunk)
        if rate:  # throttled: hold the average at `rate` bytes per second
            ahead = (length - remaining) / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """Single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, else None."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        start = max(0, size - int(m.group(2)))
        end = size - 1
    end = min(end, size - 1)
    if start > end:
        return None
    return start, end


class Cdn(BackgroundHTTPServer[CdnRequest]):
    """Serves blobs from ``storage_root`` (the registry's rootdirectory).

    :meth:`set_failing` fails every blob request; other paths still get 404.
    """

    handler_class = _Handler
    name = "cdn"

    def __init__(self, storage_root: str | Path, *, port: int = 0) -> None:
        super().__init__(port)
        self.storage_root = Path(storage_root)
        self._truncated: str | None = None
        self._rate: int | None = None

    def truncate(self, digest: str | None) -> None:
        """While set, GETs of this blob send full headers, half the body, then RST."""
        self._truncated = digest

    def throttle(self, bytes_per_second: int | None) -> None:
        """While set, blob bodies are sent no faster than this (None: full speed)."""
        self._rate = bytes_per_second

    def count(self, digest: str | None = None, method: str = "GET", since: int = 0) -> int:
        """Requests for one blob (or any blob) with ``method``."""
        return sum(
            1
            for r in self.requests(since)
            if r.method == method and r.digest is not None and (digest is None or r.digest == digest)
        )
