"""Bundle parsing and import safety (end-to-end bundle tests are in tests/e2e/test_bundle.py)."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from regcache.oci.digest import digest_of
from regcache.oci.reference import TagRef
from regcache.ops.bundle import OCI_INDEX, BundleError, import_bundle, parse_image_ref, read_layout
from regcache.store.disk import DiskStore


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("alpine", TagRef("docker.io", "library/alpine", "latest")),
        ("alpine:3.20", TagRef("docker.io", "library/alpine", "3.20")),
        ("library/alpine:3.20", TagRef("docker.io", "library/alpine", "3.20")),
        ("docker.io/library/alpine:3.20", TagRef("docker.io", "library/alpine", "3.20")),
        ("index.docker.io/bitnami/redis:7", TagRef("docker.io", "bitnami/redis", "7")),
        ("ghcr.io/org/app:1.2", TagRef("ghcr.io", "org/app", "1.2")),
        ("registry.local:5000/team/app:v1", TagRef("registry.local:5000", "team/app", "v1")),
    ],
)
def test_parse_image_ref(text: str, ref: TagRef) -> None:
    assert parse_image_ref(text) == ref


@pytest.mark.parametrize("text", ["UPPER/case:1", "a:b:c", "x:-bad"])
def test_bad_image_ref(text: str) -> None:
    with pytest.raises(BundleError, match="not an image reference"):
        parse_image_ref(text)


def layout_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_escaping_its_directory_is_refused(tmp_path: Path) -> None:
    bundle = layout_tar(tmp_path / "evil.tar", {"oci-layout": b"{}", "../../escaped": b"x"})
    store = DiskStore(tmp_path / "cache", 10**9)
    with pytest.raises(BundleError, match="cannot unpack"):
        import_bundle(store, bundle, None)
    assert not list(tmp_path.rglob("escaped"))
    assert store.tag_refs() == []


def test_layout_without_names_needs_as(tmp_path: Path) -> None:
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64, "size": 0}}).encode()
    digest = digest_of(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "1"},
            }
        ],
    }
    bundle = layout_tar(
        tmp_path / "layout.tar",
        {
            "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
            "index.json": json.dumps(index).encode(),
            f"blobs/sha256/{digest[7:]}": manifest,
        },
    )
    store = DiskStore(tmp_path / "cache", 10**9)
    with pytest.raises(BundleError, match="--as"):
        import_bundle(store, bundle, None)
    with pytest.raises(BundleError, match=f"blob sha256:{'0' * 64} is missing"):
        import_bundle(store, bundle, TagRef("docker.io", "library/x", "1"))
    assert store.get_manifest(digest) is None


def layout_dir(path: Path, annotations: list[dict[str, str]]) -> Path:
    """A layout with one manifest, tagged once per annotations dict."""
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64, "size": 0}}).encode()
    digest = digest_of(manifest)
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(manifest)}
    entries = [{**descriptor, "annotations": a} for a in annotations]
    (path / "blobs" / "sha256").mkdir(parents=True)
    (path / "blobs" / "sha256" / digest[7:]).write_bytes(manifest)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    return path


def test_what_an_import_marks_readable_anonymously(tmp_path: Path) -> None:
    """regcache's own bundles say so per entry; anything else stays private (fails closed), unless
    imported with --public, which makes every imported repository public."""
    names = {"io.regcache.registry": "docker.io", "io.regcache.tag": "1"}
    layout = layout_dir(
        tmp_path / "layout",
        [
            {**names, "io.regcache.repository": "library/pub", "io.regcache.access": "public"},
            {**names, "io.regcache.repository": "library/priv", "io.regcache.access": "private"},
            {"org.opencontainers.image.ref.name": "docker.io/library/skopeo-made:1"},
        ],
    )
    assert read_layout(layout, None).public == {"docker.io/library/pub"}
    everything = {"docker.io/library/pub", "docker.io/library/priv", "docker.io/library/skopeo-made"}
    assert read_layout(layout, None, public=True).public == everything


def test_an_import_vouches_only_for_what_the_bundle_holds(tmp_path: Path) -> None:
    """An index whose bundle lacks one of its platform manifests: that digest is not marked as
    belonging to the repository (a manifest of it may be cached from elsewhere)."""
    config = b"{}"
    image = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config), "size": 2},
        "layers": [],
    }
    image_bytes = json.dumps(image).encode()
    absent = "sha256:" + "e" * 64
    children = [
        {"mediaType": image["mediaType"], "digest": digest, "size": 1} for digest in (digest_of(image_bytes), absent)
    ]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    names = {"io.regcache.registry": "docker.io", "io.regcache.repository": "library/multi", "io.regcache.tag": "1"}
    entry = {"mediaType": OCI_INDEX, "digest": digest_of(index), "size": len(index), "annotations": names}
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for data in (config, image_bytes, index):
        (layout / "blobs" / "sha256" / digest_of(data)[7:]).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    store = DiskStore(tmp_path / "cache", 10**9)
    import_bundle(store, layout, None)
    repository = "docker.io/library/multi"
    assert [store.is_seen(repository, digest_of(data)) for data in (config, image_bytes, index)] == [True] * 3
    assert not store.is_seen(repository, absent)
    store.close()
