"""pytest fixtures for the test bed (load with ``pytest_plugins = ("bed.fixtures",)``).

Owns: the session-wide lifecycle of the bed servers (one token server, CDN,
upstream registry and pushed image set per test session, since pushing the
100 MB image costs seconds), factories for per-test clients (dockerd,
skopeo, mitmdump), and resetting the failure controls after every test so
one test's outage does not leak into the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import hostmap as _hostmap
from .cdn import Cdn
from .dockerd import Dockerd
from .images import ImageSet, push_standard_images
from .mitm import MitmDump, passthrough
from .registry import Registry
from .skopeo import Skopeo
from .tokens import DEFAULT_REALM_PATHS, Policy, TokenServer


@pytest.fixture(scope="session")
def bed_workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bed's servers' directories for the session. Afterwards only their logs stay (pytest
    removes even those when every test passed, `tmp_path_retention_policy`): registry storage and
    image layouts run to gigabytes and are made anew by every session."""
    workdir = tmp_path_factory.mktemp("bed")
    yield workdir
    keep_only_logs(workdir)


def keep_only_logs(directory: Path) -> None:
    """Remove every file under `directory` but `*.log`, then the directories left empty."""
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.suffix != ".log":
                path.unlink()


@pytest.fixture(scope="session")
def token_server(bed_workdir: Path) -> Iterator[TokenServer]:
    server = TokenServer(bed_workdir / "certs")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def upstream_registry(bed_workdir: Path, token_server: TokenServer) -> Iterator[Registry]:
    registry = Registry(bed_workdir / "registry", token_server)
    registry.start()
    yield registry
    registry.close()


@pytest.fixture(scope="session")
def cdn(upstream_registry: Registry) -> Iterator[Cdn]:
    server = Cdn(upstream_registry.storage_root)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def images(bed_workdir: Path, upstream_registry: Registry) -> ImageSet:
    """The four standard images, pushed once per session."""
    return push_standard_images(upstream_registry, bed_workdir / "images")


@pytest.fixture(scope="session")
def bed_hostmap(upstream_registry: Registry, token_server: TokenServer, cdn: Cdn) -> dict[str, str]:
    """Docker Hub host name → local URL, for whatever routes client traffic."""
    return _hostmap(upstream_registry, token_server, cdn)


@pytest.fixture(scope="session")
def passthrough_proxy(bed_workdir: Path, bed_hostmap: dict[str, str]) -> Iterator[MitmDump]:
    """A non-caching mitmdump that only routes Docker Hub names to the bed."""
    proxy = passthrough(bed_workdir / "passthrough", bed_hostmap)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def dockerd_factory(bed_workdir: Path) -> Iterator[Callable[..., Dockerd]]:
    """``make(proxy_url, ca_pem=None, **kw) -> Dockerd`` (started); all closed at session end."""
    made: list[Dockerd] = []

    def make(proxy_url: str | None, ca_pem: str | Path | None = None, **kw: object) -> Dockerd:
        d = Dockerd(bed_workdir / f"dockerd{len(made)}", proxy_url, ca_pem, **kw)  # type: ignore[arg-type]
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture(scope="session")
def skopeo_factory(bed_workdir: Path) -> Callable[..., Skopeo]:
    """``make(proxy_url, ca_pem=None) -> Skopeo``."""
    count = 0

    def make(proxy_url: str | None, ca_pem: str | Path | None = None) -> Skopeo:
        nonlocal count
        count += 1
        return Skopeo(bed_workdir / f"skopeo{count}", proxy_url, ca_pem)

    return make


@pytest.fixture(autouse=True)
def _bed_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, undo failure controls, reset the token policy to
    grant-all, and restart a stopped upstream."""
    yield
    names = set(request.fixturenames)
    if "cdn" in names:
        c: Cdn = request.getfixturevalue("cdn")
        c.truncate(None)
        c.throttle(None)
        c.set_failing(None)
        if not c.running:
            c.start()
    if "token_server" in names:
        t: TokenServer = request.getfixturevalue("token_server")
        t.set_failing(None)
        t.policy = Policy()
        t.realm_paths = set(DEFAULT_REALM_PATHS)
        if not t.running:
            t.start()
    if "upstream_registry" in names:
        r: Registry = request.getfixturevalue("upstream_registry")
        if not r.running:
            r.start()
