"""Bundles: cached images as an OCI image layout (a directory or a tar), exported and imported.

A bundle is a plain OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`), so skopeo,
containerd and other OCI tools can read it, and a layout they wrote can seed the cache. Each
`index.json` entry is one tag; its annotations say which registry, repository and tag it is
(`io.regcache.*`, plus the conventional `org.opencontainers.image.ref.name` and
`io.containerd.image.name` holding the full reference), for which Accept list it was recorded, and
whether its repository is readable anonymously (`io.regcache.access: public|private`). Import marks
the entries annotated public public; any other entry (annotated private, or from a layout skopeo or
others wrote) stays private — it fails closed — unless imported with `public`, which marks every
imported repository readable anonymously. What an import marks as belonging to a repository is only
what the bundle holds. Credentials and grants never go into a bundle: a private image stays private
after import.

Import is all or nothing: every manifest and blob is hashed and checked against its digest and
size while it is staged, and only when the whole bundle is good is anything committed.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from regcache.oci.api import NAME_RE, TAG_RE
from regcache.oci.digest import DigestMismatch, verify_digest
from regcache.oci.manifest import Manifest, children, descriptor_digest
from regcache.oci.media import accept_key
from regcache.oci.reference import TagRef, repository_name, split_registry
from regcache.store import keys
from regcache.store.access import ANONYMOUS, AccessRecords, Grant
from regcache.store.base import Store, TagRecord
from regcache.store.staging import BlobStaging
from regcache.store.walk import lacking, reachable

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
REGISTRY = "io.regcache.registry"
REPOSITORY = "io.regcache.repository"
TAG = "io.regcache.tag"
ACCEPT = "io.regcache.accept"
ACCESS = "io.regcache.access"
COPY_CHUNK = 4 * 1024 * 1024


class ExportSource(Protocol):
    """What an export reads: a node's store, or the cluster's content (cluster.Snapshot)."""

    def tag_refs(self) -> list[TagRef]: ...
    def tag_records(self, ref: TagRef) -> dict[str, TagRecord]: ...
    def get_manifest(self, digest: str) -> Manifest | None: ...
    def needs(self, key: str) -> list[str]: ...
    def has_entry(self, key: str) -> bool: ...
    def blob_size(self, digest: str) -> int | None: ...
    def blob_path(self, digest: str) -> str | None: ...


class BundleError(Exception):
    """A bundle or reference that cannot be used; the message says what and where."""


def parse_image_ref(text: str) -> TagRef:
    """`alpine`, `library/alpine:3.20`, `docker.io/library/alpine:3.20`, `ghcr.io/org/app:1`."""
    namespace, remainder = split_registry(text)
    name, _, tag = remainder.rpartition(":") if ":" in remainder else (remainder, "", "latest")
    name = repository_name(namespace, name)
    if not NAME_RE.fullmatch(name) or not TAG_RE.fullmatch(tag):
        raise BundleError(f"{text!r} is not an image reference like docker.io/library/alpine:3.20")
    return TagRef(namespace, name, tag)


# export --------------------------------------------------------------------------------------


@dataclass
class Contents:
    """What goes into (or came out of) a bundle."""

    entries: list[dict[str, object]] = field(default_factory=list)
    manifests: dict[str, Manifest] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)  # digest → size
    tags: list[tuple[TagRef, str, TagRecord]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why images were left out (incomplete)
    public: set[str] = field(default_factory=set)  # repositories an import marks readable anonymously

    def summary(self) -> str:
        size = sum(self.blobs.values()) + sum(len(m.body) for m in self.manifests.values())
        return f"{len(self.entries)} tags, {len(self.manifests)} manifests, {len(self.blobs)} blobs, {size} bytes"


def _collect(store: ExportSource, digest: str, manifest: Manifest, contents: Contents) -> bool:
    """Add a manifest and what it needs; False if the store lacks something an image needs.
    An index keeps only the children that were recorded (others were never pulled)."""
    child_manifests, blobs = children(manifest)
    sizes = {}
    for blob in blobs:
        blob_digest = descriptor_digest(blob)
        size = contents.blobs.get(blob_digest) or store.blob_size(blob_digest)
        if size is None:
            return False
        sizes[blob_digest] = size
    complete_children = 0
    for child in child_manifests:
        child_digest = descriptor_digest(child)
        stored = store.get_manifest(child_digest)
        if stored is not None and _collect(store, child_digest, stored, contents):
            complete_children += 1
    if child_manifests and not complete_children:
        return False
    contents.blobs.update(sizes)
    contents.manifests[digest] = manifest
    return True


def incomplete_message(ref: TagRef | str, missing: list[str] | tuple[str, ...]) -> str:
    """What an incomplete image lacks (store keys, see store/walk.py `lacking`), and how to complete it."""
    manifests = sum(1 for key in missing if keys.is_kind(key, keys.MANIFEST))
    blobs = len(missing) - manifests
    counts = [f"{n} {kind}{'' if n == 1 else 's'}" for n, kind in ((manifests, "manifest"), (blobs, "blob")) if n]
    return f"{ref} is incomplete in the cache ({', '.join(counts)} missing): complete it with regcache warm {ref}"


def collect_for_export(
    store: ExportSource, refs: list[TagRef] | None, records: AccessRecords | None = None
) -> Contents:
    """Every complete image of `refs` (None: of the whole store); an incomplete one is skipped,
    saying so, and is an error when it was named and nothing else of its tag was complete.
    `records`: to tell public repositories (without them, every entry says private)."""
    contents = Contents()
    for ref in refs if refs is not None else sorted(store.tag_refs(), key=str):
        exported = False
        lacks = []
        for accepted, record in sorted(store.tag_records(ref).items()):
            manifest = store.get_manifest(record.digest)
            missing = lacking(keys.manifest_key(record.digest), store.needs, store.has_entry)
            if manifest is None or missing or not _collect(store, record.digest, manifest, contents):
                lacks.append(incomplete_message(ref, missing or [keys.manifest_key(record.digest)]))
                continue
            annotations = {
                REF_NAME: str(ref),
                CONTAINERD_NAME: str(ref),
                REGISTRY: ref.namespace,
                REPOSITORY: ref.name,
                TAG: ref.tag,
                ACCEPT: accepted,
                ACCESS: "public" if records is not None and is_public(records, ref.repository) else "private",
            }
            descriptor = {"mediaType": manifest.media_type, "digest": record.digest, "size": len(manifest.body)}
            contents.entries.append({**descriptor, "annotations": annotations})
            exported = True
        if refs is not None and not exported:
            raise BundleError(lacks[0] if lacks else f"{ref} is not in the cache")
        contents.skipped += dict.fromkeys(lacks)
    return contents


def write_bundle(store: ExportSource, contents: Contents, out: Path) -> None:
    """Write a layout directory, or a tar when `out` ends in .tar; atomically (temp + rename)."""
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": contents.entries}
    files: list[tuple[str, bytes | Path]] = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, indent=2).encode()),
    ]
    files += [(_blob_name(d), m.body) for d, m in sorted(contents.manifests.items())]
    for digest in sorted(contents.blobs):
        path = store.blob_path(digest)
        if path is None:
            raise BundleError(f"{digest} left the cache during export")
        files.append((_blob_name(digest), Path(path)))
    out = out.resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / "oci-layout").exists():
        raise BundleError(f"{out} exists and is not an OCI layout: not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    temp.unlink(missing_ok=True)
    try:
        if out.suffix == ".tar":
            with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
                for name, content in files:
                    _tar_add(tar, name, content)
        else:
            for name, content in files:
                target = temp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    _copy_blob(content, target)
                else:
                    target.write_bytes(content)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        temp.unlink(missing_ok=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    temp.replace(out)


def _copy_blob(source: Path, target: Path) -> None:
    try:
        shutil.copyfile(source, target)
    except FileNotFoundError as err:  # evicted by a running regcache since we listed it
        raise BundleError(f"a blob left the cache during export ({source.name}); export again") from err


def _blob_name(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"blobs/{algorithm}/{hex_digest}"


def _tar_add(tar: tarfile.TarFile, name: str, content: bytes | Path) -> None:
    if isinstance(content, Path):
        try:
            tar.add(content, arcname=name)
        except FileNotFoundError as err:
            raise BundleError(f"{name} left the cache during export; export again") from err
        return
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(content), int(time.time()), 0o644
    tar.addfile(info, fileobj=io.BytesIO(content))


# import --------------------------------------------------------------------------------------


@contextmanager
def opened_layout(source: Path, scratch: Path) -> Iterator[Path]:
    """The layout directory: `source` itself, or a tar unpacked under `scratch` (same disk)."""
    if source.is_dir():
        yield source
        return
    if not tarfile.is_tarfile(source):
        raise BundleError(f"{source} is neither an OCI layout directory nor a tar of one")
    with tempfile.TemporaryDirectory(dir=scratch, prefix="bundle-") as temp:
        with tarfile.open(source) as tar:
            try:
                tar.extractall(temp, filter="data")  # refuses absolute paths, .., and outside links
            except (tarfile.TarError, OSError) as err:
                raise BundleError(f"{source}: cannot unpack: {err}") from err
        yield Path(temp)


def _read_json(path: Path) -> dict[str, object]:
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path.name}: {err}") from err
    if not isinstance(document, dict):
        raise BundleError(f"{path.name} is not a JSON object")
    return document


def _entry_ref(entry: dict[str, object], as_ref: TagRef | None, unnamed: int) -> TagRef:
    annotations = entry.get("annotations") or {}
    assert isinstance(annotations, dict)
    if all(key in annotations for key in (REGISTRY, REPOSITORY, TAG)):
        # Through the reference grammar: a bundle is input like any other.
        named = f"{annotations[REGISTRY]}/{annotations[REPOSITORY]}:{annotations[TAG]}"
        ref = parse_image_ref(named)
        if str(ref) != named:
            raise BundleError(f"index.json entry {entry.get('digest')} names {named!r}, not a valid reference")
        return ref
    ref_name = str(annotations.get(REF_NAME, ""))
    if as_ref is not None and (unnamed == 1 or ref_name == as_ref.tag):
        return as_ref
    if "/" in ref_name:  # containerd and others write the full reference
        return parse_image_ref(ref_name)
    raise BundleError(
        f"index.json entry {entry.get('digest')} (ref.name {ref_name!r}) does not say which registry and "
        "repository it is: name it with --as REGISTRY/REPOSITORY:TAG"
    )


def read_layout(root: Path, as_ref: TagRef | None, public: bool = False) -> Contents:
    """Parse and verify every manifest of a layout (blobs are verified when staged). Readable
    anonymously: the repositories of entries annotated public; with `public`, every one."""
    if _read_json(root / "oci-layout").get("imageLayoutVersion") != "1.0.0":
        raise BundleError("oci-layout: imageLayoutVersion is not 1.0.0")
    entries = _read_json(root / "index.json").get("manifests")
    if not isinstance(entries, list) or not entries:
        raise BundleError("index.json lists no manifests")
    unnamed = sum(1 for e in entries if REGISTRY not in (e.get("annotations") or {}))
    contents = Contents(entries=entries)
    now = time.time()
    for entry in entries:
        ref = _entry_ref(entry, as_ref, unnamed)
        digest = descriptor_digest(entry)
        manifest = _load_manifest(root, entry, contents, required=True)
        assert manifest is not None
        annotations = entry.get("annotations") or {}
        accepted = str(annotations.get(ACCEPT) or accept_key((manifest.media_type,)))
        contents.tags.append((ref, accepted, TagRecord(digest, manifest.media_type, len(manifest.body), now)))
        if public or annotations.get(ACCESS) == "public":
            contents.public.add(ref.repository)
    return contents


def _load_manifest(root: Path, descriptor: dict[str, object], contents: Contents, required: bool) -> Manifest | None:
    digest = descriptor_digest(descriptor)
    path = root / _blob_name(digest)
    if not path.is_file():
        if required:
            raise BundleError(f"manifest {digest} is missing from blobs/")
        return None  # an index child that was never recorded
    body = path.read_bytes()
    try:
        verify_digest(digest, body)
    except DigestMismatch as err:
        raise BundleError(f"manifest {digest} is corrupt: its bytes do not match its digest") from err
    media_type = descriptor.get("mediaType") or json.loads(body).get("mediaType") or ""
    manifest = Manifest(str(media_type), body)
    contents.manifests[digest] = manifest
    child_manifests, blobs = children(manifest)
    for child in child_manifests:
        _load_manifest(root, child, contents, required=False)
    for blob in blobs:
        size = blob.get("size")
        contents.blobs[descriptor_digest(blob)] = size if isinstance(size, int) else -1
    return manifest


def stage_blobs(store: Store, root: Path, blobs: dict[str, int]) -> list[BlobStaging]:
    """Copy every blob into staging, hashing as it goes; on any problem discard them all.
    Blobs the cache already has are verified too: a corrupt bundle is rejected whole."""
    staged: list[BlobStaging] = []
    try:
        for digest, size in sorted(blobs.items()):
            source = root / _blob_name(digest)
            if not source.is_file():
                raise BundleError(f"blob {digest} is missing from blobs/")
            staging = store.stage_blob(digest)
            staged.append(staging)
            with source.open("rb") as reader:
                while chunk := reader.read(COPY_CHUNK):
                    staging.write(chunk)
            try:
                staging.verify(size if size >= 0 else None)
            except DigestMismatch as err:
                raise BundleError(f"blob {digest} is corrupt: {err}") from err
            if store.blob_size(digest) is not None:  # verified, but the cache has it already
                staged.remove(staging)
                staging.discard()
    except BaseException:
        for staging in staged:
            staging.discard()
        raise
    return staged


def bundled_needs(manifests: dict[str, Manifest]) -> Callable[[str], list[str]]:
    """For `store.walk.reachable`: the digests a bundled manifest refers to (nothing for a blob)."""

    def needs(digest: str) -> list[str]:
        if digest not in manifests:
            return []
        child_manifests, blobs = children(manifests[digest])
        return [descriptor_digest(d) for d in child_manifests + blobs]

    return needs


def import_bundle(
    store: Store,
    source: Path,
    as_ref: TagRef | None,
    pin: bool = False,
    records: AccessRecords | None = None,
    public: bool = False,
) -> Contents:
    """Merge a layout into the store; with `records`, its public repositories (every one with
    `public`) are marked readable anonymously (see the module docstring)."""
    with opened_layout(source, store.staging_dir) as root:
        try:
            contents = read_layout(root, as_ref, public)
        except (ValueError, TypeError, AttributeError, KeyError, AssertionError) as err:
            raise BundleError(f"malformed index.json or manifest: {err!r}") from err
        staged = stage_blobs(store, root, contents.blobs)
    # Everything is verified: only now does the cache change.
    try:
        for staging in staged:
            store.commit_blob(staging, staging.size)
    finally:
        for staging in staged:
            staging.discard()  # what was not committed (no-op for what was)
    for digest, manifest in contents.manifests.items():
        store.put_manifest(digest, manifest)
    held = contents.manifests.keys() | contents.blobs.keys()
    for ref, accepted, record in contents.tags:
        store.put_tag(ref, tuple(accepted.split(",")) if accepted else (), record)
        # What the bundle holds only: an index child it lacks is not vouched for by it.
        needed = reachable([record.digest], bundled_needs(contents.manifests)) & held
        store.mark_seen(ref.repository, sorted(needed))
        if pin:
            store.pin(ref, record.digest)
    if records is not None:
        mark_public(records, sorted(contents.public))
    store.evict()
    return contents


def is_public(records: AccessRecords, repository: str) -> bool:
    return records.grant(ANONYMOUS, repository) is not None


def mark_public(records: AccessRecords, repositories: Iterable[str]) -> None:
    """Make these repositories readable anonymously (what the bundle or the scratch store said)."""
    for repository in repositories:
        records.put_grant(ANONYMOUS, repository, Grant(time.time(), None))
