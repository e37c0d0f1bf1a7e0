"""regcache as a process: its ready line, one instance per cache_dir, taken ports, and a clean stop.

Every test runs a real `regcache run` (or `mitmdump -s addon/cache.py`) and reads its log.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bed.images import ImageSet
from bed.mitm import MitmError
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo, SkopeoError

from regcache.store.disk import DiskStore

from .conftest import regcache_cli
from .test_fronts import address, closed_by_peer
from .test_mirror import plain
from .test_pull import assert_stored

NOISE_AT_EXIT = ("Traceback", "RuntimeError", "Task was destroyed", "never awaited", "Unclosed")


@pytest.fixture
def busy_port() -> Iterator[Callable[[], int]]:
    """``take()``: a port some other program listens on (until the test ends)."""
    taken: list[socket.socket] = []

    def take() -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken.append(sock)
        return int(sock.getsockname()[1])

    yield take
    for sock in taken:
        sock.close()


def start_failure(regcache_with: Callable[..., Mitmdump], **settings: object) -> tuple[str, str]:
    """Start a regcache that must not start: (the start error, the lines it logged itself)."""
    with pytest.raises(MitmError) as failed:
        regcache_with(**settings)
    log = failed.value.args[0]
    return log, "\n".join(line for line in log.splitlines() if line.startswith("["))


def wait_for_staging(cache_dir: Path, at_least: int, timeout: float = 60) -> None:
    """Until a fill has written `at_least` bytes into staging (a fill in progress)."""
    deadline = time.monotonic() + timeout
    while not any(f.stat().st_size >= at_least for f in (cache_dir / "staging").iterdir()):
        assert time.monotonic() < deadline, "no fill got going"
        time.sleep(0.01)


@pytest.mark.parametrize("mitmdump", [False, True], ids=["regcache-run", "mitmdump-s"])
def test_the_ready_line_names_every_listener_and_each_answers(
    regcache_with: Callable[..., Mitmdump], mitmdump: bool
) -> None:
    """The bed waits for `regcache ready:` (README, "Run it"); at that line, everything serves."""
    regcache = regcache_with(mitmdump=mitmdump)
    listeners = regcache.listeners()
    assert set(listeners) == {"proxy", "blob endpoint", "mirror of registry-1.docker.io", "metrics"}
    assert listeners["proxy"] == f"127.0.0.1:{regcache.port}"
    assert plain(f"{listeners['mirror of registry-1.docker.io']}/v2/")[0] == 401  # the registry's challenge
    assert plain(f"{listeners['blob endpoint']}/blobs/sha256:{'0' * 64}")[0] == 403  # unsigned
    assert plain(listeners["metrics"])[0] == 200


def test_a_second_instance_on_the_same_cache_dir_refuses_to_start(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    tmp_path: Path,
) -> None:
    """It would clear the first's staging area under a running fill; admin commands go on."""
    first = regcache_with()
    cache_dir = first.workdir / "cache"
    image = images.big
    pulled: list[str] = []
    skopeo = skopeo_factory(first.url, first.ca_cert)
    pull = threading.Thread(target=lambda: pulled.append(skopeo.copy_to_dir(image.ref, tmp_path / "big")))
    pull.start()
    try:
        wait_for_staging(cache_dir, 10**6)
        error, lines = start_failure(regcache_with, cache_dir=str(cache_dir))
        for command in ("stats", "ls"):
            regcache_cli(command, "--config", str(first.config_path))
    finally:
        pull.join(300)
    assert "exited with 1 during start" in error
    assert lines.count("\n") == 0, lines  # one line
    assert f"cache_dir: cannot use {cache_dir}: in use by another regcache (pid {first.pid})" in lines
    assert "Traceback" not in error
    assert pulled == [image.digest]
    store = DiskStore(cache_dir, 10**12, owner=False)
    assert_stored(store, image)
    store.close()


def test_a_taken_blob_listen_port_stops_start_up(
    regcache_with: Callable[..., Mitmdump], busy_port: Callable[[], int]
) -> None:
    """Without its blob endpoint regcache cannot serve a blob: it says so, and does not start."""
    port = busy_port()
    error, lines = start_failure(regcache_with, blob_listen=f"127.0.0.1:{port}")
    assert "exited with 1 during start" in error
    failure = [line for line in lines.splitlines() if "blob endpoint" in line]
    assert len(failure) == 1, lines
    assert f"blob endpoint not started: cannot listen on http://127.0.0.1:{port} (blob_listen)" in failure[0]
    assert "Traceback" not in error


def test_taken_mirror_and_metrics_ports_are_warnings_and_the_proxy_serves(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    busy_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    mirror_port, metrics_port = busy_port(), busy_port()
    regcache = regcache_with(
        mirrors={"docker.io": f"127.0.0.1:{mirror_port}"}, metrics_listen=f"127.0.0.1:{metrics_port}"
    )
    log = regcache.log()
    assert (
        f"WARNING: mirror of registry-1.docker.io not started: cannot listen on http://127.0.0.1:{mirror_port} "
        "(mirrors)" in log
    )
    assert f"WARNING: metrics endpoint not started: cannot listen on 127.0.0.1:{metrics_port} (metrics_listen)" in log
    assert set(regcache.listeners()) == {"proxy", "blob endpoint"}
    image = images.oci_single
    assert skopeo_factory(regcache.url, regcache.ca_cert).copy_to_dir(image.ref, tmp_path / "pulled") == image.digest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_during_traffic_is_clean(
    images: ImageSet,
    regcache: Mitmdump,
    skopeo: Skopeo,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    """A stop while a fill runs and clients keep coming: exit 0, nothing in the log but log
    lines (no traceback, no task left pending), and no partial blob left in the store."""
    image = images.oci_single
    skopeo.copy_to_dir(image.ref, tmp_path / "small")
    mirror = address(regcache.mirror_url())
    failed: list[str] = []

    def pull_big() -> None:  # cut off by the stop
        try:
            skopeo.copy_to_dir(images.big.ref, tmp_path / "big")
        except SkopeoError as err:
            failed.append(str(err))

    big = threading.Thread(target=pull_big)
    big.start()
    cache_dir = regcache.workdir / "cache"
    wait_for_staging(cache_dir, 10**6)

    def keep_asking() -> None:  # a stored blob from the mirror, until nobody listens
        head = f"GET /v2/{image.repo}/blobs/{image.layers[0].digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        while True:
            try:
                with socket.create_connection(mirror, timeout=5) as sock:
                    sock.sendall(head)
                    closed_by_peer(sock, time.monotonic() + 5)
            except ConnectionRefusedError:
                return
            except OSError:
                continue

    clients = [threading.Thread(target=keep_asking) for _ in range(4)]
    for client in clients:
        client.start()
    # From a line's start: the proxy writes its log unbuffered, and print() writes a line and its
    # newline in two writes, so what is there now may end between them (the slice then began with
    # an empty line).
    mark = regcache.log().rfind("\n") + 1
    status = regcache.stop(sig=sig)
    for thread in (*clients, big):
        thread.join(60)
    log = regcache.log()[mark:]
    assert status == 0, log[-3000:]
    assert [noise for noise in NOISE_AT_EXIT if noise in log] == [], log[-3000:]
    strays = [line for line in log.splitlines() if not line.startswith("[")]
    assert strays == [], log[-3000:]  # all through mitmproxy's log
    assert list((cache_dir / "staging").iterdir()) == []
    assert len(failed) == 1
