"""Cold and warm pulls through a real regcache, with real skopeo and dockerd.

The upstream is Debian's docker-registry with Docker-Hub-style token auth and CDN redirects (the
bed). Upstream traffic is counted from the registry's own access log and the CDN's request log.
"""

from __future__ import annotations

import hashlib
import json
import random
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.dockerd import Dockerd
from bed.images import ImageSet, PushedImage, push_variant
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from regcache.oci.media import ACCEPT_KEY_TYPES
from regcache.oci.reference import TagRef
from regcache.store.base import MAX_TAG_RECORDS
from regcache.store.disk import DiskStore

IMAGES = ["oci_single", "oci_multi", "docker_multi", "big"]


def revalidation_only(registry: Registry, since: int) -> list[str]:
    """Upstream requests other than `/v2/` pings and manifest `HEAD`s (must be none when warm)."""
    return [
        f"{r.method} {r.path}"
        for r in registry.requests(since)
        if not (r.kind == "base" or (r.kind == "manifest" and r.method == "HEAD"))
    ]


def assert_stored(store: DiskStore, image: PushedImage, timeout: float = 10) -> None:
    """Every blob of the (amd64) image is in the store, byte for byte. A client can have the last
    byte of a blob a moment before its fill is committed, so wait for the commit (bounded)."""
    for blob in image.blobs:
        deadline = time.monotonic() + timeout
        while (handle := store.open_blob(blob.digest)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert handle is not None, f"{blob.digest} not stored"
        with handle:
            assert "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest() == blob.digest
    assert store.get_manifest(image.digest) is not None


@pytest.mark.parametrize("name", IMAGES)
def test_skopeo_cold_then_warm(
    name: str,
    images: ImageSet,
    skopeo: Skopeo,
    store: DiskStore,
    upstream_registry: Registry,
    cdn: Cdn,
    regcache: Mitmdump,
    tmp_path: Path,
) -> None:
    image: PushedImage = getattr(images, name)
    cdn_start = cdn.mark()
    cold = skopeo.copy_to_dir(image.ref, tmp_path / "cold", all_platforms=image.is_list)
    assert cold == image.digest
    assert_stored(store, image)
    assert not any(r.has_authorization for r in cdn.requests(cdn_start)), "registry credentials reached the CDN"

    registry_mark, cdn_mark, log_mark = upstream_registry.mark(), cdn.mark(), regcache.mark()
    warm = skopeo.copy_to_dir(image.ref, tmp_path / "warm", all_platforms=image.is_list)
    assert warm == image.digest
    assert revalidation_only(upstream_registry, registry_mark) == []
    assert cdn.count(since=cdn_mark) == 0
    results = {result for result, _, _ in regcache.results(log_mark)}
    assert results <= {"HIT", "REVALIDATED", "PASS"}, results
    assert "REVALIDATED" in results
    # mitmproxy's per-connection lines are off unless regcache_connection_log is set.
    assert "client connect" not in regcache.log()[log_mark:]
    for blob in image.blobs:
        assert (tmp_path / "warm" / blob.digest.split(":")[1]).read_bytes() == (
            tmp_path / "cold" / blob.digest.split(":")[1]
        ).read_bytes()


@pytest.mark.parametrize("name", IMAGES)
def test_dockerd_cold_then_warm(
    name: str, images: ImageSet, dockerd: Dockerd, store: DiskStore, upstream_registry: Registry, cdn: Cdn
) -> None:
    image: PushedImage = getattr(images, name)
    cdn_start = cdn.mark()
    dockerd.pull(image.ref)
    # dockerd shows Docker Hub's official images by their familiar name: oci-single@sha256:...
    assert f"{image.repo.removeprefix('library/')}@{image.digest}" in dockerd.repo_digests(image.ref)
    assert dockerd.image_id(image.ref) == image.config.digest
    assert_stored(store, image)
    assert not any(r.has_authorization for r in cdn.requests(cdn_start)), "registry credentials reached the CDN"

    dockerd.rmi(image.ref)
    registry_mark, cdn_mark = upstream_registry.mark(), cdn.mark()
    dockerd.pull(image.ref)
    assert dockerd.image_id(image.ref) == image.config.digest
    assert revalidation_only(upstream_registry, registry_mark) == []
    assert upstream_registry.manifest_heads(registry_mark) >= 1  # the tag was revalidated
    assert cdn.count(since=cdn_mark) == 0


def test_plain_mitmdump_with_the_addon_script_caches_too(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    """`mitmdump -s addon/cache.py` (README) is the same cache as `regcache run`."""
    proxy = regcache_with(mitmdump=True)
    skopeo = skopeo_factory(proxy.url, proxy.ca_cert)
    image = images.oci_multi
    assert skopeo.copy_to_dir(image.ref, tmp_path / "cold", all_platforms=True) == image.digest
    registry_mark, cdn_mark = upstream_registry.mark(), cdn.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "warm", all_platforms=True) == image.digest
    assert revalidation_only(upstream_registry, registry_mark) == []
    assert cdn.count(since=cdn_mark) == 0
    assert "Loading script" in proxy.log()
    assert "client connect" not in proxy.log()


def test_skopeo_warm_pull_with_upstream_stopped(
    images: ImageSet, skopeo: Skopeo, upstream_registry: Registry, regcache: Mitmdump, tmp_path: Path
) -> None:
    image = images.oci_multi
    assert skopeo.copy_to_dir(image.ref, tmp_path / "cold", all_platforms=True) == image.digest
    upstream_registry.stop()
    mark = regcache.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "warm", all_platforms=True) == image.digest
    assert ("STALE", "GET", f"docker.io/{image.ref}") in regcache.results(mark)


