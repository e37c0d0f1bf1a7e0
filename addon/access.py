"""Who may read cached content: private images stay private.

A cached manifest or blob of repository R is served to a client only when
- the upstream has lately said, for this client's own credentials, that it may read R (a *grant*:
  any successful upstream request regcache made with them — the tag `HEAD` every pull starts with,
  a fetch — or, failing that, one cheap `HEAD` of the object itself, free on Docker Hub), and
- the object is known to belong to R (*seen*: fetched through R, referenced by a manifest of R, or
  confirmed by that `HEAD`), so a digest cannot be read through another repository.

Grants live in memory for `GRANT_SECONDS` per (credential hash, repository); seen pairs are
in the store. A normal pull needs no request beyond what it already made.

Policies where the upstream cannot be asked:
- upstream unreachable (stale mode): objects seen in R are served, so pulls keep working in an
  outage; a client the upstream refused while it was up is still refused;
- offline mode: every cached object is served to every client of the proxy — protect an offline
  cache with mitmproxy's proxy authentication (`proxyauth`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable

from multidict import CIMultiDict

from .answers import Answer, answer_from_head, error_answer
from .routes import RegistryRequest
from .store import Manifest, Store, referenced_digests
from .upstream import UpstreamClient, UpstreamUnavailable
from .writes import best_effort

GRANT_SECONDS = 300.0


def credential(req: RegistryRequest) -> str:
    return hashlib.sha256(req.headers.get("Authorization", "").encode()).hexdigest()


def repository(req: RegistryRequest) -> str:
    return f"{req.namespace}/{req.route.name}"


class Access:
    def __init__(self, store: Store, upstream: UpstreamClient, offline: bool) -> None:
        self._store = store
        self._upstream = upstream
        self._offline = offline
        self._grants: dict[tuple[str, str], float] = {}
        self._refused: dict[tuple[str, str], float] = {}

    def grant(self, req: RegistryRequest) -> None:
        """The upstream just answered this client's own request for this repository."""
        key = (credential(req), repository(req))
        self._grants[key] = time.monotonic() + GRANT_SECONDS
        self._refused.pop(key, None)
        if len(self._grants) > 10_000:  # forget expired grants now and then
            now = time.monotonic()
            self._grants = {k: t for k, t in self._grants.items() if t > now}

    def granted(self, req: RegistryRequest) -> bool:
        return self._grants.get((credential(req), repository(req)), 0.0) > time.monotonic()

    async def seen(self, req: RegistryRequest, digest: str, manifest: Manifest | None = None) -> None:
        """`digest` (and what its manifest references) belongs to the request's repository
        (best effort: the client is allowed either way, and is asked about again if it is not saved)."""
        digests: Iterable[str] = [digest, *(referenced_digests(manifest) if manifest is not None else [])]
        await asyncio.to_thread(best_effort, "access records", self._store.mark_seen, repository(req), list(digests))

    async def check(self, req: RegistryRequest, digest: str, kind: str, known: bool | None = None) -> Answer | None:
        """None if the client may have the cached object; otherwise the answer to send instead.
        `kind` is "manifests" or "blobs"; `known`: whether it is seen in the repository, if the
        caller has asked the store already."""
        if self._offline:
            return None
        key = (credential(req), repository(req))
        if known is None:
            known = await asyncio.to_thread(self._store.is_seen, repository(req), digest)
        if known and self.granted(req):
            return None
        url = req.url.split("/v2/", 1)[0] + f"/v2/{req.route.name}/{kind}/{digest}"
        try:
            answer = await self._upstream.fetch("HEAD", url, CIMultiDict(req.headers))
        except UpstreamUnavailable:
            if known and self._refused.get(key, 0.0) <= time.monotonic():
                return None
            return error_answer(503, "UNAVAILABLE", "upstream unavailable: this client's access cannot be checked")
        if answer.status == 200:
            self.grant(req)
            await self.seen(req, digest)
            return None
        unknown = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
        if answer.status == 429 or answer.status >= 500:
            return None if known else answer_from_head(answer, req.head, unknown, "PASS")
        self._refused[key] = time.monotonic() + GRANT_SECONDS
        return answer_from_head(answer, req.head, unknown, "PASS", note="upstream refused this client")
