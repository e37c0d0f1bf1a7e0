"""The `shared` configuration section, and the pure parts of the shared store (key layout, part
sizes, SigV4, ListMultipartUploads parsing, the breaker). The engines: tests/e2e/test_shared_backends.py."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest

from regcache.config import (
    ConfigError,
    SharedSettings,
    load_settings,
    parse_shared,
    settings_from_mapping,
    unprotected_redis,
)
from regcache.store.shared.errors import Breaker, RedisUnavailable, SharedUnavailable
from regcache.store.shared.s3 import MiB, digest_of_key, object_key, part_size
from regcache.store.shared.sigv4 import SigV4, parse_uploads

S3 = {"endpoint": "http://s3.internal:7480", "bucket": "regcache", "access_key": "AK", "secret_key": "SK"}
DIGEST = "sha256:" + "ab" * 32
BLOB_URL = "http://cache-a.internal:5080"
ACCESS_SECRET = "the-clusters-access-secret-0123456789"
ACCESS = {"access_secret_env": "I16_ACCESS_SECRET"}


@pytest.fixture(autouse=True)
def access_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I16_ACCESS_SECRET", ACCESS_SECRET)


def shared(**changes: object) -> SharedSettings:
    raw: dict[str, object] = {"s3": dict(S3), "redis": "redis://redis.internal:6379/0", **ACCESS, **changes}
    return parse_shared("shared", raw, max_age=3600.0)


def test_without_shared_nothing_changes(tmp_path: Path) -> None:
    assert load_settings(None).shared is None
    path = tmp_path / "regcache.yaml"
    path.write_text("size_limit: 1GiB\n")
    assert load_settings(str(path)).shared is None


def test_the_issue_example_parses_with_its_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secret").write_text("the-secret-key\n")
    monkeypatch.setenv("I16_ACCESS", "the-access-key")
    path = tmp_path / "regcache.yaml"
    path.write_text(
        f"""
max_age: 2d
blob_url: http://cache-a.internal:5080
shared:
  node: cache-a
  s3:
    endpoint: http://S3.internal:7480/
    bucket: regcache
    access_key_env: I16_ACCESS
    secret_key_file: {tmp_path / "secret"}
  redis: redis://redis.internal:6379/0
  access_secret_file: {tmp_path / "access"}
