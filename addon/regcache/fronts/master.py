"""The proxy `regcache run` starts: mitmproxy's proxy core with the regcache addon, and only that,
with each hook event dispatched only to the addons that implement it (`CachedDispatch`).

`mitmdump -s addon/cache.py` works too, but carries mitmdump's 36 default addons (flow dumps,
replays, header rewrites, HAR export, ...), and mitmproxy calls every addon for every event of
every connection. Registry clients make that count: dockerd and containers/image (skopeo, podman)
disable HTTP keep-alive, so each registry request is a new CONNECT + TLS handshake through the
proxy, about 20 hook events (docs/benchmarks.md).

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
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, master, options
from mitmproxy import log as mitmproxy_log
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

log = logging.getLogger("regcache")

# Set (to anything but empty): mitmproxy's own dispatch, every addon called for every event.
STOCK_DISPATCH_ENV = "REGCACHE_STOCK_DISPATCH"


class RegcacheMaster(master.Master):
    def __init__(self, opts: options.Options, event_loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(opts, event_loop=event_loop, with_termlog=True)
        if not os.environ.get(STOCK_DISPATCH_ENV):
            CachedDispatch.install(self)
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
            if isinstance(handler, mitmproxy_log.LegacyLogEvents) and handler.master is self:
                handler.addFilter(AddLogListened(self.addons))

    async def done(self) -> None:
        """Stop taking proxy connections first, then what mitmproxy does: it keeps its listeners
        open to the very end, and a client connecting in those last milliseconds left a connection
        task pending when the event loop closed ("Task was destroyed but it is pending!"). The
        connections already open go on until the loop ends, as before."""
        if (servers := self.addons.get("proxyserver")) is not None:
            await servers.servers.update([])
        await super().done()


class AddLogListened(logging.Filter):
    """Passes a log record to mitmproxy's `add_log` events only while some addon implements
    `add_log` (looked up per record: scripts come and go with reloads)."""

    def __init__(self, addons: addonmanager.AddonManager) -> None:
        super().__init__()
        self._addons = addons

    def filter(self, record: logging.LogRecord) -> bool:
        return any(hasattr(addon, "add_log") for addon in addonmanager.traverse(self._addons.chain))


class CachedDispatch(addonmanager.AddonManager):
    """mitmproxy's AddonManager, dispatching each hook event only to the addons that implement it.

    The stock `trigger_event` walks every addon (and its children) for every event: a getattr, a
    generator and a `safecall` context manager per addon, some 20 events per proxied connection
    over 12 addons, most of which implement none of them. This one keeps, per hook name, the
    top-level addons that implement it, in chain order; addons with children (the script loader:
    scripts come and go) are always kept and walked each time, as the stock dispatch does. The
    plans are dropped whenever an addon is registered (`add` too registers) or removed. Calling an addon is the
    stock `invoke_addon`, with the stock error handling (`safecall`, `AddonHalt`).

    It overrides `trigger_event` and takes over `chain` and `lookup` (attributes, not documented
    API): `install` leaves the stock manager in place when it does not look as expected."""

    def __init__(self, m: master.Master) -> None:
        super().__init__(m)  # type: ignore[no-untyped-call]
        self._plans: dict[str, list[Any]] = {}

    @classmethod
    def install(cls, m: master.Master) -> bool:
        """Replace `m`'s addon manager by this one, keeping what it holds. Before any addon but
        mitmproxy's own termlog is added. False: the stock manager stays (and says so at debug)."""
        stock = m.addons
        if not _looks_like_stock(stock):
            log.debug("regcache: mitmproxy's AddonManager is not as expected: its own hook dispatch is used")
            return False
        cached = cls(m)  # connects its own configure receiver to the options
        m.options.changed.disconnect(stock._configure_all)
        cached.chain, cached.lookup = stock.chain, stock.lookup
        m.addons = cached
        return True

    def register(self, addon: Any) -> Any:
        self._plans.clear()
        return super().register(addon)  # type: ignore[no-untyped-call]

    def remove(self, addon: Any) -> None:
        super().remove(addon)  # type: ignore[no-untyped-call]
        self._plans.clear()

    def clear(self) -> None:
        super().clear()  # type: ignore[no-untyped-call]
        self._plans.clear()

    def plan(self, name: str) -> list[Any]:
        """The top-level addons an event called `name` goes to, in chain order."""
        found = self._plans.get(name)
        if found is None:
            found = [a for a in self.chain if hasattr(a, "addons") or getattr(a, name, None)]
            self._plans[name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        for addon in self.plan(event.name):
            try:
                with addonmanager.safecall():
                    await self.invoke_addon(addon, event)
            except exceptions.AddonHalt:
                return


def _looks_like_stock(manager: object) -> bool:
    """Is `manager` mitmproxy's own AddonManager, with the parts CachedDispatch relies on?"""
    stock = addonmanager.AddonManager
    return (
        type(manager) is stock
        and isinstance(getattr(manager, "chain", None), list)
        and isinstance(getattr(manager, "lookup", None), dict)
        and callable(getattr(manager, "_configure_all", None))
        and inspect.iscoroutinefunction(getattr(stock, "invoke_addon", None))
        and inspect.iscoroutinefunction(getattr(stock, "trigger_event", None))
        and all(callable(getattr(stock, name, None)) for name in ("register", "remove", "clear"))
        and callable(getattr(addonmanager, "safecall", None))
    )


def serve(arguments: Sequence[str]) -> None:
    """Run the proxy with mitmdump's command line (`--set`, `--listen-host`, `-s`, ...)."""
    run(RegcacheMaster, cmdline.mitmdump, arguments)
