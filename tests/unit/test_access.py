"""Access without a fresh upstream answer: identities, token expiry, grants, regcache's own tokens,
the decision table (against a small real HTTP upstream whose answer the test switches) and realm
normalisation. What the access records keep, on disk and in Redis: tests/e2e/test_shared_backends.py.
End-to-end: tests/e2e/test_private_outage.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from multidict import CIMultiDict

from addon import access as access_module
from addon.access import Access, judged, with_scope
from addon.access_records import DiskAccessRecords
from addon.answers import Answer
from addon.config import ConfigError, Credential, Settings, load_settings
from addon.identity import (
    ANONYMOUS,
    Client,
    Identity,
    Keyer,
    jwt_expiry,
    requested_repositories,
    split_authorization,
    token_requester,
)
from addon.routes import RegistryRequest, parse_path
from addon.store import DiskStore
from addon.token_service import realm_key, remove_dot_segments
from addon.upstream import UpstreamClient

DIGEST = "sha256:" + "a" * 64
SECRET = b"s" * 32


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


def a_jwt(exp: object) -> str:
    claims = {"sub": "alice"} if exp is None else {"sub": "alice", "exp": exp}
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


# identity.py -------------------------------------------------------------------------------------


def test_keys_hide_the_credential_and_depend_on_the_secret() -> None:
    keyer = Keyer(SECRET)
    key = keyer.key("basic", "alice:alice-password")
    assert key.startswith("basic:") and "alice" not in key and len(key) == len("basic:") + 64
    assert key == Keyer(SECRET).key("basic", "alice:alice-password")
    assert key != Keyer(b"t" * 32).key("basic", "alice:alice-password")
    assert key != keyer.key("bearer", "alice:alice-password")


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("", ("none", "")),
        ("Basic YTpi", ("basic", "YTpi")),
        ("bearer  T ", ("bearer", "T")),
        ("Negotiate xyz", ("other", "Negotiate xyz")),
    ],
)
def test_split_authorization(header: str, parsed: tuple[str, str]) -> None:
    assert split_authorization(header) == parsed


def test_jwt_expiry_is_read_without_verification() -> None:
    assert jwt_expiry(a_jwt(1_900_000_000)) == 1_900_000_000.0
    assert jwt_expiry(a_jwt(None)) is None
    assert jwt_expiry(a_jwt(True)) is None
    assert jwt_expiry(a_jwt("soon")) is None
    assert jwt_expiry("made-up-12345") is None
    assert jwt_expiry("a.!!!.c") is None
    assert jwt_expiry(a_jwt(1_900_000_000)[:-5] + "xxxxx") == 1_900_000_000.0  # a bad signature: still read


def test_tokens_regcache_issues_carry_an_identity_until_they_expire() -> None:
    keyer, now = Keyer(SECRET), 1_800_000_000.0
    token = keyer.issue("basic:abc", now, lifetime=3600)
    assert token.startswith("regcache.") and "basic:abc" not in token
    assert keyer.verify(token, now) == Identity("basic:abc", now + 3600)
    assert keyer.verify(token, now + 3601) is None  # expired
    assert Keyer(b"t" * 32).verify(token, now) is None  # another store's
    _, payload, signature = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"id": "anonymous", "exp": now + 3600}).encode()).decode()
    assert keyer.verify(f"regcache.{forged.rstrip('=')}.{signature}", now) is None
    assert keyer.verify(f"regcache.{payload}.{signature[:-2]}AA", now) is None
    assert keyer.verify("regcache.garbage", now) is None


@pytest.mark.parametrize(
    ("method", "authorization", "body", "kind", "value"),
    [
        ("GET", "", None, "anonymous", ""),
        ("GET", basic("alice:pw"), None, "basic", "alice:pw"),
        ("POST", "", b"grant_type=password&username=alice&password=pw&service=s", "basic", "alice:pw"),
        ("POST", basic("bob:x"), b"grant_type=refresh_token&refresh_token=R1", "refresh", "R1"),
        ("POST", "", b"service=s&scope=repository:a:pull&client_id=regctl", "anonymous", ""),
        ("POST", "", b"grant_type=client_credentials&client_secret=z", "opaque", ""),
        ("GET", "Bearer regcache.p.s", None, "issued", "regcache.p.s"),
        ("GET", "Bearer T", None, "opaque", "Bearer T"),
    ],
)
def test_who_asks_for_a_token(method: str, authorization: str, body: bytes | None, kind: str, value: str) -> None:
    requester = token_requester(method, authorization, body)
    assert requester.kind == kind
    if kind != "opaque" or value:
        assert requester.value == value


# what a refusal says about a credential ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "status", "challenge", "revokes"),
    [
        ("none", 401, 'Bearer realm="https://auth.docker.io/token"', False),  # "get a token first"
        ("basic", 401, 'Bearer realm="https://auth.docker.io/token"', False),  # wants a token, not Basic
        ("bearer", 401, 'Bearer realm="x",error="insufficient_scope"', True),
        ("none", 401, 'Basic realm="registry"', True),
        ("bearer", 401, 'Basic realm="registry"', False),
        ("basic", 401, 'Basic realm="registry"', True),
        ("configured", 401, 'Bearer realm="x"', True),  # regcache's own credentials were tried
        ("none", 403, "", True),
    ],
)
def test_which_refusals_judge_the_credential(scheme: str, status: int, challenge: str, revokes: bool) -> None:
    assert judged(Client((), scheme), status, challenge) is revokes


def test_recorded_challenges_name_the_scope() -> None:
    challenge = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
    assert with_scope(challenge, "library/x") == challenge + ',scope="repository:library/x:pull"'
    assert with_scope('Basic realm="r"', "library/x") == 'Basic realm="r"'


# realms ---------------------------------------------------------------------------------------------------


def test_dot_segments() -> None:
    assert remove_dot_segments("/a/./b/../c") == "/a/c"
    assert remove_dot_segments("/../../x") == "/x"
    assert remove_dot_segments("/a/b/..") == "/a/"
    assert remove_dot_segments("/") == "/"


def test_realms_compare_after_normalisation() -> None:
    quay = realm_key("https://quay.io/v2/auth")
    assert quay == ("https", "quay.io", 443, "/v2/auth")
    for same in (
        "https://QUAY.io/v2/auth",
        "https://quay.io:443/v2/auth",
        "https://quay.io//v2/auth",
        "https://quay.io/./v2/auth",
        "https://quay.io/v2/x/../auth",
        "https://quay.io/v2/%61uth",
        "HTTPS://quay.io/v2/auth?service=quay.io",
    ):
        assert realm_key(same) == quay, same
    for other in (
        "https://quay.io/V2/auth",
        "https://quay.io/v2/auth/",
        "https://quay.io/v2/auth/%2e%2e/library/x/manifests/1",
        "https://quay.io/v2/auth%2f..%2f..%2fv2%2flibrary",
        "http://quay.io/v2/auth",
        "https://quay.io:8443/v2/auth",
        "https://quay.io.evil/v2/auth",
    ):
        assert realm_key(other) != quay, other
    assert realm_key("https://quay.io/v2/auth/%2e%2e/%2e%2e/v2/library/x") == ("https", "quay.io", 443, "/v2/library/x")
    for not_a_realm in ("ftp://x/token", "https:///token", "https://user:pw@x/token", "https://x:99999/token"):
        assert realm_key(not_a_realm) is None, not_a_realm


# Access: identities, grants, decisions -----------------------------------------------------------------


class Upstream:
    """A registry that answers every `HEAD` of an object with `status` (the test switches it)."""

    def __init__(self) -> None:
        self.status = 200
        self.challenge = 'Basic realm="registry"'
        self.asked = 0

    async def head(self, request: web.Request) -> web.Response:
        self.asked += 1
        headers = {"WWW-Authenticate": self.challenge} if self.status == 401 else {}
        return web.Response(status=self.status, headers=headers)


@asynccontextmanager
async def upstream_server() -> AsyncIterator[tuple[Upstream, int]]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("HEAD", "/{tail:.*}", upstream.head)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield upstream, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def settings_for(tmp_path: Path, port: int, **changes: object) -> Settings:
    path = tmp_path / "regcache.yaml"
    path.write_text(
        json.dumps({"cache_dir": str(tmp_path), "upstreams": {"registry-1.docker.io": f"http://127.0.0.1:{port}"}})
    )
    return replace(load_settings(str(path)), upstream_timeout=2.0, **changes)  # type: ignore[arg-type]


def request(name: str, authorization: str | None = None, reference: str = DIGEST) -> RegistryRequest:
    path = f"/v2/{name}/blobs/{reference}"
    headers = CIMultiDict({"Authorization": authorization} if authorization else {})
    return RegistryRequest("docker.io", f"https://registry-1.docker.io{path}", "GET", parse_path(path), headers, ())


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """time.time() as access.py sees it: `clock[0]`."""
    now = [time.time()]
    monkeypatch.setattr(access_module.time, "time", lambda: now[0])
    yield now


class World:
    def __init__(self, tmp_path: Path, port: int, offline: bool = False, **changes: object) -> None:
        self.settings = settings_for(tmp_path, port, **changes)
        self.store = DiskStore(tmp_path / "store", 10**9)
        self.records = DiskAccessRecords(tmp_path)
        self.upstream = UpstreamClient(self.settings)
        self.access = Access(self.store, self.records, self.upstream, self.settings, offline)

    async def decide(self, req: RegistryRequest, seen: bool = True) -> int:
        """200 if served, else the status of the refusal."""
        client = await self.access.client(req)
        answer = await self.access.check(req, client, DIGEST, "blobs", known=seen)
        return 200 if answer is None else answer.status

    async def accept(self, req: RegistryRequest) -> None:
        self.access.observe(req, await self.access.client(req), 200)

    async def close(self) -> None:
        await self.access.close()
        await self.upstream.close()
        self.records.close()
        self.store.close()


def test_identities_of_a_request(tmp_path: Path, clock: list[float]) -> None:
    async def go() -> None:
        world = World(tmp_path, 1)
        access, keyer = world.access, world.access.keyer
        alice = keyer.key("basic", "alice:pw")
        assert (await access.client(request("a/b"))).identities == (Identity(ANONYMOUS),)
        assert (await access.client(request("a/b", basic("alice:pw")))).keys == (alice,)

        unknown = await access.client(request("a/b", "Bearer made-up-12345"))
        assert unknown.keys == (keyer.key("bearer", "made-up-12345"),)
        assert unknown.identities[0].until == clock[0] + 300  # no expiry known: 5 minutes

        token = a_jwt(int(clock[0]) + 120)
        access.record_token(token, alice, 300, ("a/b",))
        seen = await access.client(request("a/b", f"Bearer {token}"))
        own = Identity(keyer.key("bearer", token), int(clock[0]) + 120)
        assert seen.identities == (own, Identity(alice, judged=frozenset({"a/b"})))
        assert (await access.client(request("a/b", f"Bearer {a_jwt(int(clock[0]) - 1)}"))).identities == ()

        issued = await access.client(request("a/b", f"Bearer {access.issue(alice)}"))
        assert issued.issued_here and issued.keys == (alice,)
        forged = await access.client(request("a/b", "Bearer regcache.e30.AAAA"))
        assert forged.issued_here and forged.identities == ()

        configured = replace(world.settings, credentials={"registry-1.docker.io": Credential("ci", "pw")})
        own = Access(world.store, world.records, world.upstream, configured, False)
        assert (await own.client(request("a/b"))).keys == (own.keyer.key("configured", "registry-1.docker.io"),)
        assert (await own.client(request("a/b", basic("alice:pw")))).keys == (alice,)
        await world.close()

    asyncio.run(go())


def test_grants_expire_with_the_ttl_and_with_the_token(tmp_path: Path, clock: list[float]) -> None:
    async def go() -> None:
        world = World(tmp_path, 1, access_grant_ttl=3600.0)  # port 1: unreachable
        alice_basic = request("team/app", basic("alice:pw"))
        await world.accept(alice_basic)
        assert await world.decide(alice_basic) == 200
        clock[0] += 3599
        assert await world.decide(alice_basic) == 200
        clock[0] += 2
        assert await world.decide(alice_basic) == 503  # older than access_grant_ttl

        token = a_jwt(int(clock[0]) + 60)  # never seen issued: only the token's own identity
        alice_token = request("team/app", f"Bearer {token}")
        await world.accept(alice_token)
        assert await world.decide(alice_token) == 200
        clock[0] += 61
        assert await world.decide(alice_token) == 503  # the token expired, and its grant with it

        await world.accept(request("pub/lic"))  # anonymous: readable anonymously, no expiry
        clock[0] += 10 * 3600
        assert await world.decide(request("pub/lic", "Bearer made-up-12345")) == 200
        await world.close()

    asyncio.run(go())


def test_grants_survive_a_restart(tmp_path: Path) -> None:
    async def go() -> None:
        world = World(tmp_path, 1)
        alice = request("team/app", basic("alice:pw"))
        await world.accept(alice)
        await world.close()
        again = World(tmp_path, 1)
        assert await again.decide(alice) == 200
        assert await again.decide(request("team/app", basic("alice:guess"))) == 503
        assert await again.access.holds_grants(again.access.keyer.key("basic", "alice:pw"))
        await again.close()

    asyncio.run(go())


# The decision table: (upstream, client, seen) → served (200) or the refusal's status.
DECISIONS = [
    # a fresh answer decides
    ("200", "stranger", True, 200),
    ("401", "owner", True, 401),
    ("404", "owner", True, 404),
    # no fresh answer: grants and "readable anonymously" decide, else fail closed
    ("down", "owner", True, 200),
    ("down", "owner", False, 503),  # not seen in this repository: never
    ("down", "stranger", True, 503),
    ("down", "anonymous", True, 503),
    ("down", "public", True, 200),
    ("429", "owner", True, 200),
    ("429", "stranger", True, 429),  # the upstream's own answer
    ("429", "anonymous", True, 429),
    ("503", "stranger", True, 503),
    ("500", "owner", True, 200),
    ("offline", "owner", True, 200),
    ("offline", "stranger", True, 401),
    ("offline", "public", True, 200),
    ("offline", "owner", False, 401),
    ("offline-open", "stranger", True, 200),
    ("offline-open", "anonymous", False, 200),
]


@pytest.mark.parametrize(("upstream", "who", "seen", "expected"), DECISIONS)
def test_decision_table(
    tmp_path: Path, clock: list[float], upstream: str, who: str, seen: bool, expected: int
) -> None:
    async def go() -> None:
        async with upstream_server() as (server, port):
            offline = upstream.startswith("offline")
            world = World(
                tmp_path,
                1 if upstream == "down" else port,
                offline=offline,
                offline_access="open" if upstream == "offline-open" else "recorded",
            )
            owner = request("team/app", basic("alice:pw"))
            await world.accept(owner)
            await world.accept(request("pub/lic"))
            clock[0] += 400  # past the fast path: the upstream is asked (or found down)
            server.status = int(upstream) if upstream.isdigit() else 200
            req = {
                "owner": owner,
                "stranger": request("team/app", "Bearer made-up-12345"),
                "anonymous": request("team/app"),
                "public": request("pub/lic", basic("bob:pw")),
            }[who]
            assert await world.decide(req, seen) == expected
            if expected == 401 and offline:
                client = await world.access.client(req)
                answer = await world.access.check(req, client, DIGEST, "blobs", known=seen)
                assert isinstance(answer, Answer)
                assert json.loads(answer.body)["errors"][0]["code"] == "UNAUTHORIZED"
            await world.close()

    asyncio.run(go())


def test_a_token_refused_for_another_repository_judges_only_itself(tmp_path: Path, clock: list[float]) -> None:
    """An anonymous token asked for library/secret, presented for a public repository: the
    registry refuses it (wrong scope), and the public repository stays readable anonymously."""

    async def go() -> None:
        async with upstream_server() as (server, port):
            world = World(tmp_path, port)
            await world.accept(request("pub/lic"))
            token = a_jwt(int(clock[0]) + 300)
            world.access.record_token(token, ANONYMOUS, 300, ("library/secret",))
            server.challenge, server.status = 'Bearer realm="x",error="insufficient_scope"', 401
            clock[0] += 400
            assert await world.decide(request("pub/lic", f"Bearer {token}")) == 401
            server.status = 503
            assert await world.decide(request("pub/lic")) == 200  # still readable anonymously
            await world.close()

    asyncio.run(go())


def test_token_requests_name_their_repositories() -> None:
    query = "service=s&scope=repository:library/a:pull&scope=repository:host:5000/b:pull,push registry:catalog:*"
    assert requested_repositories("GET", query, None) == ("host:5000/b", "library/a")
    assert requested_repositories("POST", "", b"grant_type=refresh_token&scope=repository:c:pull") == ("c",)
    assert requested_repositories("GET", "service=s", None) == ()


def test_fast_path_asks_nothing_and_refusals_revoke(tmp_path: Path, clock: list[float]) -> None:
    async def go() -> None:
        async with upstream_server() as (server, port):
            world = World(tmp_path, port)
            owner = request("team/app", basic("alice:pw"))
            await world.accept(owner)
            assert await world.decide(owner) == 200
            assert server.asked == 0  # accepted a moment ago: no upstream request
            stranger = request("team/app", basic("bob:pw"))
            assert await world.decide(stranger) == 200 and server.asked == 1  # fresh 200 grants bob
            server.status, clock[0] = 401, clock[0] + 400
            assert await world.decide(stranger) == 401  # a Basic refusal of Basic: revoked
            server.status = 503
            assert await world.decide(stranger) == 503
            assert await world.decide(owner) == 200
            server.challenge, server.status = 'Bearer realm="https://auth.example/token"', 401
            assert await world.decide(owner) == 401  # asks for a token: it did not judge alice's password
            server.status = 503
            assert await world.decide(owner) == 200
            await world.close()

    asyncio.run(go())


# configuration --------------------------------------------------------------------------------------------


def test_access_settings(tmp_path: Path) -> None:
    assert (Settings().offline_access, Settings().access_grant_ttl) == ("recorded", 86400.0)
    path = tmp_path / "regcache.yaml"
    path.write_text("offline_access: open\naccess_grant_ttl: 90m\n")
    assert (load_settings(str(path)).offline_access, load_settings(str(path)).access_grant_ttl) == ("open", 5400.0)
    for text, key in (("offline_access: everyone", "offline_access"), ("access_grant_ttl: soon", "access_grant_ttl")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_settings(str(path))
