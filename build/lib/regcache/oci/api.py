"""The registry HTTP API's request grammar: which request is which, what an error looks like, and
`RegistryRequest`, a parsed registry read as the services see it.

Pure functions only — no I/O — so every rule here is unit-testable. Grammar from the OCI
distribution spec / distribution's `reference` package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from regcache.oci.reference import repository_of

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
MAX_NAME_LENGTH = 255

_OBJECT_PATH = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")

# Headers that describe one hop, never the resource (RFC 9110 §7.6.1), plus the framing
# headers we recompute when we answer from our own bytes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
    }
)

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}


class Kind(Enum):
    PING = "ping"
    MANIFEST = "manifest"
    BLOB = "blob"
    INVALID = "invalid"
    OTHER = "other"


@dataclass(frozen=True)
class Route:
    """One registry API request, as far as caching cares."""

    kind: Kind
    name: str = ""
    reference: str = ""
    error_code: str = ""  # set when kind is INVALID

    @property
    def is_digest(self) -> bool:
        return ":" in self.reference

    def describe(self) -> str:
        if not self.name:
            return "v2/"  # shown as docker.io/v2/
        return f"{self.name}{'@' if self.is_digest else ':'}{self.reference}"


def parse_path(path: str) -> Route:
    """Classify a request path (query ignored). Anything we do not cache is OTHER."""
    path = path.split("?", 1)[0]
    if path in ("/v2/", "/v2"):
        return Route(Kind.PING)
    match = _OBJECT_PATH.fullmatch(path)
    if not match:
        return Route(Kind.OTHER)
    name, reference = match["name"], match["reference"]
    kind = Kind.MANIFEST if match["kind"] == "manifests" else Kind.BLOB
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        return Route(Kind.INVALID, name, reference, "NAME_INVALID")
    if ":" in reference or kind is Kind.BLOB:
        if not DIGEST_RE.fullmatch(reference):
            return Route(Kind.INVALID, name, reference, "DIGEST_INVALID")
    elif not TAG_RE.fullmatch(reference):
        return Route(Kind.INVALID, name, reference, "TAG_INVALID")
    return Route(kind, name, reference)


def error_body(code: str, message: str, detail: object = None) -> bytes:
    """A registry-style JSON error body (distribution spec, "Error Codes")."""
    error: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()


INVALID_MESSAGES = {
    "NAME_INVALID": "invalid repository name",
    "DIGEST_INVALID": "invalid digest (expected sha256:<64 hex> or sha512:<128 hex>)",
    "TAG_INVALID": "invalid tag",
}


@dataclass(frozen=True)
class RegistryRequest:
    """A parsed registry read request, as the services see it (no mitmproxy types)."""

    namespace: str  # cache namespace of the registry, e.g. docker.io
    url: str  # the logical upstream URL, before any `upstreams` re-targeting
    method: str  # GET or HEAD
    route: Route
    headers: Mapping[str, str]  # the client's headers that may go upstream
    accepted: tuple[str, ...]

    @property
    def head(self) -> bool:
        return self.method == "HEAD"

    @property
    def repository(self) -> str:
        """`docker.io/library/alpine`: the repository as access records and metrics name it."""
        return repository_of(self.namespace, self.route.name)

    def describe(self) -> str:
        return f"{self.namespace}/{self.route.describe()}"
