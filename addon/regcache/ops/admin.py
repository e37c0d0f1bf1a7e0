"""The store-walking work behind `regcache ls`, `stats`, `purge`, `verify` and `gc`.

Owns: which cached images there are and what each needs (`list_images`); which image references a
pattern such as `docker.io/library/alpine` covers (`RefPattern`); what a purge or a gc would remove
(`plan_purge`, `plan_gc`: plans first, so `--dry-run` shows exactly what the real run removes);
rehashing content (`find_corrupt`); and reading the usage totals the proxy saved (`summarize_usage`).

Every walk uses the store's own reference walker (`reachable` over `Store.needs`), spells store keys
only through store/keys.py, and reads entries without counting as a use, so looking at the cache
never changes what eviction removes next. All of it works while regcache runs on the same store
(diskcache is multi-process safe); an image pulled while a purge runs may lose a blob it needs,
which the proxy then fetches again.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from regcache.oci.api import NAME_RE, TAG_RE
from regcache.oci.digest import verify_digest
from regcache.oci.reference import TagRef, repository_name, split_registry
from regcache.ops.bundle import BundleError
from regcache.store import keys
from regcache.store.base import Entry, Store
from regcache.store.walk import lacking, reachable

HASH_CHUNK = 1024 * 1024


# references ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefPattern:
    """A registry (`docker.io`), a repository (`docker.io/library/alpine`) or a tag
    (`docker.io/library/alpine:3.20`)."""

    registry: str
    repository: str = ""  # without the registry: library/alpine
    tag: str = ""

    def covers(self, ref: TagRef) -> bool:
        return self.covers_repository(ref.repository) and (not self.tag or ref.tag == self.tag)

    def covers_repository(self, repository: str) -> bool:
        """Does it cover all of, or a tag in, this `registry/repository`?"""
        registry, _, name = repository.partition("/")
        return registry == self.registry and (not self.repository or name == self.repository)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}" if self.repository else self.registry
        return f"{text}:{self.tag}" if self.tag else text


def parse_ref_pattern(text: str, aliases: Mapping[str, str] | None = None) -> RefPattern:
    """`docker.io`, `ghcr.io`, `localhost:5000`, `myhost:5000/` (a registry: a dot or `localhost`
    in the host, or a trailing `/`); `docker.io/library/alpine`, `library/alpine`, `alpine` (a
    repository); any of those with `:TAG`. `aliases` maps registry hosts to their cache namespace
    (`registry-1.docker.io` → `docker.io`, and the `registries` configuration)."""
    aliases = aliases or {}
    text = text.strip()
    host = text.split(":")[0]
    only_registry = text.endswith("/") or ("/" not in text and ("." in host or host == "localhost"))
    if only_registry:
        namespace, _ = split_registry(text.rstrip("/") + "/x")
        return RefPattern(aliases.get(namespace, namespace))
    namespace, remainder = split_registry(text)
    name, _, tag = remainder.partition(":")
    name = repository_name(namespace, name)
    if not NAME_RE.fullmatch(name) or (tag and not TAG_RE.fullmatch(tag)):
        raise BundleError(f"{text!r} is not a registry, repository or image like docker.io/library/alpine:3.20")
    return RefPattern(aliases.get(namespace, namespace), name, tag)


class Walkable(Protocol):
    """What the listing and the plans read: a node's store, or the cluster's content (cluster.Snapshot)."""

    def entries(self) -> dict[str, Entry]: ...
    def needs(self, key: str) -> list[str]: ...
    def pins(self) -> dict[str, str]: ...
    def seen_pairs(self) -> list[tuple[str, str]]: ...


# listing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRow:
    """A cached image: a tag and a digest it resolved to (one per kind of manifest clients asked for)."""

    ref: str  # registry/repository:tag
    digest: str
    size: int  # stored bytes it needs: its manifests and the blobs of them that are stored
    last_used: float
    pinned: bool
    missing: tuple[str, ...] = ()  # what it lacks (store keys, see store/walk.py `lacking`): incomplete if any


def list_images(store: Walkable, pattern: RefPattern | None = None) -> list[ImageRow]:
    needs = functools.cache(store.needs)  # images share manifests and blobs: read each once
    entries = store.entries()
    pins = store.pins()
    rows = []
    for key in sorted(k for k in entries if keys.is_kind(k, keys.TAG)):
        ref = keys.tag_ref_of(key)
        if pattern is not None and not pattern.covers(ref):
            continue
        for manifest_key in dict.fromkeys(needs(key)):  # one row per digest, in record order
            needed = reachable([manifest_key], needs)
            digest = keys.subject(manifest_key)
            size = sum(entries[k].size for k in needed if k in entries)
            missing = tuple(lacking(manifest_key, needs, entries.__contains__))
            pinned = pins.get(str(ref)) == digest
            rows.append(ImageRow(str(ref), digest, size, entries[key].last_use, pinned, missing))
    return rows


# purge and gc ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a purge or gc removes; `keys` in the order they go (tag records first)."""

    keys: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    kept_pinned: list[str] = field(default_factory=list)  # tags the pattern covers that are pinned
    staging_files: list[Path] = field(default_factory=list)

    def count(self, kind: str) -> int:
        """How many entries of one kind (store/keys.py: `tag`, `manifest`, `blob`, `seen`) it removes."""
        return sum(1 for key in self.keys if keys.kind_of(key) == kind)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values()) + sum(_size_of(path) for path in self.staging_files)


