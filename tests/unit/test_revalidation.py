"""Tag revalidation against a real (small) HTTP upstream whose behaviour the test switches:
stale-if-error on 429, 5xx and time-outs; no stale answer for a 404; errors when nothing is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from mitmproxy import http
from mitmproxy.test import taddons

from regcache.fronts.proxy import RegistryCache
from regcache.oci.digest import digest_of

from .flows import registry_flow, write_config

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
BODY = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()


class Upstream:
    """An upstream registry that answers the tag `library/x:1` as `mode` says."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[str] = []

    async def manifest(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path}")
        if self.mode == "hang":
            await asyncio.sleep(2)  # longer than upstream_timeout
        if self.mode in ("429", "503", "404"):
            return web.Response(status=int(self.mode), body=b'{"errors":[]}', content_type="application/json")
        if self.mode == "huge":
            return web.Response(body=b" " * (5 * 2**20), content_type=OCI_MANIFEST)
        if self.mode in ("not-json", "odd-type"):
            odd = b"{not json" if self.mode == "not-json" else b'{"schemaVersion": 2}'
            content_type = OCI_MANIFEST if self.mode == "not-json" else "application/x-odd"
            return web.Response(body=odd, content_type=content_type)
        headers = {"Docker-Content-Digest": DIGEST, "Content-Type": OCI_MANIFEST}
        return web.Response(body=BODY, headers=headers)


@asynccontextmanager
async def upstream_server() -> AsyncIterator[tuple[Upstream, int]]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", upstream.manifest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield upstream, port
    finally:
        await runner.cleanup()


async def ask(addon: RegistryCache, path: str, method: str = "GET", accept: str = OCI_MANIFEST) -> http.Response:
    flow = registry_flow("registry-1.docker.io", path, method, accept)
    await addon.request(flow)
    assert flow.response is not None
    return flow.response


def test_stale_if_error(tmp_path: Path) -> None:
    async def go() -> None:
        async with upstream_server() as (upstream, port):
            config = write_config(tmp_path, port, timeout=0.5)
            addon = RegistryCache()
            with taddons.context(addon) as tctx:
                tctx.configure(addon, regcache_config=config)
                tag = "/v2/library/x/manifests/1"

                first = await ask(addon, tag)
                assert (first.status_code, first.headers["X-Cache"], first.content) == (200, "MISS", BODY)
                assert upstream.requests == [f"HEAD {tag}", f"GET {tag}"]

                upstream.requests.clear()
                again = await ask(addon, tag)
                assert (again.headers["X-Cache"], again.content) == ("REVALIDATED", BODY)
                assert upstream.requests == [f"HEAD {tag}"]

                for mode in ("429", "503", "hang"):
                    upstream.mode = mode
                    started = time.monotonic()
                    stale = await ask(addon, tag)
                    assert (stale.status_code, stale.headers["X-Cache"], stale.content) == (200, "STALE", BODY)
                    assert stale.headers["Docker-Content-Digest"] == DIGEST
                    head = await ask(addon, tag, method="HEAD")
                    assert (head.status_code, head.headers["X-Cache"], head.content) == (200, "STALE", b"")
                    assert head.headers["Content-Length"] == str(len(BODY))
                    assert time.monotonic() - started < 3, f"{mode}: not prompt"

                # Another client, accepting only Docker manifests, was never answered this tag.
                upstream.mode = "503"
                other = await ask(addon, tag, accept=DOCKER_MANIFEST)
                assert (other.status_code, other.headers["X-Cache"]) == (503, "PASS")
                upstream.mode = "hang"
                other = await ask(addon, tag, accept=DOCKER_MANIFEST)
                assert other.status_code == 503
                assert json.loads(other.content)["errors"][0]["code"] == "UNAVAILABLE"

                # A client with another Accept list that includes the recorded media type gets the
                # recorded manifest: the tag named it when it was last seen.
                wider = await ask(addon, tag, accept=f"{DOCKER_MANIFEST}, {OCI_MANIFEST}")
                assert (wider.status_code, wider.headers["X-Cache"], wider.content) == (200, "STALE", BODY)

                # A tag the upstream says is gone is gone: no stale answer for a 404.
                upstream.mode = "404"
                gone = await ask(addon, tag)
                assert (gone.status_code, gone.headers["X-Cache"]) == (404, "PASS")

                # By digest, the store answers without asking the upstream at all.
                upstream.mode, upstream.requests = "503", []
                by_digest = await ask(addon, f"/v2/library/x/manifests/{DIGEST}")
                assert (by_digest.headers["X-Cache"], by_digest.content) == ("HIT", BODY)
                assert upstream.requests == []

                upstream.mode = "huge"
                huge = await ask(addon, "/v2/library/x/manifests/2")
                assert huge.status_code == 502
                assert json.loads(huge.content)["errors"][0]["code"] == "MANIFEST_INVALID"
                # Malformed or unknown manifests reach the client as they came, and are never stored.
                for mode in ("not-json", "odd-type"):
                    upstream.mode = mode
                    odd = await ask(addon, f"/v2/library/x/manifests/{mode}")
                    assert (odd.status_code, odd.headers["X-Cache"]) == (200, "PASS")
                    assert addon.runtime.store.get_manifest(digest_of(odd.content)) is None  # type: ignore[union-attr]
                addon.done()
                await asyncio.sleep(0.1)

    asyncio.run(go())
