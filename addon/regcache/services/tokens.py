"""The token service both fronts share: token requests to the auth realms of cached registries.

Realms are recorded from the challenges of cached registries (`/v2/` pings and other answers) and
kept in the access records, as full URLs. A request is a token request only if its URL, normalised
(percent-decoding, dot segments, repeated slashes, host case, default port), is exactly a recorded
realm; then exactly the recorded realm URL is asked, with the client's query, never its raw path.
The proxy intercepts TLS for realm hosts and answers such requests here (other paths on those hosts
pass through); the mirror's `/_token/…` relay does the same.

- Online: the request is relayed with the client's own credentials only (never regcache's
  `credentials`), and the exchange observed: the tokens (and refresh tokens) in the answer are
  recorded, hashed, as belonging to the identity that asked (access.py), so a later request
  bearing them counts as that identity.
- Offline, or while the realm is unreachable or answers 429/5xx: regcache issues a token itself
  (`regcache.<payload>.<signature>`, 1 h) carrying the requester's identity — only for anonymous
  requests or credentials the upstream accepted for something (a grant); anything else gets
  `401 UNAUTHORIZED`. With `offline_access: open`, offline, anyone gets a token (it is not checked).
  Once the registry answers again, a request bearing such a token is asked upstream, which refuses
  it with its challenge: the client comes back for a real token (access.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from multidict import CIMultiDict

from regcache.oci.auth import RealmKey, bearer_challenge, realm_key, realm_url
from regcache.services.access import Access
from regcache.services.answers import Answer, error_answer, relay
from regcache.services.identity import ISSUED_LIFETIME, requested_repositories
from regcache.services.upstream import UpstreamClient, UpstreamUnavailable, upstream_failed
from regcache.store.access import ANONYMOUS, AccessRecords

MAX_TOKEN_REQUEST = 64 * 1024  # a token POST is a small form
MAX_TOKEN_ANSWER = 1024 * 1024  # a token answer is a small JSON document
_TOKEN_HEADERS = ("Authorization", "Content-Type", "Accept", "User-Agent")


def token_answer(token: str, result: str, note: str) -> Answer:
    """A token answer as registries give it (distribution's token.md): both names, lifetime, time."""
    issued_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    document = {"token": token, "access_token": token, "expires_in": int(ISSUED_LIFETIME), "issued_at": issued_at}
    return Answer(200, [("Content-Type", "application/json")], json.dumps(document).encode(), result, note=note)


def offline_token() -> Answer:
    """`offline_access: open`: a token for everyone; the open offline cache does not check it."""
    return token_answer("regcache-offline", "HIT", "offline")


def issued_tokens(body: bytes) -> tuple[list[str], str | None, float | None]:
    """(tokens, refresh token, `expires_in`) of a token answer; nothing if it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return [], None, None
    if not isinstance(document, dict):
        return [], None, None
    tokens = {document.get("token"), document.get("access_token")}
    refresh, lifetime = document.get("refresh_token"), document.get("expires_in")
    return (
        sorted(t for t in tokens if isinstance(t, str) and t),
        refresh if isinstance(refresh, str) and refresh else None,
        float(lifetime) if isinstance(lifetime, int | float) and not isinstance(lifetime, bool) else None,
    )


class TokenService:
    def __init__(
        self, access: Access, records: AccessRecords, upstream: UpstreamClient, offline: bool
    ) -> None:
        self._access = access
        self._records = records
        self._upstream = upstream
        self._offline = offline
        self._realms: dict[RealmKey, str] = {}
        self._hosts: set[tuple[str, int]] = set()
        for url in sorted(records.realms()):
            self._add(url)

    def _add(self, url: str) -> bool:
        key = realm_key(url)
        if key is None or key in self._realms:
            return False
        self._realms[key] = realm_url(url)
        self._hosts.add((key[1], key[2]))
        return True

    def learn_realm(self, challenge: str) -> None:
        """A cached registry's challenge (`WWW-Authenticate`) named this realm."""
        realm = (bearer_challenge(challenge) or {}).get("realm")
        if realm and self._add(realm):
            recorded = realm_url(realm)
            self._access.writer.write(f"the auth realm {recorded}", lambda: self._records.add_realm(recorded))

    def intercepts(self, host: str, port: int | None) -> bool:
        """Is this a host (and port) a recorded realm is on? (The proxy opens its TLS.)"""
        return (host.lower(), port or 443) in self._hosts

    def realm_for(self, url: str) -> str | None:
        """The recorded realm URL `url` (without query) stands for, or None."""
        key = realm_key(url)
        return self._realms.get(key) if key is not None else None

    async def answer(
        self, realm: str, method: str, query: str, headers: Mapping[str, str], body: bytes | None
    ) -> Answer:
        """The answer to a token request for the recorded realm `realm`."""
        if method not in ("GET", "POST"):
            return error_answer(405, "UNSUPPORTED", "token requests are GET or POST")
        if body is not None and len(body) > MAX_TOKEN_REQUEST:
            return error_answer(413, "SIZE_INVALID", "token request too large")
        if self._offline and self._access.open_offline:
            return offline_token()
        content_type = headers.get("Content-Type", "")
        requester = await self._access.requester(headers.get("Authorization", ""), query, body, content_type)
        if self._offline:
            return await self._issue(requester, "HIT", "offline")
        forwarded = CIMultiDict((k, headers[k]) for k in _TOKEN_HEADERS if k in headers)
        forwarded["Accept-Encoding"] = "identity"  # relayed as it comes: no compression to undo
        url = realm + (f"?{query}" if query else "")
        try:
            answer = await self._upstream.fetch(
                method, url, forwarded, MAX_TOKEN_ANSWER, data=body, own_credentials=False
            )
        except UpstreamUnavailable as err:
            return await self._issue(requester, "STALE", f"auth realm unavailable: {err}")
        if upstream_failed(answer.status):
            return await self._issue(requester, "STALE", f"auth realm answered {answer.status}")
        if len(answer.body) > MAX_TOKEN_ANSWER:
            return error_answer(502, "UNAVAILABLE", f"auth realm answered more than {MAX_TOKEN_ANSWER} bytes")
        if answer.status == 200:
            self._observe(answer.body, requester, requested_repositories(query, body, content_type))
        return relay(answer, "PASS")

    def _observe(self, body: bytes, requester: str, repositories: tuple[str, ...]) -> None:
        tokens, refresh, lifetime = issued_tokens(body)
        for token in tokens:
            self._access.record_token(token, requester, lifetime, repositories)
        if refresh is not None:
            self._access.record_token(refresh, requester, None, kind="refresh")

    async def _issue(self, requester: str, result: str, note: str) -> Answer:
        """regcache's own token, for anonymous requests and credentials the store recorded."""
        if requester == ANONYMOUS or await self._access.holds_grants(requester):
            return token_answer(self._access.issue(requester), result, note)
        message = "regcache cannot check these credentials now: the upstream never accepted them here"
        return error_answer(401, "UNAUTHORIZED", message, note=note)
