"""Access without a fresh upstream answer: identities, token expiry, grants, regcache's own tokens,
the decision table (against a small real HTTP upstream whose answer the test switches), realm
normalisation and what the access records keep. End-to-end: tests/e2e/test_private_outage.py."""

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

import regcache.services.access as access_module
from regcache.config import ConfigError, Credential, Settings, load_settings
from regcache.oci.api import RegistryRequest, parse_path
from regcache.oci.auth import realm_key, remove_dot_segments
from regcache.services.access import Access, judged, with_scope
from regcache.services.answers import Answer
from regcache.services.identity import (
    Client,
    Identity,
    Keyer,
    jwt_expiry,
    requested_repositories,
    split_authorization,
    token_requester,
)
from regcache.services.upstream import Recent, UpstreamClient
from regcache.store.access import ANONYMOUS, DiskAccessRecords, Grant, RecordWriter, TokenRecord
from regcache.store.disk import DiskStore

from .flows import serving

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


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("authorization", "query", "body", "content_type", "kind", "value"),
    [
        ("", "service=s&scope=repository:a:pull", None, "", "anonymous", ""),
        ("", "", None, "", "anonymous", ""),
        # what docker, containerd, podman/skopeo and regctl send without credentials
        ("", "service=s&scope=repository:a:pull&client_id=regctl&offline_token=true", None, "", "anonymous", ""),
        ("", "account=alice&service=s", None, "", "anonymous", ""),
        ("", "", b"service=s&scope=repository:a:pull&client_id=regctl", f"{FORM}; charset=utf-8", "anonymous", ""),
        ("", "", b"service=s&access_type=offline&client_id=containerd", FORM, "anonymous", ""),
        ("", "", b"", "multipart/form-data", "anonymous", ""),  # no body at all
        (basic("alice:pw"), "service=s", None, "", "basic", "alice:pw"),
        ("", "", b"grant_type=password&username=alice&password=pw&service=s", FORM, "basic", "alice:pw"),
        (basic("bob:x"), "", b"grant_type=refresh_token&refresh_token=R1", FORM, "refresh", "R1"),
        # credentials in the query, as a realm reading both (Go's FormValue) takes them
        ("", "grant_type=password&username=alice&password=pw", b"service=s&scope=repository:a:pull", FORM,
         "basic", "alice:pw"),
        ("", "grant_type=refresh_token&refresh_token=R2&service=s", None, "", "refresh", "R2"),
        ("", "username=alice", b"grant_type=password&password=pw", FORM, "basic", "alice:pw"),
        ("", "password=pw&service=s", None, "", "opaque", ""),  # a secret, whatever it is for
        ("", "", b"grant_type=client_credentials&client_secret=z", FORM, "opaque", ""),
        ("", "client_secret=z", None, "", "opaque", ""),
        # a body regcache cannot read as a form: whatever it carries, never anonymous
        ("", "service=s", b"preamble\r\n--b\r\nContent-Disposition: form-data; name=service\r\n\r\ns\r\n--b--",
         "multipart/form-data; boundary=b", "opaque", ""),
        ("", "service=s", b"service=s", "", "opaque", ""),
        ("", "", b'{"username": "alice", "password": "pw"}', "application/json", "opaque", ""),
        ("Bearer regcache.p.s", "", None, "", "issued", "regcache.p.s"),
        ("Bearer T", "", None, "", "opaque", "Bearer T"),
    ],
)
def test_who_asks_for_a_token(
    authorization: str, query: str, body: bytes | None, content_type: str, kind: str, value: str
) -> None:
    requester = token_requester(authorization, query, body, content_type)
    assert requester.kind == kind
    if kind != "opaque" or value:
        assert requester.value == value


def test_opaque_token_requesters_are_told_apart() -> None:
    """Each unreadable credential is an identity of its own (its keyed hash), never another's."""
    assert token_requester("", "client_secret=a", None, "") != token_requester("", "client_secret=b", None, "")
    assert token_requester("", "", b"x", "text/plain") != token_requester("", "", b"y", "text/plain")


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


# the access records -------------------------------------------------------------------------------------


