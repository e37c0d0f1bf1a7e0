"""The load benchmark's client (``scripts/bench/load.py`` runs it as a process of its own): many
registry pulls at once from one asyncio process, each pulling the way a Go registry client does.

Why not N skopeo processes: 64 of them on 2 cores measure skopeo (each start, each TLS set-up,
each layer written to disk), not the cache. This client makes the same requests, in the same
order, over the same kind of connection, and nothing else:

* ``GET /v2/``; on a ``401`` with a ``Bearer`` challenge a token ``GET`` from its realm
  (``service``, ``scope=repository:<repo>:pull``);
* the manifest: ``dockerd``'s pattern ``HEAD``s the tag, then ``GET``s the digest it named;
  ``skopeo``'s ``GET``s the tag; for a list, then the ``linux/amd64`` manifest by digest;
* the config and layer blobs, :data:`BLOB_CONCURRENCY` at a time (dockerd's
  ``max-concurrent-downloads``), following ``307``s: without ``Authorization`` to another host, as
  Go's client does, and never through the proxy to a loopback address (Go never proxies loopback).

Every request is a **new connection** (``Connection: close``, no pool): dockerd and containers/image
disable keep-alive. Through the proxy that is ``CONNECT`` + a TLS handshake (no session
resumption, as Go's client without a session cache) per request, with the proxy's CA trusted.
Every body is checked: the sha256 of every manifest and blob against the digest it was asked by
(the tag's against the digest the registry holds), every blob's size; anything else — a status
not expected, a broken connection, a time-out, a mismatch — is an error, ends that pull, and the
client goes on with its next pull.

Input: a JSON spec file (:class:`Spec`, written by ``load.py``); output: a JSON result file
(:class:`Results`: per request kind, status, seconds, bytes, ok; per pull client, image, pattern,
start, seconds, ok; the error count and the first messages; the window's start and end; this
process's CPU seconds). Run: ``python -m bench.loadclient SPEC.json RESULT.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from multidict import CIMultiDictProxy

ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
BLOB_CONCURRENCY = 3
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
CHUNK = 1024 * 1024
USER_AGENT = "regcache-bench-load/1 (pulls like docker/20.10 and containers/image)"
DOCKERD, SKOPEO = "dockerd", "skopeo"
PATTERNS = (DOCKERD, SKOPEO)
MAX_MESSAGES = 50
RELEASED = "released"  # the line on stdout that says the clients are off


@dataclass(frozen=True)
class Image:
    """What a pull must get: the tag's digest (a list's, for multi-arch), the amd64 manifest's
    digest, and the amd64 image's blobs (config first) as ``(digest, size)``."""

    repo: str
    tag: str
    digest: str
    amd64_digest: str
    blobs: list[tuple[str, int]]


@dataclass(frozen=True)
class Spec:
    """One load phase. ``base``: the registry as clients address it (``https://registry-1.docker.io``
    through ``proxy``, or a plain-HTTP ``http://127.0.0.1:PORT``); ``ca``: the proxy's CA (PEM).
    ``duration`` None: one pull per client, all released at once (cold); else every client pulls
    again and again until ``duration`` seconds have passed (then finishes the pull it is in).
    Client ``i`` pulls image ``i % len(images)`` with pattern ``patterns[i % len(patterns)]``."""

    base: str
    proxy: str | None
    ca: str | None
    images: list[Image]
    clients: int
    patterns: list[str]
    duration: float | None
    timeout: float = 600.0

    @classmethod
    def load(cls, path: Path) -> Spec:
        raw = json.loads(path.read_text())
        raw["images"] = [Image(**{**i, "blobs": [tuple(b) for b in i["blobs"]]}) for i in raw["images"]]
        return cls(**raw)


class PullFailed(Exception):
    pass


@dataclass
class Results:
    started: float = 0.0  # time.time() when the clients were released
    ended: float = 0.0  # time.time() when the last pull ended
    # (kind, status, seconds, bytes, ok) per request; status 0: no answer.
    requests: list[tuple[str, int, float, int, bool]] = field(default_factory=list)
    # (client, image index, pattern, start in seconds after `started`, seconds, ok) per pull.
    pulls: list[tuple[int, int, str, float, float, bool]] = field(default_factory=list)
    errors: int = 0  # failed pulls (each ends at its first failed request)
    messages: list[str] = field(default_factory=list)
    cpu: float = 0.0  # this process's CPU seconds

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_params(challenge: str) -> dict[str, str] | None:
    """``Bearer realm="…",service="…"`` → its parameters; None for any other scheme."""
    scheme, _, rest = challenge.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params: dict[str, str] = {}
    for part in rest.split(","):
        key, _, value = part.strip().partition("=")
        if key:
            params[key.strip().lower()] = value.strip().strip('"')
    return params


