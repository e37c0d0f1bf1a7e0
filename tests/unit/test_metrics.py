"""Metrics: rate limit headers, what the addon counts for a tag's miss and revalidation, the
endpoint on a free port, and the usage totals it saves into the store."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from mitmproxy.test import taddons

from regcache.fronts.proxy import RegistryCache
from regcache.metrics import METRICS, MetricsEndpoint, UsageCounts, parse_ratelimit
from regcache.store.disk import DiskStore

from .flows import registry_flow

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BODY = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()


@pytest.mark.parametrize(
    ("header", "count"),
    [("100;w=21600", 100), ("76;w=21600", 76), (" 0 ", 0), ("5", 5), ("", None), (None, None), ("many", None)],
)
def test_parse_ratelimit(header: str | None, count: int | None) -> None:
    assert parse_ratelimit(header) == count


def sample(name: str, **labels: str) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


async def docker_hub_like(request: web.Request) -> web.Response:
    """A manifest, with Docker Hub's rate limit headers on every answer (HEADs included)."""
    headers = {
        "Docker-Content-Digest": DIGEST,
        "Content-Type": OCI_MANIFEST,
        "ratelimit-limit": "100;w=21600",
        "ratelimit-remaining": "97;w=21600" if request.method == "HEAD" else "96;w=21600",
    }
    return web.Response(body=BODY, headers=headers)


def test_miss_then_revalidated_tag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/v2/{name:.+}/manifests/{reference}", docker_hub_like)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = tmp_path / "regcache.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "cache_dir": str(tmp_path / "cache"),
                    "upstreams": {"registry-1.docker.io": f"http://127.0.0.1:{port}"},
                    "metrics_listen": "127.0.0.1:0",
                }
            )
        )
        addon = RegistryCache()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, regcache_config=str(config))
            before = {
                result: sample("regcache_requests_total", registry="docker.io", kind="manifest", result=result)
                for result in ("MISS", "REVALIDATED")
            }
            saved = sample("regcache_pulls_saved_total", registry="docker.io")
            heads = sample("regcache_upstream_requests_total", registry="docker.io", method="HEAD")
            gets = sample("regcache_upstream_requests_total", registry="docker.io", method="GET")
            for _ in range(2):
                flow = registry_flow("registry-1.docker.io", "/v2/library/x/manifests/1", accept=OCI_MANIFEST)
                await addon.request(flow)
                addon.response(flow)
                addon.response(flow)  # a flow is counted once, whatever hooks it sees
            counted = sample("regcache_requests_total", registry="docker.io", kind="manifest", result="MISS")
            assert counted == before["MISS"] + 1
            revalidated = sample("regcache_requests_total", registry="docker.io", kind="manifest", result="REVALIDATED")
            assert revalidated == before["REVALIDATED"] + 1
            assert sample("regcache_pulls_saved_total", registry="docker.io") == saved + 1
            assert sample("regcache_upstream_requests_total", registry="docker.io", method="HEAD") == heads + 2
            assert sample("regcache_upstream_requests_total", registry="docker.io", method="GET") == gets + 1
            # The last answer was the second HEAD's: a HEAD's headers count too.
            assert sample("regcache_ratelimit_remaining", registry="docker.io") == 97
            assert sample("regcache_ratelimit_limit", registry="docker.io") == 100

            url = re.findall(r"regcache: metrics at (\S+)", caplog.text)[-1]
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            text = await asyncio.to_thread(lambda: opener.open(url, timeout=5).read().decode())
            assert 'regcache_ratelimit_remaining{registry="docker.io"} 97.0' in text
            assert 'regcache_store_entries{type="manifest"} 1.0' in text
            assert "_created" not in text
            addon.done()
            await asyncio.sleep(0.1)
        await runner.cleanup()

    asyncio.run(go())
    store = DiskStore(tmp_path / "cache", 10**9, owner=False)
    counters = store.counters()  # saved at shutdown
    assert counters["requests docker.io manifest MISS"] == 1
    assert counters["requests docker.io manifest REVALIDATED"] == 1
    assert counters["pulls_saved docker.io"] == 1
    assert counters["repository docker.io/library/x pulls"] == 2


def test_usage_counts_are_added_up_and_kept_when_the_store_fails(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10**9)
    usage = UsageCounts()
    usage.add("bytes cache", 10)
    usage.add("bytes cache", 5)
    usage.flush(store)
    usage.add("bytes cache", 1)
    usage.flush(store)
    assert store.counters() == {"bytes cache": 16}

    class Broken:
        def add_counters(self, deltas: dict[str, int]) -> None:
            raise OSError("disk full")

    usage.add("bytes upstream", 7)
    with pytest.raises(OSError):
        usage.flush(Broken())  # type: ignore[arg-type]
    usage.flush(store)
    assert store.counters() == {"bytes cache": 16, "bytes upstream": 7}


def test_endpoint_on_a_busy_port_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = MetricsEndpoint(METRICS)
        endpoint.serve(("127.0.0.1", busy.getsockname()[1]))
        endpoint.stop()
    assert "metrics endpoint not started: cannot listen on 127.0.0.1:" in caplog.text
