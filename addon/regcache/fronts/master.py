"""The proxy `regcache run` starts: mitmproxy's proxy core with the regcache addon, and only that.

`mitmdump -s addon/cache.py` works too, but carries mitmdump's 36 default addons (flow dumps,
replays, header rewrites, HAR export, ...), and mitmproxy calls every addon for every event of
every connection. Registry clients make that count: dockerd and containers/image (skopeo, podman)
disable HTTP keep-alive, so each registry request is a new CONNECT + TLS handshake through the
proxy. On warm pulls of a small image the unused addons took about 15 % of the proxy's CPU
(README, "Run it").

Kept: what a forward proxy needs (core, proxyserver, next layer, TLS), proxy authentication,
`block_global` (refuses clients from public addresses unless authenticated), an upstream proxy's
credentials (`--mode upstream:…` behind a corporate proxy), `-s` scripts, and mitmdump's
start-up error check (an error logged while starting, such as a bad configuration, exits 1).

mitmproxy also turns every log line into an `add_log` event (deprecated since mitmproxy 9) for
every addon: here only while an addon (a `-s` script) implements it. regcache logs a line per
registry request and per blob sent, and that event was 60 % of a line's cost (27 of 43 µs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mitmproxy import addonmanager, log, master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyauth,
    proxyserver,
    script,
    tlsconfig,
    upstream_auth,
)
from mitmproxy.tools import cmdline
from mitmproxy.tools.main import run

from regcache.fronts.proxy import RegistryCache


class RegcacheMaster(master.Master):
    def __init__(self, opts: options.Options, event_loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(opts, event_loop=event_loop, with_termlog=True)
        self.addons.add(
            core.Core(),
            block.Block(),
            disable_h2c.DisableH2C(),
            proxyauth.ProxyAuth(),
            proxyserver.Proxyserver(),
            script.ScriptLoader(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            upstream_auth.UpstreamAuth(),
            RegistryCache(),
            errorcheck.ErrorCheck(),
        )
        for handler in logging.getLogger().handlers:
            if isinstance(handler, log.LegacyLogEvents) and handler.master is self:
                handler.addFilter(AddLogListened(self.addons))


class AddLogListened(logging.Filter):
    """Passes a log record to mitmproxy's `add_log` events only while some addon implements
    `add_log` (looked up per record: scripts come and go with reloads)."""

    def __init__(self, addons: addonmanager.AddonManager) -> None:
        super().__init__()
        self._addons = addons

    def filter(self, record: logging.LogRecord) -> bool:
        return any(hasattr(addon, "add_log") for addon in addonmanager.traverse(self._addons.chain))


def serve(arguments: Sequence[str]) -> None:
    """Run the proxy with mitmdump's command line (`--set`, `--listen-host`, `-s`, ...)."""
    run(RegcacheMaster, cmdline.mitmdump, arguments)
