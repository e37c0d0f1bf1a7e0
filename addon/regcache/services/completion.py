"""Completing images in the store: an image's manifest, the platform manifests of the platforms a
cache serves, and their blobs, fetched through the same services as a pull (single-flight manifest
fetches; blob fills, joined when one is running). One implementation for `regcache warm` and for
the proxy's background completion.

Background completion: a client that holds an image already (dockerd after earlier pulls)
resolves its tag with a `HEAD` and fetches only what it lacks, so no manifest `GET` may reach
regcache, and the tag would be recorded for a manifest the store lacks: `regcache ls` would show
it with 0 B and an offline replay could not serve it. So when a tag `HEAD` names a digest the store
lacks, regcache fetches that image in the background, with the client's own request headers (its
`Authorization`: a client that brought its own never gets regcache's credentials used for it).
The client's own `GET` by digest goes first: dockerd `HEAD`s the tag and `GET`s the digest at
once, so completion waits `COMPLETION_GRACE_SECONDS`, then joins a fetch in flight or finds the
manifest stored, and a pull still makes one manifest `GET` per digest (on Docker Hub, one counted
pull). Each repository and digest is completed at most once per process.

Platforms (setting `platforms`): `auto` — those the store holds already for the repository (the
platform manifests of its indexes that are stored) plus this host's own; `all`; or a list.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass

from multidict import CIMultiDict

from regcache.oci.api import RegistryRequest
from regcache.oci.manifest import BadManifest, Manifest, children, descriptor_digest, manifest_references, platform_of
from regcache.oci.reference import repository_of
from regcache.services.blobs import Fills, FillView
from regcache.services.manifests import ManifestService
from regcache.services.requests import registry_request
from regcache.services.upstream import UpstreamUnavailable
from regcache.store.base import Store
from regcache.store.errors import STORE_ERRORS

log = logging.getLogger("regcache")

# How long the client's own `GET` of a digest its tag `HEAD` named has before completion fetches it.
COMPLETION_GRACE_SECONDS = 3.0
PARALLEL_BLOBS = 4
# Completions remembered (so never repeated), the oldest forgotten first.
MAX_REMEMBERED = 10_000

# platform.machine() → the architecture (and variant) registries name.
ARCHITECTURES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "armv6l": "arm/v6",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

# A fill's progress: (what, bytes written, bytes expected if known).
Progress = Callable[[str, int, int | None], None]


class FetchError(Exception):
    """An image could not be completed; the message says which request failed and how."""


def host_platform(machine: str | None = None) -> str:
    """The platform of this host's containers: `linux/amd64`, `linux/arm64`, `linux/arm/v7`."""
    machine = (machine or platform.machine()).lower()
    return f"linux/{ARCHITECTURES.get(machine, machine)}"


def platform_wanted(platform_: str, wanted: set[str] | None) -> bool:
    """`linux/arm64` selects `linux/arm64/v8` too; no selection means every platform."""
    return wanted is None or platform_ in wanted or "/".join(platform_.split("/")[:2]) in wanted


def held_platforms(store: Store, namespace: str, name: str) -> set[str]:
    """The platforms whose manifests the store holds for a repository's multi-arch tags."""
    held = set()
    for ref in store.tag_refs():
        if (ref.namespace, ref.name) != (namespace, name):
            continue
        for record in store.tag_records(ref).values():
            index = store.peek_manifest(record.digest)
            try:
                child_manifests = manifest_references(index)[0] if index is not None else []
            except ValueError:
                continue
            held |= {
                platform_of(child)
                for child in child_manifests
                if isinstance(child.get("digest"), str) and store.has_manifest(str(child["digest"]))
            }
    return held


def selected_platforms(setting: str | tuple[str, ...], held: Callable[[], set[str]]) -> set[str] | None:
    """The platforms setting as a selection for `platform_wanted` (None: all)."""
    if setting == "all":
        return None
    if setting == "auto":
        return held() | {host_platform()}
    return set(setting)


@dataclass(frozen=True)
class ImageSource:
    """Where an image is fetched from, and with which request headers (Authorization, Accept)."""

    namespace: str
    name: str
    base: str  # the registry's logical base URL, e.g. https://registry-1.docker.io
    headers: CIMultiDict[str]

    @classmethod
    def of(cls, req: RegistryRequest) -> ImageSource:
        """The source a client's request came through, with its headers."""
        return cls(req.namespace, req.route.name, req.url.split("/v2/", 1)[0], CIMultiDict(req.headers))

    @property
    def repository(self) -> str:
        return repository_of(self.namespace, self.name)

    def manifest_request(self, reference: str) -> RegistryRequest:
        path = f"/v2/{self.name}/manifests/{reference}"
        return registry_request(self.namespace, f"{self.base}{path}", "GET", path, self.headers.items())

    def blob_fill(self, digest: str) -> tuple[str, CIMultiDict[str]]:
        """The URL and headers of a blob fill (no Accept: it is about manifests)."""
        url = f"{self.base}/v2/{self.name}/blobs/{digest}"
        return url, CIMultiDict((k, v) for k, v in self.headers.items() if k.lower() != "accept")


