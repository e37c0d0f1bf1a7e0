"""What regcache counts: Prometheus metrics, their `/metrics` endpoint, and the usage totals
`regcache stats` reads from the store.

Owns:
- the metric definitions, on regcache's own `CollectorRegistry` (never prometheus-client's global
  one, so nothing else in the process adds series to ours or clashes with them); one `METRICS`
  per process, so counters survive mitmproxy re-reading the configuration;
- what is counted where: the addon hands every registry flow to `record_flow` once its answer is
  out (or it failed); `upstream.py` reports every answer regcache itself got from upstream, blob
  fills report their bytes and failures, the blob server the bytes it sent from stored blobs;
- the store gauges, read from the store at scrape time by one aggregate query;
- `MetricsEndpoint`: prometheus-client's HTTP server in a daemon thread, so a scrape never waits
  for mitmproxy's event loop nor holds it up;
- `UsageCounts`: the same counts as deltas, added into the store in batches (`flush_usage`, every
  `USAGE_FLUSH_SECONDS` and at shutdown), so `regcache stats` sees them across restarts.

Counter semantics (README, "Metrics"): `cache` bytes are blob bytes sent from stored blobs;
`upstream` bytes are response bodies regcache received from upstreams (blob fills, manifests,
pings, errors) plus bodies of registry responses mitmproxy relayed; a pull saved is a manifest
`GET` answered from the store (HIT, or REVALIDATED by a `HEAD`), which Docker Hub would have
counted against its pull limit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from wsgiref.simple_server import WSGIServer

import diskcache
import prometheus_client
from mitmproxy import http
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from regcache.config import Settings
from regcache.fronts.bloburls import base_url
from regcache.oci.api import RegistryRequest
from regcache.store.disk import Store
from regcache.store.errors import best_effort

log = logging.getLogger(__name__)

# flow.metadata keys: the parsed registry request, the registry (label) a relayed flow went to,
# and "already counted" (a flow can see `response` and then `error`).
FLOW_REQUEST = "regcache_request"
FLOW_RELAYED = "regcache_relayed"
FLOW_COUNTED = "regcache_counted"

FROM_STORE = frozenset({"HIT", "REVALIDATED", "STALE"})
# A manifest GET with one of these results made no upstream manifest GET.
PULL_SAVED = frozenset({"HIT", "REVALIDATED"})
USAGE_FLUSH_SECONDS = 5.0

# `ratelimit-remaining: 76;w=21600` (Docker Hub), or a bare number.
_RATELIMIT_RE = re.compile(r"\s*(\d+)\s*(?:;.*)?")

# Counters without their `_created` series: a timestamp per label set is noise on a dashboard.
prometheus_client.disable_created_metrics()


def parse_ratelimit(value: str | None) -> int | None:
    """The count of a `ratelimit-limit`/`ratelimit-remaining` header (`100;w=21600` → 100)."""
    match = _RATELIMIT_RE.fullmatch(value or "")
    return int(match[1]) if match else None


def registry_label(settings: Settings, host: str, port: int | None = None) -> str:
    """The `registry` label of a host: its cache namespace (docker.io for both Docker Hub names),
    or the host itself for anything else regcache talks to (CDNs, auth realms)."""
    return settings.namespace_for(host, port) or host.lower()


class UsageCounts:
    """Counts since the last flush into the store, by name (`requests docker.io blob HIT`, ...)."""

    def __init__(self) -> None:
        self._pending: Tally[str] = Tally()
        self._lock = threading.Lock()

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            self._pending[name] += count

    def take(self) -> dict[str, int]:
        with self._lock:
            pending, self._pending = self._pending, Tally()
        return dict(pending)

    def flush(self, store: Store) -> None:
        """Add what was counted into the store (blocking: one SQLite transaction)."""
        deltas = self.take()
        if not deltas:
            return
        try:
            store.add_counters(deltas)
        except (OSError, sqlite3.Error, diskcache.Timeout):
            for name, count in deltas.items():  # keep them for the next flush
                self.add(name, count)
            raise


class StoreCollector(Collector):
    """Store size and entry counts, asked from the store when Prometheus scrapes."""

    def __init__(self) -> None:
        self.store: Store | None = None
        self.size_limit = 0

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # the series depend on the store; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self.store
        if store is None:
            return
        try:
            totals = store.entry_totals()
        except (OSError, sqlite3.Error, diskcache.Timeout) as err:
            log.warning("metrics: store size not available: %s", err)
            return
        yield GaugeMetricFamily(
            "regcache_store_bytes", "Bytes in the store (blobs, manifests, records)", sum(b for _, b in totals.values())
        )
        entries = GaugeMetricFamily("regcache_store_entries", "Entries in the store, by type", labels=["type"])
        for entry_type, (count, _) in sorted(totals.items()):
            entries.add_metric([entry_type], count)
        yield entries
        yield GaugeMetricFamily("regcache_store_size_limit_bytes", "The store's size_limit", self.size_limit)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "regcache_requests",
            "Registry requests, by registry, kind (manifest, blob, ping, token, invalid) and cache result",
            ["registry", "kind", "result"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "regcache_bytes",
            "Bytes: blob bytes sent from the store (cache), bodies received from upstreams (upstream)",
            ["source"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "regcache_upstream_requests",
            "Upstream requests that got an answer (regcache's own and relayed ones), by registry and method",
            ["registry", "method"],
            registry=self.registry,
        )
        self.pulls_saved = Counter(
            "regcache_pulls_saved",
            "Manifest GETs answered from the store without an upstream manifest GET (Docker Hub pulls saved)",
            ["registry"],
            registry=self.registry,
        )
        self.ratelimit_remaining = Gauge(
            "regcache_ratelimit_remaining",
            "The last ratelimit-remaining an upstream answered with",
            ["registry"],
            registry=self.registry,
        )
        self.ratelimit_limit = Gauge(
            "regcache_ratelimit_limit",
            "The last ratelimit-limit an upstream answered with",
            ["registry"],
            registry=self.registry,
        )
        self.fill_errors = Counter(
            "regcache_fill_errors",
            "Blob fills that failed (upstream broke off, digest mismatch, store write error)",
            ["registry"],
            registry=self.registry,
        )
        self.store = StoreCollector()
        self.registry.register(self.store)
        self.usage = UsageCounts()

    # what the addon, the upstream client, fills and the blob server report -------------------
    def record_flow(self, flow: http.HTTPFlow, result: str | None, host: str) -> None:
        """A flow the addon handled is done (answered or failed). `result` is its cache result,
        None for a flow that was only relayed; `host` the one the client addressed (before any
        re-targeting). Counted once per flow."""
        if flow.metadata.get(FLOW_COUNTED):
            return
        flow.metadata[FLOW_COUNTED] = True
        relayed_to = flow.metadata.get(FLOW_RELAYED)
        if relayed_to is not None and flow.response is not None:
            self.upstream_answered(relayed_to, flow.request.method, flow.response.headers)
            if flow.request.method != "HEAD":
                self.upstream_bytes(relayed_body_size(flow.response))
        if result is None:
            return
        req: RegistryRequest | None = flow.metadata.get(FLOW_REQUEST)
        if req is None:  # a token request (token_service.py)
            self.request_answered(host, "token", flow.request.method, result, "")
        else:
            self.request_decided(req, result)

    def request_decided(self, req: RegistryRequest, result: str) -> None:
        """A registry read regcache decided on (through the proxy or the mirror) got `result`."""
        repository = f"{req.namespace}/{req.route.name}" if req.route.name else ""
        self.request_answered(req.namespace, req.route.kind.value, req.method, result, repository)

    def mark_relayed(self, flow: http.HTTPFlow, settings: Settings, host: str, port: int) -> None:
        """mitmproxy is about to relay this flow, addressed to host:port, upstream: count it when
        the answer comes (hosts regcache intercepts only; plain-HTTP requests to other hosts are
        no registry's)."""
        if settings.intercepts(host, port):
            flow.metadata[FLOW_RELAYED] = registry_label(settings, host, port)

    def request_answered(self, registry: str, kind: str, method: str, result: str, repository: str) -> None:
        self.requests.labels(registry, kind, result).inc()
        self.usage.add(f"requests {registry} {kind} {result}")
        pull = kind == "manifest" and method == "GET"
        saved = pull and result in PULL_SAVED
        if saved:
            self.pulls_saved.labels(registry).inc()
            self.usage.add(f"pulls_saved {registry}")
        if repository:
            self.usage.add(f"repository {repository} requests")
            if result in FROM_STORE:
                self.usage.add(f"repository {repository} from_store")
            if pull:
                self.usage.add(f"repository {repository} pulls")
            if saved:
                self.usage.add(f"repository {repository} pulls_saved")

    def upstream_answered(self, registry: str, method: str, headers: Mapping[str, str]) -> None:
        """An upstream answered a request (any status); keeps its rate limit headers."""
        self.upstream_requests.labels(registry, method).inc()
        remaining = parse_ratelimit(headers.get("ratelimit-remaining"))
        if remaining is not None:
            self.ratelimit_remaining.labels(registry).set(remaining)
        limit = parse_ratelimit(headers.get("ratelimit-limit"))
        if limit is not None:
            self.ratelimit_limit.labels(registry).set(limit)

    def upstream_bytes(self, count: int) -> None:
        if count > 0:
            self.bytes.labels("upstream").inc(count)
            self.usage.add("bytes upstream", count)

    def fill_ended(self, repository: str, fetched: int, failed: bool) -> None:
        """A blob fill for `repository` (`docker.io/library/alpine`) ended."""
        self.upstream_bytes(fetched)
        if failed:
            self.fill_errors.labels(repository.partition("/")[0]).inc()

    def cache_bytes_sent(self, count: int) -> None:
        if count > 0:
            self.bytes.labels("cache").inc(count)
            self.usage.add("bytes cache", count)


def relayed_body_size(response: http.Response) -> int:
    """A relayed answer's body size: as buffered, or its Content-Length when it was streamed."""
    if response.raw_content is not None:
        return len(response.raw_content)
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else 0


METRICS = Metrics()


async def flush_usage_periodically(store: Store) -> None:
    """The running cache's loop: counts go into the store every few seconds, off the event loop."""
    while True:
        await asyncio.sleep(USAGE_FLUSH_SECONDS)
        # Kept for the next flush when the store refuses them; on a full disk, warned about once.
        await asyncio.to_thread(best_effort, "usage counts", METRICS.usage.flush, store)


def flush_usage(store: Store) -> None:
    """The last flush, at shutdown or when a configuration replaces the store (blocking)."""
    try:
        METRICS.usage.flush(store)
    except (OSError, sqlite3.Error, diskcache.Timeout) as err:
        log.warning("usage counts since the last save are lost: %s", err)


class MetricsEndpoint:
    """`GET /metrics` where `metrics_listen` says, served from a daemon thread."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._server: WSGIServer | None = None
        self._listen: tuple[str, int] | None = None

    def serve(self, listen: tuple[str, int] | None) -> None:
        """Listen there (None: not at all); a no-op when already listening there."""
        if listen == self._listen and (self._server is not None or listen is None):
            return
        self.stop()
        self._listen = listen
        if listen is None:
            return
        host, port = listen
        try:
            self._server, _ = start_http_server(port, host, registry=self._metrics.registry)
        except OSError as err:
            # Metrics are not worth refusing to cache for: say so loudly and go on.
            log.warning(
                "regcache: WARNING: metrics endpoint not started: cannot listen on %s:%d (metrics_listen): %s",
                host,
                port,
                err,
            )
            return
        log.info("regcache: metrics at %s", self.url)

    @property
    def url(self) -> str | None:
        """`http://HOST:PORT/metrics` while serving."""
        if self._server is None or self._listen is None:
            return None
        return f"{base_url(self._listen[0], self._server.server_port)}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._listen = None
