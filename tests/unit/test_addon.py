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
from mitmproxy.addons import proxyauth
from mitmproxy.test import taddons

from addon.cache import RegistryCache, warn_if_exposed

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
        with taddons.context(addon, proxyauth.ProxyAuth()) as tctx:  # running() reads proxyauth
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
