"""What scripts/setup-dockerd writes is enough for a real dockerd to pull through regcache."""

from __future__ import annotations

import json
from pathlib import Path

from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.setup_scripts import run_setup, systemd_environment


class DropInDockerd(Dockerd):
    """dockerd with the environment a systemd drop-in gives it, trusting the CA the way the
    system trust store would (the bed's bundle of system roots plus that file)."""

    def __init__(
        self, workdir: Path, environment: dict[str, str], trusted_ca: Path, daemon_json: Path | None = None
    ) -> None:
        config = json.loads(daemon_json.read_text()) if daemon_json else None
        super().__init__(workdir, None, trusted_ca, daemon_config=config)
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


def test_dockerd_takes_docker_hub_from_the_mirror_setup_dockerd_adds(
    regcache: Mitmdump, images: ImageSet, tmp_path: Path
) -> None:
    """`--mirror`: Docker Hub names through the mirror (no proxy lines), with the proxy still set."""
    root = tmp_path / "root"
    root.mkdir()
    mirror = regcache.mirror_url()
    run_setup("dockerd", "--proxy", regcache.url, "--ca", str(regcache.ca_cert), "--mirror", mirror, root=root)
    environment = systemd_environment((root / "etc/systemd/system/docker.service.d/regcache.conf").read_text())
    daemon_json = root / "etc/docker/daemon.json"
    assert json.loads(daemon_json.read_text()) == {"registry-mirrors": [mirror]}
    image = images.oci_single
    trusted = root / "usr/local/share/ca-certificates/regcache.crt"
    with DropInDockerd(tmp_path / "dockerd", environment, trusted, daemon_json) as d:
        mark = regcache.mark()
        d.pull(image.ref)
        assert d.image_id(image.ref) == image.config.digest
    lines = [line for line in regcache.log()[mark:].splitlines() if f"docker.io/{image.repo}" in line]
    assert lines and all(line.endswith("(mirror)") for line in lines), lines
