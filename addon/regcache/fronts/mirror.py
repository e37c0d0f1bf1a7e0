"""regcache as a registry mirror: the registry API in plain HTTP on a port of its own.

For clients that take a mirror rather than a proxy: dockerd's `registry-mirrors` (Docker Hub
only), containerd's `hosts.toml` (any registry: containerd adds `?ns=<registry>` to each request)
and registries.conf `[[registry.mirror]]` (podman, skopeo, buildah). No proxy and no CA to trust,
and no CONNECT and TLS handshake per request: dockerd and containers/image open a new connection
for every registry request, which costs more than the answer itself on small images.

Each mirror stands for one cached registry (`mirrors` in the configuration); `?ns=` may name another
cached registry. Requests go through the same `Runtime.decide` (services/runtime.py) as proxied
ones: the same cache, revalidation and access rules, with the client's own `Authorization` forwarded upstream.

- Bearer challenges are rewritten so the client asks the mirror for its token (`/_token/…`), and
  the mirror hands that request to the token service the proxy uses too (services/tokens.py): only
  for exactly a realm a cached registry's challenge named, never anywhere a client says, and with
  the client's credentials only. Tag lists and other reads it cannot cache are relayed with the
  client's rights only, too.
- Blob bytes go out from the store by sendfile, or follow a running fill; no redirect, since this
  port is plain HTTP already.
- Read-only: anything but `GET` and `HEAD` (and token `POST`s) is refused.

Plain HTTP: token requests carry the client's credentials. Keep a mirror on loopback, or put a
TLS front end before it that keeps `Host` and sets `X-Forwarded-Proto: https`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import http_exceptions, web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from regcache.addresses import base_url, is_loopback
from regcache.config import Settings
from regcache.fronts.blobserver import BlobServer
from regcache.fronts.listener import Listener, Timeouts, application
from regcache.logs import log_request
from regcache.metrics import METRICS
from regcache.oci.api import HOP_BY_HOP, Kind, RegistryRequest
from regcache.oci.auth import bearer_challenge
from regcache.services.answers import Answer, LocalStream, PassThrough, error_answer
from regcache.services.requests import registry_request
from regcache.services.runtime import Runtime
from regcache.services.tokens import MAX_TOKEN_REQUEST
from regcache.services.upstream import UpstreamClient, UpstreamUnavailable, describe_error

log = logging.getLogger("regcache")

TOKEN_PATH = "/_token/"
RELAY_CHUNK = 256 * 1024
_HOST_HEADER_RE = re.compile(r"[A-Za-z0-9.-]+(?::\d+)?|\[[0-9A-Fa-f:.]+\](?::\d+)?")
_REALM_RE = re.compile(r'realm="([^"]*)"', re.IGNORECASE)


# -- pure parts ------------------------------------------------------------------------------------


def target_registry(settings: Settings, mirrored: str, ns: str | None) -> str | None:
    """The registry host a mirror request is for: `?ns=` (containerd), else the mirror's own."""
    return settings.registry_host(ns) if ns else mirrored


def upstream_url(host: str, raw_path: str, query: MultiMapping[str]) -> str:
    """The logical upstream URL of a mirror request (`ns` is the mirror's, not the registry's)."""
    kept = [(k, v) for k, v in query.items() if k != "ns"]
    return f"https://{host}{raw_path}" + (f"?{urlencode(kept)}" if kept else "")


def mirror_base(host_header: str | None, listen: tuple[str, int], forwarded_proto: str | None = None) -> str:
    """This mirror's base URL as the client addressed it (its `Host`; `https` when a TLS front
    end says so in `X-Forwarded-Proto`), else as it listens. Taken from the client's own request,
    it only shapes that client's challenges."""
    scheme = "https" if (forwarded_proto or "").strip().lower() == "https" else "http"
    if host_header and _HOST_HEADER_RE.fullmatch(host_header):
        return f"{scheme}://{host_header}"
    return base_url(*listen, scheme=scheme)