def test_dockerd_warm_pull_with_upstream_stopped(
    images: ImageSet, dockerd: Dockerd, upstream_registry: Registry, token_server: TokenServer, regcache: Mitmdump
) -> None:
    image = images.docker_multi
    dockerd.pull(image.ref)
    dockerd.rmi(image.ref)
    upstream_registry.stop()
    token_server.stop()
    mark = regcache.mark()
    dockerd.pull(image.ref)
    assert dockerd.image_id(image.ref) == image.config.digest
    assert ("STALE", "HEAD", f"docker.io/{image.ref}") in regcache.results(mark)


def test_uncached_image_with_upstream_stopped_is_a_clear_error(
    images: ImageSet, skopeo: Skopeo, upstream_registry: Registry, regcache: Mitmdump, tmp_path: Path
) -> None:
    upstream_registry.stop()
    with pytest.raises(Exception, match="503 Service Unavailable"):
        skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "x")
    url = f"https://registry-1.docker.io/v2/{images.oci_single.repo}/manifests/1"
    status, _, body = request_through(regcache, url)
    assert status == 503
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert error["message"] == f"upstream unavailable and docker.io/{images.oci_single.ref} is not cached"


@pytest.mark.parametrize("name", ["oci_single", "big"])
def test_truncated_blob_is_not_stored_and_next_pull_succeeds(
    name: str, images: ImageSet, skopeo: Skopeo, store: DiskStore, cdn: Cdn, regcache: Mitmdump, tmp_path: Path
) -> None:
    """The upstream cuts the largest layer in half. Small: the fill fails before the client gets
    a byte (a registry error). Big (100 MB): the client is already receiving it and must see a
    broken transfer, never a short blob. Either way nothing is stored."""
    image: PushedImage = getattr(images, name)
    layer = max(image.layers, key=lambda blob: blob.size)
    cdn.truncate(layer.digest)
    with pytest.raises(Exception):  # noqa: B017 - skopeo's wording of a broken transfer varies
        skopeo.copy_to_dir(image.ref, tmp_path / "broken")
    assert store.open_blob(layer.digest) is None
    assert list(store.staging_dir.iterdir()) == []
    assert "Traceback" not in regcache.log()
    cdn.truncate(None)
    assert skopeo.copy_to_dir(image.ref, tmp_path / "ok") == image.digest
    assert_stored(store, image)


def test_moved_tag_is_served_new(
    images: ImageSet, skopeo: Skopeo, upstream_registry: Registry, bed_workdir: Path, tmp_path: Path
) -> None:
    first = push_variant(upstream_registry, bed_workdir / "variants", "library/moving", "1", seed=1)
    assert skopeo.copy_to_dir(first.ref, tmp_path / "a") == first.digest
    second = push_variant(upstream_registry, bed_workdir / "variants", "library/moving", "1", seed=2)
    assert second.digest != first.digest
    assert skopeo.copy_to_dir(second.ref, tmp_path / "b") == second.digest


