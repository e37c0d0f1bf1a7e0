"""`regcache warm`: fetch images from their upstream registries into the store, no container
runtime needed — all platforms of a multi-arch image, or only the ones named.

It uses the same services as the proxy (manifest service, single-flight blob fills), so what it
stores and records is exactly what a pull through regcache would have stored and recorded. It
gets an anonymous pull token the way registry clients do (`/v2/` challenge → token realm), and
records it as anonymous: what the upstream serves with it is readable anonymously (access.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from multidict import CIMultiDict
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from .access import Access
from .access_records import DiskAccessRecords
from .blobs import Fill, Fills
from .bundle import BundleError, children, descriptor_digest
from .config import Settings
from .identity import ANONYMOUS
from .manifests import ManifestService
from .routes import Kind, RegistryRequest, Route, accepted_media_types
from .store import DiskStore, Manifest, TagRef
from .upstream import UpstreamClient, UpstreamUnavailable, bearer_challenge

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
PARALLEL_BLOBS = 4


class WarmError(Exception):
    pass


@dataclass
class Warmed:
    ref: TagRef
    digest: str
    manifests: int
    blobs: int


def platform_of(descriptor: dict[str, object]) -> str:
    platform = descriptor.get("platform")
    if not isinstance(platform, dict):
        return "?"
    parts = [platform.get("os", "?"), platform.get("architecture", "?"), platform.get("variant")]
    return "/".join(str(p) for p in parts if p)


def platform_wanted(platform: str, wanted: set[str] | None) -> bool:
    """`linux/arm64` selects `linux/arm64/v8` too; no selection means every platform."""
    return wanted is None or platform in wanted or "/".join(platform.split("/")[:2]) in wanted


class Warmer:
    def __init__(self, settings: Settings, store: DiskStore, progress: Progress) -> None:
        self._settings = settings
        self._store = store
        self._upstream = UpstreamClient(settings)
        self._records = DiskAccessRecords(store.cache_dir)
        self._access = Access(store, self._records, self._upstream, settings, offline=False)
        self._manifests = ManifestService(store, self._upstream, self._access, offline=False)
        self._fills = Fills(store, self._upstream)
        self._progress = progress
        self._parallel = asyncio.Semaphore(PARALLEL_BLOBS)

    def _host(self, namespace: str) -> str:
        """The registry host of a cache namespace (docker.io → registry-1.docker.io)."""
        return next((h for h, ns in self._settings.registries.items() if ns == namespace), namespace)

    async def warm(self, ref: TagRef, platforms: set[str] | None) -> Warmed:
        base = f"https://{self._host(ref.namespace)}"
        headers = CIMultiDict({"Accept": ", ".join(MANIFEST_TYPES)})
        authorization = await self._token(base, ref.name)
        if authorization:
            headers["Authorization"] = authorization
        digest, top = await self._manifest(base, ref, ref.tag, headers)
        images = [top]
        manifests = 1
        child_manifests, _ = children(top)
        for child in child_manifests:
            if platform_wanted(platform_of(child), platforms):
                images.append((await self._manifest(base, ref, descriptor_digest(child), headers))[1])
                manifests += 1
        blobs = {descriptor_digest(blob): blob for image in images for blob in children(image)[1]}
        await asyncio.gather(*(self._blob(base, ref, digest, headers) for digest in blobs))
        return Warmed(ref, digest, manifests, len(blobs))

    async def _token(self, base: str, name: str) -> str | None:
        ping = await self._upstream.fetch("GET", f"{base}/v2/", CIMultiDict())
        challenge = bearer_challenge(ping.headers.get("WWW-Authenticate", "")) if ping.status == 401 else None
        if not challenge or "realm" not in challenge:
            return None
        token = await self._upstream.realm_token(challenge, f"repository:{name}:pull", None)
        if token is None:
            raise WarmError(f"the token service {challenge['realm']} gave no anonymous pull token for {name}")
        authorization, lifetime = token
        self._access.record_token(authorization.removeprefix("Bearer "), ANONYMOUS, lifetime, (name,))
        return authorization

    async def _manifest(
        self, base: str, ref: TagRef, reference: str, headers: CIMultiDict[str]
    ) -> tuple[str, Manifest]:
        route = Route(Kind.MANIFEST, ref.name, reference)
        req = RegistryRequest(
            ref.namespace,
            f"{base}/v2/{ref.name}/manifests/{reference}",
            "GET",
            route,
            headers,
            accepted_media_types([headers["Accept"]]),
        )
        answer = await self._manifests.serve(req)
        answer_headers = dict(answer.headers)
        if answer.status != 200:
            raise WarmError(f"{req.describe()}: {answer.status} {answer.body[:300].decode(errors='replace')}")
        digest = answer_headers.get("Docker-Content-Digest") or reference
        stored = self._store.get_manifest(digest)
        if stored is None:
            raise WarmError(f"{req.describe()}: manifest {digest} was not stored")
        return digest, stored

    async def _blob(self, base: str, ref: TagRef, digest: str, headers: CIMultiDict[str]) -> None:
        if await asyncio.to_thread(self._store.has_blob, digest):
            return
        async with self._parallel:
            url = f"{base}/v2/{ref.name}/blobs/{digest}"
            fill, _ = self._fills.start(
                digest,
                url,
                CIMultiDict((k, v) for k, v in headers.items() if k != "Accept"),
                f"{ref.namespace}/{ref.name}",
            )
            task = self._progress.add_task(f"{ref.name} {digest[7:19]}", total=None)
            await self._follow(fill, task)
        if fill.upstream_refusal is not None:
            raise WarmError(f"{url}: upstream answered {fill.upstream_refusal.status}")
        if fill.pass_through:
            raise WarmError(f"{url}: not cached: {fill.pass_through}")
        if not fill.committed:
            raise WarmError(f"{url}: {fill.error}")

    async def _follow(self, fill: Fill, task: object) -> None:
        while not fill.finished:
            await fill.wait_beyond(fill.written)
            self._progress.update(task, completed=fill.written, total=fill.expected_size)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self._fills.close(wait=True)  # each fill ends by bringing the store under size_limit
        await self._upstream.close()
        await self._access.close()
        self._records.close()


async def warm_all(
    settings: Settings, store: DiskStore, refs: Iterable[TagRef], platforms: set[str] | None
) -> list[Warmed | str]:
    """Warm each image; a failure is reported (as a string) and does not stop the others."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    results: list[Warmed | str] = []
    with Progress(*columns, transient=True) as progress:
        warmer = Warmer(settings, store, progress)
        try:
            for ref in refs:
                try:
                    results.append(await warmer.warm(ref, platforms))
                except (WarmError, BundleError, UpstreamUnavailable, ValueError) as err:
                    results.append(f"{ref}: {err}")
        finally:
            await warmer.close()
    return results