def body_problem(digest: str, size: int | None, got_digest: str, got: int) -> str:
    """What is wrong with a body of ``got`` bytes whose sha256 is ``got_digest`` ("" if nothing)."""
    if size is not None and got != size:
        return f"{got} bytes, expected {size}"
    if got_digest != digest:
        return f"body digest {got_digest}, expected {digest}"
    return ""


def amd64_child(body: bytes) -> str:
    """The ``linux/amd64`` manifest's digest in a manifest list or index."""
    for entry in json.loads(body).get("manifests", []):
        platform = entry.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return str(entry["digest"])
    raise PullFailed("no linux/amd64 manifest in the list")


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class Puller:
    """The connections and the record of one load phase."""

    def __init__(self, spec: Spec, results: Results) -> None:
        self.spec = spec
        self.results = results
        self.released = 0.0  # monotonic time the clients were released at
        self.ssl = ssl.create_default_context(cafile=spec.ca) if spec.ca else ssl.create_default_context()
        # A new connection per request, as dockerd and containers/image make; no pool limit, no
        # keep-alive; bodies as sent (the digest is over them).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0, ssl=self.ssl),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=spec.timeout, sock_connect=60, sock_read=60),
        )

    async def close(self) -> None:
        await self.session.close()

    # one request ---------------------------------------------------------------------------

    async def exchange(
        self,
        kind: str,
        method: str,
        url: str,
        headers: dict[str, str],
        expect: Sequence[int] = (200,),
        digest: str | None = None,
        size: int | None = None,
    ) -> Answer:
        """One request on a new connection, its body read whole. With ``digest``, a ``200`` body must
        have that sha256 (and ``size`` bytes): blobs are hashed as they come and not kept. Recorded
        with its latency (connect to last byte); raises PullFailed."""
        host = urlsplit(url).hostname or ""
        proxy = self.spec.proxy if self.spec.proxy and not is_loopback(host) else None
        keep = kind != "blob"
        started = time.monotonic()
        status, got, body = 0, 0, bytearray()
        try:
            async with self.session.request(
                method,
                url,
                headers={"User-Agent": USER_AGENT, "Connection": "close", **headers},
                proxy=proxy,
                allow_redirects=False,
            ) as response:
                status, answer_headers = response.status, response.headers
                sha = hashlib.sha256()
                async for chunk in response.content.iter_chunked(CHUNK):
                    sha.update(chunk)
                    got += len(chunk)
                    if keep or (status != 200 and len(body) < 64 * 1024):  # a blob's error body: its start
                        body += chunk
            problem = "" if status in expect else f"HTTP {status}: {bytes(body[:200])!r}"
            if not problem and digest is not None and status == 200 and method == "GET":
                problem = body_problem(digest, size, "sha256:" + sha.hexdigest(), got)
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            problem = f"{type(err).__name__}: {err}"
        seconds = time.monotonic() - started
        self.results.requests.append((kind, status, seconds, got, not problem))
        if problem:
            raise PullFailed(f"{method} {url}: {problem}")
        return Answer(status, answer_headers, bytes(body))

    # one pull ----------------------------------------------------------------------------

    async def pull(self, image: Image, pattern: str) -> None:
        """One pull of ``image``'s amd64 variant; raises PullFailed at the first thing wrong."""
        base = self.spec.base
        auth = await self.authorize(base, image.repo)
        manifests = f"{base}/v2/{image.repo}/manifests"
        if pattern == DOCKERD:
            head = await self.exchange("tag HEAD", "HEAD", f"{manifests}/{image.tag}", {**auth, "Accept": ACCEPT})
            named = head.headers.get("Docker-Content-Digest", "")
            if named != image.digest:
                raise PullFailed(f"tag HEAD named {named!r}, the registry has {image.digest}")
            top = await self.manifest(f"{manifests}/{image.digest}", auth, image.digest)
        else:
            top = await self.manifest(f"{manifests}/{image.tag}", auth, image.digest)
        if image.amd64_digest != image.digest:
            child = amd64_child(top.body)
            if child != image.amd64_digest:
                raise PullFailed(f"the list names {child} for linux/amd64, expected {image.amd64_digest}")
            await self.manifest(f"{manifests}/{child}", auth, child)
        slots = asyncio.Semaphore(BLOB_CONCURRENCY)

        async def blob(digest: str, size: int) -> None:
            async with slots:
                await self.blob(f"{base}/v2/{image.repo}/blobs/{digest}", auth, digest, size)

        fetches = [asyncio.ensure_future(blob(d, s)) for d, s in image.blobs]
        try:
            await asyncio.gather(*fetches)
        finally:
            for fetch in fetches:
                fetch.cancel()

    async def authorize(self, base: str, repo: str) -> dict[str, str]:
        """``/v2/``, and a token if it asks for one: the ``Authorization`` header for the pull."""
        ping = await self.exchange("ping", "GET", f"{base}/v2/", {}, expect=(200, 401))
        if ping.status == 200:
            return {}
        params = bearer_params(ping.headers.get("WWW-Authenticate", ""))
        if not params or "realm" not in params:
            raise PullFailed(f"/v2/ answered 401 without a Bearer challenge: {dict(ping.headers)!r}")
        query = {"scope": f"repository:{repo}:pull", **({"service": params["service"]} if "service" in params else {})}
        token = await self.exchange("token", "GET", f"{params['realm']}?{urlencode(query)}", {})
        try:
            document = json.loads(token.body)
        except ValueError as err:
            raise PullFailed(f"the token answer is no JSON: {err}") from None
        value = document.get("token") or document.get("access_token")
        if not value:
            raise PullFailed("the token answer holds no token")
        return {"Authorization": f"Bearer {value}"}

    async def manifest(self, url: str, auth: dict[str, str], digest: str) -> Answer:
        return await self.exchange("manifest", "GET", url, {**auth, "Accept": ACCEPT}, digest=digest)

    async def blob(self, url: str, auth: dict[str, str], digest: str, size: int) -> None:
        headers = dict(auth)
        kind = "blob"
        for _ in range(MAX_REDIRECTS + 1):
            answer = await self.exchange(kind, "GET", url, headers, expect=(200, *REDIRECTS), digest=digest, size=size)
            if answer.status == 200:
                return
            location = urljoin(url, answer.headers.get("Location", ""))
            if urlsplit(location).hostname != urlsplit(url).hostname:
                headers.pop("Authorization", None)  # Go's client drops it for another host
            url, kind = location, "blob"
        raise PullFailed(f"more than {MAX_REDIRECTS} redirects for {digest}")


