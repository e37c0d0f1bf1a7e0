"""A recorded tag must replay: when a client resolves a tag with a `HEAD` only (dockerd that holds
the image already), regcache completes the image in the background, with the client's own token,
once; the offline cache, and a bundle exported from it, then serve it.

Upstream manifest `GET`s are counted in the registry's own access log.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bed.cdn import Cdn
from bed.dockerd import Dockerd
from bed.images import ImageSet, PushedImage
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from .conftest import regcache_cli
from .test_pull import request_through

DEADLINE = 60.0


def completion_line(regcache: Mitmdump, image: PushedImage, outcome: str = "COMPLETED", since: int = 0) -> str:
    """Wait (bounded) for the log line that says how the background completion of `image` ended."""
    pattern = re.compile(rf"{outcome} docker\.io/{re.escape(image.ref)} -> {image.digest}: .*")
    deadline = time.monotonic() + DEADLINE
    while not (found := pattern.search(regcache.log()[since:])):
        assert time.monotonic() < deadline, f"no {outcome} line for {image.ref}:\n{regcache.log()[-3000:]}"
        time.sleep(0.05)
    return found[0]


def manifest_gets(registry: Registry, since: int) -> Counter[str]:
    """Upstream manifest GETs since a mark, by reference (tag or digest)."""
    return Counter(r.reference or "" for r in registry.requests(since) if r.kind == "manifest" and r.method == "GET")


def stored_size(image: PushedImage) -> int:
    """What the store holds for the amd64 pull of `image`: manifests (type, newline, body) and blobs."""
    manifests = len(image.media_type) + 1 + len(image.manifest)
    if image.is_list:
        manifests += len(image.child_media_types["linux/amd64"]) + 1 + len(image.amd64_manifest)
    return manifests + image.total_size


def listed(cache: Path, image: PushedImage) -> dict[str, object]:
    rows = json.loads(regcache_cli("ls", "--cache-dir", str(cache), "--json").stdout)
    return next(row for row in rows if row["ref"] == f"docker.io/{image.ref}" and row["digest"] == image.digest)


def anonymous_token(regcache: Mitmdump, image: PushedImage) -> str:
    """A pull token fetched anonymously through regcache, as registry clients do (`/v2/` challenge,
    then the realm it names): regcache sees it issued to nobody, so what the upstream serves with
    it is readable anonymously (public), and the offline cache serves it to every client."""
    status, headers, _ = request_through(regcache, "https://registry-1.docker.io/v2/")
    assert status == 401 and headers["WWW-Authenticate"].startswith('Bearer realm="https://auth.docker.io/token"')
    scope = f"repository:{image.repo}:pull"
    status, _, body = request_through(regcache, f"https://auth.docker.io/token?service=registry.docker.io&scope={scope}")
    assert status == 200
    return str(json.loads(body)["token"])


def head_tag(regcache: Mitmdump, image: PushedImage, token: str) -> dict[str, str]:
    """A client that sends only the tag HEAD (with its token and dockerd's Accept list)."""
    url = f"https://registry-1.docker.io/v2/{image.repo}/manifests/{image.tag}"
    accept = ", ".join([image.media_type, *image.child_media_types.values(), "application/json"])
    status, headers, _ = request_through(regcache, url, {"Authorization": f"Bearer {token}", "Accept": accept}, "HEAD")
    assert (status, headers["Docker-Content-Digest"]) == (200, image.digest)
    return headers


def test_a_tag_head_alone_is_completed_once_and_replays(
    images: ImageSet,
    regcache: Mitmdump,
    upstream_registry: Registry,
    token_server: TokenServer,
    cdn: Cdn,
    skopeo_factory: Callable[..., Skopeo],
    dockerd_factory: Callable[..., Dockerd],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    image, cache = images.docker_multi, regcache.workdir / "cache"
    mark, cdn_mark = upstream_registry.mark(), cdn.mark()
    token = anonymous_token(regcache, image)
    assert head_tag(regcache, image, token)["X-Cache"] == "MISS"
    assert head_tag(regcache, image, token)["X-Cache"] == "MISS"  # still lacking: no second completion
    assert "linux/amd64" in completion_line(regcache, image)  # this host's platform
    assert manifest_gets(upstream_registry, mark) == {image.digest: 1, image.amd64_digest: 1}
    assert cdn.count(since=cdn_mark) == len(image.blobs)
    assert head_tag(regcache, image, token)["X-Cache"] == "REVALIDATED"
    row = listed(cache, image)
    assert (row["size"], row["missing"]) == (stored_size(image), [])

    regcache.stop()
    assert manifest_gets(upstream_registry, mark) == {image.digest: 1, image.amd64_digest: 1}  # never again
    bundle = tmp_path / "bundle.tar"
    regcache_cli("export", "--cache-dir", str(cache), "-o", str(bundle), f"docker.io/{image.ref}")
    upstream_gone()
    for replayed in (cache, tmp_path / "imported"):
        if replayed != cache:
            regcache_cli("import", "--cache-dir", str(replayed), str(bundle))
        offline = offline_regcache(replayed)
        skopeo = skopeo_factory(offline.url, offline.ca_cert)
        assert skopeo.copy_to_dir(image.ref, tmp_path / f"{replayed.name}-skopeo") == image.amd64_digest
        dockerd = dockerd_factory(offline.url, offline.ca_cert)
        dockerd.pull(image.ref)
        assert dockerd.image_id(image.ref) == image.config.digest
        dockerd.close()


def test_dockerd_that_holds_the_image_sends_only_the_head(
    images: ImageSet,
    regcache: Mitmdump,
    dockerd: Dockerd,
    upstream_registry: Registry,
    dockerd_factory: Callable[..., Dockerd],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
) -> None:
    """dockerd 20.10 pulled the image earlier (through another cache); pulled again, it HEADs the
    tag and fetches nothing. The new cache completes the image and replays it to a fresh dockerd."""
    image, cache = images.oci_multi, regcache.workdir / "cache"
    dockerd.pull(image.ref)
    regcache.stop()
    shutil.rmtree(cache)
    regcache.start()
    mark, log_mark = upstream_registry.mark(), regcache.mark()
    dockerd.pull(image.ref)
    expected = [("PASS", "GET", "docker.io/v2/"), ("PASS", "GET", "token"), ("MISS", "HEAD", f"docker.io/{image.ref}")]
    assert regcache.results(log_mark) == expected
    completion_line(regcache, image, since=log_mark)
    assert manifest_gets(upstream_registry, mark) == {image.digest: 1, image.amd64_digest: 1}
    assert listed(cache, image)["size"] == stored_size(image)

    regcache.stop()
    upstream_gone()
    offline = offline_regcache(cache)
    fresh = dockerd_factory(offline.url, offline.ca_cert)
    fresh.pull(image.ref)
    assert fresh.image_id(image.ref) == image.config.digest
    fresh.close()


def test_a_dockerd_pull_still_makes_one_manifest_get_per_digest(
    images: ImageSet, regcache: Mitmdump, dockerd: Dockerd, upstream_registry: Registry, cdn: Cdn
) -> None:
    """dockerd HEADs the tag, then GETs the digest at once: its own GET goes first (the grace
    period); the background completion finds everything stored and fetches nothing."""
    image = images.docker_multi
    mark, cdn_mark = upstream_registry.mark(), cdn.mark()
    dockerd.pull(image.ref)
    assert dockerd.image_id(image.ref) == image.config.digest
    completion_line(regcache, image)
    assert manifest_gets(upstream_registry, mark) == {image.digest: 1, image.amd64_digest: 1}
    assert cdn.count(since=cdn_mark) == len(image.blobs)


def test_ls_and_export_say_what_an_incomplete_image_lacks(
    images: ImageSet, regcache: Mitmdump, token_server: TokenServer, cdn: Cdn, tmp_path: Path
) -> None:
    """The CDN fails while the completion fetches blobs: `ls` and `export` say the image is
    incomplete and how to complete it; `regcache warm` does."""
    image, cache = images.oci_single, regcache.workdir / "cache"
    cdn.set_failing(503)
    head_tag(regcache, image, token_server.mint(image.repo))
    assert "upstream answered 503" in completion_line(regcache, image, "INCOMPLETE")
    row = listed(cache, image)
    assert sorted(row["missing"]) == sorted(f"blob:{blob.digest}" for blob in image.blobs)
    missing = f"{len(image.blobs)} blobs missing"
    hint = f"docker.io/{image.ref} is incomplete in the cache ({missing}): complete it with regcache warm"
    assert f"{hint} docker.io/{image.ref}" in regcache_cli("ls", "--cache-dir", str(cache)).stdout
    result = regcache_cli("export", "--cache-dir", str(cache), "-o", str(tmp_path / "out"), image.ref, check=False)
    assert result.returncode == 1
    assert result.stderr == f"regcache export: {hint} docker.io/{image.ref}\n"

    cdn.set_failing(None)
    regcache_cli("warm", "--config", str(regcache.config_path), image.ref)
    row = listed(cache, image)
    assert (row["size"], row["missing"]) == (stored_size(image), [])
    regcache_cli("export", "--cache-dir", str(cache), "-o", str(tmp_path / "out"), image.ref)
