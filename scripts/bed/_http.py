"""Threaded loopback HTTP servers for the test bed (token server, CDN).

Owns: binding 127.0.0.1 on a free port (with an accept queue for hundreds of connections at once),
running ``ThreadingHTTPServer`` in a background thread, stopping and restarting on the *same* port, and cutting
every open keep-alive connection on stop so that a stopped server really looks
down to clients (a plain ``shutdown()`` only stops accepting; handler threads
of keep-alive connections would go on answering); and what every such server
offers tests: a thread-safe log of the requests it saw (mark / requests /
clear) and the forced-failure control (:meth:`BackgroundHTTPServer.set_failing`).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Self, TypeVar

RecordT = TypeVar("RecordT")


class _TrackingServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers open client sockets."""

    daemon_threads = True
    # socketserver's default accept queue is 5: with dozens of clients connecting at once (the load
    # bench relays every client's token request here) the kernel drops SYNs, and each costs its
    # client a retransmission a second later: upstream latency the bed would add, not the server.
    request_queue_size = 512
    # Handler threads may be blocked on keep-alive reads; do not join them.
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: Any) -> None:
        self.owner = owner
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body (tests of aborted pulls, stop()) are
        # expected; only print tracebacks for real handler bugs.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def cut_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


class BackgroundHTTPServer(Generic[RecordT]):
    """Base for a loopback server running in its own thread.

    Subclasses set ``handler_class``; the handler reaches the owning object as
    ``self.server.owner``, logs each request with ``owner._record(rec)`` and
    answers with ``owner._failing`` while that is set.
    """

    handler_class: type[BaseHTTPRequestHandler]
    name = "http"

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._server: _TrackingServer | None = None
        self._thread: threading.Thread | None = None
        self._log: list[RecordT] = []
        self._lock = threading.Lock()
        self._failing: int | None = None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{self.name} server was never started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start serving; a restart reuses the port chosen the first time."""
        if self._server is not None:
            return
        server = _TrackingServer(("127.0.0.1", self._port), self.handler_class, self)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"bed-{self.name}-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and drop every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.cut_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- controls and log ----------------------------------------------------

    def set_failing(self, status: int | None) -> None:
        """While set, answer requests with this status (an outage); None ends it."""
        self._failing = status

    def requests(self, since: int = 0) -> list[RecordT]:
        """Requests seen after ``since`` (a :meth:`mark`), oldest first."""
        with self._lock:
            return list(self._log[since:])

    def mark(self) -> int:
        """Position in the request log; pass to ``requests(since=...)``."""
        with self._lock:
            return len(self._log)

    def clear(self) -> None:
        with self._lock:
            self._log.clear()

    def _record(self, rec: RecordT) -> None:
        with self._lock:
            self._log.append(rec)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
