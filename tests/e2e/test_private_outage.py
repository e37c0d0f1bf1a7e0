"""Cached private content fails closed: without a fresh upstream answer, only to credentials the
upstream accepted for the repository, or when the repository is readable anonymously.

The probe matrix asks a regcache that cached a private image (alice's) for it in every way a
client can — through the proxy and the mirror, GET and HEAD, by tag, by digest, config and layer
blob, and the private layer through a public repository's name — with every credential but the
owner's, while the upstream is up, stopped (token server up or down), or answering 429 or 503
(a fault relay in front of the real registry). Real skopeo and dockerd, restarts, offline mode,
bundles and a realm under `/v2/` (quay.io's form) follow.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed.cdn import Cdn
from bed.client import ACCEPT_ALL
from bed.dockerd import Dockerd
from bed.faults import FaultRelay
from bed.images import ImageSet, PushedImage, push_variant
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from .conftest import regcache_cli
from .test_access import (  # noqa: F401 - the fixtures
    ALICE,
    BOB,
    OtherUpstream,
    alice_password_file,
    basic_auth_upstream,
    other_upstream,
    secret,
)
from .test_mirror import mirror_ref, plain
from .test_pull import request_through

REGISTRY = "https://registry-1.docker.io"
TOKEN_URL = "https://auth.docker.io/token?service=registry.docker.io&scope=repository:{}:pull"


def basic(pair: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a 307 to the blob endpoint is the answer: it hands out the bytes


@dataclass
class Front:
    """One way in: the proxy (`https://registry-1.docker.io` through it) or the mirror's port."""

    name: str
    base: str
    opener: urllib.request.OpenerDirector

    def status(self, method: str, path: str, headers: dict[str, str]) -> int:
        request = urllib.request.Request(self.base + path, method=method, headers={"Accept": ACCEPT_ALL, **headers})
        try:
            with self.opener.open(request, timeout=30) as answer:
                answer.read()
                return int(answer.status)
        except urllib.error.HTTPError as err:
            err.read()
            return err.code


def fronts(regcache: Mitmdump) -> list[Front]:
    context = ssl.create_default_context(cafile=str(regcache.ca_cert))
    proxy = urllib.request.ProxyHandler({"https": regcache.url})
    proxied = urllib.request.build_opener(proxy, urllib.request.HTTPSHandler(context=context), _NoRedirect())
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    return [Front("proxy", REGISTRY, proxied), Front("mirror", regcache.mirror_url(), direct)]


def objects(image: PushedImage, public_repo: str | None = None) -> dict[str, str]:
    """Every way to name the image's content; with `public_repo`, its layer through that name too."""
    paths = {
        "tag": f"/v2/{image.repo}/manifests/{image.tag}",
        "digest": f"/v2/{image.repo}/manifests/{image.digest}",
        "config": f"/v2/{image.repo}/blobs/{image.config.digest}",
        "layer": f"/v2/{image.repo}/blobs/{image.layers[-1].digest}",
    }
    if public_repo:
        paths["through-public"] = f"/v2/{public_repo}/blobs/{image.layers[-1].digest}"
    return paths


def probe(
    regcache: Mitmdump, paths: dict[str, str], clients: dict[str, dict[str, str]]
) -> dict[tuple[str, str, str, str], int]:
    """(front, method, object, client) → status, for every combination."""
    return {
        (front.name, method, what, who): front.status(method, path, headers)
        for front in fronts(regcache)
        for method in ("GET", "HEAD")
        for what, path in paths.items()
        for who, headers in clients.items()
    }


def served(status: int) -> bool:
    return status < 400  # 200, or the 307 to the blob endpoint


def token_through(regcache: Mitmdump, repo: str, creds: str | None = None) -> str:
    """A token from the auth realm through the proxy (regcache sees who obtained it)."""
    status, _, body = request_through(regcache, TOKEN_URL.format(repo), basic(creds) if creds else {})
    assert status == 200, body
    return str(json.loads(body)["token"])


def cache_private_and_public(
    regcache: Mitmdump, skopeo_factory: Callable[..., Skopeo], private: PushedImage, public: PushedImage, tmp: Path
) -> None:
    """alice pulls her private image, an anonymous client a public one: both cached."""
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    assert skopeo.copy_to_dir(private.ref, tmp / "alice", creds=ALICE) == private.digest
    assert skopeo.copy_to_dir(public.ref, tmp / "public") == public.digest


@pytest.fixture
def fault_relay(upstream_registry: Registry) -> Iterator[FaultRelay]:
    relay = FaultRelay(upstream_registry.url)
    relay.start()
    yield relay
    relay.stop()


