"""Registry path and header parsing."""

import json

import pytest

from regcache.oci.api import Kind, error_body, parse_path
from regcache.oci.media import MAX_ACCEPT_BYTES, MAX_ACCEPT_ENTRIES, accept_entries, accepted_media_types, is_acceptable

SHA = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("path", "kind", "name", "reference"),
    [
        ("/v2/", Kind.PING, "", ""),
        ("/v2", Kind.PING, "", ""),
        ("/v2/library/alpine/manifests/3.20", Kind.MANIFEST, "library/alpine", "3.20"),
        (f"/v2/library/alpine/manifests/{SHA}", Kind.MANIFEST, "library/alpine", SHA),
        (f"/v2/a/b/c/blobs/{SHA}", Kind.BLOB, "a/b/c", SHA),
        (f"/v2/x/blobs/{SHA}?ns=docker.io", Kind.BLOB, "x", SHA),
        ("/v2/x/blobs/uploads/", Kind.OTHER, "", ""),
        ("/v2/x/blobs/uploads/1234-abcd", Kind.OTHER, "", ""),
        ("/v2/x/tags/list", Kind.OTHER, "", ""),
        ("/v2/_catalog", Kind.OTHER, "", ""),
        ("/token?scope=x", Kind.OTHER, "", ""),
    ],
)
def test_parse_path(path: str, kind: Kind, name: str, reference: str) -> None:
    route = parse_path(path)
    assert (route.kind, route.name, route.reference) == (kind, name, reference)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Library/alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/../etc/manifests/latest", "NAME_INVALID"),
        ("/v2/a/%2e%2e/manifests/latest", "NAME_INVALID"),
        ("/v2/a/blobs/latest", "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/a/manifests/md5:" + "a" * 32, "DIGEST_INVALID"),
        ("/v2/a/manifests/-bad", "TAG_INVALID"),
        ("/v2/a/manifests/" + "t" * 129, "TAG_INVALID"),
    ],
)
def test_invalid_paths_name_their_error(path: str, code: str) -> None:
    route = parse_path(path)
    assert route.kind is Kind.INVALID
    assert route.error_code == code


def test_accept_is_normalised_across_headers() -> None:
    one = accepted_media_types(["application/vnd.oci.image.index.v1+json, application/json;q=0.5"])
    two = accepted_media_types(["application/json", "Application/VND.oci.image.index.v1+json; q=1"])
    assert one == two == ("application/vnd.oci.image.index.v1+json",)


DOCKERD_ACCEPT = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
]


def test_accept_keeps_only_manifest_media_types_sorted_and_unique() -> None:
    accepted = accepted_media_types([*DOCKERD_ACCEPT, DOCKERD_ACCEPT[0], "text/html, */*;q=0.1, image/png"])
    assert accepted == tuple(sorted({*DOCKERD_ACCEPT[:5], "*/*"}))
    assert accepted_media_types(["application/x-junk-1, application/x-junk-2"]) == ()
    assert accepted_media_types([]) == ()


def test_accept_parsing_is_capped_in_bytes_and_entries() -> None:
    oci = "application/vnd.oci.image.manifest.v1+json"
    junk = ", ".join(f"application/x-{n}" for n in range(10_000))  # about 180 KB
    assert accepted_media_types([f"{oci}, {junk}"]) == (oci,)
    assert accepted_media_types([f"{junk}, {oci}"]) == ()  # beyond the byte budget: not read
    assert accepted_media_types(["," * (MAX_ACCEPT_ENTRIES) + oci]) == ()  # beyond the entry cap
    assert accepted_media_types(["," * (MAX_ACCEPT_ENTRIES - 1) + oci]) == (oci,)
    assert accepted_media_types([""] * MAX_ACCEPT_ENTRIES + [oci]) == ()  # many headers count too
    # A known type cut off by the byte budget is dropped, not read as its prefix.
    cut = "x" * (MAX_ACCEPT_BYTES - len(oci) - 1) + "," + oci + "-and-more"
    assert accepted_media_types([cut]) == ()
    assert accept_entries([cut])[-1] == "x" * (MAX_ACCEPT_BYTES - len(oci) - 1)
    assert accepted_media_types(["x" * (MAX_ACCEPT_BYTES - len(oci) - 1) + "," + oci]) == (oci,)


def test_acceptable() -> None:
    oci = "application/vnd.oci.image.manifest.v1+json"
    assert is_acceptable(oci, ())
    assert is_acceptable(oci, ("*/*",))
    assert is_acceptable(oci, (oci,))
    assert not is_acceptable(oci, ("application/vnd.docker.distribution.manifest.v2+json",))


def test_error_body_is_registry_json() -> None:
    body = json.loads(error_body("MANIFEST_UNKNOWN", "manifest unknown", {"tag": "x"}))
    assert body == {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {"tag": "x"}}]}
