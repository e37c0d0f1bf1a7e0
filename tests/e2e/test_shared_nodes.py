"""Several real `regcache run` nodes over one shared store: Ceph radosgw (the bucket) and redis-server.

Each node has its own ports and cache directory (L1); all share one bucket (under a prefix of the
test's own) and one Redis (under a key prefix of the test's own). Clients are real skopeo processes.
What is asserted comes from the engines and the upstream: the registry's access log and the CDN's
request log (blob fetches), the bucket's listing by the bed's own S3 client, regcache's result lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
from bed.cdn import Cdn
from bed.ceph import Ceph
from bed.faults import FaultRelay
from bed.images import ImageSet, PushedImage, push_variant
from bed.mitm import MitmError
from bed.redis import Redis
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from .test_access import ALICE, BOB, private_to_alice
from .test_lifecycle import wait_for_staging
from .test_private_outage import (  # noqa: F401 - fault_relay: the fixture
    assert_fails_closed,
    basic,
    bearer,
    cache_private_and_public,
    fault_relay,
    objects,
    relayed,
    set_condition,
    token_through,
)
from .test_pull import request_through

pytestmark = pytest.mark.shared_store

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """``start(n)``: n more nodes of one cluster (a bucket prefix and a Redis prefix of this test's
    own); `shared` changes the nodes' `shared` section, `settings` the rest of their configuration."""

    def __init__(self, ceph: Ceph, redis_server: Redis, regcache_with: Callable[..., Mitmdump], workdir: Path) -> None:
        self._ceph, self._redis, self._regcache_with = ceph, redis_server, regcache_with
        self.run = uuid.uuid4().hex[:12]
        self.access_secret = workdir / "access-secret"  # the same on every node
        self.access_secret.write_text(f"access-secret-{self.run}-{uuid.uuid4().hex}\n")
        self.prefix = f"{self.run}/"
        self.redis_url = redis_server.url
        self.nodes: list[Mitmdump] = []

    def shared(self, **changes: Any) -> dict[str, Any]:
        ceph = self._ceph
        s3 = {"endpoint": ceph.endpoint, "bucket": ceph.bucket, "region": ceph.region, "access_key": ceph.access_key,
              "secret_key": ceph.secret_key, "prefix": self.prefix, **changes.pop("s3", {})}  # fmt: skip
        redis = {"url": self._redis.url, "prefix": f"t{self.run}:", "timeout": 1}
        section = {"node": f"node{len(self.nodes)}", "s3": s3, "redis": redis,
                   "access_secret_file": str(self.access_secret), **changes}  # fmt: skip
        return {key: value for key, value in section.items() if value is not None}  # None: left out

    def start(self, count: int, shared: dict[str, Any] | None = None, **settings: Any) -> list[Mitmdump]:
        nodes = []
        for _ in range(count):
            port = free_port()
            node = self._regcache_with(blob_listen=f"127.0.0.1:{port}", blob_url=f"http://127.0.0.1:{port}",
                                       shared=self.shared(**(shared or {})), **settings)  # fmt: skip
            self.nodes.append(node)
            nodes.append(node)
        return nodes

    __call__ = start

    def in_bucket(self) -> dict[str, int]:
        """key → size of every object under this cluster's prefix (the bed's own S3 client)."""
        return self._ceph.s3.list_keys(self._ceph.bucket, self.prefix)

    def blob_key(self, digest: str) -> str:
        return f"{self.prefix}blobs/sha256/{digest.split(':')[1]}"


@pytest.fixture
def cluster(ceph: Ceph, redis_server: Redis, regcache_with: Callable[..., Mitmdump], tmp_path: Path) -> Cluster:
    return Cluster(ceph, redis_server, regcache_with, tmp_path)


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def blob_fetches(
    registry: Registry, cdn: Cdn, image: PushedImage, since: tuple[int, int]
) -> dict[str, tuple[int, int]]:
    """digest → (the registry's blob GETs, the CDN's GETs) since the marks, for each of its blobs."""
    gets = Counter(r.reference for r in registry.requests(since[0]) if r.method == "GET" and r.kind == "blob")
    return {blob.digest: (gets[blob.digest], cdn.count(blob.digest, since=since[1])) for blob in image.blobs}


