"""Synthetic test images: built as OCI layouts in Python, pushed with skopeo.

Owns: deterministic layer content (pseudo-random bytes from a seed, so the
same spec always gives the same digests), valid image configs (``diff_ids``
are sha256 of the *uncompressed* tar, which dockerd verifies), OCI manifests
and indexes, a per-workdir cache of built layouts, pushing to the bed
registry with ``skopeo copy`` (format conversion to Docker v2s2 happens on
push: skopeo 1.9 cannot read Docker media types from an OCI layout), and
reading back what the registry stored (digests as stored, children, blobs).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import client
from ._process import without_proxies
from .registry import Registry

SKOPEO = "/usr/bin/skopeo"
# Bump when the build recipe changes, so cached layouts are not reused.
_RECIPE = "bed-images-v1"
_CREATED = "2024-01-01T00:00:00Z"
_MB = 1024 * 1024


@dataclass(frozen=True)
class LayerSpec:
    """``files`` small files of ``file_size`` bytes each, or one file of ``big`` bytes."""

    seed: str
    files: int = 3
    file_size: int = 4096
    big: int = 0
    # gzip level 0 (stored blocks) is still a valid gzip stream that every
    # client extracts; it makes the 100 MB layer cost 0.2 s instead of 3.6 s.
    level: int = 1


@dataclass(frozen=True)
class ImageSpec:
    """One image: per platform ("linux/amd64") the layer list."""

    name: str
    platforms: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    # Layers common to every platform and image (first in the layer list).
    shared: tuple[LayerSpec, ...] = ()

    def key(self) -> str:
        return hashlib.sha256(repr((_RECIPE, self)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class PushedImage:
    """An image as stored in the bed registry.

    ``digest``/``media_type`` are the top-level manifest's (the index or list
    for multi-arch images). ``children`` maps "linux/amd64" (with "/v8" for
    arm64 variants) to child manifest digests; empty for single-arch.
    ``blobs`` are the amd64 image's config (first) and layers, as stored.
    """

    repo: str
    tag: str
    digest: str
    media_type: str
    manifest: bytes
    children: dict[str, str] = field(default_factory=dict)
    child_media_types: dict[str, str] = field(default_factory=dict)
    amd64_digest: str = ""
    amd64_manifest: bytes = b""
    blobs: tuple[Blob, ...] = ()

    @property
    def ref(self) -> str:
        """Docker Hub style reference, e.g. ``library/oci-single:1``."""
        return f"{self.repo}:{self.tag}"

    @property
    def config(self) -> Blob:
        return self.blobs[0]

    @property
    def layers(self) -> tuple[Blob, ...]:
        return self.blobs[1:]

    @property
    def is_list(self) -> bool:
        return self.media_type in client.LIST_TYPES

    @property
    def total_size(self) -> int:
        return sum(b.size for b in self.blobs)


# -- building ------------------------------------------------------------------


class _Hashing:
    """Write-through file wrapper that hashes and counts what passes."""

    def __init__(self, inner: BinaryIO | gzip.GzipFile) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()


class _RandomReader(io.RawIOBase):
    """Deterministic pseudo-random bytes of a fixed length, produced on demand."""

    def __init__(self, seed: str, length: int) -> None:
        self._rng = random.Random(seed)
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._left)
        if n <= 0:
            return 0
        buf[:n] = self._rng.randbytes(n)
        self._left -= n
        return n


def _layer_entries(spec: LayerSpec) -> Iterator[tuple[str, int, BinaryIO]]:
    if spec.big:
        yield f"bed/{spec.seed}/big.bin", spec.big, io.BufferedReader(_RandomReader(spec.seed, spec.big), 4 * _MB)
        return
    for i in range(spec.files):
        data = random.Random(f"{spec.seed}/{i}").randbytes(spec.file_size)
        yield f"bed/{spec.seed}/file-{i}", spec.file_size, io.BytesIO(data)
    # A readable marker so a human looking into an extracted image sees what it is.
    marker = f"layer {spec.seed}\n".encode()
    yield f"bed/{spec.seed}/LAYER", len(marker), io.BytesIO(marker)


def _write_layer(spec: LayerSpec, blobs: Path) -> tuple[Blob, str]:
    """Write one gzip layer into ``blobs``; return (blob, diff_id)."""
    tmp = blobs / f".tmp-{os.getpid()}-{spec.seed}"
    with tmp.open("wb") as raw:
        outer = _Hashing(raw)
        # mtime=0 and no file name keep the gzip header, hence the digest, stable.
        with gzip.GzipFile(filename="", mode="wb", fileobj=outer, compresslevel=spec.level, mtime=0) as gz:
            inner = _Hashing(gz)
            with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                dirs: set[str] = set()
                for name, size, fh in _layer_entries(spec):
                    parts = name.split("/")
                    for depth in range(1, len(parts)):
                        d = "/".join(parts[:depth])
                        if d not in dirs:
                            dirs.add(d)
                            tar.addfile(_tarinfo(d, 0, tarfile.DIRTYPE, 0o755))
                    tar.addfile(_tarinfo(name, size, tarfile.REGTYPE, 0o644), fh)
    digest = "sha256:" + outer.sha.hexdigest()
    tmp.rename(blobs / outer.sha.hexdigest())
    return Blob(digest, outer.size, client.OCI_LAYER_GZIP), "sha256:" + inner.sha.hexdigest()


def _tarinfo(name: str, size: int, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.type = kind
    ti.mode = mode
    ti.mtime = 1704067200  # 2024-01-01, fixed for reproducible digests
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def _write_json(obj: object, blobs: Path) -> tuple[str, int, bytes]:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    hexd = hashlib.sha256(data).hexdigest()
    (blobs / hexd).write_bytes(data)
    return "sha256:" + hexd, len(data), data


def _platform(p: str) -> dict[str, str]:
    os_, arch, *variant = p.split("/")
    out = {"architecture": arch, "os": os_}
    if variant:
        out["variant"] = variant[0]
    return out


def build_layout(spec: ImageSpec, cache_dir: str | Path, tag: str = "1") -> Path:
    """Build ``spec`` as an OCI layout (cached under ``cache_dir``); ref name ``tag``.

    Multi-platform specs get an image index in ``index.json``; single-platform
    ones a plain manifest.
    """
    layout = Path(cache_dir) / f"{spec.name.replace('/', '_')}-{spec.key()}-{tag}"
    if (layout / ".complete").exists():
        return layout
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    shared = [_write_layer(ls, blobs) for ls in spec.shared]
    descriptors = []
    for plat in spec.platforms:
        arch_tag = plat.replace("/", "-")
        layers = shared + [
            _write_layer(LayerSpec(f"{ls.seed}-{arch_tag}", ls.files, ls.file_size, ls.big, ls.level), blobs)
            for ls in spec.layers
        ]
        config = {
            **_platform(plat),
            "created": _CREATED,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "Labels": {"bed.image": spec.name, "bed.platform": plat},
            },
            "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
            "history": [{"created": _CREATED, "created_by": f"bed layer {i}"} for i in range(len(layers))],
        }
        cfg_digest, cfg_size, _ = _write_json(config, blobs)
        manifest = {
            "schemaVersion": 2,
            "mediaType": client.OCI_MANIFEST,
            "config": {"mediaType": client.OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
            "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b, _ in layers],
        }
        m_digest, m_size, _ = _write_json(manifest, blobs)
        descriptors.append(
            {"mediaType": client.OCI_MANIFEST, "digest": m_digest, "size": m_size, "platform": _platform(plat)}
        )
    if len(descriptors) == 1:
        top = {k: v for k, v in descriptors[0].items() if k != "platform"}
    else:
        index = {"schemaVersion": 2, "mediaType": client.OCI_INDEX, "manifests": descriptors}
        i_digest, i_size, _ = _write_json(index, blobs)
        top = {"mediaType": client.OCI_INDEX, "digest": i_digest, "size": i_size}
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (layout / ".complete").write_text("ok\n")
    return layout


# -- pushing -------------------------------------------------------------------


def skopeo_env(workdir: Path) -> dict[str, str]:
    """Environment isolating skopeo from the host's config, credentials and proxies."""
    workdir.mkdir(parents=True, exist_ok=True)
    auth = workdir / "auth.json"
    if not auth.exists():
        auth.write_text("{}")
    regconf = workdir / "registries.conf"
    if not regconf.exists():
        # Empty registries.conf: no mirrors, no short-name aliases, no blocks.
        regconf.write_text("")
    env = without_proxies()
    env["REGISTRY_AUTH_FILE"] = str(auth)
    env["CONTAINERS_REGISTRIES_CONF"] = str(regconf)
    return env


