"""Manifests: what one is (`Manifest`: media type and exact bytes), what it refers to (platform
manifests of an index, an image's config and layers), and which manifests may be cached.

Pure functions only. Manifests are stored and served byte for byte, never re-serialised: nothing
here writes one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from regcache.oci.api import DIGEST_RE
from regcache.oci.media import CACHEABLE_MEDIA_TYPES, IMAGE_MEDIA_TYPES, INDEX_MEDIA_TYPES, normalize_media_type

Descriptor = dict[str, object]


class BadManifest(Exception):
    """A manifest or descriptor that is not what an image needs; the message says what."""


@dataclass(frozen=True)
class Manifest:
    media_type: str
    body: bytes


def manifest_references(manifest: Manifest) -> tuple[list[Descriptor], list[Descriptor]]:
    """(child manifest descriptors, blob descriptors) of an index or an image manifest, read by its
    declared media type only: an index its `manifests`, an image manifest its `config` and `layers`;
    anything else references nothing. Nothing else in a document counts (unknown members,
    `subject`, annotations): a registry checks only these against what the repository holds.
    Raises ValueError when the body is not a JSON object."""
    document = json.loads(manifest.body)
    if not isinstance(document, dict):
        raise ValueError("manifest is not a JSON object")
    media_type = normalize_media_type(manifest.media_type)
    if media_type in INDEX_MEDIA_TYPES:
        return _descriptors(document.get("manifests")), []
    if media_type not in IMAGE_MEDIA_TYPES:
        return [], []
    config = document.get("config")
    return [], ([config] if isinstance(config, dict) else []) + _descriptors(document.get("layers"))


def _descriptors(value: object) -> list[Descriptor]:
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []


def referenced_digests(manifest: Manifest) -> list[str]:
    """The digests a manifest of a repository vouches for in that repository (platform manifests,
    config, layers); [] if unparsable. Foreign layers (descriptors with `urls`) are left out: a
    registry does not check that the repository holds them."""
    try:
        child_manifests, blobs = manifest_references(manifest)
    except ValueError:
        return []
    return [
        digest
        for d in child_manifests + blobs
        if isinstance(digest := d.get("digest"), str) and "urls" not in d
    ]


def children(manifest: Manifest) -> tuple[list[Descriptor], list[Descriptor]]:
    """(child manifest descriptors, blob descriptors); BadManifest if it is not a manifest."""
    try:
        return manifest_references(manifest)
    except ValueError as err:
        raise BadManifest(f"manifest is not a JSON object: {err}") from err


def descriptor_digest(descriptor: Descriptor) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise BadManifest(f"bad digest in descriptor {descriptor!r}")
    return digest


def platform_of(descriptor: Descriptor) -> str:
    """An index entry's platform: `linux/arm64/v8`, `?` when it names none."""
    platform_ = descriptor.get("platform")
    if not isinstance(platform_, dict):
        return "?"
    parts = [platform_.get("os", "?"), platform_.get("architecture", "?"), platform_.get("variant")]
    return "/".join(str(p) for p in parts if p)


def manifest_media_type(body: bytes, content_type: str) -> str:
    """The manifest's own `mediaType` field if it has one, else the Content-Type, parameters
    dropped (some registries send `...+json; charset=utf-8`)."""
    try:
        declared = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        declared = None
    return normalize_media_type(declared if isinstance(declared, str) and declared else content_type)


def not_cacheable(body: bytes, media_type: str) -> str:
    """Why these manifest bytes must not be stored (empty: they may be). Anything else is relayed
    to the client as it came, so an odd registry still works, but never enters the cache."""
    if media_type not in CACHEABLE_MEDIA_TYPES:
        return f"unknown media type {media_type!r}"
    try:
        document = json.loads(body)
    except ValueError:
        return "not JSON"
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        return "not a schemaVersion 2 manifest"
    return ""