def pull_all(pulls: list[tuple[Skopeo, str, Path, str | None]]) -> list[str]:
    """Every pull at once (real skopeo processes); the digests they report."""
    with ThreadPoolExecutor(len(pulls)) as pool:
        futures = [pool.submit(s.copy_to_dir, ref, dest, creds=creds) for s, ref, dest, creds in pulls]
        return [future.result() for future in futures]


def test_cold_pulls_over_three_nodes_fetch_each_blob_once_and_a_fresh_node_pulls_from_the_bucket(
    cluster: Cluster,
    images: ImageSet,
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    cdn: Cdn,
    ceph: Ceph,
    tmp_path: Path,
) -> None:
    nodes = cluster(3)
    image = images.big  # a 100 MB layer: the fills overlap
    clients = [skopeo_factory(node.url, node.ca_cert) for node in nodes]
    marks = upstream_registry.mark(), cdn.mark()
    pulls = [(clients[i % 3], image.ref, tmp_path / f"cold{i}", None) for i in range(9)]
    assert pull_all(pulls) == [image.digest] * 9
    fetched = blob_fetches(upstream_registry, cdn, image, marks)
    assert fetched == {blob.digest: (1, 1) for blob in image.blobs}, fetched
    # Manifests too: each node revalidates the tag (HEAD), one GETs it, the others take it from the bucket.
    manifest_gets = Counter(r.reference for r in upstream_registry.requests(marks[0])
                            if r.method == "GET" and r.kind == "manifest")  # fmt: skip
    assert manifest_gets and set(manifest_gets.values()) == {1}, manifest_gets
    followed = sum(node.log().count("FOLLOWING blob") for node in nodes)
    assert followed >= 1, "no node followed another node's fill"
    registry = redis_client.Redis.from_url(cluster.redis_url)
    assert {m.decode() for m in registry.smembers(f"t{cluster.run}:nodes")} >= {"node0", "node1", "node2"}
    registry.close()
    # Uploaded once verified and committed (after the clients had their last byte): wait, bounded.
    wanted = {cluster.blob_key(blob.digest): blob.size for blob in image.blobs}
    assert wait_for(lambda: wanted.items() <= cluster.in_bucket().items(), 60)

    # A fourth node, its disk empty: every blob is a 307 to the bucket, nothing from upstream.
    (fresh,) = cluster(1)
    marks = upstream_registry.mark(), cdn.mark()
    log_mark = fresh.mark()
    assert skopeo_factory(fresh.url, fresh.ca_cert).copy_to_dir(image.ref, tmp_path / "fresh") == image.digest
    assert blob_fetches(upstream_registry, cdn, image, marks) == {blob.digest: (0, 0) for blob in image.blobs}
    digests = {blob.digest for blob in image.blobs}
    blob_results = [result for result, _, what in fresh.results(log_mark) if what.rpartition("@")[2] in digests]
    assert len(blob_results) == len(digests) and set(blob_results) == {"HIT"}, blob_results
    assert fresh.log()[log_mark:].count("(from the shared bucket)") == len(digests)
    for blob in image.blobs:
        assert (tmp_path / "fresh" / blob.digest.split(":")[1]).read_bytes() == (
            tmp_path / "cold0" / blob.digest.split(":")[1]
        ).read_bytes()


