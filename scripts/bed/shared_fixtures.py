"""pytest fixtures for the shared store's real engines (load with ``pytest_plugins = ("bed.shared_fixtures",)``).

Owns: one Ceph cluster with radosgw (:class:`bed.ceph.Ceph`) and one
``redis-server`` (:class:`bed.redis.Redis`) per test session, each started
only when a test first asks for it (``ceph`` costs a few seconds, Redis
milliseconds); skipping such a test with the missing Debian packages named
when the programs are not installed; the ``shared_store`` marker on every test
that uses them (``-m "not shared_store"`` leaves them out); and, after each
test, restarting whichever of the two a fault test stopped.

The engines are shared by the whole session: tests use keys (S3 prefixes,
Redis key names) of their own, e.g. from ``uuid4().hex``. A restarted Redis is
empty (no persistence); a restarted radosgw still has every object.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import ceph as _ceph
from . import redis as _redis

MARKER = "shared_store"
_FIXTURES = ("ceph", "redis_server")
# Debian 12 package of each program the engines need.
_PACKAGE = {
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "radosgw": "radosgw",
    "radosgw-admin": "radosgw",
    "ceph": "ceph-common",
    "monmaptool": "ceph-base",
    "redis-server": "redis-server",
}


def skip_unless_installed(commands: tuple[str, ...]) -> None:
    """Skip the calling test, naming the Debian packages to install, when a program is missing."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        packages = sorted({_PACKAGE.get(c, c) for c in missing})
        pytest.skip(
            f"needs {', '.join(missing)} (Debian packages: {' '.join(packages)}; scripts/test installs them as root)"
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: uses the real Ceph radosgw and/or Redis of bed.shared_fixtures")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in _FIXTURES):
            item.add_marker(MARKER)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ceph.Ceph]:
    """A running single-node Ceph with radosgw, an S3 user and the bucket :attr:`Ceph.bucket`."""
    skip_unless_installed(_ceph.COMMANDS)
    cluster = _ceph.Ceph(tmp_path_factory.mktemp("ceph"))
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_redis.Redis]:
    """A running ``redis-server`` without persistence on a free loopback port."""
    skip_unless_installed((_redis.COMMAND,))
    server = _redis.Redis(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _shared_store_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, start again whatever a fault test stopped."""
    yield
    cluster = _set_up(request, "ceph")
    if isinstance(cluster, _ceph.Ceph) and not cluster.rgw_running:
        cluster.start_radosgw()
    server = _set_up(request, "redis_server")
    if isinstance(server, _redis.Redis) and not server.running:
        server.start()


def _set_up(request: pytest.FixtureRequest, name: str) -> object:
    """The value of fixture ``name`` if this test uses it and it was set up (not skipped), else None."""
    if name not in request.fixturenames:
        return None
    try:
        return request.getfixturevalue(name)
    except pytest.skip.Exception:
        return None


def shared_section(ceph: _ceph.Ceph, redis: _redis.Redis, run: str, **extra: object) -> dict[str, object]:
    """A regcache ``shared`` configuration on these engines, under S3 and Redis prefixes of run ``run``
    (a test's own): the same for every node of one cluster and for the command line pointed at it."""
    s3 = {"endpoint": ceph.endpoint, "bucket": ceph.bucket, "region": ceph.region, "access_key": ceph.access_key,
          "secret_key": ceph.secret_key, "prefix": f"{run}/"}  # fmt: skip
    return {"s3": s3, "redis": {"url": redis.url, "prefix": f"t{run}:"}, **extra}
