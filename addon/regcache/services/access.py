"""Who may read cached content: private images stay private, also when the upstream cannot be asked.

A cached manifest or blob of repository R is served only if it is known to belong to R (*seen*:
fetched through R, referenced by a manifest of R, or confirmed by a `HEAD` through R), so a digest
cannot be read through another repository. A manifest's references are read by its media type
only (store.referenced_digests: an index's platform manifests, an image manifest's config and
layers, never foreign layers with `urls`): what a registry checks a manifest pushed to R against —
it may reference only what R holds. And
- with a fresh upstream answer (reachable, and 200/401/403/404): when the upstream accepts this
  client's own request for R — the tag `HEAD` every pull starts with, a fetch, or one `HEAD` of the
  object itself (free on Docker Hub); refusals are relayed with their challenge;
- without one (unreachable, time-out, 429, 5xx, offline mode): only to a
  client presenting an identity (identity.py) the upstream accepted for R within `access_grant_ttl`
  — for a bearer token, also before it expires — or when R was seen to be readable anonymously.
  Otherwise it fails closed: the upstream's own 429/5xx answer, else `503 UNAVAILABLE`; offline,
  `401` with the registry's recorded challenge. `offline_access: open` serves everything offline.

A token regcache issued (while the auth realm could not answer) goes upstream like any other
credential when the upstream can be asked: the upstream's refusal is relayed with its challenge, so
the client gets a real token from the realm, and revokes nothing (it judges regcache's token, not
the identity the token carries); without a fresh answer, the carried identity's grants decide.

*Grants* — (identity, R) → when the upstream accepted it — are made by every 200 for a request made
with that identity (and revoked by a 401/403 that judged it); the `anonymous` identity's grant means
"readable anonymously" and does not expire. A grant used within `GRANT_SECONDS` needs no upstream
request (the fast path): a normal pull asks nothing beyond what it asked anyway. Grants live in
memory and in the access records (store/access.py), each saved at most once a minute. A
revocation is written ahead of every other queued write; one the store refuses (a full disk) is
kept in memory for the rest of the run — after a restart, the stored grant counts again until it
expires (an anonymous one: until a fresh refusal of an anonymous token).

In a cluster the records are shared (store/shared/access.py) and another node may revoke a grant
this one holds in memory: the fast path is `CLUSTER_GRANT_SECONDS` (30 s), and without a fresh
answer a grant held in memory longer than that counts only if the cluster's records still hold it.
So a revocation on one node stops every node serving within 30 s.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from multidict import CIMultiDict

from regcache.config import Settings
from regcache.oci.api import RegistryRequest
from regcache.oci.manifest import Manifest, referenced_digests
from regcache.services.answers import Answer, answer_from_head, error_answer
from regcache.services.identity import (
    ISSUED_PREFIX,
    UNKNOWN_TOKEN_LIFETIME,
    Client,
    Identity,
    Keyer,
    basic_secret,
    jwt_expiry,
    split_authorization,
    token_requester,
)
from regcache.services.upstream import (
    Recent,
    UpstreamAnswer,
    UpstreamClient,
    UpstreamUnavailable,
    origin_of,
    upstream_failed,
)
from regcache.store.access import ANONYMOUS, AccessRecords, Grant, RecordWriter, TokenRecord
from regcache.store.base import Store
from regcache.store.errors import STORE_ERRORS, best_effort

GRANT_SECONDS = 300.0
# In a cluster another node may revoke a grant this node holds in memory: the fast path is this
# short there, and a grant in memory older than this is read back from the cluster's records
# before it counts without a fresh upstream answer. So a revocation reaches every node within it.
CLUSTER_GRANT_SECONDS = 30.0
SAVE_EVERY = 60.0  # a grant accepted again is saved to the store at most this often
MAX_REMEMBERED = 50_000  # in-memory entries of each kind before the least recently set is forgotten


def credential(req: RegistryRequest) -> str:
    return hashlib.sha256(req.headers.get("Authorization", "").encode()).hexdigest()


def registry_of(url: str) -> str:
    """The registry a logical URL is for, as challenges are recorded: `host[:port]`."""
    return urlsplit(url).netloc.lower()


def judged(client: Client, status: int, challenge: str) -> bool:
    """Did this 401/403 refuse the client's credential? A registry answering a request without a
    bearer token with a `Bearer` challenge only asks for a token (Docker Hub does so even for
    public images); a `Basic` challenge to a bearer token asks for another kind of credential."""
    if status == 403:
        return True
    asked = challenge.strip().partition(" ")[0].lower()
    if asked == "bearer":
        return client.scheme in ("bearer", "configured")
    if asked == "basic":
        return client.scheme in ("basic", "none", "configured")
    return True


def with_scope(challenge: str, name: str) -> str:
    """A recorded `/v2/` challenge for a request of repository `name`: Bearer challenges name the
    pull scope, as a registry's own refusal would."""
    if not challenge.lower().startswith("bearer ") or "scope=" in challenge or not name:
        return challenge
    return f'{challenge},scope="repository:{name}:pull"'