def test_access_records_keep_what_they_should_across_reopening(tmp_path: Path) -> None:
    records = DiskAccessRecords(tmp_path)
    secret = records.secret()
    assert len(secret) == 32 and records.secret() == secret
    now = time.time()
    records.put_grant("basic:a", "docker.io/library/x", Grant(now, now + 3600))
    records.put_grant(ANONYMOUS, "docker.io/library/p", Grant(now, None))
    records.put_token("bearer:t", TokenRecord("basic:a", now + 60))
    records.put_token("bearer:old", TokenRecord("basic:a", now - 1))
    records.add_realm("https://auth.docker.io/token")
    records.put_challenge("registry-1.docker.io", 'Bearer realm="https://auth.docker.io/token"')
    records.close()

    again = DiskAccessRecords(tmp_path)
    assert again.secret() == secret
    assert again.grant("basic:a", "docker.io/library/x") == Grant(now, now + 3600)
    assert again.grant("basic:a", "docker.io/library/y") is None
    assert again.holds_grants("basic:a") and not again.holds_grants("basic:b")
    assert again.grant(ANONYMOUS, "docker.io/library/p") == Grant(now, None)
    assert again.token("bearer:t") == TokenRecord("basic:a", now + 60)
    assert again.token("bearer:old") is None  # expired in the store itself
    assert again.realms() == {"https://auth.docker.io/token"}
    assert again.challenges() == {"registry-1.docker.io": 'Bearer realm="https://auth.docker.io/token"'}
    again.drop_grant("basic:a", "docker.io/library/x")
    assert again.grant("basic:a", "docker.io/library/x") is None
    again.put_challenge("registry-1.docker.io", None)
    assert again.challenges() == {}
    again.close()
    assert (tmp_path / "access").stat().st_mode & 0o077 == 0


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
    async with serving(upstream.head, "HEAD") as port:
        yield upstream, port


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
    assert requested_repositories(query, None, "") == ("host:5000/b", "library/a")
    body = b"grant_type=refresh_token&scope=repository:c:pull"
    assert requested_repositories("scope=repository:d:pull", body, FORM) == ("c", "d")
    assert requested_repositories("scope=repository:d:pull", body, "text/plain") == ("d",)  # the query only
    assert requested_repositories("service=s", None, "") == ()


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


# revocations -------------------------------------------------------------------------------------------


def test_a_revocation_is_written_ahead_of_queued_writes() -> None:
    async def go() -> None:
        writer, done = RecordWriter(), []
        for name in ("a", "b", "c"):
            writer.write(name, lambda n=name: done.append(n))  # type: ignore[misc]
        writer.write("drop", lambda: done.append("drop"), first=True)
        await writer.flush()
        assert done == ["drop", "a", "b", "c"]  # the worker had taken nothing yet

    asyncio.run(go())


class RefusingDrops(DiskAccessRecords):
    """Access records on a disk that takes no more deletes (full): fault injection."""

    def drop_grant(self, identity: str, repository: str) -> None:
        raise OSError(28, "No space left on device")


