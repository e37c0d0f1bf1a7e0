"""The one way a `RegistryRequest` is made: from a method, the logical upstream URL, the path it is
parsed from and the client's header pairs — whichever front received it (the proxy's flow, the
mirror's aiohttp request) or whoever asks on a client's behalf (completion, warm).

What the services get is the same from every front: the route parsed from the path, only the
client's headers that may go upstream (`forwardable_headers`), and the manifest media types its
`Accept` headers name.
"""

from __future__ import annotations

from collections.abc import Iterable

from regcache.oci.api import RegistryRequest, parse_path
from regcache.oci.media import accepted_media_types
from regcache.services.upstream import forwardable_headers


def registry_request(
    namespace: str, url: str, method: str, path: str, headers: Iterable[tuple[str, str]]
) -> RegistryRequest:
    """`url`: the logical upstream URL (before any `upstreams` re-targeting); `path`: the request
    path as the client sent it (query allowed), what the route is parsed from."""
    pairs = list(headers)
    return RegistryRequest(
        namespace=namespace,
        url=url,
        method=method,
        route=parse_path(path),
        headers=forwardable_headers(pairs),
        accepted=accepted_media_types(value for name, value in pairs if name.lower() == "accept"),
    )