class Access:
    def __init__(
        self,
        store: Store,
        records: AccessRecords,
        upstream: UpstreamClient,
        settings: Settings,
        offline: bool,
        cluster: bool = False,
    ) -> None:
        """`cluster`: the records are a cluster's (other nodes revoke grants in them)."""
        self._store = store
        self._records = records
        self._upstream = upstream
        self._settings = settings
        self._offline = offline
        self.open_offline = offline and settings.offline_access == "open"
        self._ttl = settings.access_grant_ttl
        self._cluster = cluster
        self._fast = min(GRANT_SECONDS, CLUSTER_GRANT_SECONDS) if cluster else GRANT_SECONDS
        self.keyer = Keyer(records.secret())
        self.writer = RecordWriter()
        # Bounded (clients choose what is remembered): a grant forgotten here is read from the store.
        self._grants: Recent[tuple[str, str], Grant] = Recent(MAX_REMEMBERED, self._forget)
        self._saved_at: dict[tuple[str, str], float] = {}  # of the grants in memory
        self._unsaved: dict[tuple[str, str], Grant] = {}  # accepted again since last saved
        # token key → record (None: looked up, unknown)
        self._tokens: Recent[str, TokenRecord | None] = Recent(MAX_REMEMBERED)
        self._held: Recent[str, None] = Recent(MAX_REMEMBERED)  # identities granted something this run
        self._confirmed: Recent[tuple[str, str], float] = Recent(MAX_REMEMBERED)  # cluster: last read back
        self._revoked: set[tuple[str, str]] = set()  # this run: not to be read back from the store
        self._undropped: set[tuple[str, str]] = set()  # revocations the store refused: kept in memory
        self._challenges = records.challenges()

    # identities ----------------------------------------------------------------------------
    async def client(self, req: RegistryRequest) -> Client:
        """Who presents this request (identity.py)."""
        scheme, value = split_authorization(req.headers.get("Authorization", ""))
        if scheme == "none":
            if self._settings.credential_for(*origin_of(req.url)) is not None:
                # regcache authenticates with its own credentials: every such client shares them.
                return Client((Identity(self.keyer.key("configured", registry_of(req.url))),), "configured")
            return Client((Identity(ANONYMOUS),))
        if scheme == "basic":
            return Client((Identity(self.keyer.key("basic", basic_secret(value))),), "basic")
        if scheme == "other":
            return Client((Identity(self.keyer.key("authorization", value)),), "other")
        now = time.time()
        if value.startswith(ISSUED_PREFIX):
            carried = self.keyer.verify(value, now)
            return Client((carried,) if carried else (), "bearer", issued_here=True)
        return Client(await self._bearer(value, now), "bearer")

    async def _bearer(self, token: str, now: float) -> tuple[Identity, ...]:
        """A bearer token's own identity until it expires, plus whoever obtained it (if regcache
        relayed that exchange). An expired token holds nothing."""
        key = self.keyer.key("bearer", token)
        record = await self._token_record(key)
        until = jwt_expiry(token) or (record.until if record is not None else None)
        if until is not None and until <= now:
            return ()
        own = Identity(key, until if until is not None else now + UNKNOWN_TOKEN_LIFETIME)
        if record is None:
            return (own,)
        return own, Identity(record.identity, judged=frozenset(record.repositories))

    async def requester(self, authorization: str, query: str, body: bytes | None, content_type: str) -> str:
        """The identity asking a token realm for a token."""
        who = token_requester(authorization, query, body, content_type)
        if who.kind == "anonymous":
            return ANONYMOUS
        if who.kind == "basic":
            return self.keyer.key("basic", who.value)
        if who.kind == "refresh":
            key = self.keyer.key("refresh", who.value)
            record = await self._token_record(key)
            return record.identity if record is not None else key
        carried = self.keyer.verify(who.value, time.time()) if who.kind == "issued" else None
        return carried.key if carried is not None else self.keyer.key("authorization", who.value)

    def record_token(
        self,
        token: str,
        identity: str,
        lifetime: float | None,
        repositories: tuple[str, ...] = (),
        kind: str = "bearer",
    ) -> None:
        """Regcache saw `identity` obtain `token` for `repositories` (kind `bearer`, or `refresh`
        for a refresh token, remembered as long as a grant)."""
        now = time.time()
        longest = now + max(self._ttl, UNKNOWN_TOKEN_LIFETIME)
        default = now + UNKNOWN_TOKEN_LIFETIME if kind == "bearer" else longest
        until = min(jwt_expiry(token) or (now + lifetime if lifetime else default), longest)
        if until <= now:
            return
        key, record = self.keyer.key(kind, token), TokenRecord(identity, until, repositories)
        self._remember_token(key, record)
        self.writer.write("a token record", lambda: self._records.put_token(key, record))

    async def _token_record(self, key: str) -> TokenRecord | None:
        if key in self._tokens:
            record = self._tokens[key]
        else:
            try:
                record = await asyncio.to_thread(self._records.token, key)
            except STORE_ERRORS:
                return None
            self._remember_token(key, record)
        return record if record is not None and record.until > time.time() else None

    def _remember_token(self, key: str, record: TokenRecord | None) -> None:
        self._tokens[key] = record  # made-up tokens are remembered as unknown: bounded

    def issue(self, identity: str) -> str:
        return self.keyer.issue(identity, time.time())

    # grants ----------------------------------------------------------------------------------
    def observe(self, req: RegistryRequest, client: Client, status: int, challenge: str = "") -> None:
        """The upstream answered this client's own request for the request's repository."""
        if client.issued_here:  # the upstream judged regcache's token, not the identity it carries
            return
        if status == 200:
            self._accepted(req.repository, client)
        elif status in (401, 403) and judged(client, status, challenge):
            self._refused(req.repository, req.route.name, client)

    def _accepted(self, repo: str, client: Client) -> None:
        now = time.time()
        for identity in client.identities:
            if identity.key == ANONYMOUS:
                grant = Grant(now, None)  # readable anonymously: no expiry
            else:
                until = now + self._ttl if identity.until is None else min(now + self._ttl, identity.until)
                grant = Grant(now, until)
                self._held[identity.key] = None
            self._set_grant(identity.key, repo, grant, now)

    def _set_grant(self, identity: str, repo: str, grant: Grant, now: float) -> None:
        key = (identity, repo)
        self._grants[key] = grant
        self._revoked.discard(key)
        self._undropped.discard(key)
        if now - self._saved_at.get(key, 0.0) < SAVE_EVERY:
            self._unsaved[key] = grant  # saved at the next acceptance after SAVE_EVERY, or at close
            return
        self._saved_at[key] = now
        self._unsaved.pop(key, None)
        self._save(identity, repo, grant)

    def _save(self, identity: str, repo: str, grant: Grant) -> None:
        def save() -> None:
            if (identity, repo) not in self._revoked:  # revoked since: its drop went ahead of this
                self._records.put_grant(identity, repo, grant)

        self.writer.write(f"an access grant for {repo}", save)

    def _refused(self, repo: str, name: str, client: Client) -> None:
        for identity in client.identities:
            if not identity.judged_for(name):
                continue
            key = (identity.key, repo)
            self._grants.pop(key, None)
            self._unsaved.pop(key, None)
            self._saved_at.pop(key, None)
            if len(self._revoked) > MAX_REMEMBERED:
                self._revoked &= self._undropped  # the store has caught up with the others long ago
            self._revoked.add(key)
            drop = lambda i=identity.key: self._records.drop_grant(i, repo)  # noqa: E731
            failed = lambda k=key: self._undropped.add(k)  # noqa: E731
            self.writer.write(f"a revoked grant for {repo}", drop, first=True, failed=failed)

    def _forget(self, key: tuple[str, str], grant: Grant) -> None:
        """A grant leaves memory (the least recently set): saved first if it was accepted since."""
        self._saved_at.pop(key, None)
        if (unsaved := self._unsaved.pop(key, None)) is not None:
            self._save(*key, unsaved)

    def granted_recently(self, client: Client, repo: str) -> bool:
        """The fast path: one of the client's identities was accepted for `repo` within
        GRANT_SECONDS (CLUSTER_GRANT_SECONDS in a cluster), or `repo` was confirmed readable
        anonymously that recently. Memory only."""
        now = time.time()
        recent = now - min(self._fast, self._ttl)
        for identity in client.identities:
            grant = self._grants.get((identity.key, repo))
            if identity.key != ANONYMOUS and grant is not None and grant.valid(now) and grant.accepted_at >= recent:
                return True
        public = self._grants.get((ANONYMOUS, repo))
        return public is not None and public.accepted_at >= now - self._fast

    async def permitted(self, client: Client, repo: str) -> bool:
        """Without a fresh answer: is `repo` readable anonymously, or does one of the client's
        identities hold an unexpired grant on it?"""
        for identity in (ANONYMOUS, *(i.key for i in client.identities if i.key != ANONYMOUS)):
            if await self._grant(identity, repo) is not None:
                return True
        return False

    async def _grant(self, identity: str, repo: str) -> Grant | None:
        """An unexpired grant: from memory, else from the store (after a restart); in a cluster, one
        held in memory for longer than CLUSTER_GRANT_SECONDS only if the cluster still holds it."""
        now = time.time()
        key = (identity, repo)
        grant = self._grants.get(key)
        if grant is not None and self._cluster and now - self._confirmed_at(key, grant) > CLUSTER_GRANT_SECONDS:
            grant = await self._read_back(key, grant, now)
        elif grant is None and key not in self._revoked:  # the store may lag a revocation
            try:
                grant = await asyncio.to_thread(self._records.grant, identity, repo)
            except STORE_ERRORS:
                return None
            if grant is not None and grant.valid(now):
                self._grants[(identity, repo)] = grant
        return grant if grant is not None and grant.valid(now) else None

    def _confirmed_at(self, key: tuple[str, str], grant: Grant) -> float:
        return max(grant.accepted_at, self._confirmed.get(key, 0.0))

    async def _read_back(self, key: tuple[str, str], grant: Grant, now: float) -> Grant | None:
        """The memory's grant if the cluster's records still hold one (another node may have revoked it)."""
        try:
            stored = await asyncio.to_thread(self._records.grant, *key)
        except STORE_ERRORS:
            return grant  # no records answer (neither Redis nor this node's disk): as on one node
        if stored is None or not stored.valid(now):
            self._grants.pop(key, None)
            self._unsaved.pop(key, None)
            self._saved_at.pop(key, None)
            return None
        self._confirmed[key] = now
        return grant

    async def holds_grants(self, identity: str) -> bool:
        """Has the upstream accepted this identity for anything (a credential the store recorded)?"""
        if identity in self._held:
            return True
        try:
            return await asyncio.to_thread(self._records.holds_grants, identity)
        except STORE_ERRORS:
            return False

    async def recognised(self, client: Client) -> bool:
        """Without a fresh answer, is this a client regcache can serve something? (`/v2/`)"""
        if client.issued_here or client.anonymous:
            return bool(client.identities)
        for identity in client.identities:
            if await self.holds_grants(identity.key):
                return True
        return False

    # decisions --------------------------------------------------------------------------------
    async def seen(self, req: RegistryRequest, digest: str, manifest: Manifest | None = None) -> None:
        """`digest` (and what its manifest references) belongs to the request's repository
        (best effort: the client is allowed either way, and is asked about again if it is not saved)."""
        digests: Iterable[str] = [digest, *(referenced_digests(manifest) if manifest is not None else [])]
        await asyncio.to_thread(best_effort, "access records", self._store.mark_seen, req.repository, list(digests))

    async def may_serve(self, req: RegistryRequest, client: Client, digest: str, known: bool | None = None) -> bool:
        """Without a fresh upstream answer: may this client have this cached object?"""
        if self.open_offline:
            return True
        if known is None:
            known = await asyncio.to_thread(self._store.is_seen, req.repository, digest)
        return known and await self.permitted(client, req.repository)

    async def check(
        self, req: RegistryRequest, client: Client, digest: str, kind: str, known: bool | None = None
    ) -> Answer | None:
        """None if the client may have the cached object; otherwise the answer to send instead.
        `kind` is "manifests" or "blobs"; `known`: whether it is seen in the repository, if the
        caller has asked the store already."""
        if known is None:
            known = await asyncio.to_thread(self._store.is_seen, req.repository, digest)
        if self._offline:
            return None if await self.may_serve(req, client, digest, known) else self.cannot_check(req)
        if known and self.granted_recently(client, req.repository):
            return None
        url = req.url.split("/v2/", 1)[0] + f"/v2/{req.route.name}/{kind}/{digest}"
        unknown = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
        try:
            answer = await self._upstream.fetch("HEAD", url, CIMultiDict(req.headers))
        except UpstreamUnavailable:
            return None if await self.may_serve(req, client, digest, known) else self.cannot_check(req)
        if upstream_failed(answer.status):
            failed = answer_from_head(answer, req.head, unknown, "PASS")
            return None if await self.may_serve(req, client, digest, known) else self.cannot_check(req, failed)
        self.observe_answer(req, client, answer)
        if answer.status == 200:
            await self.seen(req, digest)
            return None
        return answer_from_head(answer, req.head, unknown, "PASS", note="upstream refused this client")

    def observe_answer(self, req: RegistryRequest, client: Client, answer: UpstreamAnswer) -> None:
        self.observe(req, client, answer.status, answer.headers.get("WWW-Authenticate", ""))

    def cannot_check(self, req: RegistryRequest, failed: Answer | None = None) -> Answer:
        """The refusal when this client's access cannot be checked: fail closed."""
        if self._offline:
            return self.offline_refusal(req)
        if failed is not None:
            return failed
        message = f"upstream unavailable: this client's access to {req.repository} cannot be checked"
        return error_answer(503, "UNAVAILABLE", message)

    def offline_refusal(self, req: RegistryRequest) -> Answer:
        message = (
            f"offline: {req.repository} is served only to clients presenting credentials the upstream "
            "accepted for it"
        )
        answer = error_answer(401, "UNAUTHORIZED", message, note="offline")
        if (challenge := self.challenge(req.url)) is not None:
            answer.headers.append(("WWW-Authenticate", with_scope(challenge, req.route.name)))
        return answer

    # challenges --------------------------------------------------------------------------------
    def challenge(self, url: str) -> str | None:
        """The registry's last `/v2/` challenge (`WWW-Authenticate`), if it asked for one."""
        return self._challenges.get(registry_of(url))

    def learn_challenge(self, url: str, answer: UpstreamAnswer, authorized: bool) -> None:
        """A `/v2/` answer: a 401 names the challenge; a 200 to a request without credentials
        says the registry asks none."""
        header = answer.headers.get("WWW-Authenticate", "")
        if answer.status == 401 and header:
            challenge: str | None = header
        elif answer.status == 200 and not authorized:
            challenge = None
        else:
            return
        registry = registry_of(url)
        if self._challenges.get(registry) == challenge:
            return
        if challenge is None:
            self._challenges.pop(registry, None)
        else:
            self._challenges[registry] = challenge
        self.writer.write(f"the challenge of {registry}", lambda: self._records.put_challenge(registry, challenge))

    async def close(self) -> None:
        """Save what was accepted since it was last saved; wait for every write."""
        for (identity, repo), grant in self._unsaved.items():
            self._save(identity, repo, grant)
        self._unsaved.clear()
        await self.writer.flush()
