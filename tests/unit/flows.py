"""Helpers for addon tests: registry flows and configuration files."""

from __future__ import annotations

from pathlib import Path

import yaml
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