def test_stored_blob_answers_range_and_head(
    images: ImageSet,
    skopeo: Skopeo,
    regcache: Mitmdump,
    upstream_registry: Registry,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    image = images.oci_single
    skopeo.copy_to_dir(image.ref, tmp_path / "cold")
    layer = image.layers[-1]
    data = (tmp_path / "cold" / layer.digest.split(":")[1]).read_bytes()
    url = f"https://registry-1.docker.io/v2/{image.repo}/blobs/{layer.digest}"
    mark = upstream_registry.mark()

    # skopeo's anonymous token was accepted for this repository: it is readable anonymously, so
    # its cached blobs go to any client, with credentials or without (private ones: test_access.py).
    status, headers, body = request_through(regcache, url)
    assert (status, body) == (200, data)

    auth = {"Authorization": f"Bearer {token_server.mint(image.repo)}"}
    status, headers, body = request_through(regcache, url, {"Range": "bytes=10-99", **auth})
    assert (status, body) == (206, data[10:100])
    assert headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    assert headers["Docker-Content-Digest"] == layer.digest

    status, headers, body = request_through(regcache, url, auth, method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(len(data))
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Cache"] == "HIT"
    # Readable anonymously and confirmed a moment ago: the upstream was not asked at all.
    assert upstream_registry.requests(mark) == []


def test_store_survives_restart_and_docker_hub_names_share_it(
    images: ImageSet, skopeo: Skopeo, regcache: Mitmdump, upstream_registry: Registry, cdn: Cdn, tmp_path: Path
) -> None:
    image = images.docker_multi
    assert skopeo.copy_to_dir(image.ref, tmp_path / "cold", all_platforms=True) == image.digest
    regcache.stop()
    regcache.start()
    registry_mark, cdn_mark = upstream_registry.mark(), cdn.mark()
    alias = f"docker://index.docker.io/{image.ref}"
    assert skopeo.copy_to_dir(alias, tmp_path / "warm", all_platforms=True) == image.digest
    assert revalidation_only(upstream_registry, registry_mark) == []
    assert cdn.count(since=cdn_mark) == 0


def test_big_layer_streams_with_bounded_memory(images: ImageSet, dockerd: Dockerd, regcache: Mitmdump) -> None:
    """A 100 MB layer, cold then warm: mitmdump never holds it in memory."""
    image = images.big
    dockerd.pull(image.ref)
    dockerd.rmi(image.ref)
    dockerd.pull(image.ref)
    layer = max(image.layers, key=lambda blob: blob.size)
    assert layer.size >= 100 * 10**6
    assert regcache.peak_rss() < 150 * 2**20, f"peak RSS {regcache.peak_rss() / 2**20:.0f} MiB"


def test_large_monolithic_push_goes_to_the_mapped_upstream(
    regcache: Mitmdump, upstream_registry: Registry, token_server: TokenServer
) -> None:
    """Request bodies over stream_large_bodies (1 MiB) are streamed, and mitmproxy connects
    upstream before the `request` hook: they must still go where `upstreams` says."""
    repo = "library/pushed-monolithic"
    body = random.Random(repo).randbytes(1_100_000)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    auth = {"Authorization": f"Bearer {token_server.mint(repo, ('pull', 'push'))}"}
    blobs = f"https://registry-1.docker.io/v2/{repo}/blobs"
    mark = upstream_registry.mark()
    # A monolithic upload: a POST opens it, one PUT carries the whole blob. (distribution 2.8.2
    # takes no blob in the POST itself: it answers 202 and may close the connection unread.)
    status, answer_headers, answer = request_through(regcache, f"{blobs}/uploads/", auth, method="POST", data=b"")
    assert status == 202, answer
    upload = urllib.parse.urlsplit(answer_headers["Location"])
    put = f"https://registry-1.docker.io{upload.path}?{upload.query}&digest={digest}"
    headers = {**auth, "Content-Type": "application/octet-stream"}
    status, answer_headers, answer = request_through(regcache, put, headers, method="PUT", data=body)
    assert status == 201, answer
    assert answer_headers["Docker-Content-Digest"] == digest
    assert [(r.method, r.status) for r in upstream_registry.requests(mark)] == [("POST", 202), ("PUT", 201)]
    status, _, pulled = request_through(regcache, f"{blobs}/{digest}", auth)
    assert (status, hashlib.sha256(pulled).hexdigest()) == (200, digest.removeprefix("sha256:"))


def test_unique_accept_lists_keep_the_tag_record_small(
    images: ImageSet, regcache: Mitmdump, store: DiskStore, token_server: TokenServer, skopeo: Skopeo, tmp_path: Path
) -> None:
    """120 requests for one tag, each with an Accept list of its own (50-100 KB, some known media
    types among junk): the tag's record stays a few small entries, and clients still get the right
    manifest."""
    image = images.docker_multi
    url = f"https://registry-1.docker.io/v2/{image.repo}/manifests/{image.tag}"
    auth = {"Authorization": f"Bearer {token_server.mint(image.repo)}"}
    choose = random.Random(4)
    known = sorted(ACCEPT_KEY_TYPES)
    for n in range(120):
        junk = ", ".join(f"application/x-junk-{n}-{i}" for i in range(choose.randint(2500, 5000)))  # 50-100 KB
        listed = ", ".join(choose.sample(known, choose.randint(1, len(known))))
        status, _, _ = request_through(regcache, url, {**auth, "Accept": f"{listed}, {junk}"}, method="HEAD")
        assert status < 500
    ref = TagRef("docker.io", image.repo, image.tag)
    assert 0 < len(store.tag_records(ref)) <= MAX_TAG_RECORDS
    assert store.entries()[f"tag:{ref}"].size <= MAX_TAG_RECORDS * 1024

    assert skopeo.copy_to_dir(image.ref, tmp_path / "after", all_platforms=True) == image.digest
    dockerd_accept = ", ".join([*image.child_media_types.values(), image.media_type, "application/json"])
    status, headers, body = request_through(regcache, url, {**auth, "Accept": dockerd_accept})
    assert (status, headers["Docker-Content-Digest"], headers["X-Cache"]) == (200, image.digest, "REVALIDATED")
    assert body == image.manifest


def request_through(
    proxy: Mitmdump, url: str, headers: dict[str, str] | None = None, method: str = "GET", data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTPS request through the proxy, trusting its CA."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": proxy.url}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(proxy.ca_cert))),
    )
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()
