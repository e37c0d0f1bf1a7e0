"""The offline scenario shared by the offline and bundle tests: what is recorded, what a replay
must show (same tags and digests as online, clear errors for what was never recorded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo
from bed.tokens import Policy, TokenServer


def record(
    images: ImageSet,
    regcache: Mitmdump,
    token_server: TokenServer,
    dockerd_factory: Callable[..., Dockerd],
    skopeo_factory: Callable[..., Skopeo],
    tmp_path: Path,
) -> None:
    """dockerd pulls the OCI index (amd64 only) and the single image; skopeo copies the Docker list
    whole. Then dockerd logs in as `ci` and pulls again: offline, regcache answers token requests
    only for credentials the upstream accepted while it was online (and anonymous ones)."""
    online = dockerd_factory(regcache.url, regcache.ca_cert)
    online.pull(images.oci_multi.ref)
    online.pull(images.oci_single.ref)
    token_server.policy = Policy(users={"ci": "secret"})
    # Docker Hub's default server name: the CLI then sends these credentials with pulls.
    assert "Login Succeeded" in online.cli("login", "-u", "ci", "-p", "secret").stdout
    online.rmi(images.oci_single.ref)
    online.pull(images.oci_single.ref)
    online.close()
    recorder = skopeo_factory(regcache.url, regcache.ca_cert)
    digest = recorder.copy_to_dir(images.docker_multi.ref, tmp_path / "rec", all_platforms=True)
    assert digest == images.docker_multi.digest


def replay(
    images: ImageSet, offline: Mitmdump, dockerd: Dockerd, skopeo_factory: Callable[..., Skopeo], tmp_path: Path
) -> None:
    # `docker login` works offline too, with credentials recorded online, and pulls after it.
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
