"""The load benchmark's client (scripts/bench/loadclient.py) against a real regcache: it pulls
through the proxy (CONNECT + TLS, the 307 to the blob endpoint followed past the proxy) and from the
mirror (token through the mirror's relay) as dockerd and skopeo do, without an error, a new
connection per request; and a stored blob whose bytes changed is counted as an error, not a pull.
"""

from __future__ import annotations

import asyncio

from bed.images import ImageSet, PushedImage
from bed.regcache_run import Mitmdump
from bench import loadclient

from regcache.store.disk import DiskStore

from .test_pull import assert_stored


def spec(base: str, proxy: Mitmdump | None, image: PushedImage, clients: int) -> loadclient.Spec:
    pulled = loadclient.Image(
        image.repo, image.tag, image.digest, image.amd64_digest, [(b.digest, b.size) for b in image.blobs]
    )
    return loadclient.Spec(
        base,
        proxy.url if proxy else None,
        str(proxy.ca_cert) if proxy else None,
        [pulled],
        clients,
        list(loadclient.PATTERNS),
        duration=None,
        timeout=60,
    )


def test_pulls_through_the_proxy_and_the_mirror_without_an_error(
    images: ImageSet, regcache: Mitmdump, store: DiskStore
) -> None:
    image = images.docker_multi
    through_proxy = asyncio.run(loadclient.run(spec("https://registry-1.docker.io", regcache, image, 4)))
    assert (through_proxy.errors, through_proxy.messages) == (0, [])
    assert [ok for *_, ok in through_proxy.pulls] == [True] * 4
    kinds = [(kind, status) for kind, status, *_ in through_proxy.requests]
    # ping 401, token, the manifest(s), blobs: 307 to the endpoint, then 200 from it, per blob and pull
    assert kinds.count(("blob", 307)) == kinds.count(("blob", 200)) == 4 * len(image.blobs)
    assert kinds.count(("tag HEAD", 200)) == 2  # the two clients that pull as dockerd
    assert_stored(store, image)

    mark = regcache.mark()
    from_mirror = asyncio.run(loadclient.run(spec(regcache.mirror_url(), None, image, 4)))
    assert (from_mirror.errors, from_mirror.messages) == (0, [])
    assert [(k, s) for k, s, *_ in from_mirror.requests].count(("blob", 200)) == 4 * len(image.blobs)
    assert "(mirror" in regcache.log()[mark:]


def test_a_blob_whose_bytes_changed_is_an_error(images: ImageSet, regcache: Mitmdump, store: DiskStore) -> None:
    image = images.oci_single
    first = asyncio.run(loadclient.run(spec(regcache.mirror_url(), None, image, 1)))
    assert first.errors == 0
    assert_stored(store, image)
    layer = max(image.layers, key=lambda blob: blob.size)
    path = store.blob_path(layer.digest)
    assert path is not None
    with open(path, "r+b") as stored:  # same size, other bytes: only a digest check can notice
        stored.seek(layer.size // 2)
        stored.write(b"\0" * 16)
    again = asyncio.run(loadclient.run(spec(regcache.mirror_url(), None, image, 2)))
    assert again.errors == 2
    assert all(f"expected {layer.digest}" in message for message in again.messages)
    assert [ok for *_, ok in again.pulls] == [False, False]
