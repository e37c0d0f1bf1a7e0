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

Who asks a token realm for a token (`token_requester`) is read from its Authorization, its body and
its query alike (realms read both): a password or refresh grant is that credential; a request is
anonymous only with nothing but non-secret parameters in a form body and the query; anything else
is an identity of its own, never anonymous.

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


# The token request parameters that carry no secret: all that docker, containerd, podman/skopeo
# and regctl send when they have no credentials (distribution's token.md GET, oauth.md POST).
NON_SECRET_PARAMETERS = frozenset({"service", "scope", "account", "client_id", "offline_token", "access_type"})
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"


def token_parameters(query: str, body: bytes | None, content_type: str) -> dict[str, list[str]] | None:
    """A token request's parameters from its body and its query, the body's values first (as a
    realm reading both, like Go's FormValue, sees them); None when a body is not a form, so that
    what it carries cannot be read."""
    form: dict[str, list[str]] = {}
    if body:
        if content_type.split(";", 1)[0].strip().lower() != FORM_MEDIA_TYPE:
            return None
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    merged = {key: list(values) for key, values in form.items()}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        merged.setdefault(key, []).extend(values)
    return merged


def requested_repositories(query: str, body: bytes | None, content_type: str) -> tuple[str, ...]:
    """The repository names a token request asks for: `scope=repository:library/alpine:pull`
    (several scopes, space-separated or repeated; a name may hold `:`, as in `host:port/x`)."""
    parameters = token_parameters(query, body, content_type) or token_parameters(query, None, "") or {}
    names = set()
    for scope in (part for value in parameters.get("scope", []) for part in value.split()):
        kind, _, rest = scope.partition(":")
        name, _, _ = rest.rpartition(":")
        if kind == "repository" and name:
            names.add(name)
    return tuple(sorted(names))


def token_requester(authorization: str, query: str, body: bytes | None, content_type: str) -> Requester:
    """The credential a token request presents (distribution's token.md GET, oauth.md POST), in
    its Authorization, its body or its query. Anonymous only without an Authorization and with
    nothing but non-secret parameters in a form body and the query: whatever else a request
    carries is a credential regcache cannot read, an identity of its own."""
    parameters = token_parameters(query, body, content_type)
    if parameters is None:
        raw = (body or b"").decode("utf-8", "replace")
        return Requester("opaque", json.dumps([authorization.strip(), query, content_type, raw]))

    def field(name: str) -> str:
        return (parameters.get(name) or [""])[0]

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
    if parameters.keys() - NON_SECRET_PARAMETERS:
        return Requester("opaque", json.dumps(sorted(parameters.items())))
    return Requester("anonymous")