def relayed(hostmap: dict[str, str], relay: FaultRelay) -> dict[str, str]:
    """The bed's host map with Docker Hub's registry names behind the fault relay."""
    return {**hostmap, "registry-1.docker.io": relay.url, "index.docker.io": relay.url}


def set_condition(condition: str, relay: FaultRelay, stop: list[Registry | TokenServer | Cdn]) -> None:
    if condition in ("429", "503"):
        relay.set_failing(int(condition))
    else:
        relay.stop()
        for server in stop:
            server.stop()


def assert_fails_closed(
    regcache: Mitmdump,
    phase: str,
    paths: dict[str, str],
    others: dict[str, dict[str, str]],
    owner: dict[str, dict[str, str]],
    public: dict[str, str] | None = None,
) -> None:
    """Nothing but the owner gets the private content; the owner (and a public image) does."""
    leaks = {k: s for k, s in probe(regcache, paths, others).items() if served(s)}
    assert leaks == {}, f"{phase}: private content served to {sorted(leaks)}"
    owned = {k: v for k, v in paths.items() if k != "through-public"}
    refused = {k: s for k, s in probe(regcache, owned, owner).items() if not served(s)}
    assert refused == {}, f"{phase}: the owner was refused {refused}"
    if public is not None:
        refused = {k: s for k, s in probe(regcache, public, {"none": {}}).items() if not served(s)}
        assert refused == {}, f"{phase}: a public image was refused {refused}"


@pytest.mark.parametrize("condition", ["registry-down", "all-down", "429", "503"])
def test_private_image_probe_matrix(
    condition: str,
    secret: PushedImage,  # noqa: F811 - the fixture
    images: ImageSet,
    fault_relay: FaultRelay,
    regcache_with: Callable[..., Mitmdump],
    bed_hostmap: dict[str, str],
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    token_server: TokenServer,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    """Probed while the upstream is up (its answers rule), then in the condition: the same
    regcache, so nothing a hostile client did while it was up opens anything later."""
    regcache = regcache_with(upstreams=relayed(bed_hostmap, fault_relay))
    public = images.oci_single
    cache_private_and_public(regcache, skopeo_factory, secret, public, tmp_path)
    others = {
        "none": {},
        "made-up": bearer("made-up-12345"),
        "anonymous-token": bearer(token_through(regcache, secret.repo)),  # empty access
        "bob-token": bearer(token_through(regcache, secret.repo, BOB)),
        "wrong-password": basic("alice:never-used"),
    }
    alice_token = {"alice-token": bearer(token_through(regcache, secret.repo, ALICE))}
    paths = objects(secret, public.repo)
    # Up, a token registry refuses alice's Basic credentials itself: the fresh answer rules.
    assert_fails_closed(regcache, "up", paths, others, alice_token)

    stopped = [upstream_registry] + ([token_server, cdn] if condition == "all-down" else [])
    set_condition(condition, fault_relay, stopped)
    owner = {**alice_token, "alice-basic": basic(ALICE)}
    assert_fails_closed(regcache, condition, paths, others, owner, objects(public))


@pytest.mark.parametrize("condition", ["registry-down", "429", "503"])
@pytest.mark.parametrize("configured", [False, True], ids=["own-credentials", "regcache-credentials"])
def test_htpasswd_registry_probe_matrix(
    condition: str,
    configured: bool,
    basic_auth_upstream: OtherUpstream,  # noqa: F811 - the fixture
    bed_hostmap: dict[str, str],
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    tmp_path: Path,
) -> None:
    """With regcache's own `credentials`, every client without credentials shares their access
    (as documented; /v2/ asks for none, so skopeo sends none): then `none` is served, and still
    nobody presenting other credentials."""
    upstream = basic_auth_upstream.registry
    image = push_variant(upstream, tmp_path / "push", "library/team-app", "1", seed="team")
    relay = FaultRelay(upstream.url)
    relay.start()
    try:
        settings = {"credentials": alice_password_file(tmp_path)} if configured else {}
        regcache = regcache_with(upstreams=relayed(basic_auth_upstream.hostmap(bed_hostmap), relay), **settings)
        skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
        assert skopeo.copy_to_dir(image.ref, tmp_path / "alice", creds=ALICE) == image.digest
        others = {"made-up": bearer("made-up-12345"), "wrong-password": basic("alice:never-used")}
        owner = {"none": {}} if configured else {"alice-basic": basic(ALICE)}
        if not configured:
            others["none"] = {}
        assert_fails_closed(regcache, "up", objects(image), others, owner)
        set_condition(condition, relay, [])
        assert_fails_closed(regcache, condition, objects(image), others, owner)
    finally:
        relay.stop()


def test_real_clients_in_an_outage(
    secret: PushedImage,  # noqa: F811 - the fixture
    fault_relay: FaultRelay,
    regcache_with: Callable[..., Mitmdump],
    bed_hostmap: dict[str, str],
    skopeo_factory: Callable[..., Skopeo],
    dockerd_factory: Callable[..., Dockerd],
    upstream_registry: Registry,
    tmp_path: Path,
) -> None:
    regcache = regcache_with(upstreams=relayed(bed_hostmap, fault_relay))
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice", creds=ALICE) == secret.digest

    fault_relay.set_failing(429)  # Docker Hub's rate limit opens nothing
    with pytest.raises(Exception, match=r"429|Too Many Requests|TOOMANYREQUESTS"):
        skopeo.copy_to_dir(secret.ref, tmp_path / "anonymous-429")
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice-429", creds=ALICE) == secret.digest

    fault_relay.set_failing(None)
    fault_relay.stop()
    upstream_registry.stop()
    with pytest.raises(Exception, match=r"503|Service Unavailable|unauthorized"):
        skopeo.copy_to_dir(secret.ref, tmp_path / "anonymous-down")
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice-down", creds=ALICE) == secret.digest
    daemon = dockerd_factory(regcache.url, regcache.ca_cert)
    mark = regcache.mark()
    pulled = daemon.pull(secret.ref, check=False)
    assert pulled.returncode != 0
    assert "503 Service Unavailable" in pulled.stderr  # the answer to its tag HEAD carries no body
    assert ("ERROR", "HEAD", f"docker.io/{secret.ref}") in regcache.results(mark)
    assert "this client's access to docker.io/library/secret cannot be checked" in regcache.log()[mark:]


def test_grants_survive_a_restart_and_no_credential_is_stored(
    secret: PushedImage,  # noqa: F811 - the fixture
    regcache: Mitmdump,
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    tmp_path: Path,
) -> None:
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice", creds=ALICE) == secret.digest
    alice_token = token_through(regcache, secret.repo, ALICE)
    bob_token = token_through(regcache, secret.repo, BOB)
    regcache.stop()
    upstream_registry.stop()
    regcache.start()

    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice-after", creds=ALICE) == secret.digest
    owner = {"alice-token": bearer(alice_token), "alice-basic": basic(ALICE)}
    refused = {k: s for k, s in probe(regcache, objects(secret), owner).items() if not served(s)}
    assert refused == {}
    others = {"none": {}, "bob-token": bearer(bob_token), "wrong-password": basic("alice:never-used")}
    assert {k: s for k, s in probe(regcache, objects(secret), others).items() if served(s)} == {}
    with pytest.raises(Exception, match=r"503|Service Unavailable|unauthorized"):
        skopeo.copy_to_dir(secret.ref, tmp_path / "bob", creds=BOB)

    regcache.stop()
    secrets = [ALICE.split(":")[1], basic(ALICE)["Authorization"].split()[1], alice_token, bob_token]
    for path in (regcache.workdir / "cache").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in secrets if s.encode() in data], f"a credential in clear in {path}"
    # Every token the bed issues is a JWT ({"alg"... → eyJ): none in the access records.
    for path in (regcache.workdir / "cache" / "access").rglob("*"):
        assert not path.is_file() or b"eyJ" not in path.read_bytes(), path
    # nor in regcache's log (both runs)
    log = regcache.log()
    assert "eyJ" not in log and not [s for s in secrets if s in log], "a credential in clear in the log"


