"""The registry mirror's pure parts: which registry, which URL, challenges and the token relay;
and its configuration (`mirrors`)."""

from pathlib import Path

import pytest
from multidict import MultiDict, MultiDictProxy

from regcache.config import ConfigError, Settings, load_settings
from regcache.fronts.mirror import mirror_base, mirrored_challenge, realm_of, target_registry, token_path, upstream_url


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "regcache.yaml"
    path.write_text(text)
    return str(path)


def test_ns_names_another_cached_registry() -> None:
    settings = Settings()
    assert target_registry(settings, "registry-1.docker.io", None) == "registry-1.docker.io"
    assert target_registry(settings, "registry-1.docker.io", "docker.io") == "registry-1.docker.io"
    assert target_registry(settings, "registry-1.docker.io", "ghcr.io") == "ghcr.io"
    assert target_registry(settings, "registry-1.docker.io", "GHCR.IO") == "ghcr.io"
    assert target_registry(settings, "registry-1.docker.io", "evil.example") is None


def test_upstream_url_drops_only_ns() -> None:
    query = MultiDictProxy(MultiDict([("ns", "docker.io"), ("n", "10"), ("last", "a b")]))
    url = upstream_url("registry-1.docker.io", "/v2/library/alpine/tags/list", query)
    assert url == "https://registry-1.docker.io/v2/library/alpine/tags/list?n=10&last=a+b"
    assert upstream_url("ghcr.io", "/v2/", MultiDictProxy(MultiDict())) == "https://ghcr.io/v2/"


def test_challenge_realm_moves_behind_the_mirror_and_back() -> None:
    header = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull"'
    mirrored = mirrored_challenge(header, "http://127.0.0.1:5055")
    assert mirrored == (
        'Bearer realm="http://127.0.0.1:5055/_token/https/auth.docker.io/token",'
        'service="registry.docker.io",scope="repository:a/b:pull"'
    )
    assert (
        realm_of("/_token/https/auth.docker.io/token", "service=x&scope=y")
        == "https://auth.docker.io/token?service=x&scope=y"
    )
    assert token_path("http://127.0.0.1:8080/auth?x=1") == "/_token/http/127.0.0.1:8080/auth?x=1"
    assert realm_of("/_token/http/127.0.0.1:8080/auth", "x=1&scope=s") == "http://127.0.0.1:8080/auth?x=1&scope=s"
    assert mirrored_challenge('Basic realm="registry"', "http://m") == 'Basic realm="registry"'
    assert mirrored_challenge('Bearer realm="ftp://x/token"', "http://m") == 'Bearer realm="ftp://x/token"'


@pytest.mark.parametrize("path", ["/_token/", "/_token/ftp/x/token", "/_token/https/host", "/_token/https//token"])
def test_token_paths_that_name_no_realm(path: str) -> None:
    assert realm_of(path, "") is None


def test_mirror_base_is_what_the_client_addressed() -> None:
    assert mirror_base("127.0.0.1:5055", ("0.0.0.0", 5055)) == "http://127.0.0.1:5055"
    assert mirror_base("cache.lan:5055", ("0.0.0.0", 5055)) == "http://cache.lan:5055"
    assert mirror_base('x" evil="y', ("127.0.0.1", 5055)) == "http://127.0.0.1:5055"  # no header injection
    assert mirror_base(None, ("::1", 5055)) == "http://[::1]:5055"
    assert mirror_base("cache.lan", ("0.0.0.0", 5055), "https") == "https://cache.lan"
    assert mirror_base("cache.lan", ("0.0.0.0", 5055), "gopher") == "http://cache.lan"


def test_mirrors_config(tmp_path: Path) -> None:
    assert load_settings(None).mirrors == {"registry-1.docker.io": ("127.0.0.1", 5055)}
    text = "mirrors: {docker.io: 127.0.0.1:5000, ghcr.io: '0.0.0.0:5001', quay.io: off}"
    assert load_settings(write(tmp_path, text)).mirrors == {
        "registry-1.docker.io": ("127.0.0.1", 5000),
        "ghcr.io": ("0.0.0.0", 5001),
    }
    assert load_settings(write(tmp_path, "mirrors: {}")).mirrors == {}
    # Docker Hub not cached: no default mirror for it.
    assert load_settings(write(tmp_path, "registries: [ghcr.io]")).mirrors == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mirrors: [docker.io]", "mirrors: expected a map registry"),
        ("mirrors: {example.com: 127.0.0.1:5000}", "mirrors.example.com: not a registry regcache caches"),
        ("mirrors: {docker.io: 5000}", "mirrors.docker.io: expected HOST:PORT"),
        ("mirrors: {docker.io: 127.0.0.1:5000, ghcr.io: 127.0.0.1:5000}", "mirrors.ghcr.io: 127.0.0.1:5000 is already"),
        ("mirrors: {docker.io: 127.0.0.1:5000, registry-1.docker.io: 127.0.0.1:5001}", "mirrors.registry-1.docker.io"),
    ],
)
def test_bad_mirrors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_settings(write(tmp_path, text))
