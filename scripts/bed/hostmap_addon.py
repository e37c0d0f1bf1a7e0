"""mitmproxy addon: send Docker Hub host names to the bed's local servers.

Owns: the last hop of the test bed. Clients address ``registry-1.docker.io``,
``auth.docker.io`` and ``production.cloudflare.docker.com`` (Go clients never
proxy loopback addresses, and no outside name resolves here); this addon
re-targets those requests to the plain-HTTP servers on 127.0.0.1, keeping
the original ``Host`` header.

Load it *after* the addon under test (``-s regcache -s hostmap_addon.py``) so
that addon sees the real host names; flows that already have a response or
were re-targeted elsewhere are left alone. Configure with
``--set bed_hostmap=/path/hostmap.json`` where the file maps host names to
``http://127.0.0.1:PORT`` URLs. Run with ``connection_strategy=lazy`` so no
connection to the unresolvable original host is attempted at CONNECT time.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from pathlib import Path

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

log = logging.getLogger(__name__)


class HostMap:
    def __init__(self) -> None:
        self.targets: dict[str, tuple[str, str, int]] = {}

    def load(self, loader: Loader) -> None:
        loader.add_option("bed_hostmap", str, "", "JSON file mapping host names to http://127.0.0.1:PORT")

    def configure(self, updated: set[str]) -> None:
        if "bed_hostmap" not in updated or not ctx.options.bed_hostmap:
            return
        raw: dict[str, str] = json.loads(Path(ctx.options.bed_hostmap).read_text())
        targets = {}
        for host, url in raw.items():
            u = urllib.parse.urlsplit(url)
            targets[host.lower()] = (u.scheme or "http", u.hostname or "127.0.0.1", u.port or 80)
        self.targets = targets

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        target = self.targets.get(flow.request.pretty_host.lower())
        if target is None:
            return
        host_header = flow.request.host_header
        scheme, host, port = target
        flow.request.scheme = scheme
        flow.request.host = host
        flow.request.port = port
        # Setting .host rewrote the Host header; the bed servers should see
        # the Docker Hub name, as the real ones would.
        flow.request.host_header = host_header
        flow.metadata["bed_hostmap"] = f"{host}:{port}"


addons = [HostMap()]
