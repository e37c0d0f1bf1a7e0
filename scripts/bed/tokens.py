"""Docker-Hub-style token server (stand-in for ``auth.docker.io``).

Owns: the signing key and its self-signed certificate (the registry's
``rootcertbundle``), JWT minting in the format distribution 2.8.2 accepts, the
access policy (anonymous / users / private repositories), refresh tokens, and
what it logs of every request so tests can count token fetches (the log
itself is :class:`~bed._http.BackgroundHTTPServer`'s).

Protocol: distribution ``docs/spec/auth/token.md`` (GET with ``scope``) and
``docs/spec/auth/oauth.md`` (POST ``grant_type=password|refresh_token``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._http import BackgroundHTTPServer

DEFAULT_SERVICE = "registry.docker.io"
DEFAULT_ISSUER = "auth.docker.io"
DEFAULT_REALM_PATHS = frozenset({"/token"})


def libtrust_kid(public_key: ec.EllipticCurvePublicKey) -> str:
    """libtrust key id: base32(sha256(DER SPKI)[:30]) in 12 groups of 4.

    distribution 2.8.2 looks the JWT header ``kid`` up in a table built from
    the public keys of ``rootcertbundle`` with exactly this function.
    """
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@dataclass
class Policy:
    """Who gets which actions.

    Default: every requested action for everyone, anonymous included. A repo in
    ``private_repos`` is granted only to the listed users (all actions asked).
    Credentials that do not match ``users`` are refused with 401, as Docker Hub
    does, even for public scopes.
    """

    users: dict[str, str] = field(default_factory=dict)
    private_repos: dict[str, set[str]] = field(default_factory=dict)
    # Docker Hub refuses push to anonymous; the bed allows it unless told.
    anonymous_push: bool = True

    def grant(self, user: str | None, rtype: str, name: str, actions: list[str]) -> list[str]:
        if rtype != "repository":
            return []
        allowed = self.private_repos.get(name)
        if allowed is not None and (user is None or user not in allowed):
            return []
        if user is None and not self.anonymous_push:
            return [a for a in actions if a == "pull"]
        return list(actions)


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server saw."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    authorization: str | None
    user: str | None
    scopes: list[str]
    status: int
    time: float

    @property
    def has_authorization(self) -> bool:
        return self.authorization is not None


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:library/alpine:pull,push`` → (type, name, actions).

    The name may itself contain ':' (``host:port/repo``), so split on the
    first and last colon.
    """
    first = scope.find(":")
    last = scope.rfind(":")
    if first < 0 or first == last:
        return None
    return scope[:first], scope[first + 1 : last], [a for a in scope[last + 1 :].split(",") if a]


class _Handler(BaseHTTPRequestHandler):
    # Headers and a small body go out as separate writes: without TCP_NODELAY, Nagle holds the
    # body until the client's delayed ACK (40 ms), a stall no real server adds.
    disable_nagle_algorithm = True

    protocol_version = "HTTP/1.1"
    server_version = "bed-auth/1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are kept in TokenServer's own log instead of stderr

    @property
    def owner(self) -> TokenServer:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        form: dict[str, list[str]] = {}
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        params = {**query, **form}
        auth = self.headers.get("Authorization")
        status, payload, user = self.owner._answer(method, parsed.path, params, auth)
        scopes = [s for v in params.get("scope", []) for s in v.split(" ") if s]
        # Safe to log the form: it is test data; redact passwords anyway so a
        # log dump in a failing test never shows them.
        logged_form = {k: (["<redacted>"] if k == "password" else v) for k, v in form.items()}
        self.owner._record(
            TokenRequest(method, parsed.path, query, logged_form, auth, user, scopes, status, time.time())
        )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="bed-auth"')
        self.end_headers()
        self.wfile.write(data)


