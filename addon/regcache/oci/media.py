"""Manifest media types: the one list of them, and what a client's `Accept` headers say about them.

Pure functions only. A tag resolves per accepted media types (a registry answers a tag with an
index or a single manifest, OCI or Docker, by `Accept`), so the store keys tag records by
`accept_key` of the normalised list.
"""

from __future__ import annotations

from collections.abc import Iterable

# The manifest media types a tag can resolve to: the only `Accept` entries that change what a
# registry answers for a tag, so the only ones a tag record is keyed by (with `*/*`, which keeps
# its meaning: any of them). Regcache's own requests ask for the cacheable ones, in this order.
CACHEABLE_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
SCHEMA1_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    }
)
# What a manifest may reference, by its declared media type (oci/manifest.py).
INDEX_MEDIA_TYPES = frozenset(
    {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
)
IMAGE_MEDIA_TYPES = frozenset(
    {"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
)
ANY_MEDIA_TYPE = "*/*"
ACCEPT_KEY_TYPES = frozenset({*CACHEABLE_MEDIA_TYPES, *SCHEMA1_MEDIA_TYPES, ANY_MEDIA_TYPE})
# What reading a client's `Accept` headers may cost: dockerd sends 6 entries in about 400 bytes.
# Anything beyond is not read, so a hostile list costs every later request nothing.
MAX_ACCEPT_BYTES = 8 * 1024
MAX_ACCEPT_ENTRIES = 64


def accept_entries(accept_headers: Iterable[str]) -> list[str]:
    """The comma-separated entries of a request's `Accept` headers, up to `MAX_ACCEPT_BYTES` of
    them (an entry cut off there is dropped) and `MAX_ACCEPT_ENTRIES` entries."""
    entries: list[str] = []
    budget = MAX_ACCEPT_BYTES
    for header in accept_headers:
        parts = header[:budget].split(",", MAX_ACCEPT_ENTRIES)
        if len(header) > budget:
            parts.pop()  # cut off mid-entry
        entries += parts
        budget -= len(header)
        if budget <= 0 or len(entries) >= MAX_ACCEPT_ENTRIES:
            break
    return entries[:MAX_ACCEPT_ENTRIES]


def accepted_media_types(accept_headers: Iterable[str]) -> tuple[str, ...]:
    """The manifest media types a client accepts, normalised: known types only (`ACCEPT_KEY_TYPES`;
    others say nothing about manifests), parameters dropped, sorted, unique.

    Clients send several `Accept` headers or one comma-separated list; both mean the same.
    """
    types = {normalize_media_type(entry) for entry in accept_entries(accept_headers)}
    return tuple(sorted(types & ACCEPT_KEY_TYPES))


def normalize_media_type(media_type: str) -> str:
    """`Application/JSON; charset=utf-8` → `application/json` (clients ignore parameters)."""
    return media_type.split(";", 1)[0].strip().lower()


def is_acceptable(media_type: str, accepted: tuple[str, ...]) -> bool:
    """Would a client with this Accept list take a manifest of this media type?"""
    return not accepted or ANY_MEDIA_TYPE in accepted or normalize_media_type(media_type) in accepted




def accept_key(accepted: tuple[str, ...]) -> str:
    """Tags resolve per registry, repository, tag *and* accepted media types."""
    return ",".join(accepted)
