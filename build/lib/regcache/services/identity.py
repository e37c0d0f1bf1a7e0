"""Who a registry client is, as far as regcache can tell without asking the upstream.

A client's *identities* are keyed hashes (HMAC-SHA256 under a random secret kept in the store) of
the credentials it presents, never the credentials themselves:
- `Authorization: Basic …` → `basic:<hmac of user:password>`;
- `Authorization: Bearer T` → `bearer:<hmac of T>`, valid until T expires (its JWT `exp`, read
  without verification, else what regcache saw when it was issued, else 5 minutes); access.py adds
  the identity that obtained T when regcache relayed that token exchange;
- `Authorization: Bearer regcache.…` → the identity a token regcache issued itself carries
  (offline, or while the auth realm is down), if its signature and expiry hold;
- nothing → `anonymous` (or, when regcache authenticates with its own `credentials`,
  `configured:<hmac of the registry host>`).

Everything here is pure: parsing, hashing, signing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from urllib.parse import parse_qs

from regcache.store.access import ANONYMOUS

# A bearer token whose expiry regcache cannot tell: what it holds lasts this long after each use.
UNKNOWN_TOKEN_LIFETIME = 300.0
# Tokens regcache issues itself (offline, or while the auth realm is unreachable or failing).
ISSUED_PREFIX = "regcache."
ISSUED_LIFETIME = 3600.0


@dataclass(frozen=True)
class Identity:
    key: str
    until: float | None = None  # a bearer token's expiry: nothing it holds outlives it
    # The repositories a refusal of this request says anything about for this identity (None:
    # any). A token is scoped: its refusal for R judges whoever obtained it only if it was
    # asked for R (otherwise it only says the token does not cover R).
    judged: frozenset[str] | None = None

    def judged_for(self, name: str) -> bool:
        return self.judged is None or name in self.judged


@dataclass(frozen=True)
class Client:
    """The identities of one request, and how it authenticated."""

    identities: tuple[Identity, ...]
    scheme: str = "none"  # the Authorization scheme presented: none, basic, bearer or other
    issued_here: bool = False  # a token regcache issued: it means nothing to the upstream

    @property
    def anonymous(self) -> bool:
        return any(identity.key == ANONYMOUS for identity in self.identities)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(identity.key for identity in self.identities)


class Keyer:
    """Keyed hashes and token signatures under one store's secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._signing = hmac.new(secret, b"regcache issued tokens", hashlib.sha256).digest()

    def key(self, kind: str, value: str) -> str:
        """`kind:<hex>`: the kind stays readable, the value cannot be recovered."""
        data = f"{kind}\0{value}".encode("utf-8", "surrogateescape")
        return f"{kind}:{hmac.new(self._secret, data, hashlib.sha256).hexdigest()}"

    def issue(self, identity: str, now: float, lifetime: float = ISSUED_LIFETIME) -> str:
        """A token carrying `identity` until `now + lifetime`, signed with the store's secret."""
        claims = json.dumps({"id": identity, "exp": int(now + lifetime)}, separators=(",", ":"))
        payload = _b64(claims.encode())
        return f"{ISSUED_PREFIX}{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str, now: float) -> Identity | None:
        """The identity a token regcache issued carries; None if forged, altered or expired."""
        payload, _, signature = token.removeprefix(ISSUED_PREFIX).partition(".")
        try:
            if not hmac.compare_digest(_unb64(signature), self._mac(payload)):
                return None
            claims = json.loads(_unb64(payload))
            identity, expires = claims["id"], float(claims["exp"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        return Identity(identity, expires) if isinstance(identity, str) and expires > now else None

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._signing, f"{ISSUED_PREFIX}{payload}".encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def split_authorization(header: str) -> tuple[str, str]:
    """(`basic` | `bearer` | `none` | `other`, the credential)."""
    scheme, _, value = header.strip().partition(" ")
    if not scheme:
        return "none", ""
    if scheme.lower() in ("basic", "bearer"):
        return scheme.lower(), value.strip()
    return "other", header.strip()


def basic_secret(value: str) -> str:
    """`user:password` of a Basic credential (the raw value if it does not decode)."""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        return value


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (None: not a JWT, or no `exp`).
    Only used to stop trusting a token early, never to trust it."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(_unb64(parts[1]))
        expires = claims.get("exp") if isinstance(claims, dict) else None
    except (ValueError, binascii.Error):
        return None
    return float(expires) if isinstance(expires, int | float) and not isinstance(expires, bool) else None


@dataclass(frozen=True)
class Requester:
    """Who asks a token realm for a token: `kind` is basic, refresh, issued, anonymous or opaque."""

    kind: str
    value: str = ""


def _form(method: str, body: bytes | None) -> dict[str, list[str]]:
    return parse_qs((body or b"").decode("utf-8", "replace"), keep_blank_values=True) if method == "POST" else {}


def requested_repositories(method: str, query: str, body: bytes | None) -> tuple[str, ...]:
    """The repository names a token request asks for: `scope=repository:library/alpine:pull`
    (several scopes, space-separated or repeated; a name may hold `:`, as in `host:port/x`)."""
    scopes = [*parse_qs(query).get("scope", []), *_form(method, body).get("scope", [])]
    names = set()
    for scope in (part for value in scopes for part in value.split()):
        kind, _, rest = scope.partition(":")
        name, _, _ = rest.rpartition(":")
        if kind == "repository" and name:
            names.add(name)
    return tuple(sorted(names))


def token_requester(method: str, authorization: str, body: bytes | None) -> Requester:
    """The credential a token request presents (distribution's token.md GET, oauth.md POST)."""
    form = _form(method, body)

    def field(name: str) -> str:
        return (form.get(name) or [""])[0]

    grant = field("grant_type")
    if grant == "password":
        return Requester("basic", f"{field('username')}:{field('password')}")
    if grant == "refresh_token":
        return Requester("refresh", field("refresh_token"))
    scheme, value = split_authorization(authorization)
    if scheme == "basic":
        return Requester("basic", basic_secret(value))
    if scheme == "bearer" and value.startswith(ISSUED_PREFIX):
        return Requester("issued", value)
    if scheme != "none":
        return Requester("opaque", authorization.strip())
    if method == "POST" and (form.keys() - {"service", "scope", "client_id", "access_type"}):
        # Some other grant: whatever it carries is a credential regcache cannot read. Never anonymous.
        return Requester("opaque", json.dumps(sorted(form.items())))
    return Requester("anonymous")
