"""Blob bytes from regcache's own endpoint: a `307` to a signed URL that Go clients fetch directly.

Proves with real dockerd and skopeo that they follow the redirect past the proxy (mitmproxy logs a
0-byte `307` per blob; the endpoint logs the bytes it sent) and that dockerd verifies what it got:
a corrupted stored blob fails the pull instead of becoming an image.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from bed.dockerd import Dockerd, DockerdError
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo

from regcache.store.disk import DiskStore

from .test_pull import assert_stored


def blob_lines(proxy: Mitmdump, since: int) -> dict[str, str]:
    """digest → the status and size mitmproxy logged for each blob GET since `since`."""
    found = re.finditer(r"\] \w+ GET \S+@(sha256:[0-9a-f]{64}) (\d+ \d+ B)", proxy.log()[since:])
    return {m[1]: m[2] for m in found}


def sent(proxy: Mitmdump, since: int) -> dict[str, int]:
    """digest → bytes the blob endpoint sent since `since`."""
    return {m[1]: int(m[2]) for m in re.finditer(r"SENT blob (sha256:[0-9a-f]{64}) (\d+) B", proxy.log()[since:])}


def test_dockerd_follows_the_redirect_and_verifies_the_digest(
    images: ImageSet, dockerd: Dockerd, regcache: Mitmdump, store: DiskStore
) -> None:
    image = images.oci_single
    mark = regcache.mark()
    dockerd.pull(image.ref)
    assert_stored(store, image)
    layers = {blob.digest: blob.size for blob in image.layers}
    assert {d: blob_lines(regcache, mark).get(d) for d in layers} == {d: "307 0 B" for d in layers}

    dockerd.rmi(image.ref)
    mark = regcache.mark()
    dockerd.pull(image.ref)
    assert dockerd.image_id(image.ref) == image.config.digest
    assert {d: blob_lines(regcache, mark).get(d) for d in layers} == {d: "307 0 B" for d in layers}
    assert {d: sent(regcache, mark).get(d) for d in layers} == layers  # straight from the endpoint

    # Same size, other bytes: only the client's digest check can notice.
    layer = max(image.layers, key=lambda blob: blob.size)
    path = store.blob_path(layer.digest)
    assert path is not None
    with open(path, "r+b") as stored:
        stored.seek(layer.size // 2)
        stored.write(b"\0" * 16)
    dockerd.rmi(image.ref)
    with pytest.raises(DockerdError, match=f"verification failed for digest {layer.digest}"):
        dockerd.pull(image.ref)
    assert image.ref not in " ".join(dockerd.images())


def test_skopeo_follows_the_redirect_cold_and_warm(
    images: ImageSet, skopeo: Skopeo, regcache: Mitmdump, tmp_path: Path
) -> None:
    image = images.big
    mark = regcache.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "cold") == image.digest
    assert skopeo.copy_to_dir(image.ref, tmp_path / "warm") == image.digest
    layer = max(image.layers, key=lambda blob: blob.size)
    assert re.findall(rf"(MISS|HIT) GET \S+@{layer.digest} 307 0 B", regcache.log()[mark:]) == ["MISS", "HIT"]
    assert re.findall(rf"SENT blob {layer.digest} (\d+) B", regcache.log()[mark:]) == [str(layer.size)] * 2


def test_redirect_off_streams_blobs_through_the_proxy(
    images: ImageSet, regcache_with: Callable[..., Mitmdump], skopeo_factory: Callable[..., Skopeo], tmp_path: Path
) -> None:
    regcache = regcache_with(blob_redirect=False)
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    image = images.oci_single
    layer = image.layers[-1]
    mark = regcache.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "cold") == image.digest
    assert skopeo.copy_to_dir(image.ref, tmp_path / "warm") == image.digest
    found = re.findall(rf"(MISS|HIT) GET \S+@{layer.digest} (\d+) (\d+) B", regcache.log()[mark:])
    assert found == [("MISS", "200", str(layer.size)), ("HIT", "200", str(layer.size))]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_the_endpoint_serves_signed_urls_only(
    images: ImageSet, skopeo: Skopeo, regcache: Mitmdump, token_server: object, tmp_path: Path
) -> None:
    image = images.oci_single
    layer = image.layers[-1]
    skopeo.copy_to_dir(image.ref, tmp_path / "cold")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": regcache.url}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(regcache.ca_cert))),
        _NoRedirects(),
    )
    token = token_server.mint(image.repo)  # type: ignore[attr-defined]
    request = urllib.request.Request(
        f"https://registry-1.docker.io/v2/{image.repo}/blobs/{layer.digest}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as redirected:
        opener.open(request, timeout=30)
    assert redirected.value.code == 307
    location = redirected.value.headers["Location"]
    signed = rf"http://127\.0\.0\.1:\d+/blobs/{layer.digest}\?expires=\d+&signature=[0-9a-f]{{64}}"
    assert re.fullmatch(signed, location)

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(location, timeout=30) as response:
        assert response.read() == (tmp_path / "cold" / layer.digest.split(":")[1]).read_bytes()
    other = "sha256:" + "0" * 64
    for forged in (location[:-1] + ("0" if location[-1] != "0" else "1"), location.replace(layer.digest, other)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            direct.open(forged, timeout=30)
        assert refused.value.code == 403
        assert json.loads(refused.value.read())["errors"][0]["code"] == "DENIED"
