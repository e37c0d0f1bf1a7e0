"""regcache's own upstream client against small real HTTP servers: what its messages name, which
headers follow a redirect, and which credentials an anonymous token request carries."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from multidict import CIMultiDict

import regcache.services.upstream as upstream_module
from regcache.config import Credential, Settings
from regcache.services.upstream import UpstreamClient, UpstreamUnavailable, forwardable_headers

from .flows import serving


@dataclass
class Server:
    """Answers `/redirect?to=URL` with a 307 there, anything else with 200; keeps each request's headers."""

    port: int = 0
    seen: list[CIMultiDict[str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(CIMultiDict(request.headers))
        if request.path == "/redirect":
            return web.Response(status=307, headers={"Location": request.query["to"]})
        if request.path == "/token":  # tokens for Basic credentials only
            if not request.headers.get("Authorization", "").startswith("Basic "):
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            scope = request.query.get("scope", "")
            return web.json_response({"token": f"tok {scope}", "expires_in": 300})
        if request.path.startswith("/v2/") and request.path != "/v2/":  # a registry asking for a token
            name = request.path.removeprefix("/v2/").rpartition("/manifests/")[0]
            if request.headers.get("Authorization") != f"Bearer tok repository:{name}:pull":
                challenge = f'Bearer realm="http://127.0.0.1:{self.port}/token",service="s"'
                return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        return web.Response(body=b"{}", content_type="application/json")


@asynccontextmanager
async def server() -> AsyncIterator[Server]:
    recorder = Server()
    async with serving(recorder.handle) as recorder.port:
        yield recorder


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_messages_never_name_a_signed_storage_url() -> None:
    """A redirect to a signed URL that cannot be reached: the error names the storage host only."""

    async def go() -> None:
        async with server() as origin:
            upstream = UpstreamClient(Settings(upstream_timeout=2.0))
            signed = f"http://127.0.0.1:{closed_port()}/bucket/blob?X-Amz-Credential=AKIA1&X-Amz-Signature=s3cr3t"
            url = f"http://127.0.0.1:{origin.port}/redirect?to={signed.replace('&', '%26')}"
            with pytest.raises(UpstreamUnavailable) as raised:
                await upstream.fetch("GET", url, CIMultiDict())
            await upstream.close()
        message = str(raised.value)
        assert "127.0.0.1" in message and "/bucket/blob" not in message, message
        assert not [word for word in ("X-Amz", "s3cr3t", "AKIA1", "?") if word in message], message

    asyncio.run(go())


def test_tokens_for_regcaches_own_credentials_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token per repository asked for: clients choose how many, so only the most recent are kept."""
    monkeypatch.setattr(upstream_module, "MAX_TOKENS", 3)

    async def go() -> None:
        async with server() as registry:
            host = f"127.0.0.1:{registry.port}"
            upstream = UpstreamClient(Settings(credentials={host: Credential("ci", "pw")}))
            for n in range(6):
                answer = await upstream.fetch("GET", f"http://{host}/v2/team/app{n}/manifests/1", CIMultiDict())
                assert answer.status == 200
            assert len(upstream._tokens) == 3
            await upstream.close()

    asyncio.run(go())


def test_an_anonymous_token_is_never_asked_with_regcaches_credentials() -> None:
    """`regcache warm` records its token as anonymous: a realm that refuses anonymous requests
    (here on the registry's own host, as ghcr.io's is) must not get regcache's credentials instead."""

    async def go() -> None:
        async with server() as realm:
            host = f"127.0.0.1:{realm.port}"
            upstream = UpstreamClient(Settings(credentials={host: Credential("ci", "pw")}))
            challenge = {"realm": f"http://{host}/token", "service": "s"}
            assert await upstream.realm_token(challenge, "repository:team/app:pull", None) is None
            assert [h.get("Authorization") for h in realm.seen] == [None]
            token = await upstream.realm_token(challenge, "repository:team/app:pull", Credential("ci", "pw").basic())
            assert token is not None and token[0] == "Bearer tok repository:team/app:pull"
            await upstream.close()

    asyncio.run(go())


CLIENT = [
    ("Authorization", "Bearer registry-token"),
    ("Cookie", "session=s3cr3t"),
    ("X-Custom", "c"),
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("User-Agent", "docker/27"),
    ("If-None-Match", '"x"'),
]


@pytest.mark.parametrize(
    ("target", "keeps_authorization"),
    [
        ("http://127.0.0.1:{same}/data", True),  # the same origin
        ("http://127.0.0.1:{other}/data", False),  # the same host, another port
        ("http://localhost:{same}/data", False),  # another host
    ],
)
def test_what_follows_a_redirect(target: str, keeps_authorization: bool) -> None:
    """Of a client's headers only its rights, Accept and User-Agent go upstream; to another
    origin (scheme, host and port), never its Authorization."""

    async def go() -> None:
        async with server() as origin, server() as other:
            upstream = UpstreamClient(Settings())
            to = target.format(same=origin.port, other=other.port)
            headers = forwardable_headers(CLIENT)
            answer = await upstream.fetch("GET", f"http://127.0.0.1:{origin.port}/redirect?to={to}", headers)
            assert answer.status == 200
            await upstream.close()
            first, followed = origin.seen[0], (origin.seen + other.seen)[-1]
            for sent in (first, followed):
                assert {"Cookie", "X-Custom", "If-None-Match"} & set(sent) == set()
                assert (sent["Accept"], sent["User-Agent"]) == (CLIENT[3][1], CLIENT[4][1])
            assert first["Authorization"] == "Bearer registry-token"
            assert ("Authorization" in followed) is keeps_authorization

    asyncio.run(go())


def test_a_request_body_never_follows_a_redirect_to_another_origin() -> None:
    async def go() -> None:
        async with server() as origin, server() as other:
            upstream = UpstreamClient(Settings(upstream_timeout=2.0))
            url = f"http://127.0.0.1:{origin.port}/redirect?to=http://localhost:{other.port}/token"
            form = b"grant_type=password&username=alice&password=pw"
            with pytest.raises(UpstreamUnavailable, match="a redirect to another origin"):
                await upstream.fetch("POST", url, CIMultiDict(), data=form)
            await upstream.close()
            assert other.seen == []

    asyncio.run(go())
