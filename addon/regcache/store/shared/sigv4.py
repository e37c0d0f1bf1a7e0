"""The two S3 requests obstore has no API for: list and abort incomplete multipart uploads.

A killed or cancelled uploader leaves an incomplete multipart upload behind: invisible to GET,
HEAD and listings, but holding its parts (storage) until aborted. Removing them needs
ListMultipartUploads and AbortMultipartUpload, which obstore does not offer. A bucket lifecycle
rule (AbortIncompleteMultipartUpload) would do it too, but setting one replaces the bucket's whole
lifecycle configuration, needs a permission a cache's keys should not need, and counts in days;
so regcache signs these two requests itself (AWS Signature Version 4, path-style, header
authentication) and sends them with aiohttp: no environment proxy (`trust_env` off), the
configured proxy if any, the same timeouts as the store.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from regcache.config import S3Settings
from regcache.store.shared.errors import Breaker, S3Unavailable

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _encode(text: str, keep_slash: bool = False) -> str:
    """RFC 3986 encoding as SigV4 wants it (unreserved characters only left as they are)."""
    return quote(text, safe="-_.~/" if keep_slash else "-_.~")


@dataclass(frozen=True)
class SigV4:
    """Signs requests to one S3 endpoint with one key pair (the payload is always empty here)."""

    endpoint: str
    region: str
    access_key: str
    secret_key: str

    def _signing_key(self, day: str) -> bytes:
        key = f"AWS4{self.secret_key}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return key

    def signed(
        self, method: str, path: str, query: dict[str, str], when: datetime.datetime
    ) -> tuple[str, dict[str, str]]:
        """(the URL, the headers) of a signed request with an empty body."""
        stamp = when.strftime("%Y%m%dT%H%M%SZ")
        host = urlsplit(self.endpoint).netloc
        encoded_path = _encode(path, keep_slash=True)
        encoded_query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(query.items()))
        headers = {"host": host, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": stamp}
        names = ";".join(sorted(headers))
        request = "\n".join(
            [method, encoded_path, encoded_query, *(f"{n}:{headers[n]}" for n in sorted(headers)), "", names,
             _EMPTY_SHA256]
        )  # fmt: skip
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        digest = hashlib.sha256(request.encode()).hexdigest()
        signature = hmac.new(
            self._signing_key(stamp[:8]), f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}".encode(), hashlib.sha256
        ).hexdigest()
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, SignedHeaders={names}, Signature={signature}"
        )
        del headers["host"]  # aiohttp sends it, as signed
        url = f"{self.endpoint}{encoded_path}" + (f"?{encoded_query}" if encoded_query else "")
        return url, headers


@dataclass(frozen=True)
class Upload:
    """An incomplete multipart upload: its full key in the bucket, its id, when it began."""

    key: str
    upload_id: str
    initiated: float  # epoch seconds


def parse_uploads(body: bytes) -> tuple[list[Upload], dict[str, str] | None]:
    """The uploads of one ListMultipartUploads page, and the markers of the next page (None: last)."""
    root = ET.fromstring(body)
    uploads = [
        Upload(
            u.findtext(f"{_NS}Key", ""),
            u.findtext(f"{_NS}UploadId", ""),
            datetime.datetime.fromisoformat(u.findtext(f"{_NS}Initiated", "").replace("Z", "+00:00")).timestamp(),
        )
        for u in root.iter(f"{_NS}Upload")
    ]
    if root.findtext(f"{_NS}IsTruncated", "false") != "true":
        return uploads, None
    return uploads, {
        "key-marker": root.findtext(f"{_NS}NextKeyMarker", ""),
        "upload-id-marker": root.findtext(f"{_NS}NextUploadIdMarker", ""),
    }


class MultipartUploads:
    """List and abort the incomplete multipart uploads of regcache's blobs in the bucket."""

    def __init__(self, settings: S3Settings, breaker: Breaker) -> None:
        self._settings = settings
        self._breaker = breaker
        self._signer = SigV4(settings.endpoint, settings.region, settings.access_key, settings.secret_key)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self._settings.connect_timeout, sock_read=self._settings.timeout
            )
            self._session = aiohttp.ClientSession(timeout=timeout, trust_env=False)
        return self._session

    async def _request(self, method: str, key: str, query: dict[str, str]) -> bytes:
        path = f"/{self._settings.bucket}" + (f"/{key}" if key else "")
        what = f"{method} {path}"
        self._breaker.check(what)
        url, headers = self._signer.signed(method, path, query, datetime.datetime.now(datetime.UTC))
        try:
            async with self._client().request(
                method, URL(url, encoded=True), headers=headers, proxy=self._settings.proxy, allow_redirects=False
            ) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise self._breaker.failed(what, str(err) or type(err).__name__) from err
        if response.status // 100 != 2:
            raise self._breaker.failed(what, f"answered {response.status}: {body[:200]!r}")
        self._breaker.worked()
        return body

    async def list(self) -> list[Upload]:
        """Every incomplete upload under `<prefix>blobs/` (all pages)."""
        query = {"uploads": "", "prefix": f"{self._settings.prefix}blobs/"}
        found: list[Upload] = []
        while True:
            body = await self._request("GET", "", query)
            try:
                uploads, markers = parse_uploads(body)
            except (ET.ParseError, ValueError) as err:
                raise S3Unavailable(f"S3: listing multipart uploads gave an unreadable answer: {err}") from err
            found += uploads
            if markers is None:
                return found
            query = {**query, **markers}

    async def abort(self, upload: Upload) -> None:
        await self._request("DELETE", upload.key, {"uploadId": upload.upload_id})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