def sendable(value: str) -> str:
    """An upstream header value as text aiohttp can send (bytes that were not UTF-8 replaced)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def token_path(realm: str) -> str | None:
    """`https://auth.docker.io/token` → `/_token/https/auth.docker.io/token` (None: not a URL)."""
    parts = urlsplit(realm)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    query = f"?{parts.query}" if parts.query else ""
    return f"{TOKEN_PATH}{parts.scheme}/{parts.netloc}{parts.path or '/'}{query}"


def realm_of(raw_path: str, query_string: str) -> str | None:
    """The inverse of `token_path`: the realm URL a `/_token/…` request stands for."""
    scheme, _, rest = raw_path.removeprefix(TOKEN_PATH).partition("/")
    netloc, slash, path = rest.partition("/")
    if scheme not in ("http", "https") or not netloc or not slash:
        return None
    return f"{scheme}://{netloc}/{path}" + (f"?{query_string}" if query_string else "")


def mirrored_challenge(header: str, base: str) -> str:
    """A `Bearer` challenge with its realm moved behind this mirror; other schemes unchanged."""
    realm = (bearer_challenge(header) or {}).get("realm")
    path = token_path(realm) if realm else None
    if path is None:
        return header
    return _REALM_RE.sub(lambda _: f'realm="{base}{path}"', header, count=1)


# -- the server --------------------------------------------------------------------------------------


class MirrorServer:
    """One mirror port, standing for the registry `registry_host`."""

    def __init__(
        self, runtime: Runtime, blob_server: BlobServer, registry_host: str, listen: tuple[str, int], timeouts: Timeouts
    ) -> None:
        self._runtime = runtime
        self._blob_server = blob_server
        self.registry_host = registry_host
        app = application(client_max_size=MAX_TOKEN_REQUEST)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.listener = Listener(f"mirror of {registry_host}", app, listen, timeouts)
        self._body_timeout = timeouts.header  # a token POST's body: as long as a request head may take

    @property
    def url(self) -> str:
        return self.listener.url

    def _base(self, request: web.Request) -> str:
        """This mirror as `request`'s client addressed it: only challenges need it."""
        headers = request.headers
        listen = (self.listener.host, self.listener.port)
        return mirror_base(headers.get("Host"), listen, headers.get("X-Forwarded-Proto"))

    def warn_if_exposed(self) -> None:
        if is_loopback(self.listener.host):
            return
        log.warning(
            "regcache: WARNING: the mirror at %s is plain HTTP on a non-loopback address: token requests "
            "carry clients' credentials in clear text, and anyone who can reach it can pull what "
            "regcache's own credentials can read (offline with offline_access open: everything cached). "
            "Put a TLS front end before it (X-Forwarded-Proto: https).",
            self.url,
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        if request.rel_url.raw_path.startswith(TOKEN_PATH):
            what, answer = await self._token(request)
            token_response = await self._send_answer(request, answer, what, started)
            if not request.content.is_eof():  # a body left unread: this connection cannot go on
                token_response.force_close()
            return token_response
        settings = self._runtime.settings
        ns = request.query.get("ns")
        host = target_registry(settings, self.registry_host, ns)
        if host is None:
            message = f"regcache does not cache the registry {ns!r} (registries)"
            answer = error_answer(404, "NAME_UNKNOWN", message)
            return await self._send_answer(request, answer, f"{ns}/?", started)
        namespace = settings.namespace_for(host) or host
        url = upstream_url(host, request.rel_url.raw_path, request.query)
        req = registry_request(namespace, url, request.method, request.rel_url.raw_path, request.headers.items())
        route = req.route
        what = req.describe() if route.kind is not Kind.OTHER else f"{namespace}{request.rel_url.raw_path}"
        if request.method not in ("GET", "HEAD"):
            answer = error_answer(405, "UNSUPPORTED", "regcache's registry mirror is read-only")
            return await self._send_answer(request, answer, what, started)
        if route.kind is Kind.OTHER:  # tag lists, catalog, referrers: relayed, never cached
            return await self._relay(request, req, what, started, PassThrough())
        decision = await self._runtime.decide(req, ranged="Range" in request.headers)
        METRICS.request_decided(req, decision.result)
        if isinstance(decision, Answer):
            return await self._send_answer(request, decision, what, started)
        if isinstance(decision, LocalStream):
            headers = {"X-Cache": decision.result}
            blobs = self._blob_server
            response = await blobs.respond(request, decision.source, decision.digest, headers, decision.path)
            _log(request, decision.result, what, f"{response.status} from the store", started, decision.note)
            return response
        return await self._relay(request, req, what, started, decision)

    async def _token(self, request: web.Request) -> tuple[str, Answer]:
        """A token request: answered by the token service if it names exactly a recorded realm."""
        tokens = self._runtime.tokens
        named = realm_of(request.rel_url.raw_path, "")
        realm = tokens.realm_for(named) if named is not None else None
        # Named after the recorded realm only: what the client wrote may not even parse as a URL.
        what = f"token {urlsplit(realm).hostname if realm is not None else '?'}"
        if realm is None:
            return what, error_answer(404, "NAME_UNKNOWN", "not the auth realm of a registry regcache caches")
        if (request.content_length or 0) > MAX_TOKEN_REQUEST:
            return what, error_answer(413, "SIZE_INVALID", "token request too large")
        body = None
        if request.method == "POST":
            read = await self._token_body(request)
            if isinstance(read, Answer):
                return what, read
            body = read
        query = request.rel_url.raw_query_string
        answer = await tokens.answer(realm, request.method, query, request.headers, body)
        METRICS.request_answered(urlsplit(realm).hostname or "", "token", request.method, answer.result, "")
        return what, answer

    async def _token_body(self, request: web.Request) -> bytes | Answer:
        """A token POST's body, read within the body time-out; else the error to answer with."""
        try:
            return await asyncio.wait_for(request.read(), self._body_timeout)
        except TimeoutError:
            message = f"token request body not received within {self._body_timeout:g} s"
            return error_answer(408, "UNKNOWN", message)
        except web.HTTPRequestEntityTooLarge:  # chunked, so no Content-Length said so up front
            return error_answer(413, "SIZE_INVALID", "token request too large")
        except (OSError, aiohttp.ClientError, http_exceptions.HttpProcessingError) as err:  # the client broke off
            return error_answer(400, "UNKNOWN", f"token request body cut off: {describe_error(err)}")

    async def _relay(
        self, request: web.Request, req: RegistryRequest, what: str, started: float, why: PassThrough
    ) -> web.StreamResponse:
        """Stream an upstream answer through (uncached blobs, ranges, tag lists), bounded memory."""
        upstream: UpstreamClient = self._runtime.upstream
        headers = CIMultiDict(req.headers)
        for name in ("Range", "If-Range"):
            if name in request.headers:
                headers[name] = request.headers[name]
        try:
            # Relayed for the client: with its own rights only, as mitmproxy relays through the proxy.
            answer = await upstream.open(req.method, req.url, headers, upstream.blob_timeout(), own_credentials=False)
        except UpstreamUnavailable as err:
            failed = error_answer(503, "UNAVAILABLE", f"upstream unavailable: {err}")
            return await self._send_answer(request, failed, what, started)
        sent = 0
        try:
            response = web.StreamResponse(status=answer.status, headers=await self._headers(answer.headers, request))
            response.headers["X-Cache"] = why.result
            if answer.content_length is not None:
                response.content_length = answer.content_length
            try:
                await response.prepare(request)
                if req.method != "HEAD":
                    async for chunk in answer.content.iter_chunked(RELAY_CHUNK):
                        await response.write(chunk)
                        sent += len(chunk)
                await response.write_eof()
            except (OSError, TimeoutError, aiohttp.ClientError) as err:  # client or upstream broke off
                _log(request, why.result, what, f"failed: {describe_error(err)}", started, why.note, logging.WARNING)
                if request.transport is not None:
                    request.transport.abort()  # never let a short body pass for a whole one
                return response
        finally:
            answer.release()
            METRICS.upstream_bytes(sent)
        _log(request, why.result, what, f"{answer.status} {sent} B", started, why.note)
        return response

    async def _send_answer(self, request: web.Request, answer: Answer, what: str, started: float) -> web.Response:
        headers = await self._headers(answer.headers, request)
        headers["X-Cache"] = answer.result
        response = web.Response(status=answer.status, body=answer.body or None, headers=headers)
        size = len(answer.body)
        if request.method == "HEAD" and answer.content_length is not None:
            response.headers["Content-Length"] = str(size := answer.content_length)
        _log(request, answer.result, what, f"{answer.status} {size} B", started, answer.note)
        return response

    async def _headers(
        self, headers: Iterable[tuple[str, str]] | CIMultiDictProxy[str], request: web.Request
    ) -> CIMultiDict[str]:
        """Upstream answer headers as the mirror sends them: hop-by-hop ones dropped, challenges
        pointed at the mirror's token relay (their realms remembered as relayable)."""
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in headers.items() if isinstance(headers, CIMultiDictProxy) else headers:
            if name.lower() in HOP_BY_HOP:
                continue
            if name.lower() == "www-authenticate":
                self._runtime.tokens.learn_realm(value)
                value = mirrored_challenge(value, self._base(request))
            out.add(name, sendable(value))
        return out


def _log(
    request: web.Request, result: str, what: str, outcome: str, started: float, note: str, level: int = logging.INFO
) -> None:
    ms = (time.monotonic() - started) * 1000
    log_request(result, request.method, what, outcome, ms, f"mirror; {note}" if note else "mirror", level)
