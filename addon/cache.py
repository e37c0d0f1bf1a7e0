"""regcache's mitmproxy addon — the entry point for `mitmdump -s addon/cache.py`.

It owns the mapping between mitmproxy flows and the registry services: which connections are
intercepted at all (registries, re-targeted hosts, the hosts of recorded auth realms), which
requests are registry reads or token requests, and how a service's decision becomes a response
(`Answer`), a re-targeted stream (`LocalStream`) or an untouched pass-through.
Everything else lives in the package: routes (parsing), manifests, blobs, store, upstream, config.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Coroutine
from pathlib import Path

from mitmproxy import ctx, http, tls
from mitmproxy.addonmanager import Loader
from multidict import CIMultiDict

if __package__ in (None, "") or __package__.startswith("__mitmproxy_script__"):
    # Loaded by path (`mitmdump -s addon/cache.py`): make the package importable even when it was
    # not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addon.answers import Answer, LocalStream, log_request, redirect_answer
from addon.bloburls import is_loopback, reachable_host, redirect_base
from addon.config import ConfigError, Settings, load_settings
from addon.metrics import FLOW_REQUEST, METRICS, MetricsEndpoint, flush_usage
from addon.routes import Kind, RegistryRequest, accepted_media_types, parse_path
from addon.runtime import Runtime
from addon.upstream import forwardable_headers

log = logging.getLogger("regcache")

META = "regcache"  # flow.metadata key: (result, what, note)
STREAMED = "regcache_streamed"


def retarget(flow: http.HTTPFlow, settings: Settings) -> None:
    """Send the flow where `upstreams` says this host really is (no-op for other hosts)."""
    target = settings.upstream_for(flow.request.host, flow.request.port)
    METRICS.mark_relayed(flow, settings)
    if target is None:
        return
    flow.request.scheme = target.scheme
    flow.request.host = target.host
    flow.request.port = target.port
    flow.request.path = target.path_prefix + flow.request.path


def send_to_blob_server(flow: http.HTTPFlow, runtime: Runtime, stream: LocalStream) -> None:
    """A redirect to the blob endpoint where the client can reach it; else stream it through."""
    server, settings = runtime.blob_server, runtime.settings
    path = server.urls.path(stream.source, stream.digest)
    client = flow.client_conn.peername[0] if flow.client_conn.peername else ""
    base = redirect_base(settings.blob_redirect, settings.blob_url, server.host, server.port, client)
    if base is not None:
        flow.response = make_response(redirect_answer(base + path, stream))
        return
    flow.request.scheme, flow.request.host, flow.request.port = "http", reachable_host(server.host), server.port
    flow.request.path = path
    flow.metadata[STREAMED] = True


def logical_url(request: http.Request, path: str | None = None) -> str:
    default_port = 443 if request.scheme == "https" else 80
    port = "" if request.port == default_port else f":{request.port}"
    return f"{request.scheme}://{request.host.lower()}{port}{request.path if path is None else path}"


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
        self.runtime: Runtime | None = None
        self.metrics_endpoint = MetricsEndpoint(METRICS)

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "regcache_config",
            str | None,
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
        # `configure` names only the options set on the command line, so `self.runtime is None`
        # stands for "first time" too.
        if "regcache_connection_log" in updated or self.runtime is None:
            level = logging.NOTSET if ctx.options.regcache_connection_log else logging.WARNING
            logging.getLogger("mitmproxy.proxy.server").setLevel(level)
        if self.runtime is not None and not {"regcache_config", "regcache_offline"} & updated:
            return
        try:
            settings = load_settings(ctx.options.regcache_config)
            runtime = Runtime(settings, offline=settings.offline or ctx.options.regcache_offline)
        except ConfigError as err:
            # One line naming the key, not a traceback; an error logged during start-up makes
            # mitmdump exit (its errorcheck addon), which is what a bad config must do.
            log.error("regcache: bad configuration: %s", err)
            return
        except OSError as err:
            log.error("regcache: cache_dir: cannot use %s: %s", settings.cache_dir, err)
            return
        old, self.runtime, self.settings = self.runtime, runtime, settings
        METRICS.store.store, METRICS.store.size_limit = runtime.store, settings.size_limit
        self.metrics_endpoint.serve(settings.metrics_listen)
        if old is not None:
            _close_soon(old, successor=runtime)
        log.info(
            "regcache: %s %d registries into %s (size limit %d B)",
            "OFFLINE, replaying" if runtime.offline else "caching",
            len(settings.registries),
            settings.cache_dir,
            settings.size_limit,
        )

    def running(self) -> None:
        warn_if_exposed(ctx.options.listen_host, ctx.options.proxyauth)
        # Everything allocated so far (mitmproxy, aiohttp, the settings) lives as long as the
        # process: leave it out of the collector's full passes. Otherwise the first full pass
        # comes a few requests into the first pull and stops the event loop for 50-60 ms here.
        gc.collect()
        gc.freeze()
        if self.runtime is not None:
            # Start the blob server now rather than on the first blob request.
            _background(self.runtime.started())

    def done(self) -> None:
        self.metrics_endpoint.stop()
        METRICS.store.store = None
        if self.runtime is not None:
            # Now: at shutdown the loop may stop before a background close gets to it.
            flush_usage(self.runtime.store)
            _close_soon(self.runtime)
            self.runtime = None

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        address = data.context.server.address or ("", None)
        host = (data.client_hello.sni or address[0]).lower()
        answers_tokens = self.runtime is not None and self.runtime.tokens.intercepts(host, address[1])
        if host and not self.settings.intercepts(host, address[1]) and not answers_tokens:
            # Not ours: let the TLS session through untouched, with the real server's certificate.
            data.ignore_connection = True

    async def request(self, flow: http.HTTPFlow) -> None:
        runtime = self.runtime
        if flow.response is not None or runtime is None:
            return
        if runtime.tokens.intercepts(flow.request.host, flow.request.port):
            path, _, query = flow.request.path.partition("?")
            realm = runtime.tokens.realm_for(logical_url(flow.request, path))
            if realm is not None:
                await self._token(flow, runtime, realm, query)
                return
        namespace = self.settings.namespace_for(flow.request.host, flow.request.port)
        route = parse_path(flow.request.path)
        if namespace is None or flow.request.method not in ("GET", "HEAD") or route.kind is Kind.OTHER:
            retarget(flow, self.settings)
            return
        req = RegistryRequest(
            namespace=namespace,
            url=logical_url(flow.request),
            method=flow.request.method,
            route=route,
            headers=forwardable_headers(flow.request.headers.items(multi=True)),
            accepted=accepted_media_types(flow.request.headers.get_all("accept")),
        )
        decision = await runtime.decide(req, ranged="range" in flow.request.headers)
        flow.metadata[META] = (decision.result, req.describe(), decision.note)
        flow.metadata[FLOW_REQUEST] = req
        if isinstance(decision, Answer):
            flow.response = make_response(decision)
        elif isinstance(decision, LocalStream):
            await runtime.started()
            send_to_blob_server(flow, runtime, decision)
        else:
            retarget(flow, self.settings)
            flow.metadata[STREAMED] = True

    @staticmethod
    async def _token(flow: http.HTTPFlow, runtime: Runtime, realm: str, query: str) -> None:
        """A request for exactly a recorded auth realm: the token service answers it."""
        body = flow.request.content if flow.request.method == "POST" else None
        headers = CIMultiDict(flow.request.headers.items(multi=True))
        answer = await runtime.tokens.answer(realm, flow.request.method, query, headers, body)
        flow.response = make_response(answer)
        flow.metadata[META] = (answer.result, f"token {flow.request.host}", answer.note)

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
        METRICS.record_flow(flow, cache_result(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        if META in flow.metadata:
            _log_request(flow, f"failed: {flow.error.msg if flow.error else '?'}", logging.WARNING)
        METRICS.record_flow(flow, cache_result(flow))


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


def _log_request(flow: http.HTTPFlow, outcome: str, level: int = logging.INFO) -> None:
    result, what, note = flow.metadata[META]
    ms = (time.time() - flow.request.timestamp_start) * 1000
    log_request(result, flow.request.method, what, outcome, ms, note, level)


_background_tasks: set[asyncio.Future[None]] = set()


def _background(work: Coroutine[None, None, None]) -> None:
    task = asyncio.ensure_future(work)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


def _close_soon(runtime: Runtime, successor: Runtime | None = None) -> None:
    """Close `runtime` in the background; then start `successor` (a new configuration), whose
    blob endpoint and mirrors can listen only once the old ones have let go of their ports."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not running yet: `running` starts the successor
        runtime.store.close()
        return

    async def replace() -> None:
        await runtime.close()
        if successor is not None:
            await successor.started()

    _background(replace())


addons = [RegistryCache()]
