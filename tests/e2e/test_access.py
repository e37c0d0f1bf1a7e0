"""Private images stay private: cached content only for clients the upstream authorises.

The bed's token server makes `library/secret` readable by alice only (Docker-Hub-style token auth);
every other repository stays public.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.images import ImageSet, PushedImage, push_variant
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import Policy, TokenServer

from .mitm import Mitmdump
from .test_pull import request_through

ALICE, BOB = "alice:alice-password", "bob:bob-password"


@pytest.fixture
def secret(upstream_registry: Registry, token_server: TokenServer, bed_workdir: Path) -> PushedImage:
    image = push_variant(upstream_registry, bed_workdir / "secret", "library/secret", "1", seed="secret")
    token_server.policy = Policy(
        users=dict(pair.split(":") for pair in (ALICE, BOB)), private_repos={"library/secret": {"alice"}}
    )
    return image


def test_private_image_is_served_from_cache_only_to_authorised_clients(
    secret: PushedImage,
    regcache: Mitmdump,
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    token_server: TokenServer,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice-cold", creds=ALICE) == secret.digest
    assert not any(r.has_authorization for r in cdn.requests()), "registry credentials reached the CDN"

    for name, creds in (("anonymous", None), ("bob", BOB)):
        with pytest.raises(Exception, match=r"unauthorized|denied|401|403"):
            skopeo.copy_to_dir(secret.ref, tmp_path / name, creds=creds)

    # Straight for the cached layer by digest: anonymous, and through a public repository's name.
    layer = secret.layers[-1]
    status, _, body = request_through(regcache, f"https://registry-1.docker.io/v2/{secret.repo}/blobs/{layer.digest}")
    assert status == 401
    public = {"Authorization": f"Bearer {token_server.mint('library/oci-single')}"}
    status, _, body = request_through(
        regcache, f"https://registry-1.docker.io/v2/library/oci-single/blobs/{layer.digest}", public
    )
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"

    mark = upstream_registry.mark()
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice-warm", creds=ALICE) == secret.digest
    assert [r for r in upstream_registry.requests(mark) if r.method == "GET" and r.kind != "base"] == []


def test_proxy_authentication_keeps_strangers_out(
    images: ImageSet, regcache_with: Callable[..., Mitmdump], skopeo_factory: Callable[..., Skopeo], tmp_path: Path
) -> None:
    """mitmproxy's proxy auth in front of the cache: without the proxy password, nothing."""
    regcache = regcache_with(options={"proxyauth": "ci:proxy-secret"})
    member_url = regcache.url.replace("http://", "http://ci:proxy-secret@")
    member = skopeo_factory(member_url, regcache.ca_cert)
    assert member.copy_to_dir(images.oci_single.ref, tmp_path / "member") == images.oci_single.digest
    stranger = skopeo_factory(regcache.url, regcache.ca_cert)
    with pytest.raises(Exception, match="Proxy Authentication Required"):
        stranger.copy_to_dir(images.oci_single.ref, tmp_path / "stranger")


@dataclass
class BasicAuthUpstream:
    registry: Registry
    cdn: Cdn

    def hostmap(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "registry-1.docker.io": self.registry.url, "production.cloudflare.docker.com": self.cdn.url}


@pytest.fixture
def basic_auth_upstream(tmp_path: Path, token_server: TokenServer) -> Iterator[BasicAuthUpstream]:
    """A registry with basic (htpasswd) auth, and its own CDN: nothing readable without alice's password."""
    htpasswd = tmp_path / "htpasswd"
    user, password = ALICE.split(":")
    entry = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True)
    htpasswd.write_text(entry.stdout)
    registry = Registry(tmp_path / "htpasswd-registry", token_server, htpasswd=htpasswd)
    registry.start()
    cdn = Cdn(registry.storage_root)
    cdn.start()
    yield BasicAuthUpstream(registry, cdn)
    cdn.stop()
    registry.close()


def test_htpasswd_registry_private_content(
    basic_auth_upstream: BasicAuthUpstream,
    bed_hostmap: dict[str, str],
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    tmp_path: Path,
) -> None:
    upstream = basic_auth_upstream.registry
    image = push_variant(upstream, tmp_path / "push", "library/team-app", "1", seed="team")
    regcache = regcache_with(upstreams=basic_auth_upstream.hostmap(bed_hostmap))
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    assert skopeo.copy_to_dir(image.ref, tmp_path / "alice", creds=ALICE) == image.digest

    for name, creds in (("anonymous", None), ("wrong-password", "alice:guess")):
        with pytest.raises(Exception, match=r"unauthorized|401"):
            skopeo.copy_to_dir(image.ref, tmp_path / name, creds=creds)
    layer_url = f"https://registry-1.docker.io/v2/{image.repo}/blobs/{image.layers[-1].digest}"
    status, headers, _ = request_through(regcache, layer_url)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic")

    mark = upstream.mark()
    assert skopeo.copy_to_dir(image.ref, tmp_path / "alice-warm", creds=ALICE) == image.digest
    assert [r for r in upstream.requests(mark) if r.method == "GET" and r.kind != "base"] == []
    # alice's Basic credentials went to the registry only, never to the CDN it redirects to.
    assert basic_auth_upstream.cdn.requests()
    assert not any(r.has_authorization for r in basic_auth_upstream.cdn.requests())