class TokenServer(BackgroundHTTPServer[TokenRequest]):
    """Token server in a background thread of the test process.

    ``cert_dir`` receives ``token-ca.pem`` (see :attr:`cert_path`) for the
    registry's ``auth.token.rootcertbundle``. :meth:`set_failing` fails every
    request (an auth outage). :attr:`realm_paths`: the paths it answers
    tokens on (Docker Hub's ``/token``; quay.io's is ``/v2/auth``), 404 elsewhere.
    """

    handler_class = _Handler
    name = "tokens"

    def __init__(
        self,
        cert_dir: str | Path,
        *,
        issuer: str = DEFAULT_ISSUER,
        policy: Policy | None = None,
        ttl: int = 300,
        port: int = 0,
    ) -> None:
        super().__init__(port)
        self.issuer = issuer
        self.policy = policy or Policy()
        self.ttl = ttl
        self.realm_paths: set[str] = set(DEFAULT_REALM_PATHS)
        self._refresh: dict[str, str] = {}
        # ES256 keys are generated in microseconds; RSA would cost ~50 ms per run.
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = libtrust_kid(self._key.public_key())
        cert_dir = Path(cert_dir)
        cert_dir.mkdir(parents=True, exist_ok=True)
        self.cert_path = cert_dir / "token-ca.pem"
        self.cert_path.write_bytes(self._self_signed_cert().public_bytes(serialization.Encoding.PEM))

    def _self_signed_cert(self) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bed token signer")])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    # -- minting -----------------------------------------------------------

    def mint_access(
        self,
        access: list[dict[str, object]],
        *,
        subject: str = "",
        service: str = DEFAULT_SERVICE,
        ttl: int | None = None,
    ) -> str:
        """Sign a JWT carrying exactly ``access`` (list of {type,name,actions})."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            # distribution 2.8.2 rejects a list here; Docker Hub also sends a string.
            "aud": service,
            "exp": now + (self.ttl if ttl is None else ttl),
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": "JWT"})

    def mint(self, repo: str | list[str], actions: list[str] | tuple[str, ...] = ("pull",), **kw: object) -> str:
        """Token for ``actions`` on one repository (or several), bypassing the policy."""
        repos = [repo] if isinstance(repo, str) else repo
        access: list[dict[str, object]] = [{"type": "repository", "name": r, "actions": list(actions)} for r in repos]
        return self.mint_access(access, **kw)  # type: ignore[arg-type]

    # -- request handling ----------------------------------------------------

    def _basic_user(self, auth: str | None) -> tuple[bool, str | None]:
        """(ok, user) from a Basic header; (True, None) when anonymous."""
        if not auth:
            return True, None
        kind, _, value = auth.partition(" ")
        if kind.lower() != "basic":
            # Docker Hub ignores a stray Bearer header on the token endpoint.
            return True, None
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        return self._check(user, password), user

    def _check(self, user: str, password: str) -> bool:
        return user in self.policy.users and secrets.compare_digest(self.policy.users[user], password)

    def _answer(
        self, method: str, path: str, params: dict[str, list[str]], auth: str | None
    ) -> tuple[int, dict[str, object], str | None]:
        if self._failing is not None:
            return self._failing, {"details": "token server failing (bed control)"}, None
        if path.rstrip("/") not in self.realm_paths:
            return 404, {"details": "not found"}, None

        def one(name: str) -> str | None:
            vals = params.get(name)
            return vals[0] if vals else None

        ok, user = self._basic_user(auth)
        if not ok:
            return 401, {"details": "incorrect username or password"}, user
        offline = one("offline_token") == "true" or one("access_type") == "offline"
        if method == "POST":
            grant = one("grant_type")
            if grant == "password":
                user = one("username") or ""
                if not self._check(user, one("password") or ""):
                    return 401, {"details": "incorrect username or password"}, user
            elif grant == "refresh_token":
                found = self._refresh.get(one("refresh_token") or "")
                if found is None:
                    return 401, {"details": "invalid refresh token"}, None
                user, offline = found, True
            else:
                # Docker Hub answers POSTs without grant_type like this; clients
                # (regctl) then fall back to GET.
                return 400, {"error": "unsupported_grant_type"}, user
        service = one("service") or DEFAULT_SERVICE
        access: list[dict[str, object]] = []
        for scope in (s for v in params.get("scope", []) for s in v.split(" ") if s):
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, actions = parsed
            granted = self.policy.grant(user, rtype, name, actions)
            if granted:
                access.append({"type": rtype, "name": name, "actions": granted})
        token = self.mint_access(access, subject=user or "", service=service)
        payload: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": self.ttl,
            "issued_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        if offline and user is not None:
            refresh = secrets.token_urlsafe(24)
            self._refresh[refresh] = user
            payload["refresh_token"] = refresh
        return 200, payload, user
