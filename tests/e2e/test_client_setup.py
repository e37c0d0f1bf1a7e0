"""What scripts/setup-dockerd writes is enough for a real dockerd to pull through regcache."""

from __future__ import annotations

from pathlib import Path

from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.setup_scripts import run_setup, systemd_environment

from .mitm import Mitmdump


class DropInDockerd(Dockerd):
    """dockerd with the environment a systemd drop-in gives it, trusting the CA the way the
    system trust store would (the bed's bundle of system roots plus that file)."""

    def __init__(self, workdir: Path, environment: dict[str, str], trusted_ca: Path) -> None:
        super().__init__(workdir, None, trusted_ca)
        self.environment = environment

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.environment}


def test_dockerd_pulls_through_regcache_with_the_written_dropin(
    regcache: Mitmdump, images: ImageSet, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    run_setup("dockerd", "--proxy", regcache.url, "--ca", str(regcache.ca_cert), root=root)
    environment = systemd_environment((root / "etc/systemd/system/docker.service.d/regcache.conf").read_text())
    assert environment["HTTPS_PROXY"] == regcache.url
    image = images.oci_single
    with DropInDockerd(tmp_path / "dockerd", environment, root / "usr/local/share/ca-certificates/regcache.crt") as d:
        mark = regcache.mark()
        d.pull(image.ref)
        assert d.image_id(image.ref) == image.config.digest
    assert ("MISS", "GET", f"docker.io/{image.repo}@{image.digest}") in regcache.results(mark)