async def client(puller: Puller, index: int, release: asyncio.Event) -> None:
    """One client: waits for the start, then pulls (again and again until the spec's duration)."""
    spec, results = puller.spec, puller.results
    image_index = index % len(spec.images)
    image, pattern = spec.images[image_index], spec.patterns[index % len(spec.patterns)]
    await release.wait()
    deadline = None if spec.duration is None else puller.released + spec.duration
    while True:
        started = time.monotonic()
        ok = True
        try:
            await puller.pull(image, pattern)
        except PullFailed as err:
            ok = False
            results.error(f"client {index} ({pattern}) {image.repo}: {err}")
        except Exception as err:  # a bug here must not pass for a slow server: counted and said
            ok = False
            results.error(f"client {index} ({pattern}) {image.repo}: unexpected {type(err).__name__}: {err}")
        now = time.monotonic()
        results.pulls.append((index, image_index, pattern, started - puller.released, now - started, ok))
        if deadline is None or now >= deadline:
            return


async def run(spec: Spec) -> Results:
    results = Results()
    puller = Puller(spec, results)
    release = asyncio.Event()
    try:
        tasks = [asyncio.ensure_future(client(puller, i, release)) for i in range(spec.clients)]
        await asyncio.sleep(0)  # every client waits at the start line
        results.started, puller.released = time.time(), time.monotonic()
        release.set()
        print(RELEASED, flush=True)  # load.py starts its real clients now
        await asyncio.gather(*tasks)
        results.ended = time.time()
    finally:
        await puller.close()
    return results


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.loadclient SPEC.json RESULT.json", file=sys.stderr)
        return 2
    results = asyncio.run(run(Spec.load(Path(argv[0]))))
    times = os.times()
    results.cpu = times.user + times.system
    Path(argv[1]).write_text(json.dumps(asdict(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
