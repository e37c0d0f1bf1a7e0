"""Manifests: by digest from the store, by tag revalidated upstream with a `HEAD`.

Tag rule: the upstream is asked with a `HEAD` (free on Docker Hub) carrying the client's
`Authorization` and `Accept`. If the digest it names is stored and acceptable to the client, the
stored bytes are served (REVALIDATED); otherwise the manifest is fetched and stored (MISS). If the
upstream cannot answer (unreachable, time-out, 5xx, 429), the last digest recorded for the same
registry, repository, tag and accepted media types is served (STALE) — to clients access.py lets
have it without a fresh answer. A client `HEAD` never becomes an upstream `GET`.

In a cluster (`shared`), a manifest is fetched by one node at a time: before its upstream `GET`
(by digest, or by a tag whose `HEAD` named the digest) a node takes the lease
`manifest:<digest>` in Redis; the others wait for the holder to store it (the bucket) and serve it
from there (REVALIDATED for a tag: the `HEAD` was this client's own; a `HIT` by digest, after the
access check every hit gets). Redis down: each node fetches for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from multidict import CIMultiDict

from regcache.oci.api import DIGEST_RE, RegistryRequest
from regcache.oci.digest import DigestMismatch, digest_of
from regcache.oci.manifest import Manifest, manifest_media_type, not_cacheable, referenced_digests
from regcache.oci.media import (
    SCHEMA1_MEDIA_TYPES,
    accept_key,
    is_acceptable,
    normalize_media_type,
)
from regcache.oci.reference import TagRef
from regcache.services.access import Access, credential
from regcache.services.answers import Answer, answer_from_head, error_answer, manifest_answer, relay
from regcache.services.identity import Client
from regcache.services.upstream import UpstreamClient, UpstreamUnavailable, upstream_failed
from regcache.store.base import FillLease, SharedTier, Store, TagRecord, new_tag_record
from regcache.store.errors import best_effort
from regcache.store.shared.errors import SharedUnavailable

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# While another node fetches a manifest (holds its lease), look in the store this often.
CLUSTER_POLL_SECONDS = 0.05


class ManifestService:
    def __init__(
        self, store: Store, upstream: UpstreamClient, access: Access, offline: bool, shared: SharedTier | None = None
    ) -> None:
        self._shared = shared  # the cluster (store/shared/tiered.py); None: this node alone
        self._store = store
        self._upstream = upstream
        self._access = access
        self._offline = offline
        self._inflight: dict[tuple[str, str, str, str], asyncio.Future[Answer]] = {}
        # Called with a tag HEAD's request and the digest its upstream HEAD named, when the store
        # lacks that manifest (completion.Completions.schedule).
        self.complete_later: Callable[[RegistryRequest, str], None] | None = None

    async def serve(self, req: RegistryRequest) -> Answer:
        client = await self._access.client(req)
        if self._offline:
            return await self._replay(req, client)
        if req.route.is_digest:
            return await self._by_digest(req, client)
        return await self._by_tag(req, client)

    async def _replay(self, req: RegistryRequest, client: Client) -> Answer:
        """Offline: only what was recorded, and a clear error naming what was not."""
        if req.route.is_digest:
            stored = await asyncio.to_thread(self._store.get_manifest, req.route.reference)
            found = (req.route.reference, stored) if stored is not None else None
        else:
            found = await asyncio.to_thread(self._recorded, req)
        if found is None:
            return not_in_offline_cache(req, "MANIFEST_UNKNOWN")
        digest, stored = found
        return await self._access.check(req, client, digest, "manifests") or manifest_answer(
            stored, digest, req.head, "HIT"
        )

    async def _by_digest(self, req: RegistryRequest, client: Client) -> Answer:
        digest = req.route.reference
        stored, seen = await asyncio.to_thread(self._stored_and_seen, req, digest)
        if stored is not None:
            return await self._access.check(req, client, digest, "manifests", seen) or manifest_answer(
                stored, digest, req.head, "HIT"
            )
        try:
            return await self._fetch(req, client, digest)
        except UpstreamUnavailable as err:
            return unavailable(req, str(err))

    def _stored_and_seen(self, req: RegistryRequest, digest: str) -> tuple[Manifest | None, bool]:
        """The stored manifest and whether it is seen in the request's repository: one thread hop."""
        return self._store.get_manifest(digest), self._store.is_seen(req.repository, digest)

    async def _by_tag(self, req: RegistryRequest, client: Client) -> Answer:
        try:
            check = await self._upstream.fetch("HEAD", req.url, CIMultiDict(req.headers))
        except UpstreamUnavailable as err:
            return await self._stale(req, client, str(err))
        if upstream_failed(check.status):
            failed = answer_from_head(check, req.head, "MANIFEST_UNKNOWN", "PASS")
            return await self._stale(req, client, f"upstream answered {check.status}", failed)
        digest = check.headers.get("Docker-Content-Digest", "")
        self._access.observe_answer(req, client, check)
        if check.status == 200 and DIGEST_RE.fullmatch(digest):
            stored = await asyncio.to_thread(self._revalidated, req, digest)
            if stored is not None:
                return manifest_answer(stored, digest, req.head, "REVALIDATED")
        if req.head:
            if check.status == 200 and DIGEST_RE.fullmatch(digest):
                # dockerd HEADs the tag, then GETs the digest: remember what the tag named, so
                # the same pull can be replayed from the store when the upstream is down.
                media_type = normalize_media_type(check.headers.get("Content-Type", ""))
                record = TagRecord(digest, media_type, 0, time.time())
                held = await asyncio.to_thread(self._remember_head, req, digest, record)
                # A client that holds the image may GET nothing: the store gets it anyway (not
                # schema 1, which is never stored).
                if not held and media_type not in SCHEMA1_MEDIA_TYPES and self.complete_later is not None:
                    self.complete_later(req, digest)
            return relay(check, "MISS" if check.status == 200 else "PASS")
        named = digest if check.status == 200 and DIGEST_RE.fullmatch(digest) else None
        try:
            answer = await self._fetch(req, client, None, named)
        except UpstreamUnavailable as err:
            return await self._stale(req, client, str(err))
        if upstream_failed(answer.status):  # Docker Hub's rate limit hits GETs, not HEADs
            return await self._stale(req, client, f"upstream answered {answer.status}", answer)
        return answer

    async def _fetch(
        self, req: RegistryRequest, client: Client, expected_digest: str | None, named: str | None = None
    ) -> Answer:
        """Fetch and store; concurrent requests for the same manifest share one upstream fetch
        (`named`: the digest a tag's `HEAD` named, for the cluster's lease)."""
        # Shared between clients the upstream has lately let read this repository (every tag
        # request is, by its HEAD); anyone else shares only with its own credentials.
        shared = self._access.granted_recently(client, req.repository)
        key = (req.method, req.url, accept_key(req.accepted), "" if shared else credential(req))
        fetch = self._inflight.get(key)
        if fetch is None:
            fetch = asyncio.ensure_future(self._cluster_fetch(req, client, expected_digest, named))
            self._inflight[key] = fetch
            fetch.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(fetch)  # a client that goes away does not cancel it for others

    async def _cluster_fetch(
        self, req: RegistryRequest, client: Client, expected_digest: str | None, named: str | None
    ) -> Answer:
        """`_fetch_once` under the cluster's lease on the manifest, or what another node stored."""
        lease, stored = await self._turn(expected_digest or named)
        if stored is not None:
            return await self._stored_by_another_node(req, client, expected_digest or named or "", stored)
        try:
            return await self._fetch_once(req, client, expected_digest)
        finally:
            if lease is not None:
                with contextlib.suppress(SharedUnavailable):
                    await lease.release()

    async def _turn(self, digest: str | None) -> tuple[FillLease | None, Manifest | None]:
        """This node's turn to fetch `digest`: (the lease, None); or (None, the manifest) another
        node stored meanwhile; (None, None) to fetch without a lease (single node, Redis down, a
        holder that stays past three lease times)."""
        if self._shared is None or digest is None:
            return None, None
        name, deadline = f"manifest:{digest}", time.monotonic() + 3 * self._shared.lease_seconds
        try:
            while (lease := await self._shared.acquire(name, None)) is None and time.monotonic() < deadline:
                await asyncio.sleep(CLUSTER_POLL_SECONDS)
                if (stored := await asyncio.to_thread(self._store.get_manifest, digest)) is not None:
                    return None, stored
        except SharedUnavailable:
            return None, None
        # The last holder stores before it lets go: the lease may be free because it is stored now.
        if lease is not None and (stored := await asyncio.to_thread(self._store.get_manifest, digest)) is not None:
            with contextlib.suppress(SharedUnavailable):
                await lease.release()
            return None, stored
        return lease, None

    async def _stored_by_another_node(
        self, req: RegistryRequest, client: Client, digest: str, stored: Manifest
    ) -> Answer:
        """The manifest another node fetched, as this node would answer from its store."""
        if req.route.is_digest:
            return await self._access.check(req, client, digest, "manifests") or manifest_answer(
                stored, digest, req.head, "HIT", note="fetched by another node"
            )
        if not is_acceptable(stored.media_type, req.accepted):  # what the client's own HEAD named: unlikely
            return await self._fetch_once(req, client, None)
        await asyncio.to_thread(self._remember, req, digest, stored, new_tag_record(stored, digest))
        return manifest_answer(stored, digest, req.head, "REVALIDATED", note="fetched by another node")

    async def _fetch_once(self, req: RegistryRequest, client: Client, expected_digest: str | None) -> Answer:
        answer = await self._upstream.fetch(req.method, req.url, CIMultiDict(req.headers), MAX_MANIFEST_SIZE)
        self._access.observe_answer(req, client, answer)
        if answer.status != 200 or req.head:
            return relay(answer, "MISS" if answer.status == 200 else "PASS")
        if len(answer.body) > MAX_MANIFEST_SIZE:
            return error_answer(502, "MANIFEST_INVALID", f"upstream manifest larger than {MAX_MANIFEST_SIZE} bytes")
        media_type = manifest_media_type(answer.body, answer.headers.get("Content-Type", ""))
        if media_type in SCHEMA1_MEDIA_TYPES:  # signed JSON: its digest is not that of the bytes
            return relay(answer, "MISS", note="schema 1 manifest, not cached")
        if reason := not_cacheable(answer.body, media_type):
            return relay(answer, "PASS", note=f"not cached: {reason}")
        digest = expected_digest or answer.headers.get("Docker-Content-Digest") or digest_of(answer.body)
        manifest = Manifest(media_type, answer.body)
        record = None if req.route.is_digest else new_tag_record(manifest, digest)
        try:
            not_stored = await asyncio.to_thread(self._remember, req, digest, manifest, record, True)
        except DigestMismatch:
            return error_answer(
                502, "MANIFEST_INVALID", f"upstream manifest bytes do not match {digest}", note="not stored"
            )
        relayed = relay(answer, "MISS", note=f"not cached: {not_stored}" if not_stored else "")
        if not answer.headers.get("Docker-Content-Digest"):  # optional upstream; clients like it
            relayed.headers.append(("Docker-Content-Digest", digest))
        return relayed

    async def _stale(self, req: RegistryRequest, client: Client, reason: str, failed: Answer | None = None) -> Answer:
        """The recorded manifest for this tag, if this client may have it without a fresh answer;
        else the upstream's own failure, else a 503."""
        if failed is not None:
            failed.note = reason
        if not req.route.is_digest:
            found = await asyncio.to_thread(self._recorded, req)
            if found is not None:
                digest, stored = found
                if await self._access.may_serve(req, client, digest):
                    return manifest_answer(stored, digest, req.head, "STALE", note=reason)
                return self._access.cannot_check(req, failed)
        if failed is not None:
            return failed
        return unavailable(req, reason)

    def _recorded(self, req: RegistryRequest) -> tuple[str, Manifest] | None:
        """The stored manifest this tag last resolved to for this client: the record for exactly
        its Accept list, else the newest record of a media type it accepts."""
        records = self._store.tag_records(tag_ref(req))
        exact = records.pop(accept_key(req.accepted), None)
        others = sorted(records.values(), key=lambda r: r.recorded_at, reverse=True)
        for record in [exact, *others]:
            if record is None or (record is not exact and not is_acceptable(record.media_type, req.accepted)):
                continue
            stored = self._store.get_manifest(record.digest)
            if stored is not None and is_acceptable(stored.media_type, req.accepted):
                return record.digest, stored
        return None

    # Store work for one request runs in one worker thread: each hop waits for the GIL, which the
    # event loop holds while it is busy with other clients.

    def _revalidated(self, req: RegistryRequest, digest: str) -> Manifest | None:
        """The stored manifest the tag's upstream `HEAD` named, if acceptable to the client: the
        tag record and what the repository holds are refreshed with it."""
        stored = self._store.get_manifest(digest)
        if stored is None or not is_acceptable(stored.media_type, req.accepted):
            return None
        self._remember(req, digest, stored, new_tag_record(stored, digest))
        return stored

    def _remember_head(self, req: RegistryRequest, digest: str, record: TagRecord) -> bool:
        """Record what a tag HEAD named; whether the store has that manifest."""
        self._remember(req, digest, None, record)
        return self._store.has_manifest(digest)

    def _remember(
        self,
        req: RegistryRequest,
        digest: str,
        manifest: Manifest | None,
        record: TagRecord | None,
        store_manifest: bool = False,
    ) -> str:
        """Store the manifest (`store_manifest`), record the tag (`record`), and note that the
        digest and what it references belong to the request's repository (access.py).
        Best effort (a full disk must not fail the answer): returns why the manifest was not
        stored, "" if it was (or was not to be). Raises DigestMismatch for bytes that do not match."""
        not_stored = ""
        if store_manifest and manifest is not None:
            not_stored = best_effort("manifests", self._store.put_manifest, digest, manifest)
        if record is not None and not not_stored:
            best_effort("tag records", self._store.put_tag, tag_ref(req), req.accepted, record)
        referenced = referenced_digests(manifest) if manifest is not None else []
        best_effort("access records", self._store.mark_seen, req.repository, [digest, *referenced])
        return not_stored


def tag_ref(req: RegistryRequest) -> TagRef:
    return TagRef(req.namespace, req.route.name, req.route.reference)


def unavailable(req: RegistryRequest, reason: str) -> Answer:
    return error_answer(
        503,
        "UNAVAILABLE",
        f"upstream unavailable and {req.describe()} is not cached",
        detail={"reason": reason},
        note=reason,
    )


def not_in_offline_cache(req: RegistryRequest, code: str) -> Answer:
    return error_answer(404, code, f"not in the offline cache: {req.describe()}", note="offline")