"""
    )
    (tmp_path / "access").write_text(ACCESS_SECRET + "\n")
    settings = load_settings(str(path)).shared
    assert settings is not None
    s3 = settings.s3
    assert (s3.endpoint, s3.bucket, s3.region, s3.prefix) == ("http://s3.internal:7480", "regcache", "us-east-1", "")
    assert (s3.access_key, s3.secret_key) == ("the-access-key", "the-secret-key")
    assert (s3.redirect, s3.presign_seconds, s3.proxy) == (True, 1200.0, None)
    assert (settings.redis.url, settings.redis.prefix, settings.redis.timeout) == (
        "redis://redis.internal:6379/0", "regcache:", 2.0)  # fmt: skip
    assert (settings.node, settings.max_age, settings.size_limit) == ("cache-a", 2 * 86400, None)
    assert "the-secret-key" not in repr(settings) and "the-access-key" not in repr(settings)
    assert settings.access_secret == ACCESS_SECRET.encode() and ACCESS_SECRET not in repr(settings)


def test_without_an_access_secret_it_is_derived_from_the_s3_secret_key() -> None:
    """The same on every node that has the S3 key, another for another key, and neither the key itself."""

    def derived(secret_key: str) -> bytes:
        raw = {"s3": {**S3, "secret_key": secret_key}, "redis": "redis://r"}
        return parse_shared("shared", raw, max_age=0).access_secret

    first = derived("s3-secret-one")
    assert first == derived("s3-secret-one") and first != derived("s3-secret-two")
    assert len(first) >= 32 and b"s3-secret-one" not in first


def test_the_access_secret_is_long_and_read_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """Never from Redis, never inline: one line naming the key when it is short or unreadable."""
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"access_secret_env": "I16_UNSET_VARIABLE"}, "shared.access_secret_env", "is not set"),
        ({"access_secret_env": None, "access_secret_file": str(tmp_path / "none")}, "shared.access_secret_file",
         "cannot read"),
        ({"access_secret_env": None, "access_secret_file": str(tmp_path / "short")}, "shared.access_secret_file",
         "at least 32 characters, got 5"),
        ({"access_secret": ACCESS_SECRET}, "shared.access_secret", "unknown key"),
        ({"access_secret_file": str(tmp_path / "short")}, "shared.access_secret_env", "give only one"),
    ]  # fmt: skip
    (tmp_path / "short").write_text("short\n")
    for changes, key, message in cases:
        raw = {"s3": dict(S3), "redis": "redis://r", **ACCESS, **changes}
        with pytest.raises(ConfigError) as err:
            parse_shared("shared", {k: v for k, v in raw.items() if v is not None}, max_age=0)
        assert (err.value.key, message in str(err.value)) == (key, True), str(err.value)


@pytest.mark.parametrize(
    ("redis", "unprotected"),
    [
        ("redis://redis.internal:6379/0", True),
        ("redis://10.0.0.5:6379/0", True),
        ("redis://:pw@redis.internal:6379/0", False),
        ("redis://127.0.0.1:6379/0", False),
        ("redis://localhost:6379/0", False),
        ("redis://[::1]:6379/0", False),
        ("unix:///run/redis.sock", False),
    ],
)
def test_a_redis_without_password_off_this_host_is_flagged(redis: str, unprotected: bool) -> None:
    assert unprotected_redis(shared(redis=redis).redis) is unprotected


def test_every_setting() -> None:
    settings = shared(
        s3={**S3, "region": "eu-west-1", "prefix": "cache/", "redirect": False, "presign_seconds": "5m",
            "connect_timeout": "2s", "timeout": 10, "proxy": "http://proxy:3128", "abandoned_uploads_after": "6h"},
        redis={"url": "rediss://cache@redis:6380/2", "password": "pw", "timeout": 0.5, "prefix": "rc1:"},
        node="n1", size_limit="2TiB", max_age="30d", lease_seconds=5,
    )  # fmt: skip
    s3 = settings.s3
    assert (s3.region, s3.prefix, s3.redirect, s3.presign_seconds) == ("eu-west-1", "cache/", False, 300.0)
    assert (s3.connect_timeout, s3.timeout, s3.proxy, s3.abandoned_uploads_after) == (
        2.0, 10.0, "http://proxy:3128", 6 * 3600.0)  # fmt: skip
    redis = settings.redis
    assert (redis.url, redis.username, redis.password, redis.timeout, redis.prefix) == (
        "rediss://redis:6380/2", "cache", "pw", 0.5, "rc1:")  # fmt: skip
    assert (settings.node, settings.size_limit, settings.max_age, settings.lease_seconds) == (
        "n1", 2 * 1024**4, 30 * 86400.0, 5.0)  # fmt: skip


def test_a_password_in_the_redis_url_is_moved_out_of_it() -> None:
    redis = shared(redis="redis://:p%40ss@redis:6379/0").redis
    assert (redis.url, redis.password, redis.username) == ("redis://redis:6379/0", "p@ss", None)
    assert "p@ss" not in repr(redis)
    assert shared(redis="unix:///run/redis.sock?db=1").redis.url == "unix:///run/redis.sock?db=1"
    assert shared(redis="unix:///run/redis.sock").redis.url == "unix:///run/redis.sock"
    socket = shared(redis="unix:///run/redis.sock?db=2&password=s%26cret").redis
    assert (socket.url, socket.password) == ("unix:///run/redis.sock?db=2", "s&cret") and "cret" not in repr(socket)


@pytest.mark.parametrize(
    "url",
    [
        "unix:///run/redis.sock?db=x",
        "unix:///run/redis.sock?db=1&db=2",
        "unix:///run/redis.sock?password=TOPSECRET&colour=blue",
        "unix:///run/redis.sock?TOPSECRET",
        "unix://host/run/redis.sock?password=TOPSECRET",
        "redis://redis:6379/0?password=TOPSECRET",
    ],
)
def test_bad_redis_urls_name_the_key_and_never_echo_a_secret(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        shared(redis=url)
    assert err.value.key == "shared.redis" and "TOPSECRET" not in str(err.value), str(err.value)


def test_max_age_defaults_to_the_top_level_one() -> None:
    section = {"s3": S3, "redis": "redis://r:6379", **ACCESS}
    settings = settings_from_mapping({"max_age": "3d", "blob_url": BLOB_URL, "shared": section})
    assert settings.shared is not None and settings.shared.max_age == 3 * 86400
    default = settings_from_mapping({"blob_url": BLOB_URL, "shared": section})
    assert default.shared is not None and default.shared.max_age == default.max_age


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"s3": {**S3, "bucket": "Not A Bucket"}}, "shared.s3.bucket"),
        ({"s3": {**S3, "bucket": "x"}}, "shared.s3.bucket"),
        ({"s3": {k: v for k, v in S3.items() if k != "bucket"}}, "shared.s3.bucket"),
        ({"s3": {k: v for k, v in S3.items() if k != "endpoint"}}, "shared.s3.endpoint"),
        ({"s3": {**S3, "endpoint": "ftp://s3"}}, "shared.s3.endpoint"),
        ({"s3": {**S3, "endpoint": "http://s3/bucket"}}, "shared.s3.endpoint"),
        ({"s3": {**S3, "endpoint": "http://user:pw@s3"}}, "shared.s3.endpoint"),
        ({"s3": {**S3, "endpoint": "http://s3:99999"}}, "shared.s3.endpoint"),
        ({"s3": {k: v for k, v in S3.items() if k != "secret_key"}}, "shared.s3.secret_key"),
        ({"s3": {**S3, "secret_key_env": "I16_UNSET_VARIABLE"}}, "shared.s3.secret_key_env"),
        ({"s3": {**S3, "access_key_file": "/nonexistent/key"}}, "shared.s3.access_key_file"),
        ({"s3": {**S3, "region": "US East"}}, "shared.s3.region"),
        ({"s3": {**S3, "prefix": "/abs"}}, "shared.s3.prefix"),
        ({"s3": {**S3, "redirect": "yes"}}, "shared.s3.redirect"),
        ({"s3": {**S3, "presign_seconds": "8d"}}, "shared.s3.presign_seconds"),
        ({"s3": {**S3, "presign_seconds": 0}}, "shared.s3.presign_seconds"),
        ({"s3": {**S3, "timeout": "soon"}}, "shared.s3.timeout"),
        ({"s3": {**S3, "proxy": "socks5://p"}}, "shared.s3.proxy"),
        ({"s3": {**S3, "colour": "blue"}}, "shared.s3.colour"),
        ({"s3": "http://s3"}, "shared.s3"),
        ({"redis": "http://redis:6379"}, "shared.redis"),
        ({"redis": "redis://redis:6379/zero"}, "shared.redis"),
        ({"redis": "redis://redis:port"}, "shared.redis"),
        ({"redis": {"url": "redis://:a@r", "password": "b"}}, "shared.redis.url"),
        ({"redis": {"timeout": 1}}, "shared.redis.url"),
        ({"redis": {"url": "redis://r", "prefix": "has space"}}, "shared.redis.prefix"),
        ({"redis": {"url": "redis://r", "timeout": 0}}, "shared.redis.timeout"),
        ({"node": "a/b"}, "shared.node"),
        ({"size_limit": "lots"}, "shared.size_limit"),
        ({"max_age": "ever"}, "shared.max_age"),
        ({"lease_seconds": -1}, "shared.lease_seconds"),
        ({"lease_seconds": 0.01}, "shared.lease_seconds"),
        ({"lease_seconds": "2h"}, "shared.lease_seconds"),
        ({"lease_seconds": float("inf")}, "shared.lease_seconds"),
        ({"s3": {**S3, "timeout": float("inf")}}, "shared.s3.timeout"),
        ({"s3": {**S3, "connect_timeout": "2d"}}, "shared.s3.connect_timeout"),
        ({"s3": {**S3, "abandoned_uploads_after": float("inf")}}, "shared.s3.abandoned_uploads_after"),
        ({"redis": {"url": "redis://r", "timeout": float("inf")}}, "shared.redis.timeout"),
        ({"redis": {"url": "redis://r", "timeout": "2d"}}, "shared.redis.timeout"),
        ({"colour": "blue"}, "shared.colour"),
    ],
)
def test_bad_values_name_their_key(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        shared(**changes)
    assert err.value.key == key, str(err.value)


def test_missing_sections_and_wrong_shapes_name_their_key() -> None:
    for raw, key in ((["s3"], "shared"), ({"s3": S3}, "shared.redis"), ({"redis": "redis://r"}, "shared.s3")):
        with pytest.raises(ConfigError) as err:
            settings_from_mapping({"blob_url": BLOB_URL, "shared": raw})
        assert err.value.key == key


def test_a_shared_store_needs_a_blob_url_other_nodes_reach() -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_mapping({"shared": {"s3": S3, "redis": "redis://r:6379", **ACCESS}})
    assert err.value.key == "blob_url" and "other nodes" in str(err.value)


def test_secrets_never_appear_in_errors() -> None:
    with pytest.raises(ConfigError) as err:
        shared(s3={**S3, "secret_key": "TOPSECRET", "bucket": "B"})
    assert "TOPSECRET" not in str(err.value)


# the key layout and part sizes ------------------------------------------------------------------


def test_object_keys_are_content_addressed_and_refuse_anything_else() -> None:
    assert object_key("blobs", DIGEST) == "blobs/sha256/" + "ab" * 32
    assert digest_of_key(object_key("manifests", DIGEST)) == DIGEST
    assert digest_of_key("regcache-probe/x") is None
    for bad in ("sha256:../../etc", "sha256:" + "AB" * 32, "md5:" + "a" * 32, "sha256:" + "a" * 63):
        with pytest.raises(ValueError):
            object_key("blobs", bad)


def test_part_size_keeps_within_ten_thousand_parts() -> None:
    assert part_size(200 * MiB) == 8 * MiB
    assert part_size(80_000 * MiB) == 8 * MiB
    big = 200 * 1024 * MiB  # 200 GiB
    assert part_size(big) % MiB == 0 and -(-big // part_size(big)) <= 10_000 and part_size(big) > 8 * MiB


# SigV4 and ListMultipartUploads ---------------------------------------------------------------------


def test_sigv4_matches_the_aws_documentation_example() -> None:
    """AWS's worked example (GET Bucket Lifecycle, "Signature Calculations for the Authorization Header")."""
    signer = SigV4("https://examplebucket.s3.amazonaws.com", "us-east-1", "AKIAIOSFODNN7EXAMPLE",
                   "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")  # fmt: skip
    when = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
    url, headers = signer.signed("GET", "/", {"lifecycle": ""}, when)
    assert url == "https://examplebucket.s3.amazonaws.com/?lifecycle="
    assert headers["x-amz-date"] == "20130524T000000Z"
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;x-amz-content-sha256;x-amz-date, "
        "Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
    )


