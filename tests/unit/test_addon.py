"""The addon inside mitmproxy's test context: what is intercepted, what is answered, what errors say.

The upstream here is a closed loopback port, so every answer below is regcache's own.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from pathlib import Path

import pytest
import yaml
from mitmproxy.addons import proxyauth
from mitmproxy.test import taddons

import regcache.fronts.proxy as cache_module
from regcache.fronts.proxy import RegistryCache, warn_if_exposed
from regcache.store.lock import lock_cache_dir, unlock_cache_dir

from .flows import registry_flow, write_config

SHA = "sha256:" + "b" * 64


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_request(
    tmp_path: Path, host: str, path: str, method: str = "GET", **options: object
) -> tuple[RegistryCache, object]:
    config = write_config(tmp_path, closed_port(), timeout=5)

    async def go() -> tuple[RegistryCache, object]:
        addon = RegistryCache()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, regcache_config=config, **options)
            flow = registry_flow(host, path, method)
            addon.requestheaders(flow)  # as mitmproxy calls them: re-targeted before `request`
            await addon.request(flow)
            addon.done()
            await asyncio.sleep(0)  # let the runtime close
            return addon, flow

    return asyncio.run(go())


def error_codes(flow: object) -> list[str]:
    return [e["code"] for e in json.loads(flow.response.content)["errors"]]  # type: ignore[attr-defined]


def test_other_hosts_pass_untouched(tmp_path: Path) -> None:
    _, flow = run_request(tmp_path, "example.org", "/v2/library/x/manifests/1")
    assert flow.response is None  # type: ignore[attr-defined]
    assert flow.request.host == "example.org"  # type: ignore[attr-defined]


def test_invalid_name_gets_registry_error(tmp_path: Path) -> None:
    _, flow = run_request(tmp_path, "registry-1.docker.io", "/v2/../../etc/passwd/manifests/latest")
    assert flow.response.status_code == 400  # type: ignore[attr-defined]
    assert error_codes(flow) == ["NAME_INVALID"]


def test_uncached_manifest_with_upstream_down_is_a_prompt_json_error(tmp_path: Path) -> None:
    _, flow = run_request(tmp_path, "registry-1.docker.io", "/v2/library/x/manifests/1")
    assert flow.response.status_code == 503  # type: ignore[attr-defined]
    assert error_codes(flow) == ["UNAVAILABLE"]
    assert flow.response.headers["X-Cache"] == "ERROR"  # type: ignore[attr-defined]
    assert "docker.io/library/x:1 is not cached" in flow.response.text  # type: ignore[attr-defined]


def test_uncached_blob_with_upstream_down_is_a_prompt_json_error(tmp_path: Path) -> None:
    _, flow = run_request(tmp_path, "registry-1.docker.io", f"/v2/library/x/blobs/{SHA}")
    assert flow.response.status_code == 503  # type: ignore[attr-defined]
    assert error_codes(flow) == ["UNAVAILABLE"]
    assert not list((tmp_path / "cache" / "staging").iterdir())


def test_ping_with_upstream_down_lets_clients_go_on(tmp_path: Path) -> None:
    _, flow = run_request(tmp_path, "registry-1.docker.io", "/v2/")
    assert flow.response.status_code == 200  # type: ignore[attr-defined]
    assert flow.response.headers["Docker-Distribution-API-Version"] == "registry/2.0"  # type: ignore[attr-defined]
    assert flow.response.headers["X-Cache"] == "STALE"  # type: ignore[attr-defined]


def test_pushes_pass_through_to_the_mapped_upstream(tmp_path: Path) -> None:
    _, flow = run_request(tmp_path, "registry-1.docker.io", "/v2/library/x/blobs/uploads/", method="POST")
    assert flow.response is None  # type: ignore[attr-defined]
    assert flow.request.host == "127.0.0.1"  # type: ignore[attr-defined]
    assert flow.request.scheme == "http"  # type: ignore[attr-defined]


def test_offline_option_answers_pings_itself(tmp_path: Path) -> None:
    _, ping = run_request(tmp_path, "registry-1.docker.io", "/v2/", regcache_offline=True)
    assert (ping.response.status_code, ping.response.headers["X-Cache"]) == (200, "HIT")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("path", "code", "what"),
    [
        ("/v2/library/x/manifests/1", "MANIFEST_UNKNOWN", "docker.io/library/x:1"),
        (f"/v2/library/x/manifests/{SHA}", "MANIFEST_UNKNOWN", f"docker.io/library/x@{SHA}"),
        (f"/v2/library/x/blobs/{SHA}", "BLOB_UNKNOWN", f"docker.io/library/x@{SHA}"),
    ],
)
def test_offline_option_names_what_is_not_cached(tmp_path: Path, path: str, code: str, what: str) -> None:
    _, flow = run_request(tmp_path, "registry-1.docker.io", path, regcache_offline=True)
    assert flow.response.status_code == 404  # type: ignore[attr-defined]
    error = json.loads(flow.response.content)["errors"][0]  # type: ignore[attr-defined]
    assert error == {"code": code, "message": f"not in the offline cache: {what}"}


@pytest.mark.parametrize(
    ("host", "proxyauth", "warned"),
    [("", None, True), ("0.0.0.0", None, True), ("0.0.0.0", "ci:secret", False), ("127.0.0.1", None, False)],
)
def test_exposed_listener_is_warned_about(
    caplog: pytest.LogCaptureFixture, host: str, proxyauth: str | None, warned: bool
) -> None:
    warn_if_exposed(host, proxyauth)
    assert ("WITHOUT proxy authentication" in caplog.text) is warned


def test_running_freezes_the_start_up_heap(tmp_path: Path) -> None:
    """What start-up allocated stays out of the collector's full passes (one landed mid-pull)."""
    config = write_config(tmp_path, closed_port(), timeout=5)

    async def go() -> int:
        addon = RegistryCache()
        # ProxyAuth first (running() reads its options): added after the addon, its options would
        # configure the addon on the default config, opening a store in ~/.cache/regcache.
        with taddons.context(proxyauth.ProxyAuth(), addon) as tctx:
            tctx.configure(addon, regcache_config=config)
            addon.running()
            frozen = gc.get_freeze_count()
            addon.done()
            await asyncio.sleep(0)
            return frozen

    gc.unfreeze()
    try:
        assert asyncio.run(go()) > 1000
    finally:
        gc.unfreeze()


