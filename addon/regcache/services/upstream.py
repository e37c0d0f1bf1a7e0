"""regcache's own HTTP client for upstream registries: re-targeting, redirects, credentials, time-outs.

mitmproxy has no client for addon-originated requests, so revalidation `HEAD`s, manifest fetches
and blob fills use aiohttp on mitmproxy's event loop. Rules enforced here, for every request:

- a host named in `upstreams` is sent to its configured base URL instead (air-gapped mirrors, tests);
- of a client's headers, only `Authorization`, `Accept` and `User-Agent` go upstream
  (`forwardable_headers`): cookies and anything else a client sends stay with regcache;
- redirects are followed by us, so a blob behind a CDN is stored under its digest, never under the
  signed URL; a redirect to another origin (scheme, host or port) carries only what describes
  the resource (`Accept`, `User-Agent`, `Accept-Encoding`, `Range`), never `Authorization`, and a
  request body is never sent to another origin;
- bodies are requested with `Accept-Encoding: identity`, so manifest bytes are the exact bytes whose
  digest the registry names;
- any failure to get an answer (refused, DNS, TLS, time-out, broken redirect chain) is one
  exception, `UpstreamUnavailable`, so callers can fall back to stored content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from regcache.config import Credential, Settings
from regcache.metrics import METRICS, registry_label
from regcache.oci.auth import bearer_challenge, registrable_domain, scope_of

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024
# A client's headers that go upstream: its rights, what it accepts, who it is. Nothing else (cookies,
# proxies' and front ends' own headers, conditionals that would spoil regcache's own fetches).
_FORWARDED = frozenset({"authorization", "accept", "user-agent"})
# What a request carries to another origin a redirect names (a CDN, a storage service): no credential.
_CROSS_ORIGIN = frozenset({"accept", "user-agent", "accept-encoding", "range", "if-range"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_TOKENS = 1000  # tokens regcache keeps for its own credentials (one per repository asked for)


class Recent(OrderedDict[K, V]):
    """A map of at most `limit` entries: setting one past that forgets the least recently set
    (`forgotten` is told), so what clients make regcache remember stays bounded."""

    def __init__(self, limit: int, forgotten: Callable[[K, V], None] | None = None) -> None:
        super().__init__()
        self._limit = limit
        self._forgotten = forgotten

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self._limit:
            old_key, old_value = self.popitem(last=False)
            if self._forgotten is not None:
                self._forgotten(old_key, old_value)


# An upstream answer still streaming its body (the caller releases it), and what reading such a
# body can raise: the names the services use, so aiohttp stays this module's (and the fronts').
UpstreamResponse = aiohttp.ClientResponse
TRANSFER_ERRORS = (TimeoutError, aiohttp.ClientError)


class UpstreamUnavailable(Exception):
    """No HTTP answer could be had from the upstream (or from where it redirected)."""


def upstream_failed(status: int) -> bool:
    """The one rule for answers that say nothing about the request (a tag, an object, a token,
    a client's rights): the upstream is overloaded (429) or broken (5xx). Callers fall back to
    what the store recorded, as for an upstream that cannot be reached."""
    return status == 429 or status >= 500


@dataclass
class UpstreamAnswer:
    """A complete, small upstream answer (status, headers, body)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def forwardable_headers(client_headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The client's request headers that go upstream: its rights, what it accepts, who it is."""
    # Pairs, not a Mapping: isinstance against an ABC walks every registered subclass whenever
    # a registration anywhere has reset its caches (0.2 ms in the running proxy here).
    headers: CIMultiDict[str] = CIMultiDict((k, v) for k, v in client_headers if k.lower() in _FORWARDED)
    headers["Accept-Encoding"] = "identity"
    return headers


def same_origin(a: str, b: str) -> bool:
    """Same scheme, host and port (the default port of the scheme when none is named)."""
    first, second = urlsplit(a), urlsplit(b)
    try:
        ports = first.port or _DEFAULT_PORTS.get(first.scheme), second.port or _DEFAULT_PORTS.get(second.scheme)
    except ValueError:  # a port out of range
        return False
    return (first.scheme, first.hostname, ports[0]) == (second.scheme, second.hostname, ports[1])


class UpstreamClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        # (host, scope) → (Authorization, until)
        self._tokens: Recent[tuple[str, str], tuple[str, float]] = Recent(MAX_TOKENS)

    def resolve(self, url: str) -> str:
        """Apply the `upstreams` map: the URL we really connect to for a logical URL."""
        parts = urlsplit(url)
        target = self._settings.upstream_for(parts.hostname or "", parts.port)
        if target is None:
            return url
        netloc = f"{target.host}:{target.port}"
        return urlunsplit((target.scheme, netloc, target.path_prefix + parts.path, parts.query, ""))

    def _session_on_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,  # digests are over the bytes as sent
                trust_env=False,  # an inherited HTTPS_PROXY would loop requests back into us
                # No per-host cap: every Docker Hub fill goes to one CDN host, and a wait for a
                # pooled connection would count against the connect time-out.
                connector=aiohttp.TCPConnector(limit=0),
                # Fill chunks of up to 512 KiB rather than 64 KiB: each chunk costs a thread hop
                # to the staging file and a wake-up of the clients that follow it.
                read_bufsize=512 * 1024,
            )
        return self._session

    async def open(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        timeout: aiohttp.ClientTimeout,
        data: bytes | None = None,
        own_credentials: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send a request, following redirects ourselves. The caller must release the response.

        A request without the client's own `Authorization` to a registry that has `credentials`
        configured is authorised with them (Basic, or a token from a realm on the registry's own
        registrable domain; tokens are kept until they expire) — unless `own_credentials` is
        False: what is only relayed for a client must carry only the client's rights."""
        host, port = origin_of(url)
        wants_ours = own_credentials and "Authorization" not in headers
        credential = self._settings.credential_for(host, port) if wants_ours else None
        if credential is None:
            return await self._send(method, url, headers, timeout, data)
        headers = CIMultiDict(headers)
        cached = self._tokens.get((host, scope_of(url)))
        if cached and cached[1] > time.monotonic():
            headers["Authorization"] = cached[0]
        response = await self._send(method, url, headers, timeout, data)
        if response.status != 401:
            return response
        authorization = await self._authorize(url, response.headers.get("WWW-Authenticate", ""), credential)
        if authorization is None:
            return response
        response.release()
        headers["Authorization"] = authorization
        return await self._send(method, url, headers, timeout, data)

    async def _authorize(self, url: str, challenge: str, credential: Credential) -> str | None:
        if not credential.username:  # a static token
            return f"Bearer {credential.secret}"
        if challenge.lower().startswith("basic"):
            return credential.basic()
        params = bearer_challenge(challenge) or {}
        realm, host = params.get("realm", ""), urlsplit(url).hostname or ""
        if not realm or registrable_domain(urlsplit(realm).hostname or "") != registrable_domain(host):
            log.warning("not sending %s's credentials to the auth realm %r: not on its domain", host, realm)
            return None
        token = await self.realm_token(params, params.get("scope") or scope_of(url), credential.basic())
        if token is None:
            log.warning("the auth realm of %s refused regcache's credentials", host)
            return None
        authorization, lifetime = token
        self._tokens[(host, scope_of(url))] = (authorization, time.monotonic() + max(lifetime - 30, 10))
        return authorization

    async def realm_token(
        self, challenge: dict[str, str], scope: str, authorization: str | None
    ) -> tuple[str, float] | None:
        """A bearer token from a `Bearer` challenge's realm (anonymous when `authorization` is
        None: never with regcache's own credentials, whatever the realm answers): (the
        Authorization value, its lifetime in seconds), or None if refused."""
        query = urlencode({k: v for k, v in (("service", challenge.get("service")), ("scope", scope)) if v})
        headers = CIMultiDict(Authorization=authorization) if authorization else CIMultiDict()
        headers["Accept-Encoding"] = "identity"  # the session does not decompress
        url = f"{challenge['realm']}?{query}"
        answer = await self.fetch("GET", url, headers, own_credentials=False)
        try:
            document = json.loads(answer.body) if answer.status == 200 else {}
            token = document.get("token") or document.get("access_token")
            lifetime = float(document.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            return None
        return (f"Bearer {token}", lifetime) if token else None

    async def _send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        timeout: aiohttp.ClientTimeout,
        data: bytes | None = None,
    ) -> aiohttp.ClientResponse:
        session = self._session_on_loop()
        origin = url
        redirected = False
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await session.request(
                    method, self.resolve(url), headers=headers, data=data, allow_redirects=False, timeout=timeout
                )
            except (*TRANSFER_ERRORS, OSError) as err:
                raise UpstreamUnavailable(f"{method} {shown(url, redirected)}: {describe_error(err)}") from err
            METRICS.upstream_answered(registry_label(self._settings, *origin_of(url)), method, response.headers)
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or not location:
                return response
            response.release()
            url, redirected = urljoin(url, location), True
            if response.status == 303 and method != "HEAD":  # a HEAD stays a HEAD (RFC 9110 15.4.4)
                method, data = "GET", None
            if not same_origin(url, origin):
                # Storage hosts (CDNs, S3, GCS) authorise by the signed URL; registry credentials
                # (and whatever else the request carried) must not travel there.
                headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in _CROSS_ORIGIN)
                if data is not None:  # a token POST's form holds credentials
                    raise UpstreamUnavailable(f"{method} {shown(url, True)}: a redirect to another origin")
        raise UpstreamUnavailable(f"{method} {shown(url, redirected)}: more than {MAX_REDIRECTS} redirects")

    async def fetch(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        max_body: int = MAX_ERROR_BODY,
        data: bytes | None = None,
        own_credentials: bool = True,
    ) -> UpstreamAnswer:
        """A whole small answer: manifests, pings, tokens, errors. Longer bodies are cut at
        `max_body` (+ 1 byte, so callers can tell)."""
        timeout = aiohttp.ClientTimeout(total=self._settings.upstream_timeout)
        response = await self.open(method, url, headers, timeout, data, own_credentials)
        try:
            body = await read_limited(response, max_body) if method != "HEAD" else b""
        except (*TRANSFER_ERRORS, OSError) as err:
            raise UpstreamUnavailable(f"{method} {shown(url)}: {describe_error(err)}") from err
        finally:
            response.release()
        METRICS.upstream_bytes(len(body))
        return UpstreamAnswer(response.status, response.headers, body)

    def blob_timeout(self) -> aiohttp.ClientTimeout:
        """No total limit for a blob (it may be GBs), but a stall is a failure."""
        limit = self._settings.upstream_timeout
        return aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first `limit` + 1 bytes when it is longer (so callers can tell)."""
    body = bytearray()
    while len(body) <= limit:
        chunk = await response.content.read(limit + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def origin_of(url: str) -> tuple[str, int | None]:
    """The host and port a URL names (before `upstreams` re-targeting)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port


def shown(url: str, redirected: bool = False) -> str:
    """A URL as messages (logs, error bodies) name it: never its query or user info, which may
    sign or authorise it (storage redirects: `X-Amz-Signature=…`); a redirect target by its origin only."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}" + ("/…" if redirected else parts.path)


def describe_error(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timed out"
    if isinstance(err, aiohttp.InvalidURL):  # its text is the URL
        return "invalid URL"
    if isinstance(err, aiohttp.ClientResponseError):  # its text names the URL
        return f"{err.status} {err.message}"
    return str(err) or type(err).__name__
