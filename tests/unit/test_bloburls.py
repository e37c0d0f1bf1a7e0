"""Signed blob URLs and the choice between a redirect and streaming through the proxy."""

from urllib.parse import parse_qs, urlsplit

import pytest

from regcache.addresses import is_loopback
from regcache.fronts.bloburls import URL_LIFETIME_SECONDS, BlobUrls, redirect_base

DIGEST = "sha256:" + "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def signed(urls: BlobUrls, source: str = "blobs", digest: str = DIGEST) -> tuple[str, str, str, str]:
    parts = urlsplit(urls.path(source, digest))  # type: ignore[arg-type]
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    source, digest = parts.path.strip("/").split("/")
    return source, digest, query["expires"], query["signature"]


def test_a_signed_url_is_valid_until_it_expires() -> None:
    clock = Clock()
    urls = BlobUrls(clock=clock)
    parts = signed(urls)
    assert urls.valid(*parts)
    clock.now += URL_LIFETIME_SECONDS
    assert urls.valid(*parts)
    clock.now += 1
    assert not urls.valid(*parts)


def test_a_signature_covers_source_digest_and_expiry() -> None:
    urls = BlobUrls()
    source, digest, expires, signature = signed(urls)
    assert not urls.valid("fills", digest, expires, signature)
    assert not urls.valid(source, "sha256:" + "cd" * 32, expires, signature)
    assert not urls.valid(source, digest, str(int(expires) + 3600), signature)
    assert not urls.valid(source, digest, "soon", signature)
    assert not urls.valid(source, digest, expires, "")


def test_another_process_cannot_sign() -> None:
    assert not BlobUrls().valid(*signed(BlobUrls()))


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("10.0.0.7", False),
        ("::ffff:10.0.0.7", False),
        ("", False),
        ("cache.example", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_loopback_clients_are_sent_to_the_endpoint_others_stream_through_the_proxy() -> None:
    assert redirect_base(True, None, "127.0.0.1", 5080, "127.0.0.1") == "http://127.0.0.1:5080"
    assert redirect_base(True, None, "0.0.0.0", 5080, "::1") == "http://127.0.0.1:5080"
    assert redirect_base(True, None, "::1", 5080, "::1") == "http://[::1]:5080"
    assert redirect_base(True, None, "127.0.0.1", 5080, "10.0.0.7") is None
    assert redirect_base(False, None, "127.0.0.1", 5080, "127.0.0.1") is None


def test_a_configured_blob_url_serves_every_client() -> None:
    base = "http://cache.internal:5080"
    assert redirect_base(True, base, "0.0.0.0", 5080, "10.0.0.7") == base
    assert redirect_base(False, base, "0.0.0.0", 5080, "10.0.0.7") is None