def _pinned_roots(store: Walkable) -> list[str]:
    return [keys.manifest_key(digest) for digest in store.pins().values()]


def plan_purge(store: Walkable, pattern: RefPattern) -> Plan:
    """Tag records the pattern covers (pinned ones excepted), then the manifests and blobs they
    need that nothing else needs: no other tag record, no pin, and — for a registry or repository
    pattern — no repository outside it they were pulled through. For a registry or repository, also
    its digest-only pulls and its access records (`seen:`)."""
    needs = functools.cache(store.needs)  # three walks over the same manifests: read each once
    entries = store.entries()
    pins = store.pins()
    tags = [key for key in entries if keys.is_kind(key, keys.TAG)]
    covered = [key for key in tags if pattern.covers(keys.tag_ref_of(key))]
    plan = Plan(kept_pinned=sorted(keys.subject(key) for key in covered if keys.subject(key) in pins))
    purged_tags = sorted(key for key in covered if keys.subject(key) not in pins)
    # A pinned image stays readable through its repository.
    still_readable = {
        (keys.tag_ref_of(key).repository, keys.subject(needed))
        for key in covered
        if keys.subject(key) in pins
        for needed in reachable([key], needs)
    }
    seen = [pair for pair in store.seen_pairs() if pair not in still_readable]
    if pattern.tag:  # a tag of a repository that stays: its own pulls are no reason to keep
        own_repository = f"{pattern.registry}/{pattern.repository}"
        purged_seen: list[tuple[str, str]] = []
        kept_seen = {digest for repository, digest in seen if repository != own_repository}
    else:
        purged_seen = [(repository, digest) for repository, digest in seen if pattern.covers_repository(repository)]
        kept_seen = {digest for repository, digest in seen if not pattern.covers_repository(repository)}
    remaining_tags = set(tags) - set(purged_tags)
    keep = reachable([*remaining_tags, *_pinned_roots(store)], needs)
    candidates = reachable(purged_tags, needs) | {
        key for _, digest in purged_seen for key in (keys.manifest_key(digest), keys.blob_key(digest))
    }
    content = sorted(
        key
        for key in candidates - set(purged_tags)
        if key in entries and key not in keep and keys.subject(key) not in kept_seen
    )
    removed_digests = {keys.subject(key) for key in content}
    dropped_seen = {pair for pair in seen if pair[1] in removed_digests} | set(purged_seen)
    dropped = sorted(keys.seen_key(repository, digest) for repository, digest in dropped_seen)
    plan.keys = [*purged_tags, *content, *dropped]
    plan.sizes = {key: entries[key].size for key in plan.keys if key in entries}
    return plan


def plan_gc(store: Store, min_age: float, now: float | None = None) -> Plan:
    """`plan_orphans`, and staging files untouched for `min_age`."""
    now = time.time() if now is None else now
    plan = plan_orphans(store, min_age, now)
    plan.staging_files = [path for path in _staging_files(store) if _mtime(path) < now - min_age]
    return plan


def plan_orphans(store: Walkable, min_age: float, now: float | None = None) -> Plan:
    """Orphans: manifests and blobs no tag record and no pin needs, unused for `min_age` (so a
    pull in progress, whose manifest is stored a moment before its tag record, keeps its content);
    access records of digests no longer stored."""
    now = time.time() if now is None else now
    entries = store.entries()
    needed = reachable([*(k for k in entries if keys.is_kind(k, keys.TAG)), *_pinned_roots(store)], store.needs)
    orphans = sorted(
        key
        for key, entry in entries.items()
        if keys.is_kind(key, keys.MANIFEST, keys.BLOB) and key not in needed and entry.last_use < now - min_age
    )
    stored = {keys.subject(key) for key in entries.keys() - set(orphans)}
    stale_seen = sorted(keys.seen_key(repo, digest) for repo, digest in store.seen_pairs() if digest not in stored)
    return Plan(keys=orphans + stale_seen, sizes={key: entries[key].size for key in orphans})