def test_list_multipart_uploads_pages() -> None:
    ns = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
    page = f"""<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult {ns}><Bucket>b</Bucket><IsTruncated>true</IsTruncated>
<NextKeyMarker>blobs/sha256/bb</NextKeyMarker><NextUploadIdMarker>2~x</NextUploadIdMarker>
<Upload><Key>blobs/sha256/aa</Key><UploadId>2~a</UploadId><Initiated>2026-12-01T10:00:00.000Z</Initiated></Upload>
<Upload><Key>blobs/sha256/bb</Key><UploadId>2~x</UploadId><Initiated>2026-12-01T11:00:00.5Z</Initiated></Upload>
</ListMultipartUploadsResult>""".encode()
    uploads, markers = parse_uploads(page)
    assert [(u.key, u.upload_id) for u in uploads] == [("blobs/sha256/aa", "2~a"), ("blobs/sha256/bb", "2~x")]
    assert uploads[0].initiated == datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.UTC).timestamp()
    assert markers == {"key-marker": "blobs/sha256/bb", "upload-id-marker": "2~x"}
    last = page.replace(b"<IsTruncated>true", b"<IsTruncated>false")
    assert parse_uploads(last)[1] is None


# the breaker ---------------------------------------------------------------------------------------


def test_the_breaker_fails_at_once_while_open_and_logs_an_outage_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="regcache")
    now = [100.0]
    monkeypatch.setattr("regcache.store.shared.errors.time.monotonic", lambda: now[0])
    breaker = Breaker("Redis", RedisUnavailable, retry_after=5)
    breaker.check("reading pins")  # closed: nothing happens
    error = breaker.failed("reading pins", "Connection refused")
    assert isinstance(error, RedisUnavailable) and isinstance(error, SharedUnavailable) and isinstance(error, OSError)
    assert str(error) == "Redis: reading pins failed: Connection refused" and breaker.down == "Connection refused"
    now[0] += 3
    with pytest.raises(RedisUnavailable, match=r"^Redis: saving a tag not tried: unavailable for 3 s \(Connection"):
        breaker.check("saving a tag")
    now[0] += 2.5
    breaker.check("reading pins")  # the window is over: ask again
    breaker.failed("reading pins", "Connection refused")  # still down: no second warning
    now[0] += 1
    with pytest.raises(RedisUnavailable):
        breaker.check("reading pins")
    now[0] += 5
    breaker.check("reading pins")
    breaker.worked()
    breaker.worked()
    assert breaker.down == ""
    breaker.check("reading pins")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "regcache: Redis unavailable, carrying on without it (asking again every 5 s): Connection refused"),
        ("INFO", "regcache: Redis available again after 12 s"),
    ]
