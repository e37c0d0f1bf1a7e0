"""Fixtures for end-to-end tests: a real regcache (mitmdump -s addon/cache.py) in front of the bed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bed.dockerd import Dockerd
from bed.skopeo import Skopeo

from addon.store import DiskStore

from .mitm import Mitmdump


@pytest.fixture(scope="session")
def proxy_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mitmproxy CA for the whole session, so every client trusts every regcache started."""
    return tmp_path_factory.mktemp("confdir")


@pytest.fixture
def regcache(tmp_path: Path, proxy_confdir: Path, bed_hostmap: dict[str, str]) -> Iterator[Mitmdump]:
    """A fresh regcache with an empty store, its upstreams mapped to the bed."""
    proxy = Mitmdump(
        tmp_path,
        {"cache_dir": str(tmp_path / "cache"), "upstreams": bed_hostmap, "upstream_timeout": 10},
        proxy_confdir,
    )
    proxy.start()
    yield proxy
    proxy.stop()


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
