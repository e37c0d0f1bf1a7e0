"""Helpers for addon tests: registry flows, configuration files, small real HTTP servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import yaml
from aiohttp import typedefs, web
from mitmproxy import http
from mitmproxy.test import tflow


def registry_flow(host: str, path: str, method: str = "GET", accept: str | None = None) -> http.HTTPFlow:
    """A client's HTTPS request as the addon's `request` hook sees it."""
    flow = tflow.tflow()
    flow.request.scheme, flow.request.host, flow.request.port = "https", host, 443
    flow.request.path, flow.request.method = path, method
    flow.request.headers["Host"] = host
    if accept is not None:
        flow.request.headers["Accept"] = accept
    return flow


def write_config(tmp_path: Path, upstream_port: int, timeout: float) -> str:
    """A config whose Docker Hub upstream is 127.0.0.1:`upstream_port`."""
    path = tmp_path / "regcache.yaml"
    config = {
        "cache_dir": str(tmp_path / "cache"),
        "upstreams": {"registry-1.docker.io": f"http://127.0.0.1:{upstream_port}"},
        "upstream_timeout": timeout,
        "metrics_listen": "off",  # tests that need the endpoint pick a free port
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


@asynccontextmanager
async def serving(handler: typedefs.Handler, method: str = "*") -> AsyncIterator[int]:
    """`handler` answering every path on 127.0.0.1 (its `method` requests), on a free port: the port."""
    app = web.Application()
    app.router.add_route(method, "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()
