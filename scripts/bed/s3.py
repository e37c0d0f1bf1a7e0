"""The bed's own S3 client: just enough to set up and inspect a bucket on radosgw.

Owns: AWS Signature Version 4 for path-style requests (stdlib only, so the bed
depends on no S3 library: the libraries are what the tests examine), and the
few calls the bed needs as ground truth independent of the client under test:
create a bucket, list its keys, list its incomplete multipart uploads, abort
them. Requests go through :mod:`bed.client` (no proxy, no redirects).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from . import client

_NS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}


def _quote(text: str, safe: str) -> str:
    return urllib.parse.quote(text, safe=safe)


def canonical_query(query: dict[str, str]) -> str:
    """Sorted ``k=v`` pairs, both RFC 3986-encoded (a flag such as ``uploads`` has value ``""``)."""
    return "&".join(f"{_quote(k, '-_.~')}={_quote(v, '-_.~')}" for k, v in sorted(query.items()))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_headers(
    method: str,
    host: str,
    path: str,
    query: dict[str, str],
    body: bytes,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """The ``Authorization``, ``x-amz-date`` and ``x-amz-content-sha256`` headers for one request."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body).hexdigest()
    signed = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    names = ";".join(sorted(signed))
    canonical = "\n".join(
        [
            method,
            _quote(path, "/-_.~"),
            canonical_query(query),
            "".join(f"{k}:{signed[k]}\n" for k in sorted(signed)),
            names,
            payload,
        ]
    )
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (stamp[:8], region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    auth = f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={names}, Signature={signature}"
    return {"Authorization": auth, "x-amz-date": stamp, "x-amz-content-sha256": payload}


class S3Error(RuntimeError):
    pass


@dataclass(frozen=True)
class S3:
    """Path-style S3 at ``endpoint`` (``http://127.0.0.1:PORT``) with one key pair."""

    endpoint: str
    region: str
    access_key: str
    secret_key: str

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> client.Response:
        """One signed request (``headers`` are sent unsigned); the status is returned, not raised."""
        query = query or {}
        host = urllib.parse.urlsplit(self.endpoint).netloc
        signed = sigv4_headers(
            method,
            host,
            path,
            query,
            body,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )
        qs = f"?{canonical_query(query)}" if query else ""
        url = f"{self.endpoint}{_quote(path, '/-_.~')}{qs}"
        data = body if method in ("PUT", "POST") else None
        return client.request(method, url, {**(headers or {}), **signed}, data=data, timeout=timeout)

    def _ok(self, method: str, path: str, query: dict[str, str] | None = None) -> ET.Element | None:
        r = self.request(method, path, query)
        if r.status // 100 != 2:
            raise S3Error(f"{method} {path} {query or ''}: HTTP {r.status} {r.body[:300]!r}")
        return ET.fromstring(r.body) if r.body else None

    def create_bucket(self, bucket: str) -> None:
        self._ok("PUT", f"/{bucket}")

    def list_keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` with its size (ListObjectsV2, all pages)."""
        out: dict[str, int] = {}
        query = {"list-type": "2", "prefix": prefix}
        while True:
            root = self._ok("GET", f"/{bucket}", query)
            assert root is not None
            for item in root.findall("s3:Contents", _NS):
                out[item.findtext("s3:Key", "", _NS)] = int(item.findtext("s3:Size", "0", _NS))
            token = root.findtext("s3:NextContinuationToken", None, _NS)
            if root.findtext("s3:IsTruncated", "false", _NS) != "true" or not token:
                return out
            query = {**query, "continuation-token": token}

    def multipart_uploads(self, bucket: str, prefix: str = "") -> list[tuple[str, str]]:
        """Incomplete multipart uploads under ``prefix``: ``(key, upload_id)`` (first page of 1000)."""
        root = self._ok("GET", f"/{bucket}", {"uploads": "", "prefix": prefix})
        assert root is not None
        return [
            (u.findtext("s3:Key", "", _NS), u.findtext("s3:UploadId", "", _NS))
            for u in root.findall("s3:Upload", _NS)
        ]

    def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        self._ok("DELETE", f"/{bucket}/{key}", {"uploadId": upload_id})
