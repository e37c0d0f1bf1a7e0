"""What regcache's fronts (the proxy, the registry mirror, the blob endpoint) do with hostile or
broken connections: control characters escaped in the log, malformed requests answered with a
registry error and one log line, silent and half-sent connections closed within the bounds."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo

from .test_mirror import mirror_ref, plain


def raw_request_through(proxy: Mitmdump, host: str, head: bytes) -> bytes:
    """`head` sent byte for byte (no client library would send a raw control character) over
    TLS through the proxy; the start of the answer."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as tcp:
        tcp.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        assert tcp.recv(4096).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(proxy.ca_cert))
        with context.wrap_socket(tcp, server_hostname=host) as tls:
            tls.sendall(head)
            return tls.recv(4096)


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


@pytest.mark.parametrize("mitmdump", [False, True], ids=["regcache-run", "mitmdump-s"])
def test_control_characters_from_requests_are_escaped_in_the_log(
    regcache_with: Callable[..., Mitmdump], mitmdump: bool
) -> None:
    """An `ESC ] 0 ; … BEL` in a request would retitle the terminal showing the log."""
    regcache = regcache_with(mitmdump=mitmdump)
    hostile = b"\x1b]0;pwned\x07"
    head = b"GET /v2/library/x/manifests/" + hostile + b" HTTP/1.1\r\nHost: registry-1.docker.io\r\n\r\n"
    assert raw_request_through(regcache, "registry-1.docker.io", head).startswith(b"HTTP/1.1 400")
    status, _, _ = plain(f"{regcache.mirror_url()}/v2/library/x/manifests/1?ns=%1B]0;pwned%07")
    assert status == 404
    regcache.stop()
    log = regcache.log_path.read_bytes()
    assert re.findall(rb"[\x00-\x09\x0b-\x1f\x7f]", log) == []
    assert rb"ERROR GET docker.io/library/x:\x1b]0;pwned\x07 400" in log  # the proxy's line
    assert rb"ERROR GET \x1b]0;pwned\x07/? 404" in log  # the mirror's


def listener_url(regcache: Mitmdump, front: str) -> str:
    return regcache.mirror_url() if front == "mirror" else regcache.blob_endpoint()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("front", ["mirror", "blob endpoint"])
def test_malformed_request_line_gets_a_400_and_one_log_line(regcache: Mitmdump, front: str) -> None:
    where = address(listener_url(regcache, front))
    mark = regcache.mark()
    with socket.create_connection(where, timeout=10) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\x01\r\nHost: x\r\n\r\n")
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    lines = regcache.log()[mark:].splitlines()
    assert len(lines) == 1, lines
    named = rf"regcache: {front}( of \S+)? http://{where[0]}:{where[1]}: malformed request from 127\.0\.0\.1: Bad"
    assert re.search(named, lines[0]), lines[0]
    # A TLS ClientHello (skopeo, podman and ctr try TLS first on a bare host:port): a 400, no log line.
    mark = regcache.mark()
    with socket.create_connection(where, timeout=10) as sock:
        sock.sendall(bytes.fromhex("16030100a5010000a10303") + b"\0" * 32)
        assert read_all(sock).startswith(b"HTTP/1.0 400")
    assert regcache.log()[mark:] == ""


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Wait (until `deadline`) for the server to close `sock`: True if it did."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


@pytest.mark.parametrize("front", ["mirror", "blob endpoint"])
def test_silent_half_sent_and_idle_connections_are_closed(
    images: ImageSet, regcache_with: Callable[..., Mitmdump], skopeo_factory: Callable[..., Skopeo], front: str
) -> None:
    regcache = regcache_with(header_timeout=1, idle_timeout=2)
    where = address(listener_url(regcache, front))
    opened = time.monotonic()
    silent = [socket.create_connection(where, timeout=10) for _ in range(100)]
    half_sent = [socket.create_connection(where, timeout=10) for _ in range(100)]
    for sock in half_sent:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    idle = socket.create_connection(where, timeout=10)
    idle.sendall(b"GET /v2/nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 ")  # answered, and kept alive
    answered = time.monotonic()
    try:
        # header_timeout and idle_timeout, plus a second for a machine under load.
        assert all(closed_by_peer(sock, opened + 1 + 1) for sock in silent + half_sent)
        assert closed_by_peer(idle, answered + 2 + 1)
    finally:
        for sock in [*silent, *half_sent, idle]:
            sock.close()
    # Clients that do send their requests notice nothing.
    image = images.oci_single
    if front == "mirror":
        ref = mirror_ref(regcache.mirror_url(), image)
        pulled = skopeo_factory(None).copy_to_dir(ref, regcache.workdir / "pulled", tls_verify=False)
    else:  # blobs come from the blob endpoint, by redirect
        pulled = skopeo_factory(regcache.url, regcache.ca_cert).copy_to_dir(image.ref, regcache.workdir / "pulled")
    assert pulled == image.digest