@dataclass(frozen=True)
class Fetched:
    digest: str
    manifests: int  # the image's manifests for the platforms asked for, all stored now
    blobs: int


class ImageFetcher:
    """Fetch an image into the store, skipping what it holds: a manifest (by tag or digest), its
    platform manifests of the platforms wanted, and their blobs."""

    def __init__(
        self, store: Store, manifests: ManifestService, fills: Fills, progress: Progress | None = None
    ) -> None:
        self._store = store
        self._manifests = manifests
        self._fills = fills
        self._progress = progress
        self._parallel = asyncio.Semaphore(PARALLEL_BLOBS)

    async def fetch(self, source: ImageSource, reference: str, platforms: set[str] | None) -> Fetched:
        digest, top = await self._manifest(source, reference)
        images = [top]
        child_manifests, _ = children(top)
        for child in child_manifests:
            if platform_wanted(platform_of(child), platforms):
                images.append((await self._manifest(source, descriptor_digest(child)))[1])
        blobs = {descriptor_digest(blob) for image in images for blob in children(image)[1]}
        await asyncio.gather(*(self._blob(source, blob) for blob in blobs))
        return Fetched(digest, len(images), len(blobs))

    async def _manifest(self, source: ImageSource, reference: str) -> tuple[str, Manifest]:
        """Served as a client's `GET` would be: from the store, a fetch in flight, or upstream."""
        req = source.manifest_request(reference)
        answer = await self._manifests.serve(req)
        if answer.status != 200:
            raise FetchError(f"{req.describe()}: {answer.status} {answer.body[:300].decode(errors='replace')}")
        digest = dict(answer.headers).get("Docker-Content-Digest") or reference
        stored = await asyncio.to_thread(self._store.get_manifest, digest)
        if stored is None:
            raise FetchError(f"{req.describe()}: manifest {digest} was not stored ({answer.note or answer.result})")
        return digest, stored

    async def _blob(self, source: ImageSource, digest: str) -> None:
        if await asyncio.to_thread(self._store.has_blob, digest):
            return
        url, headers = source.blob_fill(digest)
        async with self._parallel:
            fill = self._fills.join(digest, url, headers, source.repository)
            await self._finished(fill, f"{source.name} {digest[7:19]}")
        if fill.upstream_refusal is not None:
            raise FetchError(f"{url}: upstream answered {fill.upstream_refusal.status}")
        if fill.pass_through:
            raise FetchError(f"{url}: not cached: {fill.pass_through}")
        if not fill.committed:
            raise FetchError(f"{url}: {fill.error}")

    async def _finished(self, fill: FillView, what: str) -> None:
        while not fill.finished:
            await fill.wait_beyond(fill.written)
            if self._progress is not None:
                self._progress(what, fill.written, fill.expected_size)


class Completions:
    """Background completion of the images that tag `HEAD`s named and the store lacks."""

    def __init__(
        self,
        store: Store,
        manifests: ManifestService,
        fills: Fills,
        platforms: str | tuple[str, ...],
        grace: float = COMPLETION_GRACE_SECONDS,
    ) -> None:
        self._store = store
        self._fetcher = ImageFetcher(store, manifests, fills)
        self._platforms = platforms
        self._grace = grace
        self._seen: dict[tuple[str, str], None] = {}  # (repository, digest), started (in order)
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, req: RegistryRequest, digest: str) -> None:
        """Complete the image `digest` that `req`'s tag `HEAD` named, in the background, once."""
        key = (req.repository, digest)
        if key in self._seen:
            return
        self._seen[key] = None
        if len(self._seen) > MAX_REMEMBERED:
            del self._seen[next(iter(self._seen))]
        task = asyncio.create_task(self._complete(req, digest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _complete(self, req: RegistryRequest, digest: str) -> None:
        await asyncio.sleep(self._grace)  # the client's own GET by digest first
        source = ImageSource.of(req)
        image = req.describe()
        try:
            platforms = await asyncio.to_thread(self._selected, source)
            fetched = await self._fetcher.fetch(source, digest, platforms)
        except (FetchError, BadManifest, UpstreamUnavailable, *STORE_ERRORS) as err:
            log.warning("INCOMPLETE %s -> %s: %s (regcache warm %s completes it)", image, digest, err, image)
            return
        except Exception:  # a bug: say so, and keep serving
            log.exception("regcache: completing %s -> %s failed", image, digest)
            return
        wanted = "all platforms" if platforms is None else ", ".join(sorted(platforms))
        log.info(
            "COMPLETED %s -> %s: %d manifests, %d blobs in the store (%s)",
            image,
            digest,
            fetched.manifests,
            fetched.blobs,
            wanted,
        )

    def _selected(self, source: ImageSource) -> set[str] | None:
        return selected_platforms(self._platforms, lambda: held_platforms(self._store, source.namespace, source.name))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