@pytest.mark.parametrize("access_secret", ["configured", "derived"])
def test_a_private_image_stays_private_on_every_node(
    access_secret: str,
    cluster: Cluster,
    upstream_registry: Registry,
    token_server: TokenServer,
    skopeo_factory: Callable[..., Skopeo],
    bed_workdir: Path,
    tmp_path: Path,
) -> None:
    seed = uuid.uuid4().hex
    secret = push_variant(upstream_registry, bed_workdir / "shared-secret", "library/shared-secret", "1", seed=seed)
    private_to_alice(token_server, secret.repo)
    # Without access_secret_file/_env the nodes key their hashes with a secret derived from the S3 key.
    first, second = cluster(2, shared={} if access_secret == "configured" else {"access_secret_file": None})
    alice = skopeo_factory(first.url, first.ca_cert)
    assert alice.copy_to_dir(secret.ref, tmp_path / "alice", creds=ALICE) == secret.digest

    other = skopeo_factory(second.url, second.ca_cert)
    for name, creds in (("anonymous", None), ("bob", BOB)):
        with pytest.raises(Exception, match=r"unauthorized|denied|401|403"):
            other.copy_to_dir(secret.ref, tmp_path / name, creds=creds)
    # Straight for the layer the bucket holds, by digest, anonymously and through a public repository.
    layer = secret.layers[-1]
    status, _, _ = request_through(second, f"https://registry-1.docker.io/v2/{secret.repo}/blobs/{layer.digest}")
    assert status == 401
    public = {"Authorization": f"Bearer {token_server.mint('library/oci-single')}"}
    status, _, _ = request_through(second, f"https://registry-1.docker.io/v2/library/oci-single/blobs/{layer.digest}",
                                   public)  # fmt: skip
    assert status == 404

    mark = upstream_registry.mark()
    assert other.copy_to_dir(secret.ref, tmp_path / "alice-second", creds=ALICE) == secret.digest
    assert [r for r in upstream_registry.requests(mark) if r.method == "GET" and r.kind == "blob"] == []


@pytest.mark.parametrize("redirect", [True, False], ids=["redirect", "through-the-node"])
def test_a_new_node_replays_offline_from_the_shared_store(
    redirect: bool, cluster: Cluster, images: ImageSet, skopeo_factory: Callable[..., Skopeo], tmp_path: Path
) -> None:
    """Tags, manifests, seen pairs and grants come from Redis and the bucket: an offline node with
    an empty disk and no upstream at all (its names do not even resolve) serves the image, by
    presigned URLs or through itself."""
    image = images.oci_multi
    (online,) = cluster(1)
    online_client = skopeo_factory(online.url, online.ca_cert)
    assert online_client.copy_to_dir(image.ref, tmp_path / "online", all_platforms=True) == image.digest
    wanted = {cluster.blob_key(blob.digest) for blob in image.blobs}
    assert wait_for(lambda: wanted <= cluster.in_bucket().keys(), 30)
    (offline,) = cluster(1, shared={"s3": {"redirect": redirect}}, offline=True, upstreams={})
    mark = offline.mark()
    offline_client = skopeo_factory(offline.url, offline.ca_cert)
    assert offline_client.copy_to_dir(image.ref, tmp_path / "offline", all_platforms=True) == image.digest
    results = {result for result, _, _ in offline.results(mark)}
    assert results <= {"HIT"}, offline.log()[mark:]


def test_pulls_go_on_while_redis_is_stopped(
    cluster: Cluster, images: ImageSet, redis_server: Redis, skopeo_factory: Callable[..., Skopeo], tmp_path: Path
) -> None:
    """Redis down: every node goes on alone (its own single flight, its disk), with one warning."""
    first, second = cluster(2)
    warm = images.oci_single
    assert skopeo_factory(first.url, first.ca_cert).copy_to_dir(warm.ref, tmp_path / "before") == warm.digest
    marks = first.mark(), second.mark()
    redis_server.stop()
    cold = images.docker_multi
    for i, node in enumerate((first, second)):
        client = skopeo_factory(node.url, node.ca_cert)
        assert client.copy_to_dir(cold.ref, tmp_path / f"cold{i}", all_platforms=True) == cold.digest
        assert client.copy_to_dir(warm.ref, tmp_path / f"warm{i}") == warm.digest
    for node, mark in zip((first, second), marks, strict=True):
        assert node.log()[mark:].count("Redis unavailable, carrying on without it") == 1, node.log()[mark:]


