"""Content digests: `sha256:<hex>` (or sha512) of exact bytes, and checking bytes against one.

Pure functions only; incremental hashing of a blob as it arrives is the store's staging
(`regcache.store.staging`), which raises the same `DigestMismatch`.
"""

from __future__ import annotations

import hashlib

DIGEST_ALGORITHMS = ("sha256", "sha512")


class DigestMismatch(ValueError):
    """Content whose bytes do not hash to the digest they were fetched under."""


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def verify_digest(digest: str, data: bytes) -> None:
    algorithm = digest.split(":", 1)[0]
    if algorithm not in DIGEST_ALGORITHMS or digest_of(data, algorithm) != digest:
        raise DigestMismatch(f"content does not match {digest}")