def test_a_token_regcache_issued_is_judged_upstream_once_it_answers(
    secret: PushedImage,  # noqa: F811 - the fixture
    regcache: Mitmdump,
    skopeo_factory: Callable[..., Skopeo],
    token_server: TokenServer,
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    """alice gets regcache's own token while the realm is down; once the registry answers, a
    request bearing it is asked upstream, refused with the registry's challenge (alice then gets a
    real token), and nothing of alice's is revoked: in an outage the same token serves her image."""
    skopeo = skopeo_factory(regcache.url, regcache.ca_cert)
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice", creds=ALICE) == secret.digest
    token_server.stop()
    issued = token_through(regcache, secret.repo, ALICE)
    assert issued.startswith("regcache.")
    token_server.start()
    manifest = f"{REGISTRY}/v2/{secret.repo}/manifests/{secret.tag}"
    status, headers, body = request_through(regcache, manifest, {"Accept": ACCEPT_ALL, **bearer(issued)})
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert headers["WWW-Authenticate"].startswith('Bearer realm="https://auth.docker.io/token"')
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "alice-again", creds=ALICE) == secret.digest
    upstream_gone()
    status, _, body = request_through(regcache, manifest, {"Accept": ACCEPT_ALL, **bearer(issued)})
    assert (status, body) == (200, secret.manifest)