def test_while_radosgw_is_stopped_disk_hits_and_misses_are_served(
    cluster: Cluster, images: ImageSet, ceph: Ceph, skopeo_factory: Callable[..., Skopeo], upstream_registry: Registry,
    tmp_path: Path,
) -> None:  # fmt: skip
    """S3 down: a node's own disk still serves what it holds; what it lacks comes from upstream."""
    first, second = cluster(2)
    warm = images.oci_single
    client = skopeo_factory(first.url, first.ca_cert)
    assert client.copy_to_dir(warm.ref, tmp_path / "before") == warm.digest
    wanted = {cluster.blob_key(blob.digest) for blob in warm.blobs}
    assert wait_for(lambda: wanted <= cluster.in_bucket().keys(), 30)
    ceph.stop_radosgw()
    mark = upstream_registry.mark()
    assert client.copy_to_dir(warm.ref, tmp_path / "warm") == warm.digest
    assert [r for r in upstream_registry.requests(mark) if r.method == "GET" and r.kind == "blob"] == []
    cold = images.docker_multi
    other = skopeo_factory(second.url, second.ca_cert)
    assert other.copy_to_dir(cold.ref, tmp_path / "cold", all_platforms=True) == cold.digest
    assert "S3 unavailable, carrying on without it" in second.log()


def test_a_missing_bucket_stops_start_up_with_one_line(cluster: Cluster) -> None:
    with pytest.raises(MitmError) as failed:
        cluster(1, shared={"s3": {"bucket": "no-such-bucket"}})
    lines = [line for line in failed.value.args[0].splitlines() if line.startswith("[") and "no-such-bucket" in line]
    assert len(lines) == 1 and "shared.s3.bucket: no-such-bucket" in lines[0] and "does not exist" in lines[0], lines
    assert "Traceback" not in failed.value.args[0]


def test_a_short_access_secret_stops_start_up_with_one_line(cluster: Cluster, tmp_path: Path) -> None:
    short = tmp_path / "short-secret"
    short.write_text("too-short\n")
    with pytest.raises(MitmError) as failed:
        cluster(1, shared={"access_secret_file": str(short)})
    lines = [line for line in failed.value.args[0].splitlines() if "shared.access_secret_file" in line]
    assert len(lines) == 1 and "at least 32 characters" in lines[0], lines
    assert "Traceback" not in failed.value.args[0]


def test_a_node_killed_mid_fill_is_taken_over(
    cluster: Cluster, images: ImageSet, cdn: Cdn, token_server: TokenServer
) -> None:
    """kill -9 of the node fetching a 100 MB layer, while another node's client follows its fill: the
    follower's node takes the lease over once it expires and its client gets the whole blob; the
    bucket then holds the blob whole, and no partial object or upload."""
    holder, follower = cluster(2, shared={"lease_seconds": 2})
    image = images.big
    layer = max(image.layers, key=lambda blob: blob.size)
    url = f"https://registry-1.docker.io/v2/{image.repo}/blobs/{layer.digest}"
    token = {"Authorization": f"Bearer {token_server.mint(image.repo)}"}
    cdn.throttle(20 * 10**6)  # ~5 s for the layer
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(request_through, holder, url, token)
            wait_for_staging(holder.workdir / "cache", 10**6)
            mark = follower.mark()
            second = pool.submit(request_through, follower, url, token)
            wait_for_staging(follower.workdir / "cache", 2 * 10**6)
            assert "FOLLOWING blob" in follower.log()[mark:]
            holder.stop(sig=signal.SIGKILL)
            with contextlib.suppress(Exception):
                first.result()
            status, _, data = second.result()
    finally:
        cdn.throttle(None)
    assert status == 200 and "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
    assert "taking over" in follower.log()
    assert wait_for(lambda: cluster.in_bucket().get(cluster.blob_key(layer.digest)) == layer.size, 60)
    assert all(size == layer.size for key, size in cluster.in_bucket().items() if key == cluster.blob_key(layer.digest))


