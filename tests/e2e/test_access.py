"""Private images stay private: cached content only for clients the upstream authorises.

The bed's token server makes `library/secret` readable by alice only (Docker-Hub-style token auth);
every other repository stays public.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.images import ImageSet, PushedImage, push_variant
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import Policy, TokenServer

from .test_pull import request_through

ALICE, BOB = "alice:alice-password", "bob:bob-password"


def private_to_alice(token_server: TokenServer, repo: str) -> None:
    """alice and bob are users; `repo` is readable by alice only (until the test ends)."""
    token_server.policy = Policy(users=dict(pair.split(":") for pair in (ALICE, BOB)), private_repos={repo: {"alice"}})


@pytest.fixture
def secret(upstream_registry: Registry, token_server: TokenServer, bed_workdir: Path) -> PushedImage:
    image = push_variant(upstream_registry, bed_workdir / "secret", "library/secret", "1", seed="secret")
    private_to_alice(token_server, image.repo)
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
    cdn_mark = cdn.mark()
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice-cold", creds=ALICE) == secret.digest
    assert not any(r.has_authorization for r in cdn.requests(cdn_mark)), "registry credentials reached the CDN"

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
class OtherUpstream:
    """A second registry (own storage, own CDN) for set-ups the shared bed registry does not have."""

    registry: Registry
    cdn: Cdn

    def hostmap(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "registry-1.docker.io": self.registry.url, "production.cloudflare.docker.com": self.cdn.url}


@pytest.fixture
def other_upstream(tmp_path: Path, token_server: TokenServer) -> Iterator[Callable[..., OtherUpstream]]:
    """``start(**registry_options)``, e.g. ``htpasswd=FILE`` or ``realm=URL``."""
    started: list[OtherUpstream] = []

    def start(**options: object) -> OtherUpstream:
        registry = Registry(tmp_path / f"registry{len(started)}", token_server, **options)  # type: ignore[arg-type]
        registry.start()
        cdn = Cdn(registry.storage_root)
        cdn.start()
        started.append(OtherUpstream(registry, cdn))
        return started[-1]

    yield start
    for upstream in started:
        upstream.cdn.stop()
        upstream.registry.close()


@pytest.fixture
def basic_auth_upstream(tmp_path: Path, other_upstream: Callable[..., OtherUpstream]) -> OtherUpstream:
    """A registry with basic (htpasswd) auth: nothing readable without alice's password."""
    htpasswd = tmp_path / "htpasswd"
    user, password = ALICE.split(":")
    entry = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True)
    htpasswd.write_text(entry.stdout)
    return other_upstream(htpasswd=htpasswd)


def test_htpasswd_registry_private_content(
    basic_auth_upstream: OtherUpstream,
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


def alice_password_file(tmp_path: Path) -> dict[str, dict[str, str]]:
    secret_file = tmp_path / "alice.password"
    secret_file.write_text(ALICE.split(":")[1] + "\n")
    return {"registry-1.docker.io": {"username": "alice", "password_file": str(secret_file)}}


def test_configured_credentials_pull_private_images_for_anonymous_clients(
    secret: PushedImage,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    token_server: TokenServer,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    regcache = regcache_with(credentials=alice_password_file(tmp_path))
    mark, cdn_mark = token_server.mark(), cdn.mark()
    anonymous = skopeo_factory(regcache.url, regcache.ca_cert)
    assert anonymous.copy_to_dir(secret.ref, tmp_path / "pulled") == secret.digest
    assert {r.user for r in token_server.requests(mark)} == {"alice"}  # regcache asked, as alice
    assert not any(r.has_authorization for r in cdn.requests(cdn_mark))
    assert "alice-password" not in regcache.log()


def test_configured_credentials_never_go_to_a_realm_on_another_domain(
    secret: PushedImage,
    other_upstream: Callable[..., OtherUpstream],
    bed_hostmap: dict[str, str],
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    """registry-1.docker.io sends clients to a realm on example.org: alice's password stays home."""
    foreign = other_upstream(realm="https://auth.example.org/token")
    image = push_variant(foreign.registry, tmp_path / "push", "library/secret", "1", seed="elsewhere")
    upstreams = {**foreign.hostmap(bed_hostmap), "auth.example.org": token_server.url}
    regcache = regcache_with(upstreams=upstreams, credentials=alice_password_file(tmp_path))
    mark = token_server.mark()
    with pytest.raises(Exception, match=r"unauthorized|401|denied"):
        skopeo_factory(regcache.url, regcache.ca_cert).copy_to_dir(image.ref, tmp_path / "pulled")
    assert not any(r.has_authorization for r in token_server.requests(mark))
    assert "not sending registry-1.docker.io's credentials to the auth realm" in regcache.log()


def test_hostile_requests_get_clear_errors(regcache: Mitmdump, proxy_confdir: Path) -> None:
    """Traversal, bad digests and oversized headers: an error, never a traceback or a 500."""
    base = "https://registry-1.docker.io/v2"
    status, _, body = request_through(regcache, f"{base}/library/..%2F..%2Fetc/manifests/latest")
    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
    status, _, body = request_through(regcache, f"{base}/library/x/blobs/sha256:abc")
    assert (status, json.loads(body)["errors"][0]["code"]) == (400, "DIGEST_INVALID")
    status, _, _ = request_through(regcache, f"{base}/library/x/manifests/1", {"X-Junk": "j" * 300_000})
    assert 400 <= status < 500
    # The CA's private key is the proxy's alone.
    assert (proxy_confdir / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0


def test_a_stranger_cannot_join_a_running_fill_of_a_private_blob(
    images: ImageSet,
    regcache: Mitmdump,
    token_server: TokenServer,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    """alice's fill of a private 100 MB layer is running (a throttled CDN): bob's request for the
    same digest is checked upstream before it may follow the fill, and refused."""
    image = images.big
    private_to_alice(token_server, image.repo)
    layer = max(image.layers, key=lambda blob: blob.size)
    url = f"https://registry-1.docker.io/v2/{image.repo}/blobs/{layer.digest}"

    def token(pair: str) -> dict[str, str]:
        scope = f"service=registry.docker.io&scope=repository:{image.repo}:pull"
        basic = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        status, _, body = request_through(regcache, f"https://auth.docker.io/token?{scope}", basic)
        assert status == 200, body
        return {"Authorization": f"Bearer {json.loads(body)['token']}"}

    alice, bob = token(ALICE), token(BOB)
    cdn.throttle(25 * 10**6)  # ~4 s for the layer
    staging = regcache.workdir / "cache" / "staging"
    with ThreadPoolExecutor(max_workers=1) as pool:
        pulled = pool.submit(request_through, regcache, url, alice)
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size >= 10**6 for p in staging.glob("fill-*")):
            assert time.monotonic() < deadline and not pulled.done(), "alice's fill did not start"
            time.sleep(0.05)
        mark = len(regcache.log())
        status, _, body = request_through(regcache, url, bob)
        assert not pulled.done(), "the fill ended before bob asked: nothing was joined"
        assert (status, json.loads(body)["errors"][0]["code"]) == (401, "UNAUTHORIZED")
        assert "joined a running fill" not in regcache.log()[mark:]
        status, _, data = pulled.result()
    assert status == 200 and "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
