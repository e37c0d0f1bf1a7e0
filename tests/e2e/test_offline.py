"""Offline replay: record through an online regcache, then replay with no upstream at all.

The replaying regcache has no `upstreams` map, so the Docker Hub names it would contact do not
even resolve, and the bed's registry, token server and CDN are stopped as well.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bed.dockerd import Dockerd
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from .scenario import record, replay


def test_record_online_then_replay_offline(
    images: ImageSet,
    regcache: Mitmdump,
    token_server: TokenServer,
    dockerd_factory: Callable[..., Dockerd],
    skopeo_factory: Callable[..., Skopeo],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    record(images, regcache, token_server, dockerd_factory, skopeo_factory, tmp_path)
    regcache.stop()
    upstream_gone()
    offline = offline_regcache(regcache.workdir / "cache")
    replay(images, offline, dockerd_factory(offline.url, offline.ca_cert), skopeo_factory, tmp_path)
