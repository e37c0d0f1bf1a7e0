"""regcache as a plain-HTTP registry mirror: real dockerd (`--registry-mirror`, no proxy, no CA),
skopeo, and the mirror's own rules (token relay, `?ns=`, read-only, unknown registries).

Without a proxy the bed's Docker Hub names do not resolve here, so a pull that works went through
the mirror (dockerd's fallback to the registry itself would fail).
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.dockerd import CTR, Dockerd
from bed.images import ImageSet, PushedImage
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo

from regcache.store.disk import DiskStore

from .test_access import ALICE, BOB, secret  # noqa: F401 - the fixture
from .test_pull import assert_stored


def mirror_lines(proxy: Mitmdump, since: int) -> list[tuple[str, str, str]]:
    """(result, method, what) of every mirror request logged since `since`."""
    found = re.finditer(r"\] (\w+) (GET|HEAD|POST) (\S+) .*\(mirror", proxy.log()[since:])
    return [(m[1], m[2], m[3]) for m in found]


def plain(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request straight to the mirror (no proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method=method, headers=headers or {}), timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def mirror_ref(mirror: str, image: PushedImage) -> str:
    return f"{mirror.removeprefix('http://')}/{image.ref}"


def test_dockerd_pulls_through_the_mirror_without_proxy_or_ca(
    images: ImageSet,
    regcache: Mitmdump,
    store: DiskStore,
    dockerd_factory: Callable[..., Dockerd],
    upstream_registry: Registry,
    cdn: Cdn,
) -> None:
    image = images.docker_multi
    mirror = regcache.mirror_url()
    daemon = dockerd_factory(None, None, extra_args=("--registry-mirror", mirror))
    mark, cdn_mark = regcache.mark(), cdn.mark()
    daemon.pull(image.ref)
    assert daemon.image_id(image.ref) == image.config.digest
    served = mirror_lines(regcache, mark)
    assert ("PASS", "GET", "token") in served, "dockerd got its token through the mirror"
    assert {what for result, _, what in served if result == "MISS"} >= {
        f"docker.io/{image.repo}@{blob.digest}" for blob in image.layers
    }
    assert_stored(store, image)
    fetched = [r.digest for r in cdn.requests(cdn_mark)]
    assert len(fetched) == len(set(fetched))  # each blob once from upstream

    daemon.rmi(image.ref)
    mark, upstream_mark, cdn_mark = regcache.mark(), upstream_registry.mark(), cdn.mark()
    daemon.pull(image.ref)
    assert daemon.image_id(image.ref) == image.config.digest
    assert cdn.requests(cdn_mark) == []
    assert upstream_registry.manifest_gets(upstream_mark) == 0  # the tag revalidated by a HEAD
    assert upstream_registry.blob_requests(upstream_mark) == 0
    results = {what: result for result, _, what in mirror_lines(regcache, mark)}
    assert results[f"docker.io/{image.ref}"] == "REVALIDATED"
    layer = image.layers[0]
    assert results[f"docker.io/{image.repo}@{layer.digest}"] == "HIT"


def test_skopeo_pulls_every_platform_from_the_mirror_then_from_the_store(
    images: ImageSet, regcache: Mitmdump, skopeo_factory: Callable[..., Skopeo], cdn: Cdn, tmp_path: Path
) -> None:
    image = images.oci_multi
    ref = mirror_ref(regcache.mirror_url(), image)
    skopeo = skopeo_factory(None)
    cdn_mark = cdn.mark()
    assert skopeo.copy_to_dir(ref, tmp_path / "cold", all_platforms=True, tls_verify=False) == image.digest
    fetched = [r.digest for r in cdn.requests(cdn_mark)]
    assert fetched and len(fetched) == len(set(fetched))
    cdn_mark = cdn.mark()
    assert skopeo.copy_to_dir(ref, tmp_path / "warm", all_platforms=True, tls_verify=False) == image.digest
    assert cdn.requests(cdn_mark) == []
    for blob in image.blobs:
        assert (tmp_path / "warm" / blob.digest.partition(":")[2]).stat().st_size == blob.size


def test_skopeo_takes_the_mirror_from_registries_conf(
    images: ImageSet, regcache: Mitmdump, skopeo_factory: Callable[..., Skopeo], tmp_path: Path
) -> None:
    """podman, skopeo, buildah: `[[registry.mirror]]`; Docker Hub itself is unreachable here.
    (skopeo 1.9 reads only /etc/containers/registries.conf or `--registries-conf`.)"""
    skopeo = skopeo_factory(None)
    mirror = regcache.mirror_url().removeprefix("http://")
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nlocation = "docker.io"\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
    )
    image = images.docker_multi
    mark = regcache.mark()
    copied = skopeo.copy_to_dir(f"docker://docker.io/{image.ref}", tmp_path / "x", registries_conf=conf)
    assert copied == image.amd64_digest
    assert ("MISS", "GET", f"docker.io/{image.ref}") in mirror_lines(regcache, mark)


def test_private_image_through_the_mirror_needs_the_owners_credentials(
    secret: PushedImage,  # noqa: F811 - the fixture
    regcache: Mitmdump,
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    tmp_path: Path,
) -> None:
    """Token requests go through the mirror's relay with the client's password; the cache serves
    the stored image again to alice only, also while the registry is down."""
    ref = mirror_ref(regcache.mirror_url(), secret)
    skopeo = skopeo_factory(None)
    assert skopeo.copy_to_dir(ref, tmp_path / "alice", creds=ALICE, tls_verify=False) == secret.digest
    for name, creds in (("anonymous", None), ("bob", BOB)):
        with pytest.raises(Exception, match=r"unauthorized|denied|401|403"):
            skopeo.copy_to_dir(ref, tmp_path / name, creds=creds, tls_verify=False)
    mark = upstream_registry.mark()
    assert skopeo.copy_to_dir(ref, tmp_path / "alice-warm", creds=ALICE, tls_verify=False) == secret.digest
    assert [r for r in upstream_registry.requests(mark) if r.method == "GET" and r.kind != "base"] == []

    # The registry down: still alice's only (her password was accepted for it through the relay).
    upstream_registry.stop()
    assert skopeo.copy_to_dir(ref, tmp_path / "alice-down", creds=ALICE, tls_verify=False) == secret.digest
    for name, creds in (("anonymous-down", None), ("bob-down", BOB)):
        with pytest.raises(Exception, match=r"503|unauthorized|denied"):
            skopeo.copy_to_dir(ref, tmp_path / name, creds=creds, tls_verify=False)


def test_mirror_protocol_rules(images: ImageSet, regcache: Mitmdump) -> None:
    mirror = regcache.mirror_url()
    manifest = f"{mirror}/v2/{images.oci_single.repo}/manifests/{images.oci_single.tag}"

    # The challenge points at the mirror's token relay, which hands out the registry's own token.
    status, headers, _ = plain(manifest + "?ns=docker.io")
    assert status == 401
    realm = re.search(r'realm="([^"]+)"', headers["WWW-Authenticate"])
    assert realm is not None and realm[1] == f"{mirror}/_token/https/auth.docker.io/token"
    status, _, body = plain(f"{realm[1]}?service=registry.docker.io&scope=repository:{images.oci_single.repo}:pull")
    assert status == 200
    token = json.loads(body)["token"]
    # Behind a TLS front end the realm must be https, or clients would send credentials in clear.
    _, headers, _ = plain(manifest, headers={"X-Forwarded-Proto": "https"})
    assert 'realm="https://127.0.0.1:' in headers["WWW-Authenticate"]
    accept = images.oci_single.media_type
    status, headers, body = plain(manifest, headers={"Authorization": f"Bearer {token}", "Accept": accept})
    assert status == 200 and headers["Docker-Content-Digest"] == images.oci_single.digest
    assert headers["X-Cache"] == "MISS"

    def error(url: str, method: str = "GET") -> tuple[int, str]:
        status, _, body = plain(url, method)
        return status, json.loads(body)["errors"][0]["code"]

    assert error(manifest + "?ns=registry.example") == (404, "NAME_UNKNOWN")  # not a cached registry
    assert error(f"{mirror}/_token/https/attacker.example/token") == (404, "NAME_UNKNOWN")  # not a realm
    assert error(f"{mirror}/_token/https/auth.docker.io:8443/token") == (404, "NAME_UNKNOWN")  # another port
    assert error(f"{mirror}/_token/https/auth.docker.io/v2/x/blobs/uploads/", "POST") == (404, "NAME_UNKNOWN")
    assert error(f"{mirror}/v2/{images.oci_single.repo}/blobs/uploads/", "POST") == (405, "UNSUPPORTED")
    assert error(f"{mirror}/v2/Bad/manifests/1") == (400, "NAME_INVALID")


def test_offline_replay_through_the_mirror(
    images: ImageSet,
    regcache: Mitmdump,
    skopeo_factory: Callable[..., Skopeo],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    dockerd_factory: Callable[..., Dockerd],
) -> None:
    image = images.oci_single
    skopeo = skopeo_factory(None)
    digest = skopeo.copy_to_dir(mirror_ref(regcache.mirror_url(), image), regcache.workdir / "x", tls_verify=False)
    assert digest == image.digest
    regcache.stop()
    upstream_gone()
    offline = offline_regcache(regcache.workdir / "cache")
    daemon = dockerd_factory(None, None, extra_args=("--registry-mirror", offline.mirror_url()))
    daemon.pull(image.ref)
    assert daemon.image_id(image.ref) == image.config.digest


def test_containerd_hosts_toml_mirror_for_another_registry_by_ns(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    bed_hostmap: dict[str, str],
    dockerd_factory: Callable[..., Dockerd],
    tmp_path: Path,
) -> None:
    """containerd names the registry with `?ns=`: one mirror port serves every cached registry."""
    other = "registry.bed.test"
    regcache = regcache_with(
        registries={"registry-1.docker.io": "docker.io", other: other},
        upstreams={**bed_hostmap, other: bed_hostmap["registry-1.docker.io"]},
    )
    mirror = regcache.mirror_url()
    hosts = tmp_path / "hosts" / other
    hosts.mkdir(parents=True)
    hosts_toml = f'server = "https://{other}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    (hosts / "hosts.toml").write_text(hosts_toml)
    daemon = dockerd_factory(None, None)  # for its containerd
    image = images.oci_single
    mark = regcache.mark()
    command = [CTR, "--address", str(daemon.containerd_socket), "--namespace", "regcache-test"]
    pulled = subprocess.run(
        [*command, "images", "pull", "--hosts-dir", str(tmp_path / "hosts"), f"{other}/{image.ref}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert pulled.returncode == 0, pulled.stderr
    listed = subprocess.run([*command, "images", "ls"], capture_output=True, text=True, timeout=30, check=True)
    assert image.digest in listed.stdout
    served = {what: result for result, _, what in mirror_lines(regcache, mark)}
    assert served[f"{other}/{image.ref}"] == "MISS"
    assert {f"{other}/{image.repo}@{blob.digest}" for blob in image.blobs} <= set(served)
