"""regcache's mitmproxy addon — the entry point for `mitmdump -s addon/cache.py`.

It owns the mapping between mitmproxy flows and the registry services: which connections are
intercepted at all, which requests are registry reads, and how a service's decision becomes a
response (`Answer`), a re-targeted stream (`LocalStream`) or an untouched pass-through.
Everything else lives in the package: routes (parsing), manifests, blobs, store, upstream, config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import diskcache
from mitmproxy import ctx, http, tls
from mitmproxy.addonmanager import Loader
from multidict import CIMultiDict

if __package__ in (None, "") or __package__.startswith("__mitmproxy_script__"):
    # Loaded by path (`mitmdump -s addon/cache.py`): make the package importable even when it was
    # not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addon.access import Access
from addon.answers import Answer, Decision, LocalStream, error_answer, redirect_answer, relay
from addon.blobs import BlobService, Fills
from addon.blobserver import BlobServer
from addon.bloburls import is_loopback, reachable_host, redirect_base
from addon.config import ConfigError, Settings, load_settings
from addon.manifests import ManifestService, upstream_failed
from addon.metrics import FLOW_REQUEST, METRICS, MetricsEndpoint, flush_usage, flush_usage_periodically
from addon.routes import (
    API_VERSION_HEADER,
    INVALID_MESSAGES,
    Kind,
    RegistryRequest,
    accepted_media_types,
    parse_path,
)
from addon.store import DiskStore
from addon.upstream import UpstreamClient, UpstreamUnavailable, bearer_challenge, forwardable_headers

log = logging.getLogger("regcache")

META = "regcache"  # flow.metadata key: (result, what, note)
STREAMED = "regcache_streamed"


class Runtime:
    """Everything built from one configuration: store, upstream client, services, blob server."""

    def __init__(self, settings: Settings, offline: bool) -> None:
        self.settings = settings
        self.offline = offline
        self.store = DiskStore(settings.cache_dir, settings.size_limit)
        self.realm_hosts = self.store.realm_hosts()
        self.upstream = UpstreamClient(settings)
        self.fills = Fills(self.store, self.upstream)
        self.blob_server = BlobServer(self.store, self.fills, settings.blob_listen)
        self.access = Access(self.store, self.upstream, offline)
        self.manifests = ManifestService(self.store, self.upstream, self.access, offline)
        self.blobs = BlobService(self.store, self.upstream, self.fills, self.access, offline)
        self._started: asyncio.Future[None] | None = None
        self._sweeper: asyncio.Future[None] | None = None
        self._usage_flusher: asyncio.Future[None] | None = None

    async def started(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self.blob_server.start())
            if self.settings.max_age and not self.offline:  # a replayed cache is kept whole
                self._sweeper = asyncio.ensure_future(self._expire_unused())
            self._usage_flusher = asyncio.ensure_future(flush_usage_periodically(self.store))
        await asyncio.shield(self._started)

    async def _expire_unused(self) -> None:
        """Every max_age/10 (at most hourly): drop what nobody used for max_age."""
        max_age = self.settings.max_age
        while True:
            try:
                removed, freed = await asyncio.to_thread(self.store.expire_unused, max_age)
            except (OSError, diskcache.Timeout) as err:
                log.warning("expiry skipped: %s", err)
            else:
                if removed:
                    log.info("EXPIRED %d entries, %d B, unused for %.0f s (max_age)", removed, freed, max_age)
            await asyncio.sleep(min(3600.0, max(1.0, max_age / 10)))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.fills.close()
        await self.upstream.close()
        if self._started is not None:
            await self.blob_server.stop()
        if self._usage_flusher is not None:
            self._usage_flusher.cancel()
        await asyncio.to_thread(flush_usage, self.store)
        self.store.close()


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


def logical_url(request: http.Request) -> str:
    default_port = 443 if request.scheme == "https" else 80
    port = "" if request.port == default_port else f":{request.port}"
    return f"{request.scheme}://{request.host.lower()}{port}{request.path}"


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
            "connect upstream; answer /v2/, tokens, tags, manifests and blobs from the store.",
        )
        loader.add_option(
            "regcache_connection_log",
            bool,
            False,
            "Keep mitmproxy's per-connection info lines (client connect, server connect, ...). Off: "
            "regcache's one line per registry request is the log.",
        )

    def configure(self, updated: set[str]) -> None:
        if "regcache_connection_log" in updated:
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
            _close_soon(old)
        log.info(
            "regcache: %s %d registries into %s (size limit %d B)",
            "OFFLINE, replaying" if runtime.offline else "caching",
            len(settings.registries),
            settings.cache_dir,
            settings.size_limit,
        )

    def running(self) -> None:
        warn_if_exposed(ctx.options.listen_host, ctx.options.proxyauth)
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
        if host and not self.settings.intercepts(host, address[1]) and not self._answers_tokens(host):
            # Not ours: let the TLS session through untouched, with the real server's certificate.
            data.ignore_connection = True

    async def request(self, flow: http.HTTPFlow) -> None:
        runtime = self.runtime
        if flow.response is not None or runtime is None:
            return
        namespace = self.settings.namespace_for(flow.request.host, flow.request.port)
        route = parse_path(flow.request.path)
        if namespace is None and self._answers_tokens(flow.request.host.lower()):
            flow.response = make_response(offline_token())
            flow.metadata[META] = ("HIT", f"token {flow.request.host}", "offline")
            return
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
        try:
            decision = await self._decide(runtime, req, ranged="range" in flow.request.headers)
        except Exception as err:  # a bug or a broken store must not send the flow on unhandled
            log.exception("regcache: %s %s failed", req.method, req.describe())
            decision = error_answer(503, "UNAVAILABLE", "regcache failed on this request; retry", note=repr(err))
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

    async def _decide(self, runtime: Runtime, req: RegistryRequest, ranged: bool) -> Decision:
        match req.route.kind:
            case Kind.INVALID:
                return error_answer(400, req.route.error_code, INVALID_MESSAGES[req.route.error_code])
            case Kind.MANIFEST:
                return await runtime.manifests.serve(req)
            case Kind.BLOB:
                return await runtime.blobs.serve(req, ranged)
            case _:
                return await self._ping(runtime, req)

    def _answers_tokens(self, host: str) -> bool:
        """Offline, regcache is the token service of every auth realm it has seen."""
        return self.runtime is not None and self.runtime.offline and host in self.runtime.realm_hosts

    @staticmethod
    async def _ping(runtime: Runtime, req: RegistryRequest) -> Answer:
        """`/v2/` is always asked upstream (never cached); if the upstream cannot answer, or we
        are offline, say "no auth needed" so clients go on to stored content."""
        no_auth_needed = [("Content-Type", "application/json"), *API_VERSION_HEADER.items()]
        if runtime.offline:
            return Answer(200, no_auth_needed, b"{}", "HIT", note="offline")
        url = urlsplit(req.url)
        if "Authorization" not in req.headers and runtime.settings.credential_for(url.hostname or "", url.port):
            # regcache authenticates to this registry itself: clients need not.
            return Answer(200, no_auth_needed, b"{}", "PASS", note="regcache's own credentials")
        try:
            answer = await runtime.upstream.fetch(req.method, req.url, CIMultiDict(req.headers))
        except UpstreamUnavailable as err:
            return Answer(200, no_auth_needed, b"{}", "STALE", note=str(err))
        if upstream_failed(answer):
            return Answer(200, no_auth_needed, b"{}", "STALE", note=f"upstream answered {answer.status}")
        realm_host = bearer_realm_host(answer.headers.get("WWW-Authenticate", ""))
        if realm_host and realm_host not in runtime.realm_hosts:
            runtime.realm_hosts.add(realm_host)
            await asyncio.to_thread(runtime.store.add_realm_host, realm_host)
        return relay(answer, "PASS")

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


def bearer_realm_host(header: str) -> str | None:
    """The host of a `WWW-Authenticate: Bearer realm="https://auth.docker.io/token",...` realm."""
    realm = (bearer_challenge(header) or {}).get("realm")
    return (urlsplit(realm).hostname or None) if realm else None


def offline_token() -> Answer:
    """A token for clients that ask for one offline; the offline cache does not check it."""
    body = json.dumps(
        {"token": "regcache-offline", "access_token": "regcache-offline", "expires_in": 3600, "issued_at": utc_now()}
    ).encode()
    return Answer(200, [("Content-Type", "application/json")], body, "HIT", note="offline")


def utc_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _log_request(flow: http.HTTPFlow, outcome: str, level: int = logging.INFO) -> None:
    result, what, note = flow.metadata[META]
    ms = (time.time() - flow.request.timestamp_start) * 1000
    method = flow.request.method
    log.log(level, "%s %s %s %s %.0f ms%s", result, method, what, outcome, ms, f" ({note})" if note else "")


_background_tasks: set[asyncio.Future[None]] = set()


def _background(work: Coroutine[None, None, None]) -> None:
    task = asyncio.ensure_future(work)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


def _close_soon(runtime: Runtime) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        runtime.store.close()
        return
    _background(runtime.close())


addons = [RegistryCache()]
