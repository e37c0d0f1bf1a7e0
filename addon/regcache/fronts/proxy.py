"""regcache's mitmproxy addon, `RegistryCache` (loaded by `mitmdump -s addon/cache.py`, or added by
`regcache run`'s master, master.py).

It owns the mapping between mitmproxy flows and the registry services: which connections are
intercepted at all (registries, re-targeted hosts, the hosts of recorded auth realms), which
requests are registry reads or token requests, and how a service's decision becomes a response
(`Answer`, `make_response`), a re-targeted stream (`LocalStream`) or an untouched pass-through; the
configuration's lifecycle across mitmproxy's hooks (a `Node` per configuration, node.py); and what
each flow counts in the metrics (`record_flow`: the metrics themselves know no mitmproxy).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import NamedTuple

from mitmproxy import ctx, http, tls
from mitmproxy.addonmanager import Loader
from multidict import CIMultiDict

from regcache import logs
from regcache.addresses import is_loopback, reachable_host
from regcache.config import ConfigError, Settings, load_settings
from regcache.fronts import ca
from regcache.fronts.bloburls import redirect_base
from regcache.fronts.node import Node, StartupError
from regcache.logs import log_request
from regcache.metrics import METRICS, MetricsEndpoint, registry_label
from regcache.oci.api import Kind, RegistryRequest, parse_path
from regcache.services.answers import Answer, LocalStream, redirect_answer
from regcache.services.requests import registry_request
from regcache.services.runtime import Runtime, flush_usage
from regcache.store.errors import StoreError

log = logging.getLogger("regcache")

META = "regcache"  # flow.metadata key: (result, what, note)
STREAMED = "regcache_streamed"
ORIGIN = "regcache_origin"  # flow.metadata key: the request as the client addressed it (Origin)


class Origin(NamedTuple):  # not a dataclass: they need the module in sys.modules, a script is not
    """Where the client sent a request, before `upstreams` re-targeted it: what regcache decides on."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def of(cls, request: http.Request) -> Origin:
        return cls(request.scheme, request.host.lower(), request.port, request.path)

    @property
    def url(self) -> str:
        """The logical URL (`https://registry-1.docker.io/v2/...`), the default port left out."""
        default_port = 443 if self.scheme == "https" else 80
        port = "" if self.port == default_port else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.path}"


def origin_of(flow: http.HTTPFlow) -> Origin:
    """The flow's Origin: recorded before re-targeting, or (a flow not re-targeted) its request."""
    origin = flow.metadata.get(ORIGIN)
    return origin if isinstance(origin, Origin) else Origin.of(flow.request)


def retarget(flow: http.HTTPFlow, settings: Settings) -> None:
    """Send the flow where `upstreams` says this host really is (no-op for other hosts)."""
    target = settings.upstream_for(flow.request.host, flow.request.port)
    if target is None:
        return
    flow.request.scheme = target.scheme
    flow.request.host = target.host
    flow.request.port = target.port
    flow.request.path = target.path_prefix + flow.request.path


def send_to_blob_server(flow: http.HTTPFlow, node: Node, stream: LocalStream) -> None:
    """A redirect to the blob endpoint where the client can reach it; else stream it through."""
    server, settings = node.blob_server, node.runtime.settings
    path = server.urls.path(stream.source, stream.digest)
    client = flow.client_conn.peername[0] if flow.client_conn.peername else ""
    base = redirect_base(settings.blob_redirect, settings.blob_url, server.host, server.port, client)
    if base is not None:
        flow.response = make_response(redirect_answer(base + path, stream))
        return
    flow.request.scheme, flow.request.host, flow.request.port = "http", reachable_host(server.host), server.port
    flow.request.path = path
    flow.metadata[STREAMED] = True


