"""YAML configuration: defaults, parsing, and errors that name the key."""

from pathlib import Path

import pytest

from regcache.config import (
    DEFAULT_REGISTRIES,
    ConfigError,
    Credential,
    Settings,
    Upstream,
    load_settings,
    parse_duration,
    parse_size,
)
from regcache.oci.auth import registrable_domain


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "regcache.yaml"
    path.write_text(text)
    return str(path)


def test_no_file_is_all_defaults() -> None:
    settings = load_settings(None)
    assert settings.size_limit == 50 * 1024**3
    assert settings.namespace_for("registry-1.docker.io") == "docker.io"
    assert settings.namespace_for("index.docker.io") == "docker.io"
    assert settings.namespace_for("example.com") is None
    assert set(settings.registries) == set(DEFAULT_REGISTRIES)


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")).size_limit == 50 * 1024**3


@pytest.mark.parametrize(
    ("text", "size"),
    [("50GiB", 50 * 1024**3), ("500 MB", 500 * 10**6), ("1.5g", 1_500_000_000), (4096, 4096), ("10kib", 10240)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size("size_limit", text) == size


def test_full_config(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            """
cache_dir: /srv/regcache
size_limit: 2GiB
registries: [registry-1.docker.io, registry.example.com]
upstreams:
  registry-1.docker.io: http://127.0.0.1:5000
  auth.docker.io: https://mirror.internal:8443/auth
upstream_timeout: 5
blob_listen: 0.0.0.0:5080
blob_url: http://cache.internal:5080/
""",
        )
    )
    assert settings.blob_redirect
    assert settings.blob_listen == ("0.0.0.0", 5080)
    assert settings.blob_url == "http://cache.internal:5080"
    assert settings.cache_dir == Path("/srv/regcache")
    assert settings.size_limit == 2 * 1024**3
    assert settings.registries == {"registry-1.docker.io": "docker.io", "registry.example.com": "registry.example.com"}
    assert settings.upstreams["registry-1.docker.io"] == Upstream("http", "127.0.0.1", 5000)
    assert settings.upstreams["auth.docker.io"] == Upstream("https", "mirror.internal", 8443, "/auth")
    assert settings.intercepts("auth.docker.io")
    assert not settings.intercepts("example.org")
    assert settings.upstream_timeout == 5.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("cache_dri: /x", "cache_dri"),
        ("size_limit: 50 gigs", "size_limit"),
        ("size_limit: -1", "size_limit"),
        ("size_limit: true", "size_limit"),
        ("registries: docker.io", "registries"),
        ("registries: ['bad host']", "registries[0]"),
        ("upstreams: {registry-1.docker.io: ftp://x}", "upstreams.registry-1.docker.io"),
        ("upstreams: [a]", "upstreams"),
        ("upstream_timeout: soon", "upstream_timeout"),
        ("header_timeout: 0", "header_timeout"),
        ("idle_timeout: 1m", "idle_timeout"),
        ("max_age: forever", "max_age"),
        ("max_age: -1", "max_age"),
        ("offline: yes please", "offline"),
        ("blob_redirect: 1", "blob_redirect"),
        ("blob_listen: 127.0.0.1", "blob_listen"),
        ("blob_listen: '0.0.0.0:http'", "blob_listen"),
        ("blob_url: cache.example:5080", "blob_url"),
        ("blob_url: http://cache.example/?x=1", "blob_url"),
        ("upstreams: {registry-1.docker.io: 'http://[::1'}", "upstreams.registry-1.docker.io"),
        ("blob_url: 'http://[::1'", "blob_url"),
        ("blob_listen: '[::1:5080'", "blob_listen"),
        ("metrics_listen: '[::1'", "metrics_listen"),
        ("mirrors: {docker.io: '[::1'}", "mirrors.docker.io"),
        ("platforms: linux/amd64", "platforms"),
        ("platforms: []", "platforms"),
        ("platforms: [linux/amd64, linux]", "platforms[1]"),
        ("platforms: [Linux/AMD64]", "platforms[0]"),
        ("[1, 2]", "regcache_config"),
        ("a: [", "regcache_config"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{key}: ")


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "regcache.yaml"
    path.write_bytes("cache_dir: /srv/caché\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^regcache_config: {path} is not UTF-8 text \(byte 20: "):
        load_settings(str(path))
    (tmp_path / "pw").write_bytes(b"\xff\xfe")
    credentials = f"credentials: {{ghcr.io: {{username: bot, password_file: {tmp_path / 'pw'}}}}}"
    with pytest.raises(ConfigError, match=r"^credentials.ghcr.io.password_file: .* is not UTF-8 text"):
        load_settings(write(tmp_path, credentials))


@pytest.mark.parametrize(
    ("text", "platforms"),
    [
        ("", "auto"),
        ("platforms: all", "all"),
        ("platforms: [linux/amd64, linux/arm64/v8]", ("linux/amd64", "linux/arm64/v8")),
    ],
)
def test_platforms(tmp_path: Path, text: str, platforms: object) -> None:
    assert load_settings(write(tmp_path, text)).platforms == platforms


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="regcache_config: cannot read"):
        load_settings(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800.0), ("12h", 43200.0), ("30m", 1800.0), ("90s", 90.0), ("2w", 1209600.0), (0, 0.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration("max_age", text) == seconds


def test_max_age_defaults_to_a_week() -> None:
    assert load_settings(None).max_age == 7 * 86400


def test_registry_with_a_port_matches_that_port(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "registries: [registry.local:5000, plain.example]"))
    assert settings.namespace_for("registry.local", 5000) == "registry.local:5000"
    assert settings.namespace_for("registry.local", 443) is None
    assert settings.namespace_for("plain.example", 443) == settings.namespace_for("plain.example") == "plain.example"
    # A plain host is that host on HTTPS's default port only: another port is another registry.
    assert settings.namespace_for("plain.example", 8443) is None
    assert settings.namespace_for("plain.example", 80) is None
    assert settings.intercepts("registry.local", 5000)
    hub = "registry-1.docker.io"
    defaults = Settings(credentials={hub: Credential("ci", "pw")}, upstreams={hub: Upstream("http", "127.0.0.1", 5000)})
    found = lambda port: (  # noqa: E731
        defaults.namespace_for(hub, port), defaults.credential_for(hub, port), defaults.upstream_for(hub, port)
    )
    for port in (None, 443):
        assert None not in found(port)
    for port in (80, 5000, 8443):
        assert found(port) == (None, None, None) and not defaults.intercepts(hub, port)


def test_credentials_inline_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setenv("REGCACHE_TEST_TOKEN", "from-env")
    settings = load_settings(
        write(
            tmp_path,
            f"""
credentials:
  registry-1.docker.io: {{username: ci, password: inline}}
  ghcr.io: {{username: bot, password_file: {tmp_path / "pw"}}}
  quay.io: {{token_env: REGCACHE_TEST_TOKEN}}
""",
        )
    )
    assert settings.credential_for("registry-1.docker.io") == Credential("ci", "inline")
    assert settings.credential_for("ghcr.io") == Credential("bot", "from-file")
    assert settings.credential_for("quay.io") == Credential("", "from-env")
    assert "inline" not in repr(settings) and "from-file" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("credentials: {ghcr.io: {username: a}}", "credentials.ghcr.io"),
        ("credentials: {ghcr.io: {username: a, password: b, password_env: C}}", "credentials.ghcr.io.password_env"),
        ("credentials: {ghcr.io: {password_env: REGCACHE_UNSET_VARIABLE}}", "credentials.ghcr.io.password_env"),
        ("credentials: {ghcr.io: {user: a}}", "credentials.ghcr.io.user"),
        ("credentials: {ghcr.io: {username: a, password_file: /nonexistent/pw}}", "credentials.ghcr.io.password_file"),
    ],
)
def test_bad_credentials_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert raised.value.key == key


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("auth.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("registry.example.co.uk", "example.co.uk"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_registrable_domain(host: str, domain: str) -> None:
    assert registrable_domain(host) == domain


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("metrics_listen: 127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("metrics_listen: '[::1]:0'", ("::1", 0)),
        ("metrics_listen: localhost:9464", ("localhost", 9464)),
        ("metrics_listen: off", None),  # YAML's boolean false
        ("metrics_listen: 'off'", None),
        ("metrics_listen: ''", None),
    ],
)
def test_metrics_listen(tmp_path: Path, text: str, listen: tuple[str, int] | None) -> None:
    assert load_settings(write(tmp_path, text)).metrics_listen == listen


def test_metrics_listen_defaults_to_loopback() -> None:
    assert load_settings(None).metrics_listen == ("127.0.0.1", 9464)


@pytest.mark.parametrize("value", ["9464", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "a b:1", "true"])
def test_bad_metrics_listen_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics_listen: expected HOST:PORT such as 127\.0\.0\.1:9464, or off"):
        load_settings(write(tmp_path, f"metrics_listen: {value}"))


def test_the_example_configuration_is_valid_and_says_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "regcache.example.yaml"
    assert load_settings(str(example)) == load_settings(None)
