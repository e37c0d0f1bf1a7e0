"""Tests of the test bed itself: the upstream servers, images and clients.

Direct checks talk to 127.0.0.1 without any proxy. The last tests run real
clients (dockerd, skopeo) through a plain pass-through mitmdump that only
routes Docker Hub host names to the bed, proving the bed behaves like Docker
Hub for them before any cache is put in between.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from bed import client
from bed._http import _TrackingServer
from bed.cdn import Cdn, blob_path
from bed.dockerd import Dockerd
from bed.images import ImageSet, push_variant
from bed.mitm import MitmDump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import Policy, TokenServer, libtrust_kid


def _token(tokens: TokenServer, scope: str, auth: str | None = None) -> dict[str, object]:
    query = urllib.parse.urlencode({"service": "registry.docker.io", "scope": scope})
    headers = {"Authorization": auth} if auth else {}
    r = client.request("GET", f"{tokens.url}/token?{query}", headers)
    assert r.status == 200, r.body
    data = r.json()
    assert isinstance(data, dict)
    return data


def _cdn_get(cdn: Cdn, location: str, headers: dict[str, str] | None = None) -> client.Response:
    parts = urllib.parse.urlsplit(location)
    query = f"?{parts.query}" if parts.query else ""
    return client.request("GET", f"{cdn.url}{parts.path}{query}", headers)


def test_v2_challenge(upstream_registry: Registry) -> None:
    r = client.request("GET", f"{upstream_registry.url}/v2/")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'


def test_token_format_and_use(token_server: TokenServer, upstream_registry: Registry, images: ImageSet) -> None:
    mark = token_server.mark()
    data = _token(token_server, "repository:library/oci-single:pull")
    assert {"token", "access_token", "expires_in", "issued_at"} <= data.keys()
    token = str(data["token"])
    header = jwt.get_unverified_header(token)
    assert header["kid"] == token_server.kid
    assert len(header["kid"].split(":")) == 12
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == "registry.docker.io"
    assert claims["iss"] == token_server.issuer
    assert claims["access"] == [{"type": "repository", "name": "library/oci-single", "actions": ["pull"]}]
    (rec,) = token_server.requests(mark)
    assert (rec.method, rec.path, rec.scopes, rec.has_authorization) == (
        "GET",
        "/token",
        ["repository:library/oci-single:pull"],
        False,
    )
    r = client.request("GET", f"{upstream_registry.url}/v2/", client.bearer(token))
    assert r.status == 200


def test_libtrust_kid_format(token_server: TokenServer) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    kid = libtrust_kid(ec.generate_private_key(ec.SECP256R1()).public_key())
    groups = kid.split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)


@pytest.mark.parametrize("name", ["oci_single", "oci_multi", "docker_multi", "big"])
def test_manifest_by_tag(name: str, images: ImageSet, upstream_registry: Registry, token_server: TokenServer) -> None:
    image = getattr(images, name)
    token = token_server.mint(image.repo)
    mark = upstream_registry.mark()
    r = client.request(
        "GET",
        f"{upstream_registry.url}/v2/{image.repo}/manifests/{image.tag}",
        {**client.bearer(token), "Accept": client.ACCEPT_ALL},
    )
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == image.digest
    assert r.headers["Content-Type"] == image.media_type
    assert "sha256:" + hashlib.sha256(r.body).hexdigest() == image.digest
    assert upstream_registry.manifest_gets(mark) == 1
    assert upstream_registry.manifest_gets(mark, repo=image.repo) == 1
    assert upstream_registry.manifest_heads(mark) == 0


def test_image_shapes(images: ImageSet) -> None:
    assert images.oci_single.media_type == client.OCI_MANIFEST
    assert images.oci_multi.media_type == client.OCI_INDEX
    assert images.docker_multi.media_type == client.DOCKER_LIST
    assert images.big.media_type == client.DOCKER_MANIFEST
    for multi in (images.oci_multi, images.docker_multi):
        assert set(multi.children) == {"linux/amd64", "linux/arm64/v8"}
        assert multi.amd64_digest == multi.children["linux/amd64"]
    assert images.docker_multi.child_media_types["linux/amd64"] == client.DOCKER_MANIFEST
    assert max(b.size for b in images.big.layers) >= 100 * 1024 * 1024
    # The shared base layer is the same blob in every small image.
    assert images.oci_single.layers[0].digest == images.docker_multi.layers[0].digest


def test_accept_negotiation(images: ImageSet, upstream_registry: Registry, token_server: TokenServer) -> None:
    """Facts a cache must key on: the answer for a tag depends on Accept."""
    url = upstream_registry.url
    auth = client.bearer(token_server.mint(["library/oci-single", "library/docker-multi"]))
    r = client.request("GET", f"{url}/v2/library/oci-single/manifests/1", {**auth, "Accept": client.DOCKER_MANIFEST})
    assert r.status == 404
    r = client.request("GET", f"{url}/v2/library/docker-multi/manifests/1", {**auth, "Accept": client.DOCKER_MANIFEST})
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == images.docker_multi.children["linux/amd64"]


def test_blob_redirect_and_cdn(
    images: ImageSet, upstream_registry: Registry, token_server: TokenServer, cdn: Cdn
) -> None:
    image = images.oci_single
    layer = image.layers[-1]
    auth = client.bearer(token_server.mint(image.repo))
    mark, cmark = upstream_registry.mark(), cdn.mark()
    r = client.request("GET", f"{upstream_registry.url}/v2/{image.repo}/blobs/{layer.digest}", auth)
    assert r.status == 307
    location = r.headers["Location"]
    assert location == f"https://production.cloudflare.docker.com{blob_path(layer.digest)}"
    head = client.request("HEAD", f"{upstream_registry.url}/v2/{image.repo}/blobs/{layer.digest}", auth)
    assert head.status == 307
    assert upstream_registry.blob_requests(mark, method="GET") == 1
    assert upstream_registry.blob_requests(mark, method="HEAD") == 1

    body = _cdn_get(cdn, location + "?verify=123")
    assert body.status == 200
    assert int(body.headers["Content-Length"]) == layer.size
    assert "sha256:" + hashlib.sha256(body.body).hexdigest() == layer.digest
    ranged = _cdn_get(cdn, location, {"Range": "bytes=10-19"})
    assert ranged.status == 206 and ranged.body == body.body[10:20]
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{layer.size}"
    assert cdn.count(layer.digest, since=cmark) == 2
    recs = cdn.requests(cmark)
    assert recs[0].query == "verify=123" and not recs[0].has_authorization
    assert client.request("GET", f"{cdn.url}/docker/registry/v2/blobs/sha256/00/{'0' * 64}/data").status == 404


def test_cdn_streams_big_blob(images: ImageSet, cdn: Cdn) -> None:
    layer = max(images.big.layers, key=lambda b: b.size)
    conn = http.client.HTTPConnection("127.0.0.1", cdn.port, timeout=30)
    conn.request("GET", blob_path(layer.digest))
    resp = conn.getresponse()
    sha, size = hashlib.sha256(), 0
    while chunk := resp.read(1024 * 1024):
        sha.update(chunk)
        size += len(chunk)
    conn.close()
    assert (size, "sha256:" + sha.hexdigest()) == (layer.size, layer.digest)


def test_cdn_truncate(images: ImageSet, cdn: Cdn) -> None:
    layer = images.oci_single.layers[0]
    cdn.truncate(layer.digest)
    conn = http.client.HTTPConnection("127.0.0.1", cdn.port, timeout=10)
    conn.request("GET", blob_path(layer.digest))
    resp = conn.getresponse()
    assert int(resp.headers["Content-Length"]) == layer.size
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    conn.close()
    cdn.truncate(None)
    full = client.request("GET", f"{cdn.url}{blob_path(layer.digest)}")
    assert len(full.body) == layer.size


def test_failure_controls(images: ImageSet, cdn: Cdn, token_server: TokenServer) -> None:
    cdn.set_failing(503)
    assert client.request("GET", f"{cdn.url}{blob_path(images.big.config.digest)}").status == 503
    token_server.set_failing(500)
    assert client.request("GET", f"{token_server.url}/token?scope=repository:x:pull").status == 500
    # The autouse reset fixture clears both after the test.


def test_the_servers_queue_64_connections_made_at_once(token_server: TokenServer) -> None:
    """64 clients connecting while the server accepts none (as when its thread is busy): the kernel
    completes every handshake and queues it. With socketserver's queue of 5 it drops the SYNs past
    the sixth, and each client would retry a second later."""
    server = _TrackingServer(("127.0.0.1", 0), token_server.handler_class, token_server)  # listening, not accepting
    connections: list[socket.socket] = []
    try:
        for _ in range(64):
            connections.append(socket.create_connection(("127.0.0.1", server.server_port), timeout=0.5))
    finally:
        for connection in connections:
            connection.close()
        server.server_close()
    assert len(connections) == 64


def test_token_policy(token_server: TokenServer, upstream_registry: Registry, images: ImageSet) -> None:
    token_server.policy = Policy(users={"alice": "s3cret"}, private_repos={"library/oci-single": {"alice"}})
    manifest_url = f"{upstream_registry.url}/v2/library/oci-single/manifests/1"
    accept = {"Accept": client.ACCEPT_ALL}

    # Anonymous: a token with an empty access list; the registry refuses it.
    anon = _token(token_server, "repository:library/oci-single:pull")
    assert jwt.decode(str(anon["token"]), options={"verify_signature": False})["access"] == []
    r = client.request("GET", manifest_url, {**client.bearer(str(anon["token"])), **accept})
    assert r.status == 401 and "insufficient_scope" in r.headers["WWW-Authenticate"]

    # Wrong password: 401 from the token server itself.
    r = client.request(
        "GET", f"{token_server.url}/token?scope=repository:library/oci-single:pull", {"Authorization": "Basic eDp5"}
    )
    assert r.status == 401

    # Basic auth on GET, with an offline (refresh) token.
    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    query = "service=registry.docker.io&scope=repository:library/oci-single:pull&offline_token=true"
    r = client.request("GET", f"{token_server.url}/token?{query}", {"Authorization": basic})
    data = r.json()
    assert isinstance(data, dict) and "refresh_token" in data
    r = client.request("GET", manifest_url, {**client.bearer(str(data["token"])), **accept})
    assert r.status == 200

    # POST password grant and POST refresh_token grant (dockerd after docker login).
    form = urllib.parse.urlencode(
        {
            "grant_type": "password",
            "username": "alice",
            "password": "s3cret",
            "service": "registry.docker.io",
            "scope": "repository:library/oci-single:pull",
            "access_type": "offline",
            "client_id": "bed",
        }
    ).encode()
    r = client.request("POST", f"{token_server.url}/token", {"Content-Type": "application/x-www-form-urlencoded"}, form)
    assert r.status == 200
    refresh = r.json()["refresh_token"]  # type: ignore[index]
    form = urllib.parse.urlencode(
        {"grant_type": "refresh_token", "refresh_token": refresh, "scope": "repository:library/oci-single:pull"}
    ).encode()
    r = client.request("POST", f"{token_server.url}/token", {"Content-Type": "application/x-www-form-urlencoded"}, form)
    assert r.status == 200
    claims = jwt.decode(r.json()["token"], options={"verify_signature": False})  # type: ignore[index]
    assert claims["sub"] == "alice" and claims["access"][0]["actions"] == ["pull"]
    posts = [rec for rec in token_server.requests() if rec.method == "POST"]
    assert posts[-1].form["grant_type"] == ["refresh_token"]
    assert posts[-2].form["password"] == ["<redacted>"]


def test_registry_restart_keeps_content(
    upstream_registry: Registry, token_server: TokenServer, images: ImageSet
) -> None:
    port, pid = upstream_registry.port, upstream_registry.pid
    upstream_registry.stop()
    with pytest.raises(OSError):
        client.request("GET", f"{upstream_registry.url}/v2/", timeout=2)
    mark = upstream_registry.mark()
    upstream_registry.start()
    assert upstream_registry.port == port and upstream_registry.pid != pid
    image = images.docker_multi
    r = client.request(
        "GET",
        f"{upstream_registry.url}/v2/{image.repo}/manifests/{image.tag}",
        {**client.bearer(token_server.mint(image.repo)), "Accept": client.ACCEPT_ALL},
    )
    assert r.headers["Docker-Content-Digest"] == image.digest
    # The readiness probe's GET /v2/ is logged too.
    kinds = [(rec.method, rec.kind, rec.status) for rec in upstream_registry.requests(mark)]
    assert kinds == [("GET", "base", 401), ("GET", "manifest", 200)]


def test_push_variant_moves_tag(upstream_registry: Registry, bed_workdir: Path, images: ImageSet) -> None:
    first = push_variant(upstream_registry, bed_workdir / "images", "library/variant", "latest", "a")
    second = push_variant(upstream_registry, bed_workdir / "images", "library/variant", "latest", "b", fmt="v2s2")
    assert first.digest != second.digest
    assert second.media_type == client.DOCKER_MANIFEST
    # Pushes go through the admin instance and never show up in the public log.
    assert not [r for r in upstream_registry.requests() if r.repo == "library/variant"]


def test_dockerd_lifecycle(dockerd_factory: Callable[..., Dockerd]) -> None:
    started = time.monotonic()
    d = dockerd_factory("http://127.0.0.1:9")  # nothing listens there: no registry needed
    ready = time.monotonic() - started
    info = json.loads(d.cli("info", "--format", "{{json .}}").stdout)
    assert info["Driver"] == "overlay2"
    assert ready < 15
    failed = d.pull("library/oci-single:1", check=False)
    assert failed.returncode != 0 and "proxyconnect" in failed.stderr
    pid = d.pid
    assert pid is not None
    d.stop()
    assert not d.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "Daemon shutdown complete" in d.log_tail(200)


def test_dockerd_pulls_through_passthrough(
    dockerd_factory: Callable[..., Dockerd],
    passthrough_proxy: MitmDump,
    images: ImageSet,
    upstream_registry: Registry,
    cdn: Cdn,
    token_server: TokenServer,
) -> None:
    d = dockerd_factory(passthrough_proxy.url, passthrough_proxy.ca_cert)
    for image in (images.oci_multi, images.docker_multi, images.big):
        d.pull(image.ref)
        # RepoDigests carry the digest pulled by tag: the list's for multi-arch.
        assert d.repo_digests(image.ref) == [f"{image.repo.removeprefix('library/')}@{image.digest}"]
        assert d.image_id(image.ref) == image.config.digest

    # Re-pull after rmi + prune: fully cold again. dockerd HEADs the tag,
    # GETs the manifest by digest, and fetches every blob.
    image = images.oci_single
    d.pull(image.ref)
    assert image.digest in d.content_digests()
    d.rmi(image.ref)
    assert d.images() == [] and d.content_digests() == []
    mark, cmark, tmark = upstream_registry.mark(), cdn.mark(), token_server.mark()
    d.pull(image.ref)
    fetched = {r.digest for r in cdn.requests(cmark) if r.method == "GET"}
    assert fetched == {b.digest for b in image.blobs}
    assert upstream_registry.manifest_heads(mark, repo=image.repo) == 1
    assert upstream_registry.count(mark, method="GET", kind="manifest", reference=image.digest) == 1
    assert len(token_server.requests(tmark)) == 1
    assert all(not r.has_authorization for r in cdn.requests(cmark))


def test_skopeo_through_passthrough(
    skopeo_factory: Callable[..., Skopeo],
    passthrough_proxy: MitmDump,
    images: ImageSet,
    upstream_registry: Registry,
    tmp_path: Path,
) -> None:
    sk = skopeo_factory(passthrough_proxy.url, passthrough_proxy.ca_cert)
    mark = upstream_registry.mark()
    raw = sk.inspect_raw(images.docker_multi.ref)
    assert raw == images.docker_multi.manifest
    assert upstream_registry.manifest_gets(mark) == 1
    assert upstream_registry.manifest_heads(mark) == 0
    assert sk.copy_to_dir(images.oci_multi.ref, tmp_path / "one") == images.oci_multi.children["linux/amd64"]
    assert sk.copy_to_dir(images.oci_multi.ref, tmp_path / "all", all_platforms=True) == images.oci_multi.digest