def test_a_revocation_the_store_refuses_is_kept_for_the_run(
    tmp_path: Path, clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        async with upstream_server() as (server, port):
            world = World(tmp_path, port)
            world.records.close()
            world.records = RefusingDrops(tmp_path)
            world.access = Access(world.store, world.records, world.upstream, world.settings, False)
            owner = request("team/app", basic("alice:pw"))
            await world.accept(owner)
            await world.access.writer.flush()  # the grant is in the store
            server.status, clock[0] = 401, clock[0] + 400
            assert await world.decide(owner) == 401  # a Basic refusal of Basic: revoked, the drop refused
            monkeypatch.setattr(access_module, "MAX_REMEMBERED", 3)
            for n in range(5):  # revocations of other identities push the in-memory ones out
                assert await world.decide(request("team/app", basic(f"x{n}:pw"))) == 401
            await world.access.writer.flush()
            server.status = 503
            assert await world.decide(owner) == 503  # not read back from the store this run
            assert world.records.grant(world.access.keyer.key("basic", "alice:pw"), "docker.io/team/app")
            await world.close()

    asyncio.run(go())


def test_a_grant_saved_before_its_revocation_is_not_written_after_it(tmp_path: Path) -> None:
    """The revocation's drop goes ahead of the grant's queued save: the save must not undo it."""

    async def go() -> None:
        world = World(tmp_path, 1)
        owner = request("team/app", basic("alice:pw"))
        client = await world.access.client(owner)
        world.access.observe(owner, client, 200)  # its save is queued...
        world.access.observe(owner, client, 401, 'Basic realm="registry"')  # ...and the drop goes first
        alice = world.access.keyer.key("basic", "alice:pw")
        await world.close()
        records = DiskAccessRecords(tmp_path)
        assert records.grant(alice, "docker.io/team/app") is None
        records.close()

    asyncio.run(go())


# bounded memory ------------------------------------------------------------------------------------------


def test_recent_keeps_the_most_recently_set() -> None:
    forgotten: list[tuple[str, int]] = []
    recent: Recent[str, int] = Recent(2, lambda k, v: forgotten.append((k, v)))
    recent["a"], recent["b"], recent["a"], recent["c"] = 1, 2, 3, 4
    assert dict(recent) == {"a": 3, "c": 4} and forgotten == [("b", 2)]


def test_grants_in_memory_are_bounded_and_the_forgotten_still_count(
    tmp_path: Path, clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anonymous grants never expire, so clients choose how many there are: memory keeps the most
    recent, the store the rest (accepted again since saved: saved as it leaves memory)."""
    monkeypatch.setattr(access_module, "MAX_REMEMBERED", 3)

    async def go() -> None:
        world = World(tmp_path, 1)  # unreachable: only grants decide
        alice = request("team/app", basic("alice:pw"))
        await world.accept(alice)
        clock[0] += 10
        await world.accept(alice)  # accepted again within a minute: not saved yet
        for n in range(10):
            await world.accept(request(f"pub/lic{n}"))
        assert len(world.access._grants) == 3 and len(world.access._saved_at) <= 3
        await world.access.writer.flush()
        alice_key = world.access.keyer.key("basic", "alice:pw")
        assert world.records.grant(alice_key, "docker.io/team/app") == Grant(clock[0], clock[0] + 86400)
        assert await world.decide(alice) == 200
        assert await world.decide(request("pub/lic0", "Bearer made-up")) == 200
        await world.close()

    asyncio.run(go())


# tokens regcache issued ----------------------------------------------------------------------------------


def test_a_token_regcache_issued_is_judged_upstream_and_revokes_nothing(tmp_path: Path, clock: list[float]) -> None:
    """Online, a request bearing regcache's own token is asked upstream like any other: the
    refusal is relayed with its challenge (the client gets a real token) and revokes nothing."""

    async def go() -> None:
        async with upstream_server() as (server, port):
            world = World(tmp_path, port)
            owner = request("team/app", basic("alice:pw"))
            await world.accept(owner)
            issued = request("team/app", f"Bearer {world.access.issue(world.access.keyer.key('basic', 'alice:pw'))}")
            clock[0] += 400  # past the fast path
            server.challenge, server.status = 'Bearer realm="https://auth.example/token",error="invalid_token"', 401
            client = await world.access.client(issued)
            answer = await world.access.check(issued, client, DIGEST, "blobs", known=True)
            assert answer is not None and answer.status == 401 and server.asked == 1
            assert ("WWW-Authenticate", server.challenge) in answer.headers
            server.status = 503  # no fresh answer: the identity it carries still holds its grant
            assert await world.decide(issued) == 200
            assert await world.decide(owner) == 200
            await world.close()

    asyncio.run(go())


def test_in_a_cluster_a_revocation_by_another_node_counts_within_its_bound(tmp_path: Path, clock: list[float]) -> None:
    """Two nodes over one set of records: node b's revocation stops node a serving its grant held in
    memory once that is CLUSTER_GRANT_SECONDS old (no fast path, the records read back, upstream down);
    a grant the records still hold goes on counting; within the bound the fast path serves."""

    async def go() -> None:
        async with upstream_server() as (server, port):
            a, b = World(tmp_path, port), World(tmp_path, port)
            for node in (a, b):
                node.access = Access(node.store, a.records, node.upstream, node.settings, False, cluster=True)
            alice, carol = request("team/app", basic("alice:pw")), request("team/app", basic("carol:pw"))
            await a.accept(alice)
            await a.accept(carol)
            await a.access.writer.flush()
            server.status = 401
            assert await b.decide(alice) == 401  # node b: refused upstream, revoked in the records
            await b.access.writer.flush()
            server.status, server.asked = 503, 0
            clock[0] += access_module.CLUSTER_GRANT_SECONDS / 2
            assert await a.decide(alice) == 200 and server.asked == 0  # the fast path, within the bound
            clock[0] += access_module.CLUSTER_GRANT_SECONDS
            assert await a.decide(alice) == 503 and server.asked == 1  # asked, down: the records say revoked
            assert await a.decide(carol) == 200  # still held by the records
            for node in (b, a):
                await node.close()

    asyncio.run(go())
