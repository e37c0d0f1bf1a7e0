"""Walks over the store's reference graph, pure over a `needs` function (the entries a tag record or
manifest refers to, `Store.needs`): what is reachable from some roots, and what an image lacks.

Used by eviction (pins), the admin tools (ls, purge, gc) and bundles, whichever store implementation
provides `needs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from regcache.oci.manifest import Manifest, manifest_references
from regcache.store.keys import BLOB, MANIFEST, blob_key, is_kind, manifest_key


def manifest_needs(manifest: Manifest) -> list[str]:
    """The store keys a manifest refers to (an index its platform manifests, an image manifest its
    config and layers); [] when it cannot be read as one. What every store's `needs` answers for a
    manifest, however it holds the manifest."""
    try:
        child_manifests, blobs = manifest_references(manifest)
        return [manifest_key(str(d.get("digest"))) for d in child_manifests] + [
            blob_key(str(d.get("digest"))) for d in blobs
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def lacking(root: str, needs: Callable[[str], list[str]], present: Callable[[str], bool]) -> list[str]:
    """The store keys an image lacks, from its manifest `root` (`manifest:<digest>`) down: that
    manifest; an image manifest's blobs; for an index, what its platform manifests that are stored
    lack, or all of them when none is (a platform nobody pulled is not missing while another is
    there)."""
    if not present(root):
        return [root]
    needed = needs(root)
    platforms = [key for key in needed if is_kind(key, MANIFEST)]
    held = [key for key in platforms if present(key)]
    missing = [key for key in needed if is_kind(key, BLOB) and not present(key)]
    if platforms and not held:
        return missing + platforms
    for platform in held:
        missing += lacking(platform, needs, present)
    return missing


def reachable(roots: Iterable[str], needs: Callable[[str], list[str]]) -> set[str]:
    """Every store key reachable from `roots` (tag records, manifests) through `needs`: a tag
    record needs its manifests, an index its platform manifests, an image manifest its blobs."""
    found: set[str] = set()
    pending = list(roots)
    while pending:
        key = pending.pop()
        if key not in found:
            found.add(key)
            pending += needs(key)
    return found