async def status_of(port: int, path: str = "/v2/") -> bytes:
    """The status line a plain-HTTP server on 127.0.0.1:`port` answers `GET path` with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    line = await reader.readline()
    writer.close()
    return line.strip()


def test_a_reload_keeps_the_ports_the_cache_dir_and_its_running_fills(tmp_path: Path) -> None:
    """A new configuration on the same cache_dir and fixed ports takes over from the old one in
    this process: no "in use", no port conflict, and the old fills' staging files stay theirs."""
    mirror_port, blob_port = closed_port(), closed_port()
    first = Path(write_config(tmp_path, closed_port(), timeout=5))
    settings = yaml.safe_load(first.read_text())
    settings |= {"mirrors": {"docker.io": f"127.0.0.1:{mirror_port}"}, "blob_listen": f"127.0.0.1:{blob_port}"}
    first.write_text(yaml.safe_dump(settings))
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({**settings, "size_limit": "1GiB"}))
    cache_dir = Path(settings["cache_dir"])

    async def go() -> None:
        addon = RegistryCache()
        with taddons.context(proxyauth.ProxyAuth(), addon) as tctx:  # that order: as above
            tctx.configure(addon, regcache_config=str(first))
            addon.running()
            await asyncio.gather(*cache_module._background_tasks)
            assert await status_of(mirror_port) == b"HTTP/1.1 200 OK"  # upstream down: "no auth needed"
            assert addon.runtime is not None
            staging = addon.runtime.store.stage_blob(SHA)  # a fill of the old configuration's
            staging.write(b"in progress")
            staging.flush()
            tctx.configure(addon, regcache_config=str(second))
            assert addon.runtime.settings.size_limit == 2**30
            assert staging.path.exists()
            await asyncio.gather(*cache_module._background_tasks)
            assert await status_of(mirror_port) == b"HTTP/1.1 200 OK"  # the new mirror
            assert (await status_of(blob_port, f"/blobs/{SHA}")).startswith(b"HTTP/1.1 403")  # unsigned
            closing = addon.done()
            assert closing is not None
            await closing
        assert lock_cache_dir(cache_dir)  # released: this process takes it afresh
        unlock_cache_dir(cache_dir)

    asyncio.run(go())
