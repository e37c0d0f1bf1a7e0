"""What a registry request gets back from regcache, independent of mitmproxy.

The services (manifests, blobs) decide; each front turns the decision into its own response (the
proxy: fronts/proxy.py `make_response`, a redirect or a re-targeted flow; the mirror: its aiohttp
response):
- `Answer`: a small, complete response made here (manifests, errors, pings);
- `LocalStream`: blob bytes from regcache's blob endpoint (a redirect there, the flow re-targeted,
  or the mirror streaming them itself);
- `PassThrough`: the request forwarded to the upstream unchanged (mitmproxy, or the mirror's relay).

`result` is the cache outcome, logged per request and sent as `X-Cache`:
HIT (from the store, no upstream contact), MISS (fetched upstream), REVALIDATED (tag checked
upstream, bytes from the store), STALE (upstream failed, stored answer served), PASS (relayed,
nothing to cache), ERROR (answered with an error made here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from regcache.oci.api import API_VERSION_HEADER, HOP_BY_HOP, error_body
from regcache.oci.manifest import Manifest
from regcache.services.upstream import UpstreamAnswer

# Where a blob's bytes come from: `blobs`, a stored blob; `fills`, a blob still being fetched
# upstream, followed as it grows (the blob endpoint serves both, fronts/blobserver.py).
BlobSource = Literal["blobs", "fills"]


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    result: str
    # For HEAD: the Content-Length of the GET this stands for (the body itself is empty).
    content_length: int | None = None
    note: str = ""


@dataclass
class LocalStream:
    source: BlobSource
    digest: str
    result: str
    note: str = ""
    path: str | None = None  # a stored blob's file, when the service has looked it up already


@dataclass
class PassThrough:
    result: str = "PASS"
    note: str = field(default="")


Decision = Answer | LocalStream | PassThrough


def manifest_answer(manifest: Manifest, digest: str, head: bool, result: str, note: str = "") -> Answer:
    headers = [
        ("Content-Type", manifest.media_type),
        ("Docker-Content-Digest", digest),
        ("Etag", f'"{digest}"'),
        *API_VERSION_HEADER.items(),
    ]
    body = b"" if head else manifest.body
    return Answer(200, headers, body, result, content_length=len(manifest.body), note=note)


def blob_head_answer(digest: str, size: int, result: str) -> Answer:
    headers = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", digest)]
    headers += API_VERSION_HEADER.items()
    return Answer(200, headers, b"", result, content_length=size)


def redirect_answer(url: str, stream: LocalStream) -> Answer:
    """Send the client to the blob endpoint for `stream`'s bytes (`307` keeps the method)."""
    headers = [("Location", url), ("Docker-Content-Digest", stream.digest), *API_VERSION_HEADER.items()]
    return Answer(307, headers, b"", stream.result, note=stream.note or "redirected to the blob endpoint")


def relay(answer: UpstreamAnswer, result: str, note: str = "") -> Answer:
    """Pass an upstream answer on as it came (minus hop-by-hop headers)."""
    headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP]
    length = answer.headers.get("Content-Length")
    content_length = int(length) if length and length.isdigit() else None
    return Answer(answer.status, headers, answer.body, result, content_length=content_length, note=note)


def error_answer(status: int, code: str, message: str, detail: object = None, note: str = "") -> Answer:
    headers = [("Content-Type", "application/json"), *API_VERSION_HEADER.items()]
    return Answer(status, headers, error_body(code, message, detail), "ERROR", note=note or message)


_HEAD_STATUS_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}


def answer_from_head(answer: UpstreamAnswer, head: bool, not_found_code: str, result: str, note: str = "") -> Answer:
    """An upstream `HEAD`'s answer, re-used for the client's request. A `HEAD` answer has no body,
    so a client `GET` gets a registry error body instead of a promise of bytes that never come."""
    if head:
        return relay(answer, result, note)
    code = not_found_code if answer.status == 404 else _HEAD_STATUS_CODES.get(answer.status, "UNAVAILABLE")
    headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP | {"content-type"}]
    headers.append(("Content-Type", "application/json"))
    body = error_body(code, f"upstream answered {answer.status}")
    return Answer(answer.status, headers, body, result, note=note)
