"""Signed, expiring URLs for regcache's blob endpoint, and where to send a client for them.

A blob request that passed regcache's checks (access, existence, a running fill) is sent to the
blob endpoint with a URL only this process can make: an HMAC of what is served and until when,
under a key that never leaves memory. The endpoint serves nothing else, so a local user who can
reach its port still cannot read a blob nobody handed them, and a leaked URL stops working soon.

Go clients (dockerd, containerd, skopeo, podman) never send requests for loopback addresses
through a proxy: a `307` to `http://127.0.0.1:<port>/…` makes them fetch the bytes straight from
the endpoint's `sendfile`, with mitmproxy's TLS relay (about 110 MB/s per core) out of the path.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from regcache.addresses import base_url, is_loopback, reachable_host
from regcache.services.answers import BlobSource

# Long enough for a client to start the transfer it was just redirected to (the check is made
# when the request arrives, not while bytes flow); a retry goes back to the registry URL anyway.
URL_LIFETIME_SECONDS = 600


class BlobUrls:
    def __init__(self, key: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self._key = key or secrets.token_bytes(32)
        self._clock = clock

    def _signature(self, source: str, digest: str, expires: str) -> str:
        message = f"{source}\n{digest}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def path(self, source: BlobSource, digest: str, lifetime: float = URL_LIFETIME_SECONDS) -> str:
        """The endpoint's path and query for `digest`, valid for `lifetime` seconds."""
        expires = str(int(self._clock() + lifetime))
        return f"/{source}/{digest}?expires={expires}&signature={self._signature(source, digest, expires)}"

    def valid(self, source: str, digest: str, expires: str, signature: str) -> bool:
        if not expires.isdigit() or int(expires) < self._clock():
            return False
        return hmac.compare_digest(self._signature(source, digest, expires), signature)


def redirect_base(enabled: bool, blob_url: str | None, listen_host: str, port: int, client: str) -> str | None:
    """Where to send a client for blob bytes: `blob_url` (configured for remote clients), the
    endpoint itself for a client on this host, or None to stream through the proxy instead."""
    if not enabled:
        return None
    if blob_url:
        return blob_url
    if is_loopback(client):
        return base_url(reachable_host(listen_host), port)
    return None
