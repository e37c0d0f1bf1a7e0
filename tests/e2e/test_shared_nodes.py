"""Several real `regcache run` nodes over one shared store: Ceph radosgw (the bucket) and redis-server.

Each node has its own ports and cache directory (L1); all share one bucket (under a prefix of the
test's own) and one Redis (under a key prefix of the test's own). Clients are real skopeo processes.
What is asserted comes from the engines and the upstream: the registry's access log and the CDN's
request log (blob fetches), the bucket's listing by the bed's own S3 client, regcache's result lines.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from bed.cdn import Cdn
from bed.ceph import Ceph
from bed.images import ImageSet, PushedImage, push_variant
from bed.redis import Redis
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.skopeo import Skopeo
from bed.tokens import TokenServer

from .test_access import ALICE, BOB, private_to_alice
from .test_pull import request_through

pytestmark = pytest.mark.shared_store

Nodes = Callable[[int], list[Mitmdump]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def cluster(ceph: Ceph, redis_server: Redis, regcache_with: Callable[..., Mitmdump]) -> Nodes:
    """``start(n)``: n more nodes of one cluster (bucket prefix and Redis prefix of this test's own)."""
    run = uuid.uuid4().hex[:12]
    started: list[Mitmdump] = []

    def start(count: int) -> list[Mitmdump]:
        nodes = []
        for _ in range(count):
            port = free_port()
            shared: dict[str, Any] = {
                "node": f"node{len(started)}",
                "s3": {"endpoint": ceph.endpoint, "bucket": ceph.bucket, "region": ceph.region,
                       "access_key": ceph.access_key, "secret_key": ceph.secret_key, "prefix": f"{run}/"},
                "redis": {"url": redis_server.url, "prefix": f"t{run}:"},
            }  # fmt: skip
            node = regcache_with(blob_listen=f"127.0.0.1:{port}", blob_url=f"http://127.0.0.1:{port}", shared=shared)
            started.append(node)
            nodes.append(node)
        return nodes

    start.prefix = f"{run}/"  # type: ignore[attr-defined]
    return start


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
    cluster: Nodes,
    images: ImageSet,
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
    cdn: Cdn,
    ceph: Ceph,
    tmp_path: Path,
) -> None:
    nodes, prefix = cluster(3), cluster.prefix  # type: ignore[attr-defined]
    image = images.big  # a 100 MB layer: the fills overlap
    clients = [skopeo_factory(node.url, node.ca_cert) for node in nodes]
    marks = upstream_registry.mark(), cdn.mark()
    pulls = [(clients[i % 3], image.ref, tmp_path / f"cold{i}", None) for i in range(9)]
    assert pull_all(pulls) == [image.digest] * 9
    fetched = blob_fetches(upstream_registry, cdn, image, marks)
    assert fetched == {blob.digest: (1, 1) for blob in image.blobs}, fetched
    followed = sum(node.log().count("FOLLOWING blob") for node in nodes)
    assert followed >= 1, "no node followed another node's fill"
    # Uploaded once verified and committed (after the clients had their last byte): wait, bounded.
    wanted = {f"{prefix}blobs/sha256/{blob.digest.split(':')[1]}": blob.size for blob in image.blobs}
    assert wait_for(lambda: wanted.items() <= ceph.s3.list_keys(ceph.bucket, prefix).items(), 60)

    # A fourth node, its disk empty: every blob is a 307 to the bucket, nothing from upstream.
    (fresh,) = cluster(1)
    marks = upstream_registry.mark(), cdn.mark()
    log_mark = fresh.mark()
    assert skopeo_factory(fresh.url, fresh.ca_cert).copy_to_dir(image.ref, tmp_path / "fresh") == image.digest
    assert blob_fetches(upstream_registry, cdn, image, marks) == {blob.digest: (0, 0) for blob in image.blobs}
    blob_results = [result for result, method, what in fresh.results(log_mark) if "/blobs/" in what]
    assert blob_results and set(blob_results) == {"HIT"}, blob_results
    for blob in image.blobs:
        assert (tmp_path / "fresh" / blob.digest.split(":")[1]).read_bytes() == (
            tmp_path / "cold0" / blob.digest.split(":")[1]
        ).read_bytes()


def test_a_private_image_stays_private_on_every_node(
    cluster: Nodes,
    upstream_registry: Registry,
    token_server: TokenServer,
    skopeo_factory: Callable[..., Skopeo],
    bed_workdir: Path,
    tmp_path: Path,
) -> None:
    seed = uuid.uuid4().hex
    secret = push_variant(upstream_registry, bed_workdir / "shared-secret", "library/shared-secret", "1", seed=seed)
    private_to_alice(token_server, secret.repo)
    first, second = cluster(2)
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
