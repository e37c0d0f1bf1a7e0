"""Property-based tests (hypothesis): routing never trusts a hostile path, ingest never stores
bytes that do not match their digest."""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from regcache.oci.api import DIGEST_RE, NAME_RE, TAG_RE, Kind, parse_path
from regcache.oci.digest import DigestMismatch, digest_of
from regcache.oci.manifest import Manifest
from regcache.oci.media import accepted_media_types
from regcache.store.disk import DiskStore

path_text = st.text(alphabet=st.characters(codec="ascii"), max_size=300)
path_parts = st.lists(
    st.sampled_from(["v2", "library", "..", ".", "%2e%2e", "a", "A", "manifests", "blobs", "sha256:" + "a" * 64, ""]),
    max_size=8,
)


@given(st.one_of(path_text, path_parts.map(lambda parts: "/" + "/".join(parts))))
def test_routing_accepts_only_grammatical_paths(path: str) -> None:
    route = parse_path(path)
    if route.kind in (Kind.MANIFEST, Kind.BLOB):
        assert NAME_RE.fullmatch(route.name)
        assert ".." not in route.name.split("/")
        assert DIGEST_RE.fullmatch(route.reference) or (
            route.kind is Kind.MANIFEST and TAG_RE.fullmatch(route.reference)
        )
    if route.kind is Kind.INVALID:
        assert route.error_code in ("NAME_INVALID", "DIGEST_INVALID", "TAG_INVALID")


@given(st.lists(st.text(max_size=40), max_size=5))
def test_accept_normalisation_ignores_order_and_splitting(headers: list[str]) -> None:
    joined = accepted_media_types([", ".join(headers)])
    assert joined == accepted_media_types(list(reversed(headers)))
    assert list(joined) == sorted(set(joined))


# One store for all examples (hypothesis runs many per test); removed when the run ends.
_store_dir = Path(tempfile.mkdtemp(prefix="regcache-properties-"))
_store = DiskStore(_store_dir, 10**9)
atexit.register(shutil.rmtree, _store_dir, True)


@settings(max_examples=60)
@given(body=st.binary(max_size=2048), other=st.binary(max_size=64))
def test_ingest_stores_only_matching_bytes(body: bytes, other: bytes) -> None:
    good = digest_of(body)
    _store.put_manifest(good, Manifest("application/json", body))
    assert _store.get_manifest(good) == Manifest("application/json", body)
    if other != body:
        wrong = digest_of(other)
        try:
            _store.put_manifest(wrong, Manifest("application/json", body))
        except DigestMismatch:
            pass
        else:
            raise AssertionError("stored bytes under a digest they do not have")
        stored = _store.get_manifest(wrong)
        assert stored is None or stored.body == other


@settings(max_examples=30)
@given(data=st.binary(min_size=1, max_size=4096), cut=st.integers(min_value=0, max_value=4095))
def test_blob_commit_rejects_any_truncation_or_corruption(data: bytes, cut: int) -> None:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    damaged = data[: cut % len(data)] if cut % 2 else data[:-1] + bytes([data[-1] ^ 1])
    staging = _store.stage_blob(digest)
    staging.write(damaged)
    try:
        _store.commit_blob(staging, len(data))
    except DigestMismatch:
        pass
    else:
        raise AssertionError("committed damaged bytes")
    handle = _store.open_blob(digest)
    if handle is not None:
        with handle:
            assert handle.read() == data  # only ever the real bytes, from an earlier good commit
