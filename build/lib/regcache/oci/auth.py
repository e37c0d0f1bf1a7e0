"""Registry authentication as the protocol defines it: `WWW-Authenticate: Bearer` challenges, the
scope a request needs, whose domain a token realm is on, and what identifies a realm URL.

Pure functions only (distribution's `docs/spec/auth/token.md`).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote, urlsplit

from regcache.oci.api import parse_path

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SLASHES = re.compile(r"/{2,}")

RealmKey = tuple[str, str, int, str]  # scheme, host, port, path


def scope_of(url: str) -> str:
    """The pull scope a registry URL needs: `repository:<name>:pull` (empty for `/v2/`)."""
    route = parse_path(urlsplit(url).path)
    return f"repository:{route.name}:pull" if route.name else ""


def registrable_domain(host: str) -> str:
    """`auth.docker.io` and `registry-1.docker.io` → `docker.io`; `x.example.co.uk` →
    `example.co.uk` (a country code with a short second level); an IP address is itself."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.lower().rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def bearer_challenge(header: str) -> dict[str, str] | None:
    """The parameters of `WWW-Authenticate: Bearer realm="…",service="…",scope="…"`, or None."""
    if not header.lower().startswith("bearer "):
        return None
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def bearer_realm_host(header: str) -> str | None:
    """The host of a `WWW-Authenticate: Bearer realm="https://auth.docker.io/token",...` realm."""
    realm = (bearer_challenge(header) or {}).get("realm")
    return (urlsplit(realm).hostname or None) if realm else None


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: `/a/./b/../c` → `/a/c`."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments and segments[-1] in (".", ".."):
        out.append("")  # `/a/b/..` → `/a/`
    return "/" + "/".join(out)


def realm_key(url: str) -> RealmKey | None:
    """What identifies a realm: scheme, host (lower case), port (explicit) and path after
    percent-decoding, collapsing repeated slashes and resolving dot segments (case kept).
    None: not an http(s) URL of a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    path = remove_dot_segments(_SLASHES.sub("/", "/" + unquote(parts.path)))
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], path


def realm_url(url: str) -> str:
    """A realm as recorded: the URL without query or fragment."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
