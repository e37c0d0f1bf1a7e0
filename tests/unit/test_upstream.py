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

from addon import upstream as upstream_module
from addon.config import Credential, Settings
from addon.upstream import UpstreamClient, UpstreamUnavailable


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
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recorder.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield recorder
    finally:
        await runner.cleanup()


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
