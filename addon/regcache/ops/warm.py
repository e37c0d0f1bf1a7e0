"""`regcache warm`: fetch images from their upstream registries into the store, no container
runtime needed — all platforms of a multi-arch image, or only the ones named.

It fetches through the same services as the proxy, and with the same code as the proxy's background
completion (`completion.ImageFetcher`), so what it stores and records is exactly what a pull
through regcache would have stored and recorded. It gets an anonymous pull token the way registry
clients do (`/v2/` challenge → token realm), and records it as anonymous: what the upstream serves
with it is readable anonymously (services/access.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from multidict import CIMultiDict
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

from regcache.config import Settings
from regcache.oci.auth import bearer_challenge
from regcache.oci.manifest import BadManifest
from regcache.oci.media import CACHEABLE_MEDIA_TYPES
from regcache.oci.reference import TagRef
from regcache.ops.bundle import BundleError
from regcache.services.access import Access
from regcache.services.blobs import Fills
from regcache.services.completion import FetchError, ImageFetcher, ImageSource
from regcache.services.manifests import ManifestService
from regcache.services.upstream import UpstreamClient, UpstreamUnavailable
from regcache.store.access import ANONYMOUS, DiskAccessRecords
from regcache.store.base import SharedTier, Store


@dataclass
class Warmed:
    ref: TagRef
    digest: str
    manifests: int
    blobs: int


def default_platforms(settings: Settings) -> set[str] | None:
    """What `warm` fetches without `--platform`: the `platforms` setting when it is a list, else
    every platform (None)."""
    return set(settings.platforms) if isinstance(settings.platforms, tuple) else None


class Bars:
    """One progress bar per blob fill."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, what: str, written: int, expected: int | None) -> None:
        if what not in self._tasks:
            self._tasks[what] = self._progress.add_task(what, total=None)
        self._progress.update(self._tasks[what], completed=written, total=expected)


class Warmer:
    def __init__(self, settings: Settings, store: Store, progress: Progress, shared: SharedTier | None = None) -> None:
        self._settings = settings
        self._upstream = UpstreamClient(settings)
        self._records = DiskAccessRecords(store.cache_dir)
        self._access = Access(store, self._records, self._upstream, settings, offline=False)
        manifests = ManifestService(store, self._upstream, self._access, offline=False)
        self._fills = Fills(store, self._upstream, shared)  # shared: the cluster's leases and bucket
        self._fetcher = ImageFetcher(store, manifests, self._fills, Bars(progress))

    async def warm(self, ref: TagRef, platforms: set[str] | None) -> Warmed:
        base = f"https://{self._settings.registry_host(ref.namespace) or ref.namespace}"
        headers = CIMultiDict({"Accept": ", ".join(CACHEABLE_MEDIA_TYPES)})
        authorization = await self._token(base, ref.name)
        if authorization:
            headers["Authorization"] = authorization
        fetched = await self._fetcher.fetch(ImageSource(ref.namespace, ref.name, base, headers), ref.tag, platforms)
        return Warmed(ref, fetched.digest, fetched.manifests, fetched.blobs)

    async def _token(self, base: str, name: str) -> str | None:
        ping = await self._upstream.fetch("GET", f"{base}/v2/", CIMultiDict())
        challenge = bearer_challenge(ping.headers.get("WWW-Authenticate", "")) if ping.status == 401 else None
        if not challenge or "realm" not in challenge:
            return None
        token = await self._upstream.realm_token(challenge, f"repository:{name}:pull", None)
        if token is None:
            raise FetchError(f"the token service {challenge['realm']} gave no anonymous pull token for {name}")
        authorization, lifetime = token
        self._access.record_token(authorization.removeprefix("Bearer "), ANONYMOUS, lifetime, (name,))
        return authorization

    async def close(self) -> None:
        await self._fills.close(wait=True)  # each fill ends by bringing the store under size_limit
        await self._upstream.close()
        await self._access.close()
        self._records.close()


async def warm_all(
    settings: Settings,
    store: Store,
    refs: Iterable[TagRef],
    platforms: set[str] | None,
    shared: SharedTier | None = None,
) -> list[Warmed | str]:
    """Warm each image; a failure is reported (as a string) and does not stop the others. `shared`:
    the cluster's tier (store/shared/tiered.py) when `store` is a cluster's: each blob fill then
    takes the cluster's lease, as a node's does, and goes into the bucket."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    results: list[Warmed | str] = []
    with Progress(*columns, transient=True) as progress:
        warmer = Warmer(settings, store, progress, shared)
        try:
            for ref in refs:
                try:
                    results.append(await warmer.warm(ref, platforms))
                except (FetchError, BundleError, BadManifest, UpstreamUnavailable, ValueError) as err:
                    results.append(f"{ref}: {err}")
        finally:
            await warmer.close()
    return results
