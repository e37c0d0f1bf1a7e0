"""The listening sockets of regcache's own HTTP servers (the blob endpoint and the registry mirrors).

Owns:
- binding: `Listener.bind` binds and listens synchronously, while mitmproxy is still starting, so
  a taken port is known at start-up (the caller decides whether that stops regcache); on a
  configuration reload, a socket at the same fixed address is taken over from the old listener
  (duplicated), so the new configuration never races the old one for its own port;
- serving an aiohttp application on that socket, on the running event loop (`start`, `stop`);
- connection bounds: a client has `header_timeout` seconds from connecting to send its first
  request head, and a keep-alive connection may sit idle `idle_timeout` seconds between requests
  (aiohttp's keep-alive timer; before a first request it waits as long as the connection lasts);
  a request body left unread is drained for at most `header_timeout` seconds before the close;
- malformed requests: a registry-style JSON `400` and one log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import http_exceptions, typedefs, web

from regcache.addresses import base_url
from regcache.oci.api import error_body

log = logging.getLogger("regcache")

# On shutdown or reload, requests in progress get this long before they are cancelled: a client
# retries a cut-off blob, and a stop must not wait for a slow client's gigabyte.
SHUTDOWN_GRACE = 2.0
BACKLOG = 512
# aiohttp >= 3.11 tells a first line that is no HTTP at all (a TLS ClientHello) from a malformed one.
_NOT_HTTP = getattr(http_exceptions, "BadHttpMethod", ())


@dataclass(frozen=True)
class Timeouts:
    header: float  # seconds from connecting to a complete first request head
    idle: float  # seconds a keep-alive connection may wait for its next request


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: a free one). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts: TIME_WAIT is no conflict
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def one_line(text: str) -> str:
    return " ".join(text.split())


@web.middleware
async def _head_arrived(request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
    """The first middleware of every app served here: the request head is in, stop its clock."""
    protocol = request.protocol
    if isinstance(protocol, _Connection):
        protocol.head_arrived()
    return await handler(request)


def application(*middlewares: typedefs.Middleware, client_max_size: int = 1024**2) -> web.Application:
    """An aiohttp application for a `Listener` (the head deadline needs its middleware first)."""
    return web.Application(middlewares=[_head_arrived, *middlewares], client_max_size=client_max_size)


class _Connection(web.RequestHandler):
    """aiohttp's connection handler, with a deadline for the first request head and a clear,
    short answer to malformed requests."""

    def __init__(self, manager: web.Server, *, name: str, header_timeout: float, **kwargs: object) -> None:
        super().__init__(manager, **kwargs)  # type: ignore[arg-type]
        self._name = name
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # aiohttp alone would wait for a silent connection's first byte as long as its keep-alive.
        self._head_timer = asyncio.get_running_loop().call_later(self._header_timeout, self.force_close)

    def head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_arrived()
        super().connection_lost(exc)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500 or exc is None:  # a bug in a handler: aiohttp's own answer and traceback
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # an answer is on its way already: only a break is left
            raise ConnectionError("malformed request after the response started")
        what = one_line(message or str(exc))
        # Clients given a bare host:port try TLS first (skopeo, podman, ctr): a ClientHello is no
        # method, and is answered without a word in the log.
        if not isinstance(exc, _NOT_HTTP):
            log.warning("regcache: %s: malformed request from %s: %s", self._name, request.remote or "?", what)
        body = error_body("UNSUPPORTED", f"malformed HTTP request: {what}")
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


class Listener:
    """One listening socket (`name` in log lines, e.g. `blob endpoint`) serving `app`."""

    def __init__(self, name: str, app: web.Application, listen: tuple[str, int], timeouts: Timeouts) -> None:
        self.name = name
        self.address = listen
        self._timeouts = timeouts
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        """The bound port (the configured one until bound; port 0 in the configuration: the one given)."""
        if self._sock is not None and self._sock.fileno() != -1:
            return int(self._sock.getsockname()[1])
        return self.address[1]

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    def bind(self, current: Mapping[tuple[str, int], Listener] | None = None) -> None:
        """Listen now (raises OSError). `current`: the running configuration's listeners by
        address; one at this same fixed address hands over its socket."""
        previous = (current or {}).get(self.address) if self.address[1] != 0 else None
        if previous is not None and previous._sock is not None and previous._sock.fileno() != -1:
            self._sock = previous._sock.dup()
        else:
            self._sock = bind_socket(*self.address)

    async def start(self) -> None:
        """Serve on the bound socket (bind first)."""
        assert self._sock is not None, "bind() before start()"
        # aiohttp's server logs at DEBUG with tracebacks, and mitmproxy's log handlers format every
        # record: a TLS probe's ClientHello (`_Connection.handle_error`) cost the event loop 0.5 ms
        # that way, 4-5 ms the first time (the traceback reads source files). Nothing below INFO.
        logging.getLogger("aiohttp.server").setLevel(logging.INFO)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, sock=self._sock, backlog=BACKLOG)

    def _connection(self) -> _Connection:
        assert self._runner.server is not None
        return _Connection(
            self._runner.server,
            name=f"{self.name} {self.url}",
            header_timeout=self._timeouts.header,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self._timeouts.idle,
            # A body a handler left unread is drained (so the answer is not lost to a reset) no
            # longer than a request head may take, not aiohttp's 10 s.
            lingering_time=self._timeouts.header,
            access_log=None,
        )

    def stop_accepting(self) -> None:
        """Close the listening socket now (synchronous: at shutdown, before anything else)."""
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()

    async def stop(self) -> None:
        """Stop accepting, give requests in progress SHUTDOWN_GRACE, then close every connection."""
        self.stop_accepting()
        if self._runner.server is not None:
            await self._runner.cleanup()
