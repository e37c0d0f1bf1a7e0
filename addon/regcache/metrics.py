"""What regcache counts: Prometheus metrics, their `/metrics` endpoint, and the usage totals
`regcache stats` reads from the store.

Owns:
- the metric definitions, on regcache's own `CollectorRegistry` (never prometheus-client's global
  one, so nothing else in the process adds series to ours or clashes with them); one `METRICS`
  per process, so counters survive mitmproxy re-reading the configuration;
- what is counted where: the fronts report every registry request once its answer is out (the
  proxy's flows: fronts/proxy.py); `services/upstream.py` reports every answer regcache itself got from
  upstream, blob fills report their bytes and failures, the blob server the bytes it sent from
  stored blobs;
- the store gauges, asked at scrape time from whatever the running configuration gives
  `watch_store` (one aggregate query of its store);
- `MetricsEndpoint`: prometheus-client's HTTP server in a daemon thread, so a scrape never waits
  for mitmproxy's event loop nor holds it up;
- `UsageCounts`: the same counts as deltas, handed to the store in batches (services/runtime.py does,
  every few seconds and at shutdown), so `regcache stats` sees them across restarts.

Nothing here imports mitmproxy or the store: metrics sit below both.

Counter semantics (README, "Metrics"): `cache` bytes are blob bytes sent from stored blobs;
`upstream` bytes are response bodies regcache received from upstreams (blob fills, manifests,
pings, errors) plus bodies of registry responses mitmproxy relayed; a pull saved is a manifest
`GET` answered from the store (HIT, or REVALIDATED by a `HEAD`), which Docker Hub would have
counted against its pull limit.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from regcache.addresses import base_url
from regcache.config import Settings
from regcache.oci.api import RegistryRequest

log = logging.getLogger(__name__)

FROM_STORE = frozenset({"HIT", "REVALIDATED", "STALE"})
# A manifest GET with one of these results made no upstream manifest GET.
PULL_SAVED = frozenset({"HIT", "REVALIDATED"})
class CounterSink(Protocol):
    """Where usage counts go: the store's `add_counters` (store.base.UsageStore), by shape."""

    def add_counters(self, deltas: Mapping[str, int]) -> None: ...


# (entries, bytes) per kind of store entry, or None when the store cannot say (it logs why).
StoreTotals = Callable[[], Mapping[str, tuple[int, int]] | None]

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

    def flush(self, store: CounterSink) -> None:
        """Add what was counted into the store (blocking: one transaction); if it raises, the
        counts are kept for the next flush."""
        deltas = self.take()
        if not deltas:
            return
        try:
            store.add_counters(deltas)
        except Exception:
            for name, count in deltas.items():  # keep them for the next flush
                self.add(name, count)
            raise


class StoreCollector(Collector):
    """Store size and entry counts, asked from the store when Prometheus scrapes."""

    def __init__(self) -> None:
        self.totals: StoreTotals | None = None
        self.size_limit = 0

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # the series depend on the store; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source = self.totals
        totals = source() if source is not None else None
        if totals is None:
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

    def watch_store(self, totals: StoreTotals | None, size_limit: int = 0) -> None:
        """The running configuration's store totals for the gauges (None: no store, no gauges)."""
        self.store.totals, self.store.size_limit = totals, size_limit

    # what the fronts, the upstream client, fills and the blob server report -------------------
    def request_decided(self, req: RegistryRequest, result: str) -> None:
        """A registry read regcache decided on (through the proxy or the mirror) got `result`."""
        repository = req.repository if req.route.name else ""
        self.request_answered(req.namespace, req.route.kind.value, req.method, result, repository)

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


METRICS = Metrics()


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
