"""Fixtures for end-to-end tests: a real regcache (`regcache run`) in front of the bed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.dockerd import Dockerd
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from regcache.store.disk import DiskStore


@pytest.fixture(scope="session")
def proxy_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mitmproxy CA for the whole session, so every client trusts every regcache started."""
    return tmp_path_factory.mktemp("confdir")


@pytest.fixture
def regcache_with(
    tmp_path: Path, proxy_confdir: Path, bed_hostmap: dict[str, str]
) -> Iterator[Callable[..., Mitmdump]]:
    """``start(options=None, mitmdump=False, confdir=None, **settings)``: a regcache with an empty store
    in front of the bed, plus YAML `settings` and mitmproxy `options`; `mitmdump`: as `mitmdump -s
    addon/cache.py`; `confdir`: its own CA (default: the session's)."""
    started: list[Mitmdump] = []

    def start(
        options: dict[str, str] | None = None, mitmdump: bool = False, confdir: Path | None = None, **settings: object
    ) -> Mitmdump:
        workdir = tmp_path / (f"regcache{len(started)}" if started else "")
        config = {
            "cache_dir": str(workdir / "cache"),
            "upstreams": bed_hostmap,
            "upstream_timeout": 10,
            "metrics_listen": "127.0.0.1:0",  # a free port: see Mitmdump.metrics_url
            "mirrors": {"docker.io": "127.0.0.1:0"},  # see Mitmdump.mirror_url
            **settings,
        }
        proxy = Mitmdump(workdir, config, confdir or proxy_confdir, options=options, mitmdump=mitmdump)
        started.append(proxy)
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        status = proxy.stop()
        assert "Traceback" not in proxy.log(), f"regcache logged a traceback:\n{proxy.log()[-3000:]}"
        assert status in (0, None), f"regcache stopped with status {status}:\n{proxy.log()[-3000:]}"


@pytest.fixture
def regcache(regcache_with: Callable[..., Mitmdump]) -> Mitmdump:
    """A fresh regcache with an empty store, its upstreams mapped to the bed."""
    return regcache_with()


@pytest.fixture
def store(regcache: Mitmdump) -> Iterator[DiskStore]:
    """A read-only look at the running regcache's store."""
    opened = DiskStore(regcache.workdir / "cache", 10**12, owner=False)
    yield opened
    opened.close()


@pytest.fixture
def skopeo(regcache: Mitmdump, skopeo_factory: Callable[..., Skopeo]) -> Skopeo:
    return skopeo_factory(regcache.url, regcache.ca_cert)


@pytest.fixture
def dockerd(regcache: Mitmdump, dockerd_factory: Callable[..., Dockerd]) -> Iterator[Dockerd]:
    daemon = dockerd_factory(regcache.url, regcache.ca_cert)
    yield daemon
    daemon.close()


@pytest.fixture
def offline_regcache(regcache_with: Callable[..., Mitmdump]) -> Callable[[Path], Mitmdump]:
    """``start(cache_dir)``: an offline regcache (no `upstreams`: upstream names do not even resolve)."""
    return lambda cache_dir: regcache_with(cache_dir=str(cache_dir), offline=True, upstreams={})


@pytest.fixture
def upstream_gone(upstream_registry: Registry, token_server: TokenServer, cdn: Cdn) -> Callable[[], None]:
    """``stop()``: stop the registry, its token server and its CDN (restarted after the test)."""

    def stop() -> None:
        for server in (upstream_registry, token_server, cdn):
            server.stop()

    return stop


def regcache_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The `regcache` command of this venv."""
    command = [str(Path(sys.executable).with_name("regcache")), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