def make_response(answer: Answer) -> http.Response:
    # Upstream header bytes that are not UTF-8 reach us as surrogates (aiohttp); send them back as-is.
    headers = http.Headers([(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in answer.headers])
    headers["X-Cache"] = answer.result
    response = http.Response.make(answer.status, answer.body, headers)
    if answer.content_length is not None and not answer.body:  # a HEAD answer: the GET's length
        del response.headers["Content-Length"]  # (the name keeps the case it was first set with)
        response.headers["Content-Length"] = str(answer.content_length)
    return response


class RegistryCache:
    def __init__(self) -> None:
        self.settings = Settings()
        self.node: Node | None = None
        self.metrics_endpoint = MetricsEndpoint(METRICS)
        self._tried = False  # configure has tried to build a node

    @property
    def runtime(self) -> Runtime | None:
        """The running configuration's services (None: none runs)."""
        return self.node.runtime if self.node is not None else None

    def load(self, loader: Loader) -> None:
        logs.install()  # mitmproxy's log handlers are in place by now
        _ignore_cancellations_at_exit()
        loader.add_option(
            "regcache_config",
            str | None,  # type: ignore[arg-type]  # mitmproxy takes optional types, its hint says `type`
            None,
            "Path to regcache's YAML configuration (cache_dir, size_limit, registries, upstreams, "
            "upstream_timeout). Unset: built-in defaults.",
        )
        loader.add_option(
            "regcache_offline",
            bool,
            False,
            "Replay the cache with no upstream at all (same as `offline: true` in the YAML): never "
            "connect upstream; answer /v2/, tokens, tags, manifests and blobs from the store "
            "(private content to recorded credentials only, unless offline_access: open).",
        )
        loader.add_option(
            "regcache_connection_log",
            bool,
            False,
            "Keep mitmproxy's per-connection info lines (client connect, server connect, ...). Off: "
            "regcache's one line per registry request is the log.",
        )

    def configure(self, updated: set[str]) -> None:
        # `regcache run` adds this addon to its master directly: unlike a script's, its first
        # `configure` names only the options set on the command line, so "not tried yet"
        # stands for "first time" too.
        first = not self._tried
        if "regcache_connection_log" in updated or first:
            level = logging.NOTSET if ctx.options.regcache_connection_log else logging.WARNING
            logging.getLogger("mitmproxy.proxy.server").setLevel(level)
        if not first and not {"regcache_config", "regcache_offline"} & updated:
            return  # nothing of ours changed (after a failed start too: its one error line stands)
        self._tried = True
        try:
            settings = load_settings(ctx.options.regcache_config)
            node = Node(settings, offline=settings.offline or ctx.options.regcache_offline, previous=self.node)
        except ConfigError as err:
            # One line naming the key, not a traceback; an error logged during start-up makes
            # mitmdump exit (its errorcheck addon), which is what a bad config must do.
            log.error("regcache: bad configuration: %s", err)
            return
        except (StartupError, StoreError) as err:  # StoreError says which cache_dir, and why
            log.error("regcache: %s", err)
            return
        except (OSError, sqlite3.Error) as err:  # CacheDirBusy: another regcache runs on it; sqlite3: a store
            # that cannot even be read (full disk)
            log.error("regcache: cache_dir: cannot use %s: %s", settings.cache_dir, err)
            return
        old, self.node, self.settings = self.node, node, settings
        METRICS.watch_store(node.runtime.store_totals, settings.size_limit)
        self.metrics_endpoint.serve(settings.metrics_listen)
        if old is not None:
            _close_soon(old, then=functools.partial(_start, node, self.metrics_endpoint))
        log.info(
            "regcache: %s %d registries into %s (size limit %d B)",
            "OFFLINE, replaying" if node.runtime.offline else "caching",
            len(settings.registries),
            settings.cache_dir,
            settings.size_limit,
        )

    def running(self) -> None:
        logs.install()  # handlers added since `load`
        warn_if_exposed(ctx.options.listen_host, ctx.options.proxyauth)
        log_ca(Path(ctx.options.confdir).expanduser())
        # Everything allocated so far (mitmproxy, aiohttp, the settings) lives as long as the
        # process: leave it out of the collector's full passes. Otherwise the first full pass
        # comes a few requests into the first pull and stops the event loop for 50-60 ms here.
        gc.collect()
        gc.freeze()
        if self.node is not None:
            # Start serving on the blob endpoint and mirror sockets now (bound in `configure`).
            _background(_start(self.node, self.metrics_endpoint))

    def done(self) -> asyncio.Future[None] | None:
        """Stop. The close runs on; at shutdown mitmproxy awaits the returned task, so the
        store is closed and every connection ended before the event loop goes away. (A script
        reload ignores it: the hook itself stays synchronous.)"""
        self.metrics_endpoint.stop()
        METRICS.watch_store(None)
        node, self.node = self.node, None
        if node is None:
            return None
        flush_usage(node.runtime.store)  # now: a reload's background close may come too late for it
        return _close_soon(node)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        address = data.context.server.address or ("", None)
        host = (data.client_hello.sni or address[0]).lower()
        answers_tokens = self.runtime is not None and self.runtime.tokens.intercepts(host, address[1])
        if host and not self.settings.intercepts(host, address[1]) and not answers_tokens:
            # Not ours: let the TLS session through untouched, with the real server's certificate.
            data.ignore_connection = True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Re-targeted here, not in `request`: mitmproxy streams a large request body
        # (stream_large_bodies) and connects upstream before `request` is called, so a big push
        # would go to the real host. What regcache decides on stays the client's own URL.
        if ORIGIN not in flow.metadata:
            flow.metadata[ORIGIN] = Origin.of(flow.request)
            retarget(flow, self.settings)

    async def request(self, flow: http.HTTPFlow) -> None:
        node = self.node
        if flow.response is not None or node is None:
            return
        runtime = node.runtime
        self.requestheaders(flow)  # a flow that did not come through it (a replay, a test)
        origin: Origin = flow.metadata[ORIGIN]
        if runtime.tokens.intercepts(origin.host, origin.port):
            path, _, query = origin.path.partition("?")
            realm = runtime.tokens.realm_for(origin._replace(path=path).url)
            if realm is not None:
                await self._token(flow, runtime, origin, realm, query)
                return
        namespace = self.settings.namespace_for(origin.host, origin.port)
        route = parse_path(origin.path)
        if namespace is None or flow.request.method not in ("GET", "HEAD") or route.kind is Kind.OTHER:
            mark_relayed(flow, self.settings, origin.host, origin.port)
            return
        headers = flow.request.headers.items(multi=True)
        req = registry_request(namespace, origin.url, flow.request.method, origin.path, headers)
        decision = await runtime.decide(req, ranged="range" in flow.request.headers)
        flow.metadata[META] = (decision.result, req.describe(), decision.note)
        flow.metadata[FLOW_REQUEST] = req
        if isinstance(decision, Answer):
            flow.response = make_response(decision)
        elif isinstance(decision, LocalStream):
            await node.started()
            send_to_blob_server(flow, node, decision)
        else:
            mark_relayed(flow, self.settings, origin.host, origin.port)
            flow.metadata[STREAMED] = True

    @staticmethod
    async def _token(flow: http.HTTPFlow, runtime: Runtime, origin: Origin, realm: str, query: str) -> None:
        """A request for exactly a recorded auth realm: the token service answers it."""
        body = flow.request.content if flow.request.method == "POST" else None
        headers = CIMultiDict(flow.request.headers.items(multi=True))
        answer = await runtime.tokens.answer(realm, flow.request.method, query, headers, body)
        flow.response = make_response(answer)
        flow.metadata[META] = (answer.result, f"token {origin.host}", answer.note)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if META not in flow.metadata or flow.response is None:
            return
        if flow.metadata.get(STREAMED):
            flow.response.stream = True
        flow.response.headers["X-Cache"] = flow.metadata[META][0]

    def response(self, flow: http.HTTPFlow) -> None:
        if META in flow.metadata and flow.response is not None:
            size = flow.response.headers.get("Content-Length", "?")
            if flow.response.raw_content:
                size = str(len(flow.response.raw_content))
            _log_request(flow, f"{flow.response.status_code} {size} B")
        record_flow(flow, cache_result(flow), origin_of(flow).host)

    def error(self, flow: http.HTTPFlow) -> None:
        if META in flow.metadata:
            _log_request(flow, f"failed: {flow.error.msg if flow.error else '?'}", logging.WARNING)
        record_flow(flow, cache_result(flow), origin_of(flow).host)


def cache_result(flow: http.HTTPFlow) -> str | None:
    """HIT, MISS, … for a registry request regcache decided on; None for anything only relayed."""
    return flow.metadata[META][0] if META in flow.metadata else None


def warn_if_exposed(listen_host: str, proxyauth: str | None) -> None:
    if is_loopback(listen_host) or proxyauth:
        return
    where = listen_host or "all interfaces"
    log.warning(
        "regcache: WARNING: listening on %s WITHOUT proxy authentication — anyone who can reach this "
        "port can pull everything in the cache. Listen on 127.0.0.1 or set proxyauth "
        "(--set proxyauth=USER:PASS or @htpasswd-file).",
        where,
    )


def log_ca(confdir: Path) -> None:
    """Which key signs the proxy's TLS handshakes, and whether `regcache ca upgrade` would help."""
    try:
        state = ca.read_ca(confdir)
    except ca.CaError as err:
        log.warning("regcache: proxy CA: %s", err)
        return
    if state is None:  # mitmproxy said why
        return
    if state.upgradable:
        hint = f"`regcache ca upgrade --confdir {confdir}` {ca.UPGRADE_HINT}, then restart"
        log.info("regcache: proxy CA %s: %s: %s", confdir / ca.CA_FILE, state.describe(), hint)
        return
    log.info("regcache: proxy CA %s: %s", confdir / ca.CA_FILE, state.describe())


def _log_request(flow: http.HTTPFlow, outcome: str, level: int = logging.INFO) -> None:
    result, what, note = flow.metadata[META]
    ms = (time.time() - flow.request.timestamp_start) * 1000
    log_request(result, flow.request.method, what, outcome, ms, note, level)


async def _start(node: Node, metrics: MetricsEndpoint) -> None:
    """Serve on the node's sockets, then say that every listener is up."""
    await node.started()
    proxyserver = ctx.master.addons.get("proxyserver")
    proxy = proxyserver.listen_addrs() if proxyserver is not None else []
    log.info(node.ready_line(proxy, metrics.url))


def _ignore_cancellations_at_exit() -> None:
    """A cancelled task is no error. Before Python 3.13, asyncio reports one with a traceback
    when the loop's teardown cancels the task of a client still connected to a stream server
    (any proxy client connected when mitmproxy exits). mitmproxy sets its own exception handler
    while it runs and puts back the one it found (this one) for the teardown."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_unless_cancelled)


def _unless_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


_background_tasks: set[asyncio.Future[None]] = set()


def _background(work: Coroutine[None, None, None]) -> asyncio.Future[None]:
    task = asyncio.ensure_future(work)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)
    return task


def _close_soon(node: Node, then: Callable[[], Awaitable[None]] | None = None) -> asyncio.Future[None] | None:
    """Close `node` in the background (its listening sockets at once); then `then` (start a
    new configuration, whose sockets are bound already). The task, if the loop runs."""
    node.stop_accepting()
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not running yet: `running` starts the successor
        node.runtime.store.close()
        return None

    async def replace() -> None:
        await node.close()
        if then is not None:
            await then()

    return _background(replace())


# flow.metadata keys: the parsed registry request, the registry (label) a relayed flow went to,
# and "already counted" (a flow can see `response` and then `error`).
FLOW_REQUEST = "regcache_request"
FLOW_RELAYED = "regcache_relayed"
FLOW_COUNTED = "regcache_counted"


def mark_relayed(flow: http.HTTPFlow, settings: Settings, host: str, port: int) -> None:
    """mitmproxy is about to relay this flow, addressed to host:port, upstream: count it when
    the answer comes (hosts regcache intercepts only; plain-HTTP requests to other hosts are
    no registry's)."""
    if settings.intercepts(host, port):
        flow.metadata[FLOW_RELAYED] = registry_label(settings, host, port)


def record_flow(flow: http.HTTPFlow, result: str | None, host: str) -> None:
    """A flow the addon handled is done (answered or failed): into the metrics. `result` is its
    cache result, None for a flow that was only relayed; `host` the one the client addressed
    (before any re-targeting). Counted once per flow."""
    if flow.metadata.get(FLOW_COUNTED):
        return
    flow.metadata[FLOW_COUNTED] = True
    relayed_to = flow.metadata.get(FLOW_RELAYED)
    if relayed_to is not None and flow.response is not None:
        METRICS.upstream_answered(relayed_to, flow.request.method, flow.response.headers)
        if flow.request.method != "HEAD":
            METRICS.upstream_bytes(relayed_body_size(flow.response))
    if result is None:
        return
    req: RegistryRequest | None = flow.metadata.get(FLOW_REQUEST)
    if req is None:  # a token request (services/tokens.py)
        METRICS.request_answered(host, "token", flow.request.method, result, "")
    else:
        METRICS.request_decided(req, result)


def relayed_body_size(response: http.Response) -> int:
    """A relayed answer's body size: as buffered, or its Content-Length when it was streamed."""
    if response.raw_content is not None:
        return len(response.raw_content)
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else 0
