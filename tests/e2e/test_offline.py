"""Offline replay: record through an online regcache, then replay with no upstream at all.

The replaying regcache has no `upstreams` map, so the Docker Hub names it would contact do not
even resolve, and the bed's registry, token server and CDN are stopped as well.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from .mitm import Mitmdump


def test_record_online_then_replay_offline(
    images: ImageSet,
    regcache: Mitmdump,
    dockerd_factory: Callable[..., Dockerd],
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    token_server: TokenServer,
    cdn: Cdn,
    proxy_confdir: Path,
    tmp_path: Path,
) -> None:
    # Record: dockerd pulls the OCI index (amd64 only), skopeo copies the Docker list whole.
    online = dockerd_factory(regcache.url, regcache.ca_cert)
    online.pull(images.oci_multi.ref)
    online.pull(images.oci_single.ref)
    online.close()
    recorder = skopeo_factory(regcache.url, regcache.ca_cert)
    assert recorder.copy_to_dir(images.docker_multi.ref, tmp_path / "rec", all_platforms=True) == (
        images.docker_multi.digest
    )
    regcache.stop()
    for server in (upstream_registry, token_server, cdn):
        server.stop()

    offline = Mitmdump(
        tmp_path / "offline", {"cache_dir": str(regcache.workdir / "cache"), "offline": True}, proxy_confdir
    )
    offline.start()
    try:
        replay(images, offline, dockerd_factory(offline.url, offline.ca_cert), skopeo_factory, tmp_path)
    finally:
        offline.stop()
    assert "Traceback" not in offline.log()


def replay(
    images: ImageSet, offline: Mitmdump, dockerd: Dockerd, skopeo_factory: Callable[..., Skopeo], tmp_path: Path
) -> None:
    # `docker login` works offline too (the cache answers /v2/ itself), and pulls after it.
    assert "Login Succeeded" in dockerd.cli("login", "-u", "ci", "-p", "secret", "registry-1.docker.io").stdout
    for image in (images.oci_multi, images.oci_single):
        dockerd.pull(image.ref)
        assert f"{image.repo.removeprefix('library/')}@{image.digest}" in dockerd.repo_digests(image.ref)
        assert dockerd.image_id(image.ref) == image.config.digest

    skopeo = skopeo_factory(offline.url, offline.ca_cert)
    digest = skopeo.copy_to_dir(images.docker_multi.ref, tmp_path / "replay", all_platforms=True)
    assert digest == images.docker_multi.digest

    # Never recorded: a registry error that names the image, not a hang or a bare 502.
    with pytest.raises(Exception, match=r"not in the offline cache: docker\.io/library/big:1"):
        skopeo.copy_to_dir(images.big.ref, tmp_path / "big")
    # The index was recorded, its arm64 child was not: the error names the child's digest.
    arm64 = images.oci_multi.children["linux/arm64/v8"]
    with pytest.raises(Exception, match=f"not in the offline cache: docker.io/{images.oci_multi.repo}@{arm64}"):
        skopeo.copy_to_dir(images.oci_multi.ref, tmp_path / "arm", arch="arm64")
    results = {result for result, _, _ in offline.results()}
    assert results <= {"HIT", "ERROR"}, results