def test_offline_serves_private_images_to_recorded_credentials_only(
    secret: PushedImage,  # noqa: F811 - the fixture
    images: ImageSet,
    regcache: Mitmdump,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    cache_private_and_public(regcache, skopeo_factory, secret, images.oci_single, tmp_path)
    regcache.stop()
    upstream_gone()
    cache = regcache.workdir / "cache"

    offline = offline_regcache(cache)
    skopeo = skopeo_factory(offline.url, offline.ca_cert)
    assert skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "o-public") == images.oci_single.digest
    with pytest.raises(Exception, match=r"unauthorized|401"):
        skopeo.copy_to_dir(secret.ref, tmp_path / "o-anonymous")
    mark = offline.mark()
    assert skopeo.copy_to_dir(secret.ref, tmp_path / "o-alice", creds=ALICE) == secret.digest
    assert ("HIT", "GET", "token") in offline.results(mark)  # the offline token endpoint, as alice
    for never_recorded in (BOB, "alice:never-used"):
        status, _, body = request_through(offline, TOKEN_URL.format(secret.repo), basic(never_recorded))
        assert (status, json.loads(body)["errors"][0]["code"]) == (401, "UNAUTHORIZED")
    offline.stop()

    open_cache = regcache_with(cache_dir=str(cache), offline=True, upstreams={}, offline_access="open")
    anyone = skopeo_factory(open_cache.url, open_cache.ca_cert)
    assert anyone.copy_to_dir(secret.ref, tmp_path / "open") == secret.digest


def test_a_bundle_keeps_a_private_image_private(
    secret: PushedImage,  # noqa: F811 - the fixture
    images: ImageSet,
    regcache: Mitmdump,
    skopeo_factory: Callable[..., Skopeo],
    offline_regcache: Callable[[Path], Mitmdump],
    upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:
    cache_private_and_public(regcache, skopeo_factory, secret, images.oci_single, tmp_path)
    bundle = tmp_path / "bundle"
    regcache_cli("export", "--cache-dir", str(regcache.workdir / "cache"), "-o", str(bundle))
    index = json.loads((bundle / "index.json").read_text())
    annotations = [entry["annotations"] for entry in index["manifests"]]
    access = {a["io.regcache.repository"]: a["io.regcache.access"] for a in annotations}
    assert access == {secret.repo: "private", images.oci_single.repo: "public"}
    regcache.stop()
    upstream_gone()
    fresh = tmp_path / "fresh"
    regcache_cli("import", "--cache-dir", str(fresh), str(bundle))
    offline = offline_regcache(fresh)
    skopeo = skopeo_factory(offline.url, offline.ca_cert)
    assert skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "o-public") == images.oci_single.digest
    with pytest.raises(Exception, match=r"unauthorized|401"):
        skopeo.copy_to_dir(secret.ref, tmp_path / "o-secret")


def test_a_realm_under_v2_works_through_the_mirror_and_only_that_realm(
    other_upstream: Callable[..., OtherUpstream],  # noqa: F811 - the fixture
    bed_hostmap: dict[str, str],
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    """quay.io names `https://quay.io/v2/auth`: a realm under /v2/ must work, and path tricks
    that would reach anything but exactly that realm must not."""
    token_server.realm_paths = {"/v2/auth"}
    quay = other_upstream(realm="https://auth.quay.example/v2/auth")
    image = push_variant(quay.registry, tmp_path / "push", "library/quay-app", "1", seed="quay")
    regcache = regcache_with(upstreams={**quay.hostmap(bed_hostmap), "auth.quay.example": token_server.url})
    ref = mirror_ref(regcache.mirror_url(), image)
    assert skopeo_factory(None).copy_to_dir(ref, tmp_path / "x", tls_verify=False) == image.digest

    relay = f"{regcache.mirror_url()}/_token/https/auth.quay.example"
    query = f"?service=registry.docker.io&scope=repository:{image.repo}:pull"
    mark = token_server.mark()
    for same in ("/v2/auth", "//v2/auth", "/v2/./auth", "/v2/x/../auth", "/v2/%61uth"):
        assert plain(relay + same + query)[0] == 200, same
    tricks = [
        "/V2/auth",
        "//v2/library/quay-app/manifests/1",
        "/./v2/library/quay-app/manifests/1",
        "/v2/auth/..",
        "/v2/auth/../library/quay-app/manifests/1",
        "/v2/auth/%2e%2e/library/quay-app/manifests/1",
        "/v2/auth%2f%2e%2e%2f%2e%2e%2ftoken",
        "/v2/auth/x",
    ]
    for trick in tricks:
        status, _, body = plain(relay + trick + query)
        assert (status, json.loads(body)["errors"][0]["code"]) == (404, "NAME_UNKNOWN"), trick
    assert {r.path for r in token_server.requests(mark)} == {"/v2/auth"}  # exactly the realm, always
