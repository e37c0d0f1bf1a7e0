"""The shared store's S3 tier: blobs and manifests in one bucket, on obstore.

Owns: the bucket's key layout (`blobs/sha256/<hex>`, `manifests/sha256/<hex>` under the configured
prefix; a manifest's media type is its object's Content-Type), the obstore `S3Store` with every
option that matters given explicitly, the start-up check of the bucket, and turning every S3
failure into `S3Unavailable` (a missing object is None or False, never an error).

Consistency: keys are content-addressed and an object is written whole or not at all. A blob is
uploaded from a local file whose digest the caller has verified; its bytes are hashed again as
they are read for the upload, and a mismatch (the file changed under us) raises inside the upload's
source, which makes obstore abort the multipart upload: no object appears. Two nodes uploading the
same blob write the same bytes, so a put needs no create-if-absent (radosgw ignores If-None-Match on
CompleteMultipartUpload anyway). A killed uploader leaves an incomplete multipart upload, invisible
to GET, HEAD and listings; `SharedObjects.abort_abandoned_uploads` (sigv4.py) removes those.

What obstore would otherwise take from the environment, and regcache must not:
- proxies: reqwest honours HTTP(S)_PROXY even for loopback; an explicit proxy turns that off, so
  without `shared.s3.proxy` the store gets a proxy that its own endpoint is excluded from;
- AWS_* variables fill every S3 option not given: credentials come from a credential provider (so
  no AWS_SESSION_TOKEN is sent along), and addressing, signing and payer options are given.
Timeouts: `connect_timeout`; `timeout` is a read timeout (a request making no progress for that
long fails), not obstore's overall request timeout, which would cut long blob streams.

Every call needs a running event loop (obstore's async API).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from regcache.config import S3Settings
from regcache.oci.digest import DigestMismatch, verify_digest
from regcache.oci.manifest import Manifest
from regcache.store.shared.errors import RETRY_AFTER_SECONDS, Breaker, BucketUnusable, S3Unavailable
from regcache.store.shared.sigv4 import MultipartUploads

if TYPE_CHECKING:
    from obstore import GetResult
    from obstore.store import ClientConfig

log = logging.getLogger("regcache")

MiB = 1 << 20
BLOBS, MANIFESTS = "blobs", "manifests"
BLOB_CONTENT_TYPE = "application/octet-stream"
# Blobs up to this size go up in one PUT from memory; larger ones in parts, streamed from the file.
SINGLE_PUT_MAX = 8 * MiB
_PART_SIZE = 8 * MiB
_MAX_PARTS = 10_000  # S3's limit
_PARTS_IN_FLIGHT = 4  # with 8 MiB parts: ~32 MB of a blob in memory at a time
_READ_SIZE = MiB
_STREAM_CHUNK = 256 * 1024
# obstore's overall request timeout would cut a long blob stream: progress is bounded by the read
# timeout instead, and this only ends a request that never finishes.
_OVERALL_TIMEOUT = timedelta(hours=12)
_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
# A proxy nothing listens on, excluded for the endpoint: turns off reqwest's proxies from the environment.
_NO_PROXY = "http://127.0.0.1:9"


def object_key(kind: str, digest: str) -> str:
    """`blobs/sha256/<hex>` (relative to the store's prefix); ValueError for anything but a digest."""
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256/sha512 digest: {digest!r}")
    algorithm, _, hex_digest = digest.partition(":")
    return f"{kind}/{algorithm}/{hex_digest}"


def digest_of_key(key: str) -> str | None:
    """The digest a `blobs/…` or `manifests/…` key (relative to the prefix) names, or None."""
    _, _, rest = key.partition("/")
    digest = rest.replace("/", ":", 1)
    return digest if _DIGEST_RE.fullmatch(digest) else None


def part_size(size: int) -> int:
    """Multipart part size for a blob of `size` bytes: 8 MiB, or more (whole MiB) so that S3's
    10,000 parts hold it."""
    needed = -(-size // _MAX_PARTS)
    return max(_PART_SIZE, -(-needed // MiB) * MiB)


def _short(err: BaseException) -> str:
    """The first line of an obstore error (the rest is a Rust debug dump), bounded."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:300]


def s3_store(settings: S3Settings) -> S3Store:
    """An obstore store on the bucket, taking nothing from the environment (see the docstring)."""
    access_key, secret_key = settings.access_key, settings.secret_key

    def credentials() -> dict[str, Any]:
        return {"access_key_id": access_key, "secret_access_key": secret_key, "token": None, "expires_at": None}

    seconds = timedelta(seconds=settings.timeout)
    options: ClientConfig = {
        "allow_http": settings.endpoint.startswith("http://"),
        "connect_timeout": timedelta(seconds=settings.connect_timeout),
        "read_timeout": seconds,
        "timeout": _OVERALL_TIMEOUT,
        "default_content_type": BLOB_CONTENT_TYPE,
        "proxy_url": settings.proxy or _NO_PROXY,
    }
    if not settings.proxy:
        options["proxy_excludes"] = urlsplit(settings.endpoint).hostname or ""
    return S3Store(
        settings.bucket,
        prefix=settings.prefix.rstrip("/") or None,
        endpoint=settings.endpoint,
        region=settings.region,
        credential_provider=credentials,  # type: ignore[arg-type]
        virtual_hosted_style_request=False,
        skip_signature=False,
        unsigned_payload=False,
        request_payer=False,
        client_options=options,
        retry_config={
            "max_retries": 2,
            "retry_timeout": seconds,
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1), "base": 2},
        },
    )


@dataclass(frozen=True)
class StoredObject:
    """One object of the bucket as a listing shows it."""

    digest: str
    size: int
    last_modified: float  # epoch seconds


@contextlib.contextmanager
def _guarded(breaker: Breaker, what: str) -> Iterator[None]:
    """Run the S3 calls inside unless the breaker is open; any failure but a missing or existing
    object becomes S3Unavailable naming `what` (and opens the breaker)."""
    breaker.check(what)
    try:
        yield
    except (FileNotFoundError, AlreadyExistsError):
        breaker.worked()  # S3 answered
        raise
    except BaseError as err:
        raise breaker.failed(what, _short(err)) from err
    breaker.worked()


class BlobStream:
    """An open blob (or a range of it): `size` of the whole object, bytes `start`..`end` (exclusive)
    to come by iterating. An S3 failure mid-stream raises S3Unavailable."""

    def __init__(self, result: GetResult, what: str, breaker: Breaker) -> None:
        self._result = result
        self._what = what
        self._breaker = breaker
        self.size: int = result.meta["size"]
        self.start, self.end = result.range

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _guarded(self._breaker, f"reading {self._what}"):
            async for chunk in self._result.stream(min_chunk_size=_STREAM_CHUNK):
                yield chunk


class _Objects:
    """The objects of one kind (`blobs` or `manifests`) in the bucket."""

    def __init__(self, store: S3Store, kind: str, breaker: Breaker) -> None:
        self._store = store
        self.kind = kind
        self._breaker = breaker

    def key(self, digest: str) -> str:
        return object_key(self.kind, digest)

    def _guarded(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _guarded(self._breaker, what)

    async def size(self, digest: str) -> int | None:
        """The stored object's size (HEAD); None if there is none."""
        key = self.key(digest)
        try:
            with self._guarded(f"HEAD {key}"):
                meta = await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return None
        return int(meta["size"])

    async def has(self, digest: str) -> bool:
        return await self.size(digest) is not None

    def size_blocking(self, digest: str) -> int | None:
        """`size`, blocking: for the store protocols, called from worker threads."""
        key = self.key(digest)
        try:
            with self._guarded(f"HEAD {key}"):
                meta = obstore.head(self._store, key)
        except FileNotFoundError:
            return None
        return int(meta["size"])

    async def delete(self, digest: str) -> None:
        """Remove it (no error if it is not there)."""
        with self._guarded(f"DELETE {self.key(digest)}"):
            await obstore.delete_async(self._store, self.key(digest))

    async def pages(self, page_size: int = 1000, after: str | None = None) -> AsyncIterator[list[StoredObject]]:
        """Every object of this kind, in key order, `page_size` at a time; `after`: start after
        this digest (to resume a walk)."""
        offset = self.key(after) if after else None
        with self._guarded(f"listing {self.kind}"):
            async for batch in obstore.list(self._store, prefix=f"{self.kind}/", offset=offset, chunk_size=page_size):
                page = [
                    StoredObject(digest, int(meta["size"]), meta["last_modified"].timestamp())
                    for meta in batch
                    if (digest := digest_of_key(meta["path"])) is not None
                ]
                if page:
                    yield page


class SharedBlobs(_Objects):
    """Blobs in the bucket: written from verified local files, read by presigned URL or streamed."""

    def __init__(self, store: S3Store, breaker: Breaker, presign_seconds: float) -> None:
        super().__init__(store, BLOBS, breaker)
        self._presign_seconds = presign_seconds

    async def put_file(self, digest: str, path: Path, size: int) -> bool:
        """Upload the verified blob in `path` unless the bucket has it; True if it was uploaded.
        Large blobs stream from the file in parts; the bytes are hashed on the way and a mismatch
        (DigestMismatch) aborts the upload, leaving nothing."""
        key = self.key(digest)
        if await self.size(digest) == size:
            return False
        if size <= SINGLE_PUT_MAX:
            data = await asyncio.to_thread(path.read_bytes)
            if len(data) != size:
                raise DigestMismatch(f"{digest}: {path} holds {len(data)} bytes, expected {size}")
            verify_digest(digest, data)
            with self._guarded(f"PUT {key}"):
                await obstore.put_async(self._store, key, data, use_multipart=False)
        else:
            chunks = _VerifiedChunks(path, digest, size)
            try:
                with self._guarded(f"PUT {key} ({size} bytes, in parts)"):
                    await obstore.put_async(self._store, key, chunks,
                                            chunk_size=part_size(size), max_concurrency=_PARTS_IN_FLIGHT)  # fmt: skip
            finally:
                chunks.close()
        return True

    async def presigned_url(self, digest: str, seconds: float | None = None) -> str:
        """A GET URL of the object itself, signed and expiring (default: `presign_seconds`); made
        locally, without asking S3 (so it does not say whether the object exists). Refused
        (S3Unavailable) while S3 is known to be down: clients would not get the blob there."""
        expires = timedelta(seconds=seconds or self._presign_seconds)
        with self._guarded(f"signing {self.key(digest)}"):
            url: str = await obstore.sign_async(self._store, "GET", self.key(digest), expires)
        return url

    async def open(self, digest: str, start: int = 0, end: int | None = None) -> BlobStream | None:
        """The blob's bytes `start`..`end` (exclusive; None: to the end) as a stream; None if absent."""
        options: dict[str, Any] = {}
        if end is not None:
            options["range"] = (start, end)
        elif start:
            options["range"] = {"offset": start}
        key = self.key(digest)
        try:
            with self._guarded(f"GET {key}"):
                result = await obstore.get_async(self._store, key, options=options or None)  # type: ignore[arg-type]
        except FileNotFoundError:
            return None
        return BlobStream(result, key, self._breaker)


class _VerifiedChunks:
    """The file's bytes as an upload's source, read and hashed off the event loop; the last read
    raises DigestMismatch (before the upload could complete) unless they are exactly the blob.

    `close` lets go of the file as soon as the upload ends, however it ends: when an upload is
    cancelled, obstore may still hold this iterator, and a generator would keep the file open until
    the garbage collector found it (a pipe's writer would wait for it that long)."""

    def __init__(self, path: Path, digest: str, size: int) -> None:
        self._path, self._digest, self._size = path, digest, size
        self._hasher = hashlib.new(digest.partition(":")[0])
        self._read = 0
        self._lock = threading.Lock()  # held by a read in flight; close waits for it off the loop
        self._handle: BinaryIO | None = path.open("rb")

    def __aiter__(self) -> _VerifiedChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await asyncio.to_thread(self._next_chunk)
        if chunk and self._read <= self._size:
            return chunk
        actual = f"{self._hasher.name}:{self._hasher.hexdigest()}"
        if self._read != self._size or actual != self._digest:
            raise DigestMismatch(
                f"{self._digest}: {self._path} no longer holds the blob ({self._read} bytes hashing to {actual})"
            )
        raise StopAsyncIteration

    def _next_chunk(self) -> bytes:
        with self._lock:
            if self._handle is None:  # closed: the upload is over
                return b""
            chunk = self._handle.read(_READ_SIZE)
        self._read += len(chunk)
        self._hasher.update(chunk)
        return chunk

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _release_after_read(self) -> None:
        with self._lock:
            self._release()

    def close(self) -> None:
        """Close the file now, or right after the read in flight (waiting in a worker thread, not
        on the event loop)."""
        if not self._lock.acquire(blocking=False):
            asyncio.get_running_loop().run_in_executor(None, self._release_after_read)
            return
        try:
            self._release()
        finally:
            self._lock.release()


class SharedManifests(_Objects):
    """Manifests in the bucket: their exact bytes, the media type as Content-Type."""

    def __init__(self, store: S3Store, breaker: Breaker) -> None:
        super().__init__(store, MANIFESTS, breaker)

    async def put(self, digest: str, manifest: Manifest) -> bool:
        """Store it if absent (DigestMismatch if the bytes are not `digest`'s); True if written."""
        verify_digest(digest, manifest.body)
        try:
            with self._guarded(f"PUT {self.key(digest)}"):
                await obstore.put_async(self._store, self.key(digest), manifest.body, **_created(manifest))
        except AlreadyExistsError:
            return False
        return True

    def put_blocking(self, digest: str, manifest: Manifest) -> bool:
        """`put`, blocking: for the store protocols, called from worker threads."""
        verify_digest(digest, manifest.body)
        try:
            with self._guarded(f"PUT {self.key(digest)}"):
                obstore.put(self._store, self.key(digest), manifest.body, **_created(manifest))
        except AlreadyExistsError:
            return False
        return True

    async def get(self, digest: str) -> Manifest | None:
        """The manifest, or None. DigestMismatch if the stored bytes are not the digest's."""
        key = self.key(digest)
        try:
            with self._guarded(f"GET {key}"):
                result = await obstore.get_async(self._store, key)
                body = bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        return _verified(digest, result, body)

    def get_blocking(self, digest: str) -> Manifest | None:
        """`get`, blocking: for the store protocols, called from worker threads."""
        key = self.key(digest)
        try:
            with self._guarded(f"GET {key}"):
                result = obstore.get(self._store, key)
                body = bytes(result.bytes())
        except FileNotFoundError:
            return None
        return _verified(digest, result, body)


def _created(manifest: Manifest) -> dict[str, Any]:
    """A manifest's put options: its media type as Content-Type, and only if absent (immutable)."""
    return {"attributes": {"Content-Type": manifest.media_type}, "mode": "create"}


def _verified(digest: str, result: GetResult, body: bytes) -> Manifest:
    """The manifest read (DigestMismatch unless `body` is exactly `digest`'s)."""
    verify_digest(digest, body)
    return Manifest(str(result.attributes.get("Content-Type", "")), body)


class SharedObjects:
    """The bucket: `blobs`, `manifests`, the start-up check and the sweep of abandoned uploads.
    One breaker for all of them (`retry_after`: how long S3 is not asked again after a failure)."""

    def __init__(self, settings: S3Settings, *, retry_after: float = RETRY_AFTER_SECONDS) -> None:
        self.settings = settings
        self.store = s3_store(settings)
        self.breaker = Breaker("S3", S3Unavailable, retry_after)
        self.blobs = SharedBlobs(self.store, self.breaker, settings.presign_seconds)
        self.manifests = SharedManifests(self.store, self.breaker)
        self._uploads = MultipartUploads(settings, self.breaker)

    def check_bucket(self) -> None:
        """Write and delete a probe object (blocking: at start-up). BucketUnusable naming the bucket
        when it does not exist or cannot be written with these credentials; S3Unavailable when S3
        does not answer."""
        key = f"regcache-probe/{uuid.uuid4().hex}"
        where = f"shared.s3.bucket: {self.settings.bucket} at {self.settings.endpoint}"
        try:
            obstore.put(self.store, key, b"probe", use_multipart=False)
            obstore.delete(self.store, key)
        except FileNotFoundError as err:  # NoSuchBucket
            raise BucketUnusable(f"{where} does not exist (create it first): {_short(err)}") from err
        except (PermissionDeniedError, UnauthenticatedError) as err:
            raise BucketUnusable(f"{where} is not writable with the configured keys: {_short(err)}") from err
        except BaseError as err:
            raise S3Unavailable(f"S3: {where} cannot be checked: {_short(err)}") from err

    async def abort_abandoned_uploads(self, older_than: float | None = None, now: float | None = None) -> int:
        """Abort incomplete multipart uploads under regcache's prefix started more than
        `older_than` seconds ago (default `abandoned_uploads_after`): what killed or cancelled
        uploaders left. How many were aborted. One node at a time should run it (the sweep lock)."""
        age = self.settings.abandoned_uploads_after if older_than is None else older_than
        cutoff = (time.time() if now is None else now) - age
        aborted = 0
        for upload in await self._uploads.list():
            if upload.initiated < cutoff:
                await self._uploads.abort(upload)
                aborted += 1
        if aborted:
            log.info("regcache: aborted %d abandoned multipart upload(s) in %s", aborted, self.settings.bucket)
        return aborted

    async def close(self) -> None:
        await self._uploads.close()