def test_without_redirects_bucket_hits_stream_through_the_node(
    cluster: Cluster, images: ImageSet, skopeo_factory: Callable[..., Skopeo], upstream_registry: Registry,
    cdn: Cdn, tmp_path: Path,
) -> None:  # fmt: skip
    """`shared.s3.redirect: false`: a blob the bucket holds reaches the client through the node (for
    clients that cannot reach the store), with no upstream fetch and no redirect to S3."""
    first, second = cluster(2, shared={"s3": {"redirect": False}})
    image = images.oci_single
    assert skopeo_factory(first.url, first.ca_cert).copy_to_dir(image.ref, tmp_path / "first") == image.digest
    wanted = {cluster.blob_key(blob.digest) for blob in image.blobs}
    assert wait_for(lambda: wanted <= cluster.in_bucket().keys(), 30)
    marks, log_mark = (upstream_registry.mark(), cdn.mark()), second.mark()
    assert skopeo_factory(second.url, second.ca_cert).copy_to_dir(image.ref, tmp_path / "second") == image.digest
    assert blob_fetches(upstream_registry, cdn, image, marks) == {blob.digest: (0, 0) for blob in image.blobs}
    logged = second.log()[log_mark:]
    assert logged.count("from the shared bucket, through this node") == len(image.blobs), logged
    assert "(from the shared bucket)" not in logged  # the note of a 307 to a presigned URL
    for blob in image.blobs:
        name = blob.digest.split(":")[1]
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()


@pytest.mark.parametrize("engine", ["redis", "radosgw"])
def test_a_node_starts_with_one_warning_while_an_engine_is_down(
    engine: str, cluster: Cluster, images: ImageSet, ceph: Ceph, redis_server: Redis,
    skopeo_factory: Callable[..., Skopeo], tmp_path: Path,
) -> None:  # fmt: skip
    """Redis or S3 down at start: the node starts on its own disk, says so once, and serves pulls."""
    (ceph.stop_radosgw if engine == "radosgw" else redis_server.stop)()
    (node,) = cluster(1)
    image = images.oci_single
    client = skopeo_factory(node.url, node.ca_cert)
    assert client.copy_to_dir(image.ref, tmp_path / "cold") == image.digest
    assert client.copy_to_dir(image.ref, tmp_path / "warm") == image.digest
    name = "S3" if engine == "radosgw" else "Redis"
    warnings = [line for line in node.log().splitlines() if "WARNING" in line or "unavailable" in line]
    assert [line for line in warnings if f"{name} unavailable, carrying on without it" in line] != []
    assert len(warnings) == 1, "\n".join(line[:400] for line in warnings)


