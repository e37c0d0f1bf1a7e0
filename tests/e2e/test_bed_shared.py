"""Tests of the shared store's test bed and of the clients the product will use on it.

The engines are real: a single-node Ceph 16.2.15 with radosgw (:mod:`bed.ceph`)
and Debian's redis-server 7.0 (:mod:`bed.redis`). The first tests check the
bed itself with its own SigV4 client (:mod:`bed.s3`); the others pin down
behaviour of **obstore** (S3) and **redis.asyncio** (Redis) that the shared
store relies on (regcache/store/shared/s3.py, regcache/store/shared/redis.py and their tests in
tests/e2e/test_shared_backends.py build on what is pinned here).

Measured here (2 cores, Python 3.11, obstore 0.12.1, aiobotocore 3.10.0,
redis-py 8.1.0, Ceph 16.2.15, redis-server 7.0.15), numbers the tests below
only bound loosely:

* Ceph: start-up and memory in :mod:`bed.ceph`; after ~600 MB written and
  deleted, OSD 520 MB and radosgw 215 MB RSS. redis-server starts in 0.02 s,
  11 MB.
* 200 MB streamed from an async iterator: obstore ``put_async`` goes
  multipart by itself (5 MiB parts, 12 in flight), 1.5 s, peak RSS +65 MB;
  ``open_writer_async`` fed 64 KiB writes (8 MiB buffer, 4 in flight) 1.8 s,
  +40 MB. aiobotocore multipart by hand (8 MiB parts, one at a time) 2.0 s,
  +31 MB; its import alone costs 38 MB more than obstore's. A streamed GET
  back: 0.34 s (obstore), 0.38 s (aiobotocore). curl on a presigned URL:
  ~890 MB/s, digest intact.
* Create-if-absent: radosgw 16 honours ``If-None-Match: *`` on a plain PUT
  (412), so obstore ``mode="create"`` raises ``AlreadyExistsError``; but
  obstore sends ``mode="create"`` as one PUT and holds the whole body in
  memory (200 MB: peak +212 MB), and radosgw ignores ``If-None-Match`` on
  CompleteMultipartUpload (the second upload replaces the object). So a
  streamed blob cannot be created atomically-if-absent; content-addressed
  blobs do not need it (two writers write the same bytes).
* Failed uploads: an exception from obstore's source iterator or inside
  ``open_writer_async`` aborts the multipart upload (nothing left). A
  *cancelled* ``put_async`` or a killed uploader leaves an incomplete upload:
  invisible to GET/HEAD/ListObjects, listed only by ListMultipartUploads
  (key, upload id, initiated time) and holding its parts until aborted.
* radosgw stopped: obstore with default retries fails after 3.4 s (10
  retries) with ``GenericError``; with ``max_retries=1`` in 0.1 s.
  aiobotocore defaults: ``EndpointConnectionError`` after 10.5 s; with one
  attempt 0.7 s. radosgw hung (SIGSTOP): obstore with ``timeout=5s`` fails
  after 5.0 s; aiobotocore with ``read_timeout=5`` after 10.2 s. Presigning
  needs no server (0 ms in both). Both recover on the next request after a
  restart.
* Redis stopped: ``ConnectionError`` at once (< 1 ms); hung (SIGSTOP):
  ``TimeoutError`` after ``socket_timeout`` (redis-py 8 defaults it to 5 s;
  set it explicitly). The same client reconnects after a restart.
* Proxies: obstore and aiobotocore both send loopback requests through
  ``HTTP_PROXY`` from the environment; for obstore only ``NO_PROXY`` stops
  that (``proxy_excludes`` needs a ``proxy_url``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bed import client
from bed.ceph import COMMANDS, Ceph, CephError
from bed.redis import Redis, ping
from bed.s3 import S3
from bed.shared_fixtures import skip_unless_installed

from regcache.store.shared.leases import RELEASE_SCRIPT, RENEW_SCRIPT

MiB = 1 << 20


# -- helpers -------------------------------------------------------------------


def _listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on (from ``ss``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def _peak_rss_reset() -> None:
    """Start measuring this process's peak RSS afresh (Linux: clear_refs 5 resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _chunk(i: int, size: int = MiB) -> bytes:
    """Deterministic, incompressible test data."""
    return hashlib.sha256(str(i).encode()).digest() * (size // 32)


async def _source(
    count: int, digest: Any = None, *, fail_at: int | None = None, delay: float = 0
) -> AsyncIterator[bytes]:
    """``count`` MiB, one MiB at a time, as a fill would stream them; raises at chunk ``fail_at``."""
    for i in range(count):
        if i == fail_at:
            raise RuntimeError("upstream cut the body")
        data = _chunk(i)
        if digest is not None:
            digest.update(data)
        if delay:
            await asyncio.sleep(delay)
        yield data


def _curl(url: str, *args: str) -> tuple[int, bytes]:
    """``curl`` (no proxy) the URL: HTTP status and body."""
    done = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "-o", "-", "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        check=True,
        timeout=60,
    )
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def arun(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    """``await fn(*args, **kwargs)`` in a new event loop (obstore's calls need a running loop when called)."""

    async def main() -> Any:
        return await fn(*args, **kwargs)

    return asyncio.run(main())


def _prefix() -> str:
    return uuid.uuid4().hex


# -- the Ceph bed ----------------------------------------------------------------


def test_ceph_serves_s3_on_loopback_only(ceph: Ceph) -> None:
    """The bucket exists, objects round-trip with their bytes, and every daemon listens on 127.0.0.1 only."""
    key = f"/{ceph.bucket}/{_prefix()}/hello"
    assert ceph.s3.request("PUT", key, body=b"hello").status == 200
    r = ceph.s3.request("GET", key)
    assert (r.status, r.body) == (200, b"hello")
    assert client.request("GET", f"{ceph.endpoint}{key}").status == 403  # unsigned: refused
    pids = ceph.pids()
    assert set(pids) == {"mon", "osd", "rgw"}
    for name, pid in pids.items():
        addrs = _listening(pid)
        assert addrs, name
        assert all(a.startswith("127.0.0.1:") for a in addrs), (name, addrs)
    assert f"127.0.0.1:{ceph.ports.rgw}" in _listening(pids["rgw"])


def test_ceph_access_log_records_s3_requests(ceph: Ceph) -> None:
    key = f"/{ceph.bucket}/{_prefix()}/counted"
    mark = ceph.mark()
    ceph.s3.request("PUT", key, body=b"x")
    ceph.s3.request("GET", key)
    ceph.s3.request("HEAD", f"/{ceph.bucket}/{_prefix()}/missing")
    deadline = time.monotonic() + 5
    while len(records := ceph.requests(mark)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # radosgw logs just after answering; nothing to wait on but the log
    assert [(r.method, r.path, r.status, r.user) for r in records[:2]] == [
        ("PUT", key, 200, "bed"),
        ("GET", key, 200, "bed"),
    ]
    assert (records[2].method, records[2].status) == ("HEAD", 404)


def test_radosgw_stop_and_start_keep_objects(ceph: Ceph) -> None:
    """Fault tests stop radosgw alone: the endpoint refuses connections; after a start the objects are there."""
    key = f"/{ceph.bucket}/{_prefix()}/kept"
    assert ceph.s3.request("PUT", key, body=b"kept").status == 200
    mon_osd = {k: v for k, v in ceph.pids().items() if k != "rgw"}
    ceph.stop_radosgw()
    assert not ceph.rgw_running
    with pytest.raises(OSError, match="Connection refused"):
        ceph.s3.request("GET", key, timeout=2)
    assert ceph.osd_up()
    began = time.monotonic()
    ceph.start_radosgw()
    assert time.monotonic() - began < 10
    assert ceph.s3.request("GET", key).body == b"kept"
    assert {k: v for k, v in ceph.pids().items() if k != "rgw"} == mon_osd


@pytest.mark.shared_store
def test_ceph_starts_quickly_and_cleans_up(tmp_path: Path) -> None:
    """A cluster of its own: ready in well under a minute; closing ends every daemon and deletes its data."""
    skip_unless_installed(COMMANDS)
    cluster = Ceph(tmp_path / "ceph", store_bytes=256 * MiB, bucket="own")
    try:
        cluster.start(timeout=45)
        assert cluster.startup_seconds is not None and cluster.startup_seconds < 30
        assert cluster.s3.list_keys("own") == {}
        pids = cluster.pids()
    finally:
        cluster.close()
    assert not [pid for pid in pids.values() if Path(f"/proc/{pid}").exists()]
    assert sorted(p.name for p in (tmp_path / "ceph").iterdir()) == ["ceph.conf", "log"]


@pytest.mark.shared_store
def test_ceph_start_gives_up_on_a_bad_cluster(tmp_path: Path) -> None:
    """A start that cannot succeed (the monitor's port is taken) fails within its timeout, stopping what it started."""
    skip_unless_installed(("ceph-mon", "monmaptool"))
    cluster = Ceph(tmp_path / "ceph")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", cluster.ports.mon))
        blocker.listen()
        began = time.monotonic()
        with pytest.raises(CephError, match="not ready after"):
            cluster.start(timeout=3)
    assert time.monotonic() - began < 15
    assert cluster.pids() == {}


# -- the Redis bed ----------------------------------------------------------------


def test_redis_stop_and_start(redis_server: Redis) -> None:
    """Fault tests stop Redis: connections are refused; after a start it answers again, empty."""
    assert ping(redis_server.port) is True
    assert _listening(redis_server.pid or 0) == [f"127.0.0.1:{redis_server.port}"]
    redis_server.stop()
    assert "refused" in str(ping(redis_server.port)).lower()
    redis_server.start()
    assert ping(redis_server.port) is True


def test_skip_names_missing_packages() -> None:
    with pytest.raises(pytest.skip.Exception, match=r"needs no-such-tool-i16 .*scripts/test installs them"):
        skip_unless_installed(("no-such-tool-i16",))


# -- obstore on radosgw --------------------------------------------------------------


@pytest.fixture
def obstore() -> Any:
    return pytest.importorskip("obstore")


def _store(ceph: Ceph, *, retries: int | None = None, **client_options: object) -> Any:
    """An obstore ``S3Store`` on the bed's bucket (path-style, plain http)."""
    from obstore.store import S3Store

    retry: dict[str, object] = {}
    if retries is not None:
        retry = {"max_retries": retries, "retry_timeout": timedelta(seconds=2)}
    return S3Store(
        ceph.bucket,
        endpoint=ceph.endpoint,
        region=ceph.region,
        access_key_id=ceph.access_key,
        secret_access_key=ceph.secret_key,
        client_options={"allow_http": True, **client_options},
        retry_config=retry or None,
    )


async def _get_bytes(obstore: Any, store: Any, key: str) -> bytes:
    result = await obstore.get_async(store, key)
    return bytes(await result.bytes_async())


def _gone(s3: S3, bucket: str, prefix: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Objects and incomplete multipart uploads under ``prefix``: the bed's ground truth."""
    return s3.list_keys(bucket, prefix), s3.multipart_uploads(bucket, prefix)


def test_obstore_streamed_put_goes_multipart_in_bounded_memory(ceph: Ceph, obstore: Any) -> None:
    """200 MB from an async iterator: uploaded in parts without holding the body; read back intact, streamed.

    Measured: 1.5 s up, peak RSS +65 MB (5 MiB parts, 12 in flight); 0.34 s down.
    ``mode="create"`` on the same stream: one PUT, peak +212 MB (the whole body).
    """
    store, key = _store(ceph), f"{_prefix()}/big"
    sent = hashlib.sha256()
    _peak_rss_reset()
    before = _status_kb("VmRSS")
    arun(obstore.put_async, store, key, _source(200, sent), chunk_size=5 * MiB, max_concurrency=12)
    grew_mb = (_status_kb("VmHWM") - before) // 1024
    assert grew_mb < 150, f"peak RSS grew {grew_mb} MB for a 200 MB upload"
    meta = arun(obstore.head_async, store, key)
    assert meta["size"] == 200 * MiB
    assert meta["e_tag"].strip('"').endswith("-40"), meta  # a multipart ETag: 40 parts of 5 MiB

    async def read_back() -> str:
        got = hashlib.sha256()
        result = await obstore.get_async(store, key)
        async for data in result.stream(min_chunk_size=MiB):
            got.update(data)
        return got.hexdigest()

    assert asyncio.run(read_back()) == sent.hexdigest()
    arun(obstore.delete_async, store, key)


def test_obstore_create_if_absent_refuses_a_second_put(ceph: Ceph, obstore: Any) -> None:
    """radosgw honours ``If-None-Match: *`` on PUT: obstore's ``mode="create"`` raises and the first bytes stay."""
    from obstore.exceptions import AlreadyExistsError

    store, key = _store(ceph), f"{_prefix()}/once"
    arun(obstore.put_async, store, key, b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        arun(obstore.put_async, store, key, b"second", mode="create")
    assert arun(_get_bytes, obstore, store, key) == b"first"
    raw = ceph.s3.request("PUT", f"/{ceph.bucket}/{key}", body=b"raw", headers={"If-None-Match": "*"})
    assert raw.status == 412 and b"PreconditionFailed" in raw.body


def test_radosgw_ignores_if_none_match_on_complete_multipart(ceph: Ceph) -> None:
    """radosgw 16 completes a multipart upload over an existing key despite ``If-None-Match: *``.

    What follows: a streamed (multipart) blob cannot be created if-absent on
    this engine; rely on content-addressed keys instead. If this test fails,
    the engine gained the check (newer Ceph does it).
    """
    s3, key = ceph.s3, f"/{ceph.bucket}/{_prefix()}/mp"
    assert s3.request("PUT", key, body=b"existing").status == 200
    init = s3.request("POST", key, {"uploads": ""})
    upload_id = init.body.split(b"<UploadId>")[1].split(b"</UploadId>")[0].decode()
    part = s3.request("PUT", key, {"partNumber": "1", "uploadId": upload_id}, body=b"replacement")
    etag = part.headers["ETag"]
    body = f"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part>"
    body += "</CompleteMultipartUpload>"
    done = s3.request("POST", key, {"uploadId": upload_id}, body=body.encode(), headers={"If-None-Match": "*"})
    assert done.status == 200, done.body
    assert s3.request("GET", key).body == b"replacement"


def test_obstore_failed_source_leaves_nothing(ceph: Ceph, obstore: Any) -> None:
    """An error from the source (upstream cut mid-body) aborts the multipart upload: no object, no upload left.

    Same for an exception inside ``open_writer_async``.
    """
    store, prefix = _store(ceph), _prefix()
    with pytest.raises(RuntimeError, match="upstream cut"):
        arun(obstore.put_async, store, f"{prefix}/iter", _source(30, fail_at=20))

    async def write_then_fail() -> None:
        async with obstore.open_writer_async(store, f"{prefix}/writer", buffer_size=5 * MiB) as w:
            for i in range(20):
                await w.write(_chunk(i))
            raise RuntimeError("upstream cut the body")

    with pytest.raises(RuntimeError, match="upstream cut"):
        asyncio.run(write_then_fail())
    assert _gone(ceph.s3, ceph.bucket, prefix) == ({}, [])


def test_obstore_cancelled_or_killed_upload_stays_incomplete(ceph: Ceph, obstore: Any, tmp_path: Path) -> None:
    """A cancelled ``put_async`` and a killed uploader leave an incomplete multipart upload behind.

    It is invisible to HEAD and ListObjects (no partial object is ever
    served) but holds its parts until someone aborts it: the product must
    abort uploads it cancels and sweep ones a crash left.
    """
    store, prefix = _store(ceph), _prefix()

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(obstore.put_async(store, f"{prefix}/cancelled", _source(100, delay=0.02)))
        while not ceph.s3.multipart_uploads(ceph.bucket, prefix):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # some parts uploaded
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    uploader = tmp_path / "uploader.py"
    uploader.write_text(_UPLOADER)
    argv = [str(uploader), ceph.endpoint, ceph.bucket, f"{prefix}/killed", ceph.access_key, ceph.secret_key]
    proc = subprocess.Popen([sys.executable, *argv])
    try:
        deadline = time.monotonic() + 20
        while len(ceph.s3.multipart_uploads(ceph.bucket, prefix)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # some parts uploaded
        assert proc.poll() is None, "the uploader died before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    objects, uploads = _gone(ceph.s3, ceph.bucket, prefix)
    assert objects == {}
    assert sorted(k for k, _ in uploads) == [f"{prefix}/cancelled", f"{prefix}/killed"]
    with pytest.raises(FileNotFoundError):
        arun(obstore.head_async, store, f"{prefix}/killed")
    for key, upload_id in uploads:
        ceph.s3.abort_upload(ceph.bucket, key, upload_id)
    assert _gone(ceph.s3, ceph.bucket, prefix) == ({}, [])


# Run as a separate process, then killed: an uploader that dies mid-upload.
_UPLOADER = """
import asyncio, sys
import obstore
from obstore.store import S3Store

endpoint, bucket, key, access, secret = sys.argv[1:]
store = S3Store(bucket, endpoint=endpoint, region="us-east-1", access_key_id=access, secret_access_key=secret,
                client_options={"allow_http": True})

async def slow():
    for i in range(1000):
        await asyncio.sleep(0.02)
        yield bytes([i % 256]) * (1 << 20)

async def main():
    await obstore.put_async(store, key, slow())

asyncio.run(main())
"""


def test_obstore_presigned_get_serves_bytes_and_range(ceph: Ceph, obstore: Any) -> None:
    """A presigned GET (what a blob hit's 307 would point at) serves the exact bytes to curl, and Range → 206."""
    store, key = _store(ceph), f"{_prefix()}/blob"
    data = b"".join(_chunk(i) for i in range(8))
    arun(obstore.put_async, store, key, data)
    url = arun(obstore.sign_async, store, "GET", key, timedelta(minutes=20))
    assert url.startswith(f"{ceph.endpoint}/{ceph.bucket}/{key}?") and "X-Amz-Signature=" in url
    status, body = _curl(url)
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    status, body = _curl(url, "-H", "Range: bytes=100-199")
    assert (status, body) == (206, data[100:200])
    status, _ = _curl(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
    assert status == 403


def test_obstore_head_list_delete(ceph: Ceph, obstore: Any) -> None:
    """HEAD gives size, listing gives keys under a prefix, DELETE is idempotent; a missing key raises the
    builtin ``FileNotFoundError`` (not ``obstore.exceptions.NotFoundError``, which is no base of it)."""
    from obstore.exceptions import BaseError, NotFoundError

    store, prefix = _store(ceph), _prefix()
    for name, size in (("a", 3), ("b/c", 5)):
        arun(obstore.put_async, store, f"{prefix}/{name}", b"x" * size)
    assert arun(obstore.head_async, store, f"{prefix}/b/c")["size"] == 5
    listed = arun(obstore.list(store, prefix=prefix).collect_async)
    assert sorted((m["path"], m["size"]) for m in listed) == [(f"{prefix}/a", 3), (f"{prefix}/b/c", 5)]
    arun(obstore.delete_async, store, f"{prefix}/a")
    arun(obstore.delete_async, store, f"{prefix}/a")  # already gone: no error
    with pytest.raises(FileNotFoundError) as missing:
        arun(obstore.head_async, store, f"{prefix}/a")
    assert not isinstance(missing.value, (NotFoundError, BaseError))
    assert ceph.s3.list_keys(ceph.bucket, prefix) == {f"{prefix}/b/c": 5}


def test_obstore_fails_fast_when_radosgw_is_down(ceph: Ceph, obstore: Any) -> None:
    """radosgw stopped: a store with one retry raises ``GenericError`` in well under a second; presigning
    needs no server; hung (SIGSTOP): the request gives up after the client's ``timeout``; both recover.

    Measured: stopped 0.10 s (default retries: 3.4 s, 10 retries); hung with timeout=1s: 1.0 s.
    """
    from obstore.exceptions import GenericError

    store, key = _store(ceph, retries=1, connect_timeout="1s", timeout="1s"), f"{_prefix()}/k"
    arun(obstore.put_async, store, key, b"v")

    def fails_within(limit: float) -> None:
        began = time.monotonic()
        with pytest.raises(GenericError):
            arun(obstore.head_async, store, key)
        assert time.monotonic() - began < limit

    ceph.stop_radosgw()
    fails_within(1.0)
    assert arun(obstore.sign_async, store, "GET", key, timedelta(minutes=5)).startswith(ceph.endpoint)
    ceph.start_radosgw()
    assert arun(obstore.head_async, store, key)["size"] == 1
    rgw = ceph.pids()["rgw"]
    os.kill(rgw, signal.SIGSTOP)
    try:
        fails_within(4.0)
    finally:
        os.kill(rgw, signal.SIGCONT)
    assert arun(obstore.head_async, store, key)["size"] == 1


# -- redis.asyncio on redis-server ------------------------------------------------------

# The product's scripts (regcache/store/shared/leases.py): extend or delete a lease only while we still hold
# it (compare-and-set): a lease that expired and was taken by another node must not be extended by
# its former holder.
RENEW, RELEASE = RENEW_SCRIPT, RELEASE_SCRIPT


@pytest.fixture
def aredis() -> Any:
    return pytest.importorskip("redis.asyncio")


def _redis_client(aredis: Any, server: Redis, timeout: float = 1.0) -> Any:
    return aredis.Redis.from_url(server.url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _run_with(aredis: Any, server: Redis, body: Callable[[Any], Any], timeout: float = 1.0) -> Any:
    """``body(client)`` on a fresh client in its own event loop; the client is closed after."""

    async def main() -> Any:
        r = _redis_client(aredis, server, timeout)
        try:
            return await body(r)
        finally:
            await r.aclose()

    return asyncio.run(main())


def test_redis_lease_set_nx_px_with_cas_renewal(redis_server: Redis, aredis: Any) -> None:
    """SET NX PX gives one holder; only the holder renews or releases; an expired lease can be taken over."""
    key, a, b = f"lease:{_prefix()}", "node-a", "node-b"

    async def body(r: Any) -> None:
        renew, release = r.register_script(RENEW), r.register_script(RELEASE)
        assert await r.set(key, a, nx=True, px=300) is True
        assert await r.set(key, b, nx=True, px=300) is None
        assert await renew(keys=[key], args=[b, 300]) == 0
        assert await renew(keys=[key], args=[a, 300]) == 1
        assert 0 < await r.pttl(key) <= 300
        while await r.exists(key):  # wait for the expiry Redis enforces
            await asyncio.sleep(0.02)
        assert await renew(keys=[key], args=[a, 300]) == 0
        assert await r.set(key, b, nx=True, px=300) is True
        assert await release(keys=[key], args=[a]) == 0
        assert await release(keys=[key], args=[b]) == 1
        assert await r.exists(key) == 0

    _run_with(aredis, redis_server, body)


def test_redis_stream_carries_fill_progress_pubsub_does_not_replay(redis_server: Redis, aredis: Any) -> None:
    """Fill progress for followers: a stream gives a follower that joins late every entry (XREAD from 0);
    pub/sub loses what was published before the follower subscribed."""
    stream, channel = f"progress:{_prefix()}", f"fill:{_prefix()}"

    async def body(r: Any) -> None:
        for size in (MiB, 2 * MiB):
            await r.xadd(stream, {"bytes": size}, maxlen=1000)
            await r.publish(channel, size)
        pubsub = r.pubsub()
        await pubsub.subscribe(channel)
        assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"

        async def follow() -> list[dict[bytes, bytes]]:
            seen, last = [], "0-0"
            while not seen or b"done" not in seen[-1]:
                for _, entries in await r.xread({stream: last}, block=500, count=10):
                    for last, fields in entries:  # noqa: B007 (last: where the next XREAD starts)
                        seen.append(fields)
            return seen

        follower = asyncio.ensure_future(follow())
        await r.publish(channel, 3 * MiB)
        await r.xadd(stream, {"bytes": 3 * MiB, "done": 1, "digest": "sha256:abc"})
        seen = await asyncio.wait_for(follower, 5)
        assert [int(f[b"bytes"]) for f in seen] == [MiB, 2 * MiB, 3 * MiB]
        assert seen[-1][b"digest"] == b"sha256:abc"
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        assert int(message["data"]) == 3 * MiB
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1) is None
        await pubsub.aclose()

    _run_with(aredis, redis_server, body)


def test_redis_fails_fast_when_stopped_and_times_out_when_hung(redis_server: Redis, aredis: Any) -> None:
    """Redis stopped: ``ConnectionError`` at once; hung (SIGSTOP): ``TimeoutError`` after ``socket_timeout``;
    the same client works again once the server is back (measured: < 1 ms, 0.50 s, reconnect 3 ms)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    async def body(r: Any) -> None:
        await r.set("k", "v")
        redis_server.stop()
        began = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await r.get("k")
        assert time.monotonic() - began < 0.5
        redis_server.start()
        assert await r.get("k") is None  # a restarted bed Redis is empty
        pid = redis_server.pid or 0
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await r.get("k")
            assert 0.4 < time.monotonic() - began < 2
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await r.ping() is True

    _run_with(aredis, redis_server, body, timeout=0.5)


def test_obstore_follows_proxy_environment_unless_no_proxy(
    ceph: Ceph, obstore: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """obstore (reqwest) sends even loopback requests through ``HTTP_PROXY`` from the environment;
    ``client_options={"proxy_excludes": ...}`` does not help without a ``proxy_url``; ``NO_PROXY`` does.

    What follows: the product builds its store with the proxy environment it means (regcache may run
    with a ``HTTPS_PROXY`` pointing at itself). aiobotocore behaves the same (``ProxyConnectionError``).
    """
    from obstore.exceptions import GenericError

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    with socket.socket() as dead:  # a port nothing answers on: bound, never listening
        dead.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead.getsockname()[1]}")
        key = f"{_prefix()}/proxied"
        with pytest.raises(GenericError):
            arun(obstore.put_async, _store(ceph, retries=0, proxy_excludes="127.0.0.1"), key, b"x")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        arun(obstore.put_async, _store(ceph, retries=0), key, b"x")
    assert ceph.s3.list_keys(ceph.bucket, key) == {key: 1}