def _staging_files(store: Store) -> list[Path]:
    if not store.staging_dir.is_dir():
        return []
    return sorted(path for path in store.staging_dir.iterdir() if path.is_file())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile (committed or discarded): nothing to do


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def carry_out(store: Store, plan: Plan) -> tuple[int, int]:
    """Remove what the plan names; (entries and files, bytes) actually removed."""
    removed, freed = store.remove(plan.keys)
    for path in plan.staging_files:
        size = _size_of(path)
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed, freed = removed + 1, freed + size
    return removed, freed


# verify ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corrupt:
    key: str
    problem: str


@dataclass
class Verification:
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    corrupt: list[Corrupt] = field(default_factory=list)


def verify_total(store: Store) -> int:
    """Bytes `find_corrupt` will read (for a progress bar)."""
    return sum(entry.size for key, entry in store.entries().items() if keys.is_kind(key, keys.BLOB, keys.MANIFEST))


def find_corrupt(store: Store, progress: Callable[[int], None] = lambda _: None) -> Verification:
    """Rehash every stored manifest and blob; `progress` is told each chunk of bytes read."""
    result = Verification()
    for key, entry in sorted(store.entries().items()):
        kind, digest = keys.kind_of(key), keys.subject(key)
        if kind == keys.MANIFEST:
            manifest = store.peek_manifest(digest)
            problem = "unreadable" if manifest is None else _manifest_problem(digest, manifest.body)
            progress(entry.size)
            result.manifests += 1
        elif kind == keys.BLOB:
            problem = _blob_problem(store.blob_file(digest), digest, progress)
            result.blobs += 1
        else:
            continue
        result.bytes += entry.size
        if problem:
            result.corrupt.append(Corrupt(key, problem))
    return result


def _manifest_problem(digest: str, body: bytes) -> str:
    try:
        verify_digest(digest, body)
    except ValueError:
        return f"its bytes hash to {_digest(digest, [body])}"
    return ""


def _blob_problem(path: Path | None, digest: str, progress: Callable[[int], None]) -> str:
    if path is None:
        return "no file recorded"
    try:
        with path.open("rb") as reader:
            actual = _digest(digest, _chunks(reader, progress))
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    return "" if actual == digest else f"its bytes hash to {actual}"


def _chunks(reader: BinaryIO, progress: Callable[[int], None]) -> Iterable[bytes]:
    while chunk := reader.read(HASH_CHUNK):
        progress(len(chunk))
        yield chunk


def new_hasher(expected: str) -> hashlib._Hash:
    """A hasher of the algorithm `expected` (a digest) names: sha256 or sha512 (others: sha256,
    which then never matches)."""
    algorithm = expected.partition(":")[0]
    return hashlib.new(algorithm if algorithm in ("sha256", "sha512") else "sha256")


def _digest(expected: str, chunks: Iterable[bytes]) -> str:
    hasher = new_hasher(expected)
    for chunk in chunks:
        hasher.update(chunk)
    return f"{hasher.name}:{hasher.hexdigest()}"


# stats -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepositoryUsage:
    repository: str
    requests: int
    from_store: int
    pulls: int
    pulls_saved: int


@dataclass
class UsageSummary:
    """The proxy's saved counts (`usage-counters`), added up for `regcache stats`."""

    requests: dict[str, int]  # by cache result
    pulls_saved: dict[str, int]  # by registry
    bytes_cache: int
    bytes_upstream: int
    repositories: list[RepositoryUsage]  # most pulled first

    @property
    def hit_ratio(self) -> float | None:
        """Manifest and blob requests answered from the store, of those with a cache result."""
        cached = sum(self.requests.get(result, 0) for result in ("HIT", "REVALIDATED", "STALE"))
        total = cached + self.requests.get("MISS", 0)
        return cached / total if total else None


def summarize_usage(counters: Mapping[str, int]) -> UsageSummary:
    requests: dict[str, int] = {}
    pulls_saved: dict[str, int] = {}
    repositories: dict[str, dict[str, int]] = {}
    for name, count in counters.items():
        words = name.split(" ")
        if words[0] == "requests" and len(words) == 4 and words[2] in ("manifest", "blob"):
            requests[words[3]] = requests.get(words[3], 0) + count
        elif words[0] == "pulls_saved" and len(words) == 2:
            pulls_saved[words[1]] = count
        elif words[0] == "repository" and len(words) == 3:
            repositories.setdefault(words[1], {})[words[2]] = count
    usage = [
        RepositoryUsage(
            repository,
            counts.get("requests", 0),
            counts.get("from_store", 0),
            counts.get("pulls", 0),
            counts.get("pulls_saved", 0),
        )
        for repository, counts in repositories.items()
    ]
    usage.sort(key=lambda r: (-r.pulls, -r.requests, r.repository))
    return UsageSummary(requests, pulls_saved, counters.get("bytes cache", 0), counters.get("bytes upstream", 0), usage)