def _policy(workdir: Path) -> Path:
    policy = workdir / "policy.json"
    if not policy.exists():
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return policy


def push(
    layout: Path,
    registry: Registry,
    repo: str,
    tag: str,
    *,
    fmt: str | None = None,
    all_platforms: bool = False,
    workdir: Path | None = None,
    src_tag: str = "1",
) -> str:
    """``skopeo copy`` the layout to the registry's admin instance; return the digest as stored.

    The admin instance shares storage with the public one but has no auth and
    no CDN redirect (see :class:`~bed.registry.Registry`).
    """
    work = workdir or layout.parent / "skopeo"
    env = skopeo_env(work)
    digestfile = work / f"digest-{repo.replace('/', '_')}-{tag}"
    cmd = [
        SKOPEO,
        "--policy",
        str(_policy(work)),
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--digestfile",
        str(digestfile),
    ]
    # Without conversion, keep the manifests byte for byte as built.
    cmd += ["--preserve-digests"] if fmt is None else ["--format", fmt]
    if all_platforms:
        cmd.append("--all")
    cmd += [f"oci:{layout}:{src_tag}", f"docker://{registry.admin_host}/{repo}:{tag}"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo push failed ({proc.returncode}): {' '.join(cmd[:-2])}\n{proc.stderr}")
    return digestfile.read_text().strip()


def describe(registry: Registry, repo: str, tag: str) -> PushedImage:
    """Read back what the registry stores for ``repo:tag`` (via the admin instance)."""

    def get_manifest(ref: str) -> client.Response:
        r = client.request("GET", f"{registry.admin_url}/v2/{repo}/manifests/{ref}", {"Accept": client.ACCEPT_ALL})
        if r.status != 200:
            raise RuntimeError(f"GET manifest {repo}:{ref} → {r.status}: {r.body[:300]!r}")
        return r

    top = get_manifest(tag)
    digest = top.headers["Docker-Content-Digest"]
    media_type = top.headers["Content-Type"]
    children: dict[str, str] = {}
    child_types: dict[str, str] = {}
    amd64_digest, amd64 = digest, top
    if media_type in client.LIST_TYPES:
        for d in json.loads(top.body)["manifests"]:
            p = d["platform"]
            key = "/".join([p["os"], p["architecture"]] + ([p["variant"]] if p.get("variant") else []))
            children[key] = d["digest"]
            child_types[key] = d["mediaType"]
        amd64_digest = children["linux/amd64"]
        amd64 = get_manifest(amd64_digest)
    m = json.loads(amd64.body)
    blobs = tuple(Blob(b["digest"], b["size"], b["mediaType"]) for b in [m["config"], *m["layers"]])
    return PushedImage(
        repo=repo,
        tag=tag,
        digest=digest,
        media_type=media_type,
        manifest=top.body,
        children=children,
        child_media_types=child_types,
        amd64_digest=amd64_digest,
        amd64_manifest=amd64.body,
        blobs=blobs,
    )


# -- the standard set ------------------------------------------------------------

BASE = LayerSpec("base", files=4, file_size=64 * 1024)

SPECS: dict[str, tuple[ImageSpec, str | None, bool]] = {
    # name → (spec, skopeo --format, --all)
    "library/oci-single": (
        ImageSpec("library/oci-single", ("linux/amd64",), (LayerSpec("oci-single"),), (BASE,)),
        None,
        False,
    ),
    "library/oci-multi": (
        ImageSpec("library/oci-multi", ("linux/amd64", "linux/arm64/v8"), (LayerSpec("oci-multi"),), (BASE,)),
        None,
        True,
    ),
    "library/docker-multi": (
        ImageSpec(
            "library/docker-multi", ("linux/amd64", "linux/arm64/v8"), (LayerSpec("docker-multi", files=2),), (BASE,)
        ),
        "v2s2",
        True,
    ),
    "library/big": (
        ImageSpec(
            "library/big",
            ("linux/amd64",),
            (LayerSpec("big-data", big=100 * _MB + 12345, level=0), LayerSpec("big-small", files=2)),
        ),
        "v2s2",
        False,
    ),
}


@dataclass(frozen=True)
class ImageSet:
    oci_single: PushedImage
    oci_multi: PushedImage
    docker_multi: PushedImage
    big: PushedImage

    def all(self) -> list[PushedImage]:
        return [self.oci_single, self.oci_multi, self.docker_multi, self.big]


def push_standard_images(registry: Registry, workdir: str | Path, tag: str = "1") -> ImageSet:
    """Build (or reuse cached) layouts and push the four standard images."""
    cache = Path(workdir) / "layouts"
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, PushedImage] = {}
    for repo, (spec, fmt, all_platforms) in SPECS.items():
        layout = build_layout(spec, cache)
        push(layout, registry, repo, tag, fmt=fmt, all_platforms=all_platforms, workdir=Path(workdir) / "skopeo")
        out[repo] = describe(registry, repo, tag)
    return ImageSet(
        oci_single=out["library/oci-single"],
        oci_multi=out["library/oci-multi"],
        docker_multi=out["library/docker-multi"],
        big=out["library/big"],
    )


def push_variant(
    registry: Registry,
    workdir: str | Path,
    repo: str,
    tag: str,
    seed: str,
    *,
    fmt: str | None = None,
) -> PushedImage:
    """Push a small single-arch image whose content depends on ``seed``.

    For tests that move a tag to new content (revalidation, stale tags).
    """
    spec = ImageSpec(repo, ("linux/amd64",), (LayerSpec(f"variant-{seed}"),), (BASE,))
    layout = build_layout(spec, Path(workdir) / "layouts")
    push(layout, registry, repo, tag, fmt=fmt, workdir=Path(workdir) / "skopeo")
    return describe(registry, repo, tag)
