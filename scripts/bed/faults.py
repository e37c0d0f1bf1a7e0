"""A fault-injecting relay in front of a real server (the bed's registry): a test tool, not a fake.

Owns: forwarding every request, as it came, to the real server and relaying its answer as it came
(redirects included: the client follows them, as it would from the real server); and, while
:meth:`FaultRelay.set_failing` holds a status (429, 503, ...), answering every request with that
status and a registry-style JSON error instead, without asking the server. The requests it saw
are logged (mark / requests). Point a client's ``upstreams`` at :attr:`url`.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from ._http import BackgroundHTTPServer

_NOT_RELAYED = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"})
_CODES = {429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND"}


@dataclass(frozen=True)
class RelayedRequest:
    method: str
    path: str
    failed_with: int | None  # the status answered instead of relaying, if any
    time: float
    headers: tuple[tuple[str, str], ...] = ()  # as the client sent them


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "bed-faults/1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    @property
    def owner(self) -> FaultRelay:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        failing = self.owner._failing
        headers = tuple(self.headers.items())
        self.owner._record(RelayedRequest(self.command, self.path, failing, time.time(), headers))
        if failing is not None:
            self._fail(failing)
        else:
            self._relay(body)

    def _fail(self, status: int) -> None:
        code = _CODES.get(status, "UNAVAILABLE")
        data = json.dumps({"errors": [{"code": code, "message": f"bed fault relay answers {status}"}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:  # as Docker Hub does; clients (skopeo) wait that long and retry
            self.send_header("Retry-After", str(self.owner.retry_after))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _relay(self, body: bytes | None) -> None:
        target = urllib.parse.urlsplit(self.owner.target)
        connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port or 80, timeout=30)
        try:
            # Header by header: clients send several Accept headers, and all of them count.
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _NOT_RELAYED:
                    connection.putheader(name, value)
            connection.endheaders(body)
            answer = connection.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            names = set()
            for name, value in answer.getheaders():
                if name.lower() not in _NOT_RELAYED:
                    self.send_header(name, value)
                    names.add(name.lower())
            if "content-length" not in names:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            connection.close()


class FaultRelay(BackgroundHTTPServer[RelayedRequest]):
    """``FaultRelay(target_url)``: relays to ``target_url`` (e.g. ``registry.url``) until
    :meth:`set_failing` says otherwise. :meth:`stop` makes the target unreachable through it."""

    handler_class = _Handler
    name = "faults"

    def __init__(self, target: str, port: int = 0, retry_after: int = 0) -> None:
        super().__init__(port)
        self.target = target
        self.retry_after = retry_after
