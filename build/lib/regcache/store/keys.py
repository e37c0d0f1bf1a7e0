"""Store keys: every key an entry of the store is kept under is made and parsed here.

Content entries are `<kind>:<subject>`: `blob:<digest>`, `manifest:<digest>`, `tag:<registry>/<name>:<tag>`
(one entry per tag, holding its records per accepted media types) and `seen:<repository>@<digest>`
(the digest is known to belong to the repository: access.py). Bookkeeping entries (`pins`,
`usage-counters`, and `realm-hosts` in stores written before the access records had them) are never
evicted, expired or purged. A second store implementation keeps the same keys, so admin plans, walks
and bundles read the same on either.
"""

from __future__ import annotations

from regcache.oci.reference import TagRef

BLOB = "blob"
MANIFEST = "manifest"
TAG = "tag"
SEEN = "seen"
# The entry kinds in the store, by key prefix.
ENTRY_TYPES = (BLOB, MANIFEST, TAG, SEEN)

PINS = "pins"
USAGE_COUNTERS = "usage-counters"
BOOKKEEPING_KEYS = (PINS, "realm-hosts", USAGE_COUNTERS)


def blob_key(digest: str) -> str:
    return f"{BLOB}:{digest}"


def manifest_key(digest: str) -> str:
    return f"{MANIFEST}:{digest}"


def tag_key(ref: TagRef | str) -> str:
    """The entry of a tag (`ref` as a TagRef, or as its text `docker.io/library/alpine:3`)."""
    return f"{TAG}:{ref}"


def seen_key(repository: str, digest: str) -> str:
    return f"{SEEN}:{repository}@{digest}"


def kind_of(key: str) -> str:
    """`blob`, `manifest`, `tag` or `seen`; "" for a bookkeeping entry."""
    kind, colon, _ = key.partition(":")
    return kind if colon and kind in ENTRY_TYPES else ""


def is_kind(key: str, *kinds: str) -> bool:
    return kind_of(key) in kinds


def subject(key: str) -> str:
    """What a content key names: a blob's or manifest's digest, a tag's reference text
    (`docker.io/library/alpine:3`), `repository@digest` for a seen entry."""
    return key.partition(":")[2]


def tag_ref_of(key: str) -> TagRef:
    """The tag of a `tag:<namespace>/<name>:<tag>` store key."""
    namespace, _, rest = subject(key).partition("/")
    name, _, tag = rest.rpartition(":")
    return TagRef(namespace, name, tag)


def seen_pair(key: str) -> tuple[str, str] | None:
    """(repository, digest) of a `seen:<repository>@<digest>` key (None: not one)."""
    repository, at, digest = subject(key).rpartition("@")
    return (repository, digest) if kind_of(key) == SEEN and at else None


def like(kind: str) -> str:
    """A SQL `LIKE` pattern for every key of one kind."""
    return f"{kind}:%"