def test_stale_if_error_works_on_a_node_that_never_saw_the_tag(
    cluster: Cluster, images: ImageSet, skopeo_factory: Callable[..., Skopeo], upstream_gone: Callable[[], None],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The upstream down (registry, token server, CDN): a node with an empty disk serves the tag
    another node recorded (Redis), its manifest and blobs (the bucket), to the same clients."""
    image = images.oci_single
    first, second = cluster(2)
    assert skopeo_factory(first.url, first.ca_cert).copy_to_dir(image.ref, tmp_path / "first") == image.digest
    wanted = {cluster.blob_key(blob.digest) for blob in image.blobs}
    assert wait_for(lambda: wanted <= cluster.in_bucket().keys(), 30)
    upstream_gone()
    mark = second.mark()
    assert skopeo_factory(second.url, second.ca_cert).copy_to_dir(image.ref, tmp_path / "second") == image.digest
    results = second.results(mark)
    assert ("STALE", "GET", f"docker.io/{image.repo}:{image.tag}") in results or any(
        result == "STALE" and what.endswith(f":{image.tag}") for result, _, what in results
    ), results
    assert {result for result, _, _ in results} <= {"STALE", "HIT"}, results


def test_a_node_waits_for_the_node_fetching_a_manifest(
    cluster: Cluster, images: ImageSet, redis_server: Redis, ceph: Ceph, upstream_registry: Registry,
    skopeo_factory: Callable[..., Skopeo], tmp_path: Path,
) -> None:  # fmt: skip
    """Another node holds the lease on the manifest a tag names (in Redis) and stores it in the
    bucket meanwhile: this node asks upstream only the tag's HEAD, waits, and serves that manifest."""
    image = images.oci_single  # one manifest: the tag's
    (node,) = cluster(1)
    lease = f"t{cluster.run}:lease:manifest:{image.digest}"
    other = redis_client.Redis.from_url(redis_server.url)
    other.set(lease, json.dumps({"node": "elsewhere", "url": None, "token": uuid.uuid4().hex}), px=20_000)
    mark = upstream_registry.mark()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pulled = pool.submit(skopeo_factory(node.url, node.ca_cert).copy_to_dir, image.ref, tmp_path / "pulled")
        assert wait_for(lambda: upstream_registry.manifest_heads(mark) >= 1, 30), "the tag was not revalidated"
        key = f"/{ceph.bucket}/{cluster.prefix}manifests/sha256/{image.digest.split(':')[1]}"
        stored = ceph.s3.request("PUT", key, body=image.manifest, headers={"Content-Type": image.media_type})
        assert stored.status == 200
        other.delete(lease)
        assert pulled.result() == image.digest
    other.close()
    assert upstream_registry.manifest_gets(mark) == 0
    assert "fetched by another node" in node.log()


@pytest.mark.parametrize("condition", ["registry-down", "429"])
def test_a_private_image_cached_on_one_node_fails_closed_on_another_in_an_outage(
    condition: str,
    cluster: Cluster,
    images: ImageSet,
    fault_relay: FaultRelay,  # noqa: F811 - the fixture
    bed_hostmap: dict[str, str],
    upstream_registry: Registry,
    token_server: TokenServer,
    skopeo_factory: Callable[..., Skopeo],
    bed_workdir: Path,
    tmp_path: Path,
) -> None:
    """The single node's probe matrix (test_private_outage) across nodes: alice caches her image on
    one node; another node, which never saw it, serves it to nobody else with the upstream up, down
    or answering 429, and still to alice (the grant is the cluster's, in Redis)."""
    secret = push_variant(upstream_registry, bed_workdir / "outage-secret", "library/outage-secret", "1",
                          seed=uuid.uuid4().hex)  # fmt: skip
    private_to_alice(token_server, secret.repo)
    first, second = cluster(2, upstreams=relayed(bed_hostmap, fault_relay))
    public = images.oci_single
    cache_private_and_public(first, skopeo_factory, secret, public, tmp_path)
    others = {
        "none": {},
        "made-up": bearer("made-up-12345"),
        "anonymous-token": bearer(token_through(second, secret.repo)),
        "bob-token": bearer(token_through(second, secret.repo, BOB)),
        "wrong-password": basic("alice:never-used"),
    }
    alice_token = {"alice-token": bearer(token_through(second, secret.repo, ALICE))}
    paths = objects(secret, public.repo)
    assert_fails_closed(second, "up", paths, others, alice_token)

    set_condition(condition, fault_relay, [upstream_registry])
    owner = {**alice_token, "alice-basic": basic(ALICE)}
    assert_fails_closed(second, condition, paths, others, owner, objects(public))
