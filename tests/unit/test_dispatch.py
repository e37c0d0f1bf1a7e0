"""`CachedDispatch` (regcache/fronts/master.py): every hook event reaches exactly the addons the
stock mitmproxy dispatch calls, in the same order, also after addons come and go; and
`regcache run`'s master uses it on this mitmproxy.

Each scenario runs twice, on a master with mitmproxy's own AddonManager and on one with the cached
dispatch installed, and the calls the probe addons record must be the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import addonmanager, exceptions, hooks, master, options

from regcache.fronts.master import STOCK_DISPATCH_ENV, CachedDispatch, RegcacheMaster

Calls = list[tuple[str, str]]
# Every hook mitmproxy defines but `load` (not an event: register calls it) and the deprecated `add_log`.
HOOKS = [name for name in hooks.all_hooks if name not in ("load", "add_log")]


def every_event() -> list[hooks.Hook]:
    """One event of every hook (arguments None: the probes only record)."""
    return [hooks.all_hooks[name](*([None] * len(dataclasses.fields(hooks.all_hooks[name])))) for name in HOOKS]


def recorder(name: str, calls: Calls, hook_names: list[str]) -> object:
    """An addon called `name` implementing `hook_names` (async for `request`, as regcache's)."""

    def sync_hook(hook: str) -> Callable[..., None]:
        return lambda self, *args: calls.append((name, hook))

    def async_hook(hook: str) -> Callable[..., Any]:
        async def call(self: object, *args: object) -> None:
            await asyncio.sleep(0)
            calls.append((name, hook))

        return call

    body: dict[str, Any] = {h: async_hook(h) if h == "request" else sync_hook(h) for h in hook_names}
    body["name"] = name
    return type(f"Probe_{name}", (), body)()


class Container:
    """An addon with children, as mitmproxy's script loader: they are walked on every event."""

    def __init__(self, name: str, children: list[object]) -> None:
        self.name = name
        self.addons = children


class Halting:
    name = "halting"

    def response(self, *args: object) -> None:
        raise exceptions.AddonHalt


def scenario(cached: bool) -> Calls:
    """Addons of every kind, every event, then addons added, a child added, an addon removed."""
    calls: Calls = []

    async def run() -> None:
        m = master.Master(options.Options())
        if cached:
            assert CachedDispatch.install(m)
        m.addons.add(
            recorder("everything", calls, HOOKS),
            recorder("nothing", calls, []),
            recorder("http", calls, ["requestheaders", "request", "responseheaders", "response"]),
            Container("scripts", [recorder("script1", calls, ["request", "client_connected"])]),
            Halting(),
            recorder("after_halt", calls, ["request", "response", "error"]),
        )
        for event in every_event():
            await m.addons.trigger_event(event)
        calls.append(("--", "added later"))
        m.addons.add(recorder("late", calls, ["request", "tls_clienthello"]))
        m.addons.get("scripts").addons.append(recorder("script2", calls, ["request"]))
        m.addons.remove(m.addons.get("http"))
        for event in every_event():
            await m.addons.trigger_event(event)
        calls.append(("--", "configure"))
        m.options.update(listen_port=3129)  # `configure` reaches each addon once, not twice
        calls.append(("--", "cleared"))
        m.addons.clear()
        for event in every_event():
            await m.addons.trigger_event(event)
        await m.done()

    asyncio.run(run())
    return calls


def test_every_hook_reaches_the_addons_the_stock_dispatch_calls_in_the_same_order() -> None:
    stock, cached = scenario(cached=False), scenario(cached=True)
    assert cached == stock
    # The scenario means something: hooks reached their implementers only, a halt stopped the rest.
    assert ("http", "request") in stock and ("nothing", "request") not in stock
    assert ("after_halt", "request") in stock and ("after_halt", "response") not in stock
    later = stock[stock.index(("--", "added later")) :]
    assert ("late", "request") in later and ("script2", "request") in later and ("http", "request") not in later
    configured = stock[stock.index(("--", "configure")) : stock.index(("--", "cleared"))]
    assert configured.count(("everything", "configure")) == 1
    cleared = stock[stock.index(("--", "cleared")) :]
    assert all(hook == "done" for _, hook in cleared[1:])  # `clear` says `done`; then no addon is left


def test_the_master_of_regcache_run_uses_the_cached_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STOCK_DISPATCH_ENV, raising=False)

    async def run() -> tuple[type, list[str], list[str]]:
        m = RegcacheMaster(options.Options())
        names = [type(a).__name__ for a in m.addons.chain]
        plan = [type(a).__name__ for a in m.addons.plan("tls_clienthello")]
        await m.done()
        return type(m.addons), names, plan

    kind, chain, plan = asyncio.run(run())
    assert kind is CachedDispatch
    assert chain[0] == "TermLog" and "RegistryCache" in chain  # what the stock manager held is kept
    # Only the TLS addons, the script loader (children) and regcache see a ClientHello.
    assert plan == ["ScriptLoader", "TlsConfig", "RegistryCache"]


def test_the_stock_dispatch_when_asked_or_when_mitmproxy_looks_different(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STOCK_DISPATCH_ENV, "1")

    class Other(addonmanager.AddonManager):
        pass

    async def run() -> tuple[type, bool, type]:
        regcache_master = RegcacheMaster(options.Options())
        await regcache_master.done()
        m = master.Master(options.Options())
        m.addons = Other(m)
        installed = CachedDispatch.install(m)
        await m.done()
        return type(regcache_master.addons), installed, type(m.addons)

    asked, installed, kept = asyncio.run(run())
    assert asked is addonmanager.AddonManager
    assert not installed and kept is Other
