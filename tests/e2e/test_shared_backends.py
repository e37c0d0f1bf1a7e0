"""The shared store's two backends against the real engines: Ceph radosgw (S3) and redis-server.

S3 (regcache/store/shared/s3.py): blobs and manifests round-trip with their bytes and media types; a large
blob streams up from its file in bounded memory; nothing partial is ever visible (a failed,
cancelled or killed upload leaves no object, and the sweep aborts what it leaves behind);
presigned URLs serve the exact bytes and ranges and expire; the environment (proxies, AWS_*)
changes nothing; the start-up check names the bucket; a stopped or hung radosgw fails within a bound.

Redis (regcache/store/shared/redis.py, leases.py, access.py): tag records keep the cap;
pins, seen pairs, usage counters, the inventory and the node registry; leases have one holder,
are renewed and released by the holder only and handed over after expiry; fill streams give a
late follower every event; the access records behave exactly as DiskAccessRecords (the same test
runs on both); a stopped or hung Redis fails within a bound, with one exception type.

Ground truth comes from the engines: radosgw's access log and the bed's own SigV4 client
(bed.s3: list keys, list multipart uploads), Redis itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis as redis_client
from bed.ceph import Ceph
from bed.faults import FaultRelay
from bed.redis import Redis

from regcache.config import RedisSettings, S3Settings
from regcache.oci.digest import DigestMismatch, digest_of
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.store.access import ANONYMOUS, AccessRecords, DiskAccessRecords, Grant, TokenRecord
from regcache.store.base import MAX_TAG_RECORDS, TagRecord, capped_records
from regcache.store.shared.access import ClusterAccessRecords, RedisAccessRecords
from regcache.store.shared.errors import Breaker, BucketUnusable, RedisUnavailable, S3Unavailable, SharedUnavailable
from regcache.store.shared.leases import SWEEP_LOCK, FillEvent, FillStalled
from regcache.store.shared.redis import SharedRedis
from regcache.store.shared.s3 import SINGLE_PUT_MAX, SharedObjects, object_key

MiB = 1 << 20
T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """`await fn()` in a new event loop."""

    async def main() -> T:
        return await fn()

    return asyncio.run(main())


def s3_settings(ceph: Ceph, **changes: Any) -> S3Settings:
    """The bed's bucket under a prefix of this test's own."""
    settings = S3Settings(ceph.endpoint, ceph.bucket, ceph.access_key, ceph.secret_key, region=ceph.region,
                          prefix=f"{uuid.uuid4().hex}/", connect_timeout=1.0, timeout=2.0)  # fmt: skip
    return replace(settings, **changes)


ACCESS_SECRET = b"the-clusters-access-secret-0123456789"


def redis_settings(server: Redis, **changes: Any) -> RedisSettings:
    return replace(RedisSettings(server.url, timeout=0.5, prefix=f"t{uuid.uuid4().hex[:12]}:"), **changes)


def blob_file(path: Path, mib: int, seed: str = "") -> tuple[Path, str]:
    """A file of `mib` MiB of incompressible bytes and its digest."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for i in range(mib):
            chunk = hashlib.sha256(f"{seed}{i}".encode()).digest() * (MiB // 32)
            digest.update(chunk)
            out.write(chunk)
    return path, f"sha256:{digest.hexdigest()}"


def small_file(path: Path, data: bytes) -> tuple[Path, str]:
    path.write_bytes(data)
    return path, digest_of(data)


def full_key(settings: S3Settings, kind: str, digest: str) -> str:
    return settings.prefix + object_key(kind, digest)


def curl(url: str, *args: str) -> tuple[int, bytes]:
    done = subprocess.run(["curl", "-s", "--noproxy", "*", "-o", "-", "-w", "\n%{http_code}", *args, url],
                          capture_output=True, check=True, timeout=60)  # fmt: skip
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def rgw_requests(ceph: Ceph, mark: int, count: int) -> list[Any]:
    """radosgw's log after `mark`, once it has `count` lines (it logs just after answering)."""
    deadline = time.monotonic() + 5
    while len(found := ceph.requests(mark)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def bucket_truth(ceph: Ceph, settings: S3Settings) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Objects and incomplete multipart uploads under the test's prefix, from the bed's own client."""
    return ceph.s3.list_keys(ceph.bucket, settings.prefix), ceph.s3.multipart_uploads(ceph.bucket, settings.prefix)


def fails_within(limit: float, error: type[Exception], call: Callable[[], Any]) -> float:
    """`call()` raises `error` within `limit` seconds; how long it took."""
    began = time.monotonic()
    with pytest.raises(error):
        call()
    took = time.monotonic() - began
    assert took < limit, f"took {took:.2f} s"
    return took


# -- S3: blobs -----------------------------------------------------------------------------------------


def test_blobs_round_trip(ceph: Ceph, tmp_path: Path) -> None:
    """A small blob goes up in one PUT, a larger one in parts; both read back intact (whole and a range),
    are listed and deleted; a second put of a blob the bucket has sends no PUT."""
    settings = s3_settings(ceph)
    objects = SharedObjects(settings)
    small, small_digest = small_file(tmp_path / "small", b"config blob")
    large, large_digest = blob_file(tmp_path / "large", 20)
    mark = ceph.mark()

    async def go() -> None:
        blobs = objects.blobs
        assert await blobs.size(small_digest) is None
        assert await blobs.put_file(small_digest, small, small.stat().st_size) is True
        assert await blobs.put_file(large_digest, large, 20 * MiB) is True
        assert (await blobs.size(small_digest), await blobs.size(large_digest)) == (11, 20 * MiB)
        stream = await blobs.open(large_digest)
        assert stream is not None and (stream.size, stream.start, stream.end) == (20 * MiB, 0, 20 * MiB)
        got = hashlib.sha256()
        async for chunk in stream:
            got.update(chunk)
        assert f"sha256:{got.hexdigest()}" == large_digest
        ranged = await blobs.open(large_digest, 5, 105)
        assert ranged is not None and (ranged.start, ranged.end) == (5, 105)
        assert b"".join([c async for c in ranged]) == large.read_bytes()[5:105]
        tail = await blobs.open(large_digest, 20 * MiB - 3)
        assert tail is not None and b"".join([c async for c in tail]) == large.read_bytes()[-3:]
        assert await blobs.open("sha256:" + "0" * 64) is None
        pages = [page async for page in blobs.pages()]
        assert sorted((o.digest, o.size) for page in pages for o in page) == sorted(
            [(small_digest, 11), (large_digest, 20 * MiB)])  # fmt: skip
        assert all(abs(o.last_modified - time.time()) < 120 for page in pages for o in page)
        again = ceph.mark()
        assert await blobs.put_file(large_digest, large, 20 * MiB) is False
        assert [r.method for r in rgw_requests(ceph, again, 1)] == ["HEAD"]
        await blobs.delete(small_digest)
        await blobs.delete(small_digest)  # already gone: no error
        assert await blobs.size(small_digest) is None
        await objects.close()

    run(go)
    puts = [(r.path, r.query) for r in ceph.requests(mark) if r.method in ("PUT", "POST")]
    small_key = f"/{ceph.bucket}/{full_key(settings, 'blobs', small_digest)}"
    large_key = f"/{ceph.bucket}/{full_key(settings, 'blobs', large_digest)}"
    assert [q for p, q in puts if p == small_key] == [""]  # one plain PUT
    assert sum("partNumber=" in q for p, q in puts if p == large_key) == 3  # 8 + 8 + 4 MiB
    assert ceph.s3.list_keys(ceph.bucket, settings.prefix) == {full_key(settings, "blobs", large_digest): 20 * MiB}


def test_a_blob_stream_waits_for_a_slow_reader_and_fails_on_a_hung_server(ceph: Ceph, tmp_path: Path) -> None:
    """`timeout` bounds S3 making no progress, not the reader: a reader pausing longer than it still
    gets every byte (redirect: false streams to slow clients); radosgw hanging mid-stream ends the
    stream with S3Unavailable within about the timeout."""
    settings = s3_settings(ceph, timeout=1.0)
    objects = SharedObjects(settings)
    path, digest = blob_file(tmp_path / "blob", 64)

    async def slow_reader() -> str:
        got = hashlib.sha256()
        stream = await objects.blobs.open(digest)
        assert stream is not None
        async for i, chunk in _numbered(stream):
            got.update(chunk)
            if i in (1, 4):
                await asyncio.sleep(1.5)
        return f"sha256:{got.hexdigest()}"

    async def reader_of_a_hung_server() -> float:
        stream = await objects.blobs.open(digest)
        assert stream is not None
        rgw = ceph.pids()["rgw"]
        began = 0.0
        try:
            with pytest.raises(S3Unavailable):
                async for i, _ in _numbered(stream):
                    if i == 1:
                        os.kill(rgw, signal.SIGSTOP)
                        began = time.monotonic()
        finally:
            os.kill(rgw, signal.SIGCONT)
        return time.monotonic() - began

    run(lambda: objects.blobs.put_file(digest, path, 64 * MiB))
    assert run(slow_reader) == digest
    assert run(reader_of_a_hung_server) < 4.0
    run(objects.close)


async def _numbered(stream: Any) -> Any:
    i = 0
    async for chunk in stream:
        i += 1
        yield i, chunk


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1])


def test_a_large_blob_streams_up_in_bounded_memory(ceph: Ceph, tmp_path: Path) -> None:
    """200 MB from a file: peak RSS grows by far less than the blob, the event loop keeps turning,
    and the object's bytes are the blob's. Measured: 1.1 s, +47 MB, longest loop stall 8 ms."""
    settings = s3_settings(ceph)
    objects = SharedObjects(settings)
    path, digest = blob_file(tmp_path / "big", 200)

    async def go() -> float:
        stalls = [0.0]

        async def ticker() -> None:
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                stalls[0] = max(stalls[0], time.monotonic() - before - 0.01)

        tick = asyncio.create_task(ticker())
        await objects.blobs.put_file(digest, path, 200 * MiB)
        tick.cancel()
        return stalls[0]

    _peak_rss_reset()
    before = _status_kb("VmRSS")
    began = time.monotonic()
    stall = run(go)
    took = time.monotonic() - began
    grew_mb = (_status_kb("VmHWM") - before) // 1024
    assert grew_mb < 120, f"peak RSS grew {grew_mb} MB for a 200 MB blob"
    assert stall < 0.5, f"the event loop stalled {stall:.2f} s"
    assert took < 60
    print(f"200 MB up in {took:.1f} s, peak RSS +{grew_mb} MB, longest loop stall {stall * 1000:.0f} ms")
    status, body = curl(run(lambda: objects.blobs.presigned_url(digest)))
    assert status == 200 and digest_of(body) == digest
    run(objects.close)


def test_a_changed_file_uploads_nothing(ceph: Ceph, tmp_path: Path) -> None:
    """The file no longer holds the blob it was verified as (bytes changed, or truncated): DigestMismatch,
    and neither an object nor an incomplete upload is left, for a small (one PUT) or large (parts) blob."""
    settings = s3_settings(ceph)
    objects = SharedObjects(settings)
    large, large_digest = blob_file(tmp_path / "large", 20)
    with large.open("r+b") as f:  # the last byte changes after verification
        f.seek(20 * MiB - 1)
        f.write(b"\0")
    small, small_digest = small_file(tmp_path / "small", b"config")
    small.write_bytes(b"CONFIG")
    truncated, truncated_digest = blob_file(tmp_path / "truncated", 12)
    os.truncate(truncated, 10 * MiB)

    async def go() -> None:
        for digest, path, size in ((large_digest, large, 20 * MiB), (small_digest, small, 6),
                                   (truncated_digest, truncated, 12 * MiB)):  # fmt: skip
            with pytest.raises(DigestMismatch):
                await objects.blobs.put_file(digest, path, size)
            assert await objects.blobs.size(digest) is None
        assert [o async for o in objects.blobs.pages()] == []
        await objects.close()

    run(go)
    assert bucket_truth(ceph, settings) == ({}, [])
    assert 10 * MiB > SINGLE_PUT_MAX  # the large ones did go in parts


# Run as a separate process, then killed: a node dying mid-upload. Reads its blob from a FIFO the
# test fills, so the test decides how far the upload gets.
_UPLOADER = """
import asyncio, sys
from pathlib import Path
from regcache.config import S3Settings
from regcache.store.shared.s3 import SharedObjects
endpoint, bucket, access, secret, prefix, fifo, digest = sys.argv[1:]
objects = SharedObjects(S3Settings(endpoint, bucket, access, secret, prefix=prefix))
asyncio.run(objects.blobs.put_file(digest, Path(fifo), 100 << 20))
"""


def _feed(fifo: Path, mib: int, stop: threading.Event, after_stop: int = 0) -> threading.Thread:
    """Write `mib` MiB into the FIFO (in the background), keep it open until `stop`, then write
    `after_stop` MiB more: that fails at once when the reader has let go of the pipe, and waits for
    ever when a reader holds it without reading (the test's join then times out). Gives up quietly
    when the reader goes away (or never came: see `_unblock`)."""

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), fifo.open("wb") as out:
            for i in range(mib):
                out.write(bytes([i % 256]) * MiB)
            out.flush()
            stop.wait(30)
            for _ in range(after_stop):
                out.write(bytes(MiB))
            out.flush()

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def _join(thread: threading.Thread, why: str) -> None:
    thread.join(20)
    assert not thread.is_alive(), why


def _unblock(fifo: Path) -> None:
    """Release a writer still waiting in open() for a reader (one that died before reading)."""
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))


def _wait_for_upload(ceph: Ceph, settings: S3Settings, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(ceph.s3.multipart_uploads(ceph.bucket, settings.prefix)) < count:
        assert time.monotonic() < deadline, "no multipart upload began"
        time.sleep(0.05)


def test_killed_or_cancelled_uploads_leave_nothing_visible_and_the_sweep_aborts_them(
    ceph: Ceph, tmp_path: Path
) -> None:
    """A node killed mid-upload, and a cancelled upload: no object under the key (HEAD, GET, listing),
    only incomplete multipart uploads, which `abort_abandoned_uploads` aborts once they are old enough."""
    settings = s3_settings(ceph)
    killed, cancelled = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    stop = threading.Event()
    fifo = tmp_path / "killed.fifo"
    os.mkfifo(fifo)
    feeder = _feed(fifo, 20, stop)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, ceph.endpoint, ceph.bucket, ceph.access_key,
                             ceph.secret_key, settings.prefix, str(fifo), killed], env=env)  # fmt: skip
    try:
        _wait_for_upload(ceph, settings, 1)
        assert proc.poll() is None, "the uploader ended before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        _unblock(fifo)
        _join(feeder, "the FIFO's writer is still blocked after its reader was killed")
    objects = SharedObjects(settings)

    async def cancel_one() -> None:
        fifo2 = tmp_path / "cancelled.fifo"
        os.mkfifo(fifo2)
        stop2 = threading.Event()
        feeder2 = _feed(fifo2, 20, stop2, after_stop=20)
        task = asyncio.create_task(objects.blobs.put_file(cancelled, fifo2, 100 * MiB))
        deadline = time.monotonic() + 20
        while len(ceph.s3.multipart_uploads(ceph.bucket, settings.prefix)) < 2:
            assert not task.done() and time.monotonic() < deadline, "the second upload did not begin"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stop2.set()  # the cancelled upload must have let go of its file: the writer fails, not waits
        await asyncio.to_thread(_join, feeder2, "the cancelled upload still holds its file open")

    run(cancel_one)

    async def check() -> tuple[int, int]:
        for digest in (killed, cancelled):
            assert await objects.blobs.size(digest) is None
            assert await objects.blobs.open(digest) is None
        assert [o async for o in objects.blobs.pages()] == []
        young = await objects.abort_abandoned_uploads(older_than=3600)
        old = await objects.abort_abandoned_uploads(older_than=0, now=time.time() + 5)
        await objects.close()
        return young, old

    objects_, uploads = bucket_truth(ceph, settings)
    assert objects_ == {} and sorted(k for k, _ in uploads) == sorted(
        full_key(settings, "blobs", d) for d in (killed, cancelled))  # fmt: skip
    assert run(check) == (0, 2)
    assert bucket_truth(ceph, settings) == ({}, [])


def test_presigned_urls_serve_the_bytes_ranges_and_expire(ceph: Ceph, tmp_path: Path) -> None:
    """The 307 target of a blob hit: radosgw serves the exact bytes, Range gives 206, a tampered or
    expired URL is refused (403); presigning asks no server (it works with radosgw down)."""
    settings = s3_settings(ceph, presign_seconds=600)
    objects = SharedObjects(settings)
    path, digest = blob_file(tmp_path / "blob", 9)
    data = path.read_bytes()
    run(lambda: objects.blobs.put_file(digest, path, len(data)))
    url = run(lambda: objects.blobs.presigned_url(digest))
    assert url.startswith(f"{ceph.endpoint}/{ceph.bucket}/{full_key(settings, 'blobs', digest)}?")
    assert "X-Amz-Expires=600" in url and "X-Amz-Signature=" in url
    status, body = curl(url)
    assert status == 200 and digest_of(body) == digest
    assert curl(url, "-H", "Range: bytes=1000-1999") == (206, data[1000:2000])
    assert curl(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"))[0] == 403
    # X-Amz-Date has whole seconds, and a loaded machine may take one to run curl: 5 s, not 1.
    short = run(lambda: objects.blobs.presigned_url(digest, seconds=5))
    assert curl(short)[0] == 200
    deadline = time.monotonic() + 20
    while (status := curl(short)[0]) == 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # the URL's own expiry: nothing to wait on but the clock
    assert status == 403
    ceph.stop_radosgw()
    assert run(lambda: objects.blobs.presigned_url(digest)).startswith(ceph.endpoint)
    run(objects.close)


# -- S3: manifests ----------------------------------------------------------------------------------------

MANIFESTS = [
    ("application/vnd.docker.distribution.manifest.v2+json", b'{\n   "schemaVersion": 2,  "layers": []\n}'),
    ("application/vnd.oci.image.index.v1+json", b'{"schemaVersion":2,"manifests":[]}\r\n\t'),
    ("application/vnd.docker.distribution.manifest.v1+prettyjws", '{"name": "caf\u00e9"}'.encode()),
]


def test_manifests_keep_their_exact_bytes_and_media_type(ceph: Ceph) -> None:
    """Stored as written (whitespace, line ends, UTF-8), the media type as Content-Type; a second put is
    refused by the engine (create-if-absent) and changes nothing; bytes that are not the digest's are
    refused before anything is sent."""
    settings = s3_settings(ceph)
    objects = SharedObjects(settings)

    async def go() -> None:
        manifests = objects.manifests
        for media_type, body in MANIFESTS:
            digest = digest_of(body)
            assert await manifests.get(digest) is None
            assert await manifests.put(digest, Manifest(media_type, body)) is True
            assert await manifests.put(digest, Manifest("application/json", body)) is False
            assert await manifests.get(digest) == Manifest(media_type, body)
            assert await manifests.has(digest) and await manifests.size(digest) == len(body)
        with pytest.raises(DigestMismatch):
            await manifests.put("sha256:" + "3" * 64, Manifest("application/json", b"{}"))
        assert not await manifests.has("sha256:" + "3" * 64)
        listed = [o.digest async for page in manifests.pages(page_size=2) for o in page]
        assert sorted(listed) == sorted(digest_of(body) for _, body in MANIFESTS)
        first = sorted(listed)[0]
        assert [o.digest async for page in manifests.pages(after=first) for o in page] == sorted(listed)[1:]
        await objects.close()

    run(go)
    for media_type, body in MANIFESTS:
        raw = ceph.s3.request("GET", f"/{ceph.bucket}/{full_key(settings, 'manifests', digest_of(body))}")
        assert (raw.body, raw.headers["Content-Type"]) == (body, media_type)


def test_a_manifest_changed_in_the_bucket_is_refused(ceph: Ceph) -> None:
    settings = s3_settings(ceph)
    objects = SharedObjects(settings)
    body = b'{"schemaVersion": 2}'
    ceph.s3.request("PUT", f"/{ceph.bucket}/{full_key(settings, 'manifests', digest_of(body))}", body=b"tampered")
    with pytest.raises(DigestMismatch):
        run(lambda: objects.manifests.get(digest_of(body)))
    run(objects.close)


# -- S3: start-up check, environment, failures ---------------------------------------------------------------


def test_the_bucket_check_names_a_missing_or_unwritable_bucket(ceph: Ceph) -> None:
    settings = s3_settings(ceph)
    mark = ceph.mark()
    SharedObjects(settings).check_bucket()
    deadline = time.monotonic() + 5
    while not (probe := [r.path for r in ceph.requests(mark) if r.method == "PUT" and settings.prefix in r.path]):
        assert time.monotonic() < deadline
        time.sleep(0.02)  # radosgw logs just after answering
    assert probe[0].startswith(f"/{ceph.bucket}/{settings.prefix}regcache-probe/")
    assert bucket_truth(ceph, settings) == ({}, [])  # and deleted again
    with pytest.raises(BucketUnusable, match=r"^shared\.s3\.bucket: no-such-bucket at http://127\.0\.0\.1:\d+ "
                                             r"does not exist"):  # fmt: skip
        SharedObjects(replace(settings, bucket="no-such-bucket")).check_bucket()
    with pytest.raises(BucketUnusable, match=rf"^shared\.s3\.bucket: {ceph.bucket} .* not writable"):
        SharedObjects(replace(settings, secret_key="wrong")).check_bucket()


_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret", "AWS_SESSION_TOKEN": "env-session-token",
    "AWS_SKIP_SIGNATURE": "true", "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true", "AWS_UNSIGNED_PAYLOAD": "true",
    "AWS_REQUEST_PAYER": "true", "AWS_ENDPOINT": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-3",
}  # fmt: skip


def test_the_environment_changes_nothing(ceph: Ceph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """regcache may run with proxy variables pointing at itself and with AWS_* variables of other tools:
    the S3 requests (obstore's and the multipart sweep's) go straight to the endpoint, signed with the
    configured keys, with no session token or other option from the environment.

    Seen without the fixes: a dead HTTP_PROXY fails every request; AWS_SESSION_TOKEN was sent along as
    x-amz-security-token; AWS_SKIP_SIGNATURE, AWS_VIRTUAL_HOSTED_STYLE_REQUEST, AWS_UNSIGNED_PAYLOAD and
    AWS_REQUEST_PAYER were obeyed."""
    relay = FaultRelay(ceph.endpoint)
    relay.start()
    try:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        for name, value in _ENVIRONMENT.items():
            monkeypatch.setenv(name, value)
        settings = s3_settings(ceph, endpoint=relay.url)
        objects = SharedObjects(settings)
        body = b'{"schemaVersion": 2, "env": true}'
        path, digest = blob_file(tmp_path / "blob", 9)

        async def go() -> None:
            objects.check_bucket()
            assert await objects.manifests.put(digest_of(body), Manifest("application/json", body))
            assert await objects.blobs.put_file(digest, path, 9 * MiB)
            assert (await objects.manifests.get(digest_of(body))).body == body  # type: ignore[union-attr]
            assert await objects.abort_abandoned_uploads(older_than=0) == 0
            await objects.close()

        mark = ceph.mark()
        run(go)
    finally:
        relay.stop()
    seen = relay.requests()
    assert len(seen) >= 8 and all(r.path.startswith(f"/{ceph.bucket}") for r in seen)
    for request in seen:
        headers = {name.lower(): value for name, value in request.headers}
        assert "x-amz-security-token" not in headers and "x-amz-request-payer" not in headers, request
        assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ceph.access_key}/")
        assert "/us-east-1/s3/" in headers["authorization"]
        assert headers.get("x-amz-content-sha256") != "UNSIGNED-PAYLOAD", request
    answered = rgw_requests(ceph, mark, len(seen))
    assert {r.user for r in answered} == {"bed"}
    # Every request was accepted as signed; the one 404 is the HEAD asking whether the blob is there.
    assert [(r.method, r.status) for r in answered if r.status // 100 != 2] == [("HEAD", 404)], answered


def until_it_works(call: Callable[[], T], limit: float = 5.0) -> T:
    """`call()`, again while it raises SharedUnavailable (the breaker's window after an outage)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return call()
        except SharedUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the breaker's own window: nothing to wait on but the clock


def outage_lines(caplog: pytest.LogCaptureFixture, engine: str) -> tuple[int, int]:
    """(warnings that `engine` is unavailable, lines that it is available again) logged."""
    messages = [r.getMessage() for r in caplog.records if r.name == "regcache"]
    down = sum(m.startswith(f"regcache: {engine} unavailable") for m in messages)
    return down, sum(m.startswith(f"regcache: {engine} available again") for m in messages)


def test_s3_down_or_hung_fails_within_a_bound_and_is_logged_once(
    ceph: Ceph, caplog: pytest.LogCaptureFixture
) -> None:
    """radosgw stopped: S3Unavailable (a SharedUnavailable) within a second; hung (SIGSTOP): within
    about the read timeout (1 s here, with its retries). After either, every call fails at once without
    asking S3 for `retry_after`; then S3 is asked again and, back, works. One warning per outage.
    Measured: stopped 0.2-0.3 s (two retries), hung 1.0-2.1 s, then < 1 ms."""
    caplog.set_level(logging.INFO, logger="regcache")
    settings = s3_settings(ceph, timeout=1.0)
    objects = SharedObjects(settings, retry_after=0.5)
    body = b'{"down": false}'
    digest = digest_of(body)
    run(lambda: objects.manifests.put(digest, Manifest("application/json", body)))
    ceph.stop_radosgw()
    took_down = fails_within(1.5, S3Unavailable, lambda: run(lambda: objects.manifests.get(digest)))
    mark = ceph.mark()
    for call in (lambda: objects.blobs.size(digest), objects.abort_abandoned_uploads,
                 lambda: objects.blobs.presigned_url(digest)):  # fmt: skip
        fails_within(0.2, SharedUnavailable, lambda c=call: run(c))  # type: ignore[misc]
    with pytest.raises(S3Unavailable, match="not tried"):
        run(lambda: objects.manifests.has(digest))
    ceph.start_radosgw()
    assert until_it_works(lambda: run(lambda: objects.manifests.has(digest)))
    assert outage_lines(caplog, "S3") == (1, 1)
    rgw = ceph.pids()["rgw"]
    os.kill(rgw, signal.SIGSTOP)
    try:
        took_hung = fails_within(5.0, S3Unavailable, lambda: run(lambda: objects.manifests.get(digest)))
        fails_within(0.2, S3Unavailable, lambda: run(lambda: objects.manifests.get(digest)))
    finally:
        os.kill(rgw, signal.SIGCONT)
    assert took_hung >= 0.9
    assert until_it_works(lambda: run(lambda: objects.manifests.has(digest)))
    assert outage_lines(caplog, "S3") == (2, 2)
    assert [r for r in ceph.requests(mark) if digest.partition(":")[2] in r.path and r.method == "HEAD"]
    run(objects.close)
    print(f"S3 down detected in {took_down:.2f} s, hung in {took_hung:.2f} s")


# -- Redis: the small stores ---------------------------------------------------------------------------------

REF = TagRef("docker.io", "library/alpine", "3.20")


OnNodes = Callable[..., Any]


@pytest.fixture
def on_nodes(redis_server: Redis) -> OnNodes:
    """`on_nodes(body, count)`: `await body(*nodes)` with `count` SharedRedis clients (nodes `node-a`,
    `node-b`, …) on a prefix of this test's own, in a new event loop; the clients are closed after."""
    settings = redis_settings(redis_server)

    def on(body: Callable[..., Awaitable[T]], count: int = 1) -> T:
        async def main() -> T:
            nodes = [SharedRedis(settings, f"node-{'abcdef'[i]}") for i in range(count)]
            try:
                return await body(*nodes)
            finally:
                for node in nodes:
                    await node.aclose()

        return asyncio.run(main())

    return on


RecordsOnNodes = Callable[[int], list[SharedRedis]]


@pytest.fixture
def records_on_nodes(redis_server: Redis) -> Iterator[RecordsOnNodes]:
    """`records_on_nodes(count)`: `count` SharedRedis clients (nodes `node-a`, `node-b`, …) on a prefix of
    this test's own, for the records (blocking client); closed after the test."""
    settings = redis_settings(redis_server)
    made: list[SharedRedis] = []

    def make(count: int) -> list[SharedRedis]:
        nodes = [SharedRedis(settings, f"node-{'abcdef'[i]}") for i in range(count)]
        made.extend(nodes)
        return nodes

    yield make
    for node in made:
        node.close()


def record(digest: str, at: float) -> TagRecord:
    return TagRecord(digest, "application/vnd.oci.image.index.v1+json", 100, at)


def test_tag_records_keep_the_same_cap_as_on_disk(records_on_nodes: RecordsOnNodes) -> None:
    """Ten Accept lists recorded for one tag: the MAX_TAG_RECORDS most recently recorded stay, exactly as
    store.capped_records keeps them on disk; a rewrite of an old record keeps it; refs and delete."""

    def go(r: SharedRedis) -> None:
        expected: dict[str, TagRecord] = {}
        for i in range(10):
            accepted = (f"application/type-{i}",)
            rec = record("sha256:" + f"{i}" * 64, 1000.0 + i)
            r.tags.put(REF, accepted, rec)
            expected = capped_records(expected, ",".join(accepted), rec)
        got = r.tags.records(REF)
        assert got == expected and len(got) == MAX_TAG_RECORDS
        assert "application/type-0" not in got and "application/type-9" in got
        old = record("sha256:" + "f" * 64, 999.0)  # recorded "before" all others, but it is the new one
        r.tags.put(REF, ("application/type-0",), old)
        assert (r.tags.records(REF))["application/type-0"] == old
        assert len(r.tags.records(REF)) == MAX_TAG_RECORDS
        assert r.tags.refs() == [REF]
        assert r.inventory.last_uses([f"tag:{REF}"]) == {f"tag:{REF}": 1009.0}
        assert r.tags.delete(REF) is True and r.tags.records(REF) == {}
        assert r.tags.refs() == [] and r.inventory.last_uses([f"tag:{REF}"]) == {}

    go(*records_on_nodes(1))


def test_concurrent_tag_records_from_several_nodes_are_all_kept(records_on_nodes: RecordsOnNodes) -> None:
    """Three nodes record six Accept lists of one tag at once: the optimistic transaction loses none."""

    def go(*nodes: SharedRedis) -> None:
        def put(i: int) -> None:
            nodes[i % 3].tags.put(REF, (f"type-{i}",), record("sha256:" + "a" * 64, 2000.0 + i))

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(put, range(6)))
        assert sorted(nodes[0].tags.records(REF)) == [f"type-{i}" for i in range(6)]

    go(*records_on_nodes(3))


def test_pins_seen_pairs_usage_and_nodes(records_on_nodes: RecordsOnNodes) -> None:
    def go(a: SharedRedis, b: SharedRedis) -> None:
        a.pins.pin(REF, "sha256:" + "a" * 64)
        assert b.pins.pins() == {str(REF): "sha256:" + "a" * 64}
        assert b.pins.unpin(REF) is True and a.pins.unpin(REF) is False and a.pins.pins() == {}

        digests = [f"sha256:{i:064x}" for i in range(1200)]  # more than one batch
        a.seen.mark("docker.io/library/alpine", digests)
        assert b.seen.is_seen("docker.io/library/alpine", digests[1100])
        assert not b.seen.is_seen("docker.io/library/other", digests[0])
        assert len(b.seen.pairs()) == 1200
        b.seen.forget([("docker.io/library/alpine", d) for d in digests[:1000]])
        assert sorted(a.seen.pairs()) == [("docker.io/library/alpine", d) for d in digests[1000:]]

        a.usage.add({"hits": 3, "bytes_served": 100})
        b.usage.add({"hits": 2, "misses": 1})
        a.usage.add({})
        assert b.usage.totals() == {"hits": 5, "bytes_served": 100, "misses": 1}
        assert a.usage.per_node() == {"node-a": {"hits": 3, "bytes_served": 100},
                                            "node-b": {"hits": 2, "misses": 1}}  # fmt: skip

        a.nodes.heartbeat({"blob_url": "http://a:5080"}, started=100.0, now=150.0)
        b.nodes.heartbeat({"blob_url": "http://b:5080"}, started=120.0, now=160.0)
        a.nodes.heartbeat({"blob_url": "http://a:5080"}, started=100.0, now=170.0)
        assert [(n.node, n.urls["blob_url"], n.started, n.last_seen) for n in b.nodes.nodes()] == [
            ("node-a", "http://a:5080", 100.0, 170.0), ("node-b", "http://b:5080", 120.0, 160.0)]  # fmt: skip
        a.nodes.forget("node-b")
        assert [n.node for n in a.nodes.nodes()] == ["node-a"]
        a.check()

    go(*records_on_nodes(2))


def test_the_inventory_counts_each_object_once_and_last_uses_only_move_forward(
    records_on_nodes: RecordsOnNodes,
) -> None:
    def go(a: SharedRedis, b: SharedRedis) -> None:
        a.inventory.added("blob:x", 1000, when=10.0)
        b.inventory.added("blob:x", 1000, when=5.0)  # a second node uploaded it too
        a.inventory.added("manifest:y", 50, when=20.0)
        a.inventory.added("blob:z", 7, when=30.0)
        assert b.inventory.totals() == (3, 1057)
        assert a.inventory.sizes(["blob:x", "blob:nope"]) == {"blob:x": 1000}
        a.inventory.record_uses({"blob:x": 40.0, "manifest:y": 15.0, "blob:unknown": 50.0})
        assert b.inventory.last_uses(["blob:x", "manifest:y", "blob:unknown"]) == {
            "blob:x": 40.0, "manifest:y": 20.0}  # fmt: skip
        assert b.inventory.least_recent(10) == [("manifest:y", 20.0), ("blob:z", 30.0), ("blob:x", 40.0)]
        assert b.inventory.least_recent(10, before=30.0) == [("manifest:y", 20.0)]
        assert b.inventory.least_recent(1) == [("manifest:y", 20.0)]
        assert a.inventory.forget(["blob:x", "blob:never"]) == 1000
        assert b.inventory.forget(["blob:x"]) == 0
        assert a.inventory.totals() == (2, 57)

    go(*records_on_nodes(2))


# -- Redis: leases and fill progress ------------------------------------------------------------------------


def test_one_holder_among_concurrent_acquirers(on_nodes: OnNodes) -> None:
    """Twelve acquisitions from three nodes at once: exactly one lease; everyone reads the same holder."""

    async def go(*nodes: SharedRedis) -> None:
        name = "blob:sha256:" + "c" * 64
        got = await asyncio.gather(*(
            nodes[i % 3].leases.acquire(name, 5, url=f"http://node-{'abc'[i % 3]}/fill/{i}") for i in range(12)
        ))  # fmt: skip
        leases = [lease for lease in got if lease is not None]
        assert len(leases) == 1
        holder = leases[0].holder
        assert holder.url is not None and holder.url.startswith(f"http://{holder.node}/fill/")
        assert {await node.leases.holder(name) for node in nodes} == {holder}

    on_nodes(go, 3)


def test_only_the_holder_renews_or_releases_and_an_expired_lease_is_handed_over(
    on_nodes: OnNodes,
) -> None:
    async def go(a: SharedRedis, b: SharedRedis) -> None:
        name = "manifest:sha256:" + "d" * 64
        first = await a.leases.acquire(name, 0.3, url="http://a/fill")
        assert first is not None and await b.leases.acquire(name, 0.3) is None
        assert await first.renew() is True
        while await b.leases.holder(name) is not None:  # the expiry Redis enforces
            await asyncio.sleep(0.02)
        second = await b.leases.acquire(name, 5, url="http://b/fill")
        assert second is not None and second.token != first.token
        assert await first.renew() is False and await first.release() is False  # not a's any more
        assert await a.leases.holder(name) == second.holder
        assert await second.release() is True and await a.leases.holder(name) is None
        assert await second.release() is False
        lock = await a.leases.acquire(SWEEP_LOCK, 5)
        assert lock is not None and await b.leases.acquire(SWEEP_LOCK, 5) is None and await lock.release()

    on_nodes(go, 2)


def test_a_kept_lease_outlives_its_time_and_knows_when_it_is_lost(on_nodes: OnNodes) -> None:
    """`kept` renews a 0.3 s lease for a second and releases it after; when another node has taken it
    over (here: after its key was removed), `lost` is set and the new holder's lease is left alone."""

    async def go(a: SharedRedis, b: SharedRedis) -> None:
        lease = await a.leases.acquire("fill-x", 0.3)
        assert lease is not None
        async with lease.kept():
            await asyncio.sleep(1.0)
            assert await b.leases.holder("fill-x") == lease.holder and not lease.lost.is_set()
        assert await b.leases.holder("fill-x") is None

        lease = await a.leases.acquire("fill-y", 0.3)
        assert lease is not None
        async with lease.kept():
            a.client.delete(a.keys.lease("fill-y"))
            other = await b.leases.acquire("fill-y", 5)
            await asyncio.wait_for(lease.lost.wait(), 2)
        assert other is not None and await b.leases.holder("fill-y") == other.holder

    on_nodes(go, 2)


def test_a_kept_lease_publishes_its_url_anew_at_every_renewal(on_nodes: OnNodes) -> None:
    """A fill URL is short-lived: the lease signs it anew each renewal, so a late follower reads a
    fresh one; the release still finds the lease (its value changed)."""

    async def go(a: SharedRedis, b: SharedRedis) -> None:
        made = iter(range(1000))
        lease = await a.leases.acquire("fill-z", 0.3, url=lambda: f"http://a/fill?n={next(made)}")
        assert lease is not None and lease.holder.url == "http://a/fill?n=0"
        async with lease.kept():
            await asyncio.sleep(0.5)  # a renewal every 0.1 s
            seen = await b.leases.holder("fill-z")
            assert seen is not None and seen.url not in (None, "http://a/fill?n=0") and seen.token == lease.token
        assert await b.leases.holder("fill-z") is None and not lease.lost.is_set()

    on_nodes(go, 2)


def test_a_late_follower_sees_every_fill_event(on_nodes: OnNodes) -> None:
    """Progress published before a follower joins is not lost (a stream, not pub/sub); the follower ends
    after `done`; a quiet fill raises FillStalled; a failed fill ends with its reason."""

    async def go(holder: SharedRedis, follower: SharedRedis) -> None:
        token = uuid.uuid4().hex
        for size in (MiB, 2 * MiB):
            await holder.fills.publish(token, FillEvent(size))

        async def follow() -> list[FillEvent]:
            return [event async for event in follower.fills.follow(token, stall_seconds=5)]

        following = asyncio.create_task(follow())
        await asyncio.sleep(0.1)  # the follower is blocked in XREAD by now
        await holder.fills.publish(token, FillEvent(3 * MiB, done=True, digest="sha256:abc"))
        seen = await asyncio.wait_for(following, 5)
        assert seen == [FillEvent(MiB), FillEvent(2 * MiB), FillEvent(3 * MiB, done=True, digest="sha256:abc")]
        assert [e async for e in follower.fills.follow(token, stall_seconds=1)] == seen  # and again, all of it

        quiet = uuid.uuid4().hex
        await holder.fills.publish(quiet, FillEvent(10))
        began = time.monotonic()
        with pytest.raises(FillStalled):
            [e async for e in follower.fills.follow(quiet, stall_seconds=0.6)]
        assert 0.5 < time.monotonic() - began < 2

        failed = uuid.uuid4().hex
        await holder.fills.publish(failed, FillEvent(10, failed="upstream cut the body"))
        assert [e.failed async for e in follower.fills.follow(failed, 1)] == ["upstream cut the body"]

        for i in range(300):
            await holder.fills.publish(quiet, FillEvent(i))
        key = holder.keys.fill(quiet)
        assert holder.client.xlen(key) < 250  # capped (MAXLEN ~ 100)
        assert 3500 < holder.client.ttl(key) <= 3600

    on_nodes(go, 2)


# -- Redis: access records, the same semantics as on disk ----------------------------------------------------------


@pytest.fixture(params=["disk", pytest.param("redis", marks=pytest.mark.shared_store)])
def access_records(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], AccessRecords]:
    """`open()`: the access records (a new handle each time, as after a restart), on disk or in Redis."""
    if request.param == "disk":
        return lambda: DiskAccessRecords(tmp_path)
    settings = redis_settings(request.getfixturevalue("redis_server"))
    return lambda: RedisAccessRecords(settings, ACCESS_SECRET)


def test_access_records_keep_what_they_should_across_reopening(access_records: Callable[[], AccessRecords]) -> None:
    records = access_records()
    secret = records.secret()
    assert len(secret) >= 32 and records.secret() == secret
    now = time.time()
    records.put_grant("basic:a", "docker.io/library/x", Grant(now, now + 3600))
    records.put_grant(ANONYMOUS, "docker.io/library/p", Grant(now, None))
    records.put_token("bearer:t", TokenRecord("basic:a", now + 60, ("docker.io/library/x",)))
    records.put_token("bearer:old", TokenRecord("basic:a", now - 1))
    records.add_realm("https://auth.docker.io/token")
    records.add_realm("https://auth.docker.io/token")
    records.put_challenge("registry-1.docker.io", 'Bearer realm="https://auth.docker.io/token"')
    records.close()

    again = access_records()
    assert again.secret() == secret
    assert again.grant("basic:a", "docker.io/library/x") == Grant(now, now + 3600)
    assert again.grant("basic:a", "docker.io/library/y") is None
    assert again.holds_grants("basic:a") and not again.holds_grants("basic:b")
    assert again.grant(ANONYMOUS, "docker.io/library/p") == Grant(now, None)
    assert not again.holds_grants(ANONYMOUS)  # "readable anonymously" is nobody's grant
    assert again.token("bearer:t") == TokenRecord("basic:a", now + 60, ("docker.io/library/x",))
    assert again.token("bearer:old") is None
    assert again.realms() == {"https://auth.docker.io/token"}
    assert again.challenges() == {"registry-1.docker.io": 'Bearer realm="https://auth.docker.io/token"'}
    again.drop_grant("basic:a", "docker.io/library/x")
    again.drop_grant("basic:a", "docker.io/library/never")
    assert again.grant("basic:a", "docker.io/library/x") is None
    again.put_challenge("registry-1.docker.io", None)
    again.put_challenge("never.example", None)
    assert again.challenges() == {}
    again.close()


def test_access_records_expire_as_on_disk(access_records: Callable[[], AccessRecords]) -> None:
    """Grants and tokens are gone when they expire; an identity holds grants until its latest grant
    expires; a grant put with an expiry already past removes the one there was."""
    records = access_records()
    now = time.time()
    records.put_grant("basic:a", "r/short", Grant(now, now + 0.4))
    records.put_grant("basic:a", "r/long", Grant(now, now + 3600))
    records.put_grant("basic:a", "r/shorter", Grant(now, now + 0.2))  # does not shorten `held`
    records.put_grant("basic:b", "r/short", Grant(now, now + 0.4))
    records.put_token("bearer:short", TokenRecord("basic:a", now + 0.4))
    deadline = time.monotonic() + 5
    while records.grant("basic:a", "r/short") is not None:  # the store's own expiry
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert records.token("bearer:short") is None
    assert records.grant("basic:a", "r/long") == Grant(now, now + 3600)
    assert records.holds_grants("basic:a")
    while records.holds_grants("basic:b"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    records.put_grant("basic:a", "r/long", Grant(now, now - 1))
    assert records.grant("basic:a", "r/long") is None
    records.close()


def test_redis_access_records_are_one_set_for_the_cluster(redis_server: Redis) -> None:
    """Two nodes (two clients) share the configured secret, so identities hash alike, and see each
    other's grants; another prefix is another cluster. The secret is nowhere in Redis."""
    settings = redis_settings(redis_server)
    a, b = RedisAccessRecords(settings, ACCESS_SECRET), RedisAccessRecords(settings, ACCESS_SECRET)
    other = RedisAccessRecords(replace(settings, prefix=settings.prefix + "other:"), ACCESS_SECRET)
    assert a.secret() == b.secret() == ACCESS_SECRET
    a.put_grant("basic:a", "docker.io/library/x", Grant(time.time(), time.time() + 60))
    assert b.holds_grants("basic:a") and not other.holds_grants("basic:a")
    client = redis_client.Redis.from_url(redis_server.url)
    stored = [client.dump(key) or b"" for key in client.scan_iter(f"{settings.prefix}*")]
    assert stored and not any(ACCESS_SECRET in value for value in stored)
    assert not client.exists(f"{settings.prefix}access:secret")
    client.close()
    for one in (a, b, other):
        one.close()


def test_a_revocation_redis_missed_is_owed_to_it_across_a_restart(redis_server: Redis, tmp_path: Path) -> None:
    """A grant dropped while Redis is down reads as absent at once, stays owed across the node's
    restart (kept on its disk), and is deleted from Redis by the first call once Redis is back,
    so no node serves the grant Redis still held."""
    settings = redis_settings(redis_server)
    held = Grant(time.time(), time.time() + 3600)

    def node() -> ClusterAccessRecords:
        return ClusterAccessRecords(RedisAccessRecords(settings, ACCESS_SECRET, Breaker("Redis", RedisUnavailable, 0)),
                                    DiskAccessRecords(tmp_path))  # fmt: skip

    records = node()
    records.put_grant("basic:a", "r/x", held)
    redis_server.stop()
    records.drop_grant("basic:a", "r/x")  # Redis missed it
    assert records.grant("basic:a", "r/x") is None
    records.close()
    redis_server.start()
    other = RedisAccessRecords(settings, ACCESS_SECRET)  # another node, or a Redis that kept its data
    other.put_grant("basic:a", "r/x", held)
    other.put_grant("basic:a", "r/y", held)

    again = node()  # restarted
    assert again.grant("basic:a", "r/x") is None
    assert other.grant("basic:a", "r/x") is None  # paid: gone from Redis
    assert again.grant("basic:a", "r/y") == held  # only what was revoked
    assert DiskAccessRecords(tmp_path).pending_drops() == set()  # nothing owed any more
    again.close()
    other.close()


# -- Redis: failures --------------------------------------------------------------------------------------------


def test_redis_down_or_hung_fails_fast_with_one_exception(
    redis_server: Redis, on_nodes: OnNodes, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped: every kind of call raises RedisUnavailable (a SharedUnavailable, an OSError) at once,
    asking Redis (a breaker that always asks) or not even that (a breaker open after the first failure;
    the access records share it); hung (SIGSTOP): after the socket timeout (0.5 s here), then at once;
    back, the same clients work. One warning per outage per breaker.
    Measured: stopped < 5 ms, hung 0.50 s."""
    caplog.set_level(logging.INFO, logger="regcache")

    def calls(r: SharedRedis) -> list[Callable[[], object]]:
        """The records' calls are blocking, the leases' and fills' coroutines (`settled` runs either)."""

        async def follow() -> None:
            async for _ in r.fills.follow("t", stall_seconds=5):
                pass

        return [
            lambda: r.tags.records(REF), lambda: r.tags.put(REF, ("a",), record("sha256:" + "a" * 64, 1.0)),
            lambda: r.pins.pins(), lambda: r.seen.is_seen("x", "y"), lambda: r.usage.add({"hits": 1}),
            lambda: r.inventory.record_uses({"blob:x": 1.0}), lambda: r.inventory.added("blob:x", 1),
            lambda: r.leases.acquire("x", 1), lambda: r.leases.holder("x"), follow,
            lambda: r.fills.publish("t", FillEvent(1)), lambda: r.nodes.nodes(), r.check,
        ]  # fmt: skip

    async def settled(call: Callable[[], object]) -> object:
        result = call()
        return await result if inspect.isawaitable(result) else result

    async def all_fail(r: SharedRedis, limit: float) -> float:
        slowest = 0.0
        for call in calls(r):
            began = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await settled(call)
            slowest = max(slowest, time.monotonic() - began)
        assert slowest < limit, f"slowest failure took {slowest:.3f} s"
        return slowest

    async def until_works(call: Callable[[], object]) -> object:
        deadline = time.monotonic() + 5
        while True:
            try:
                return await settled(call)
            except RedisUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)  # the breaker's window

    async def go(asking: SharedRedis) -> tuple[float, float]:
        asking.breaker.retry_after = 0  # asks Redis every time
        r = SharedRedis(asking.settings, "node-b", retry_after=0.5)
        records = RedisAccessRecords(r.settings, ACCESS_SECRET, breaker=r.breaker)
        r.tags.put(REF, ("a",), record("sha256:" + "a" * 64, 1.0))
        redis_server.stop()
        down = await all_fail(asking, 0.5)
        await all_fail(r, 0.5)  # the first asks, the others are not tried
        with pytest.raises(RedisUnavailable, match="not tried"):
            r.pins.pins()
        for sync_call in (lambda: records.grant("i", "r"), records.realms):
            fails_within(0.2, OSError, sync_call)
        redis_server.start()
        assert await until_works(lambda: r.tags.records(REF)) == {}  # a restarted bed Redis is empty
        assert records.realms() == set()
        pid = redis_server.pid or 0
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(RedisUnavailable):
                r.pins.pins()
            hung = time.monotonic() - began
            assert 0.4 < hung < 1.5
            fails_within(0.2, RedisUnavailable, records.realms)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await until_works(r.pins.pins) == {}
        assert asking.pins.pins() == {}
        records.close()
        await r.aclose()
        return down, hung

    down, hung = on_nodes(go)
    assert outage_lines(caplog, "Redis") == (3, 3)  # the asking breaker's outage, and r's two
    print(f"Redis down detected in {down * 1000:.1f} ms, hung in {hung:.2f} s")
