"""A regcache cluster's faults and its command line, on real engines: real `regcache run` nodes (own
ports and L1 directories) over one Ceph radosgw bucket and one redis-server, real skopeo clients, the
real `regcache` command pointed at the same shared store.

(The cold pulls over three nodes, the fresh node served from the bucket and private content across
nodes are in test_shared_nodes.py.) What is asserted comes from the engines and the upstream: the
registry's access log and the CDN's request log (blob fetches), the bucket's listing by the bed's own
S3 client, the nodes' logs, the command's output and exit status.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from bed.cdn import Cdn
from bed.ceph import Ceph
from bed.images import ImageSet, PushedImage
from bed.redis import Redis
from bed.regcache_run import Mitmdump
from bed.registry import Registry
from bed.shared_fixtures import shared_section
from bed.skopeo import Skopeo

from .conftest import regcache_cli
from .test_shared_nodes import blob_fetches, free_port, wait_for

pytestmark = pytest.mark.shared_store


class Cluster:
    """Nodes of one cluster (a bucket prefix and a Redis prefix of the test's own) and the
    command line's configuration for the same shared store."""

    def __init__(self, ceph: Ceph, redis: Redis, regcache_with: Callable[..., Mitmdump], workdir: Path,
                 hostmap: dict[str, str], skopeo_factory: Callable[..., Skopeo],
                 registry: Registry) -> None:  # fmt: skip
        self.ceph = ceph
        self.registry = registry
        self._hostmap = hostmap
        self._skopeo_factory = skopeo_factory
        self.run = uuid.uuid4().hex[:12]
        self.prefix = f"{self.run}/"
        self._redis = redis
        self._regcache_with = regcache_with
        self._workdir = workdir
        self.nodes: list[Mitmdump] = []
        self.blob_urls: list[str] = []

    def shared(self, **extra: object) -> dict[str, Any]:
        return shared_section(self.ceph, self._redis, self.run, **extra)

    def start(self, count: int = 1, **extra: object) -> list[Mitmdump]:
        started = []
        for _ in range(count):
            port = free_port()
            shared = self.shared(node=f"node{len(self.nodes)}", **extra)
            blob_url = f"http://127.0.0.1:{port}"
            node = self._regcache_with(blob_listen=f"127.0.0.1:{port}", blob_url=blob_url, shared=shared)
            self.nodes.append(node)
            self.blob_urls.append(blob_url)
            started.append(node)
        return started

    def config(self, **extra: object) -> Path:
        """A YAML configuration for the command line: the same shared store (an admin host's)."""
        path = self._workdir / f"admin-{uuid.uuid4().hex[:6]}.yaml"
        settings = {
            "cache_dir": str(self._workdir / "admin-cache"),
            "blob_url": "http://127.0.0.1:1",  # required with shared; the command line serves nothing
            "upstreams": self._hostmap,  # warm's
            "shared": self.shared(node="admin", **extra),
        }
        path.write_text(yaml.safe_dump(settings))
        return path

    def client(self, node: Mitmdump) -> Skopeo:
        """A skopeo using this node as its proxy."""
        return self._skopeo_factory(node.url, node.ca_cert)

    def upstream_blob_gets(self, since: int) -> list[Any]:
        """The upstream registry's blob GETs since a mark."""
        return [r for r in self.registry.requests(since) if r.method == "GET" and r.kind == "blob"]

    def one_line_error(self, *args: str, wanted: str, config: Path | None = None) -> None:
        """The command fails with one line naming `wanted`, and no traceback."""
        result = self.cli(*args, config=config, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0, (args, result.stdout)
        assert len(lines) == 1 and wanted in lines[0] and "Traceback" not in result.stderr, (args, result.stderr)

    def cli(self, *args: str, config: Path | None = None, check: bool = True) -> Any:
        return regcache_cli(*args, "--config", str(config or self.config()), check=check)

    def bucket(self) -> dict[str, int]:
        """Every object of this cluster in the bucket: key (under the prefix) → size."""
        listed = self.ceph.s3.list_keys(self.ceph.bucket, self.prefix)
        return {key[len(self.prefix) :]: size for key, size in listed.items()}


@pytest.fixture
def cluster(
    ceph: Ceph,
    redis_server: Redis,
    regcache_with: Callable[..., Mitmdump],
    tmp_path: Path,
    bed_hostmap: dict[str, str],
    skopeo_factory: Callable[..., Skopeo],
    upstream_registry: Registry,
) -> Cluster:
    return Cluster(ceph, redis_server, regcache_with, tmp_path, bed_hostmap, skopeo_factory, upstream_registry)


def pulled(image: PushedImage) -> str:
    """What skopeo reports pulling the image for this machine: the amd64 manifest of a multi-arch one."""
    return image.children.get("linux/amd64", image.digest)


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest.split(':')[1]}"


def in_bucket(cluster: Cluster, image: PushedImage) -> bool:
    """Every blob of the image in the bucket, whole."""
    held = cluster.bucket()
    return all(held.get(blob_key(blob.digest)) == blob.size for blob in image.blobs)


def fresh_node_pulls_from_the_bucket(cluster: Cluster, image: PushedImage, into: Path) -> None:
    """A new node (its L1 empty) pulls the image with no blob from upstream."""
    (fresh,) = cluster.start(1)
    mark = cluster.registry.mark()
    assert cluster.client(fresh).copy_to_dir(image.ref, into) == pulled(image)
    assert cluster.upstream_blob_gets(mark) == []


def no_partial_objects(cluster: Cluster, images: list[PushedImage]) -> None:
    """Every blob object in the bucket is whole (its size the blob's): a killed fill left nothing half."""
    sizes = {blob_key(blob.digest): blob.size for image in images for blob in image.blobs}
    for key, size in cluster.bucket().items():
        if key in sizes:
            assert size == sizes[key], f"{key}: {size} B in the bucket, the blob has {sizes[key]}"


# faults ---------------------------------------------------------------------------------------------


def test_a_node_killed_mid_fill_leaves_the_other_nodes_clients_whole_and_no_partial_object(
    cluster: Cluster,
    images: ImageSet,
    cdn: Cdn,
    tmp_path: Path,
) -> None:
    image = images.big  # its 100 MB layer, at 20 MB/s from the CDN: a fill of about 5 s
    layer = max(image.blobs, key=lambda blob: blob.size)
    first, second = cluster.start(2, lease_seconds=3)
    marks = cluster.registry.mark(), cdn.mark()
    cdn.throttle(20 << 20)
    try:
        with ThreadPoolExecutor(2) as pool:
            doomed = pool.submit(cluster.client(first).copy_to_dir, image.ref, tmp_path / "a")
            assert wait_for(lambda: cdn.count(layer.digest, since=marks[1]) >= 1, 30), "the first node never filled"
            survivor = pool.submit(cluster.client(second).copy_to_dir, image.ref, tmp_path / "b")
            assert wait_for(lambda: "FOLLOWING blob" in second.log(), 30), second.log()[-2000:]
            assert first.stop(sig=signal.SIGKILL) == -9
            with pytest.raises(Exception):  # noqa: B017 - the client of the killed node: any failure
                doomed.result(timeout=120)
            assert survivor.result(timeout=180) == pulled(image)
    finally:
        cdn.throttle(None)
    assert (tmp_path / "b" / layer.digest.split(":")[1]).stat().st_size == layer.size
    # At most the killed fill and the one that took over fetched the layer upstream.
    fetched = blob_fetches(cluster.registry, cdn, image, marks)
    assert fetched[layer.digest][1] <= 2, fetched
    no_partial_objects(cluster, [image])
    assert wait_for(lambda: in_bucket(cluster, image), 60), cluster.bucket()
    no_partial_objects(cluster, [image])


def test_pulls_go_on_while_redis_is_stopped(
    cluster: Cluster,
    images: ImageSet,
    redis_server: Redis,
    tmp_path: Path,
) -> None:
    (node,) = cluster.start(1)
    client = cluster.client(node)
    assert client.copy_to_dir(images.oci_single.ref, tmp_path / "before") == pulled(images.oci_single)
    # Marked before the stop: a background call after the first pull (its upload, its publish) may
    # find Redis going down before the pulls below do, and that is the outage's one warning too.
    mark = node.mark()
    redis_server.stop()
    # A cold image (fetched upstream, alone) and a warm one (from the L1), Redis down for both.
    assert client.copy_to_dir(images.oci_multi.ref, tmp_path / "cold") == pulled(images.oci_multi)
    registry_mark = cluster.registry.mark()
    assert client.copy_to_dir(images.oci_single.ref, tmp_path / "warm") == pulled(images.oci_single)
    assert cluster.upstream_blob_gets(registry_mark) == []
    log = node.log()[mark:]
    assert log.count("Redis unavailable") == 1, log[-3000:]  # one warning per outage
    # The command line says so in one line.
    cluster.one_line_error("stats", wanted="Redis")


def test_l1_hits_go_on_while_radosgw_is_stopped(
    cluster: Cluster,
    images: ImageSet,
    ceph: Ceph,
    tmp_path: Path,
) -> None:
    (node,) = cluster.start(1)
    client = cluster.client(node)
    image = images.docker_multi
    assert client.copy_to_dir(image.ref, tmp_path / "cold") == pulled(image)
    assert wait_for(lambda: in_bucket(cluster, image), 60)
    ceph.stop_radosgw()
    mark, registry_mark = node.mark(), cluster.registry.mark()
    assert client.copy_to_dir(image.ref, tmp_path / "warm") == pulled(image)
    assert cluster.upstream_blob_gets(registry_mark) == []  # every blob from the node's L1
    digests = {blob.digest for blob in image.blobs}
    blob_results = [result for result, _, what in node.results(mark) if what.rpartition("@")[2] in digests]
    assert len(blob_results) == len(digests) and set(blob_results) == {"HIT"}, node.log()[mark:][-3000:]
    # A miss passes through uncached: the pull still works.
    assert client.copy_to_dir(images.oci_single.ref, tmp_path / "miss") == pulled(images.oci_single)
    cluster.one_line_error("verify", wanted="S3")


# the command line ---------------------------------------------------------------------------------------


def pull_over(cluster: Cluster, pulls: list[tuple[int, PushedImage]], into: Path) -> None:
    for index, (node, image) in enumerate(pulls):
        client = cluster.client(cluster.nodes[node])
        assert client.copy_to_dir(image.ref, into / f"pull{index}") == pulled(image)


def test_stats_shows_the_cluster_and_each_node_and_ls_lists_the_clusters_tags(
    cluster: Cluster, images: ImageSet, tmp_path: Path
) -> None:
    cluster.start(2)
    one, other = images.oci_single, images.docker_multi
    pull_over(cluster, [(0, one), (1, other), (1, one)], tmp_path)
    assert wait_for(lambda: in_bucket(cluster, one) and in_bucket(cluster, other), 60)

    def stats() -> dict[str, Any]:
        return dict(json.loads(cluster.cli("stats", "--json").stdout))

    def counted(found: dict[str, Any]) -> bool:
        nodes = {node["node"]: node for node in found["nodes"]}
        return {"node0", "node1"} <= nodes.keys() and all(nodes[n]["requests"] for n in ("node0", "node1"))

    assert wait_for(lambda: counted(stats()), 30), stats()
    found = stats()
    bucket = cluster.bucket()
    assert found["cluster"]["bucket"] == {"objects": len(bucket), "bytes": sum(bucket.values()), "size_limit": None}
    nodes = {node["node"]: node for node in found["nodes"]}
    assert nodes["node0"]["urls"]["blob"] == cluster.blob_urls[0]
    # node0 pulled one image cold; node1 the other cold and the first from the bucket: their misses.
    assert nodes["node0"]["requests"].get("MISS", 0) >= len(one.blobs)
    assert nodes["node1"]["requests"].get("HIT", 0) >= len(one.blobs)
    for result, count in found["cluster"]["requests"].items():
        assert count == sum(node["requests"].get(result, 0) for node in found["nodes"]), result
    text = cluster.cli("stats").stdout
    assert "node0" in text and "node1" in text and "bucket" in text

    rows = json.loads(cluster.cli("ls", "--json").stdout)
    listed = {(row["ref"], row["digest"]) for row in rows}
    assert {(f"docker.io/{one.repo}:1", one.digest), (f"docker.io/{other.repo}:1", other.digest)} <= listed
    assert all(not row["missing"] for row in rows)
    # The admin host's own cache_dir was never created: all of it came from Redis and the bucket.
    assert not (tmp_path / "admin-cache").exists()


def test_a_pin_holds_across_the_cluster_and_the_sweep_keeps_it(
    cluster: Cluster, images: ImageSet, tmp_path: Path
) -> None:
    cluster.start(2)
    kept, dropped = images.oci_single, images.oci_multi
    pull_over(cluster, [(0, kept), (1, dropped)], tmp_path)
    assert wait_for(lambda: in_bucket(cluster, kept) and in_bucket(cluster, dropped), 60)
    ref = f"docker.io/{kept.repo}:1"
    assert cluster.cli("pin", ref).stdout.strip() == f"pinned {ref} -> {kept.digest} (cluster-wide)"
    assert cluster.cli("pins").stdout.split() == [ref, kept.digest]
    # A bucket far over its size_limit: the sweep (under the cluster's lock) empties it but for the pin.
    result = cluster.cli("gc", config=cluster.config(size_limit=1))
    assert "swept" in result.stdout, result.stdout
    held = cluster.bucket()
    assert all(held.get(blob_key(blob.digest)) == blob.size for blob in kept.blobs), held
    only_dropped = {blob.digest for blob in dropped.blobs} - {blob.digest for blob in kept.blobs}
    assert only_dropped and not any(blob_key(digest) in held for digest in only_dropped), held
    assert cluster.cli("unpin", ref).stdout.strip() == f"unpinned {ref}"
    assert cluster.cli("pins").stdout.strip() == ""


def test_verify_rehashes_the_bucket_and_removes_a_damaged_object(
    cluster: Cluster, images: ImageSet, ceph: Ceph, tmp_path: Path
) -> None:
    cluster.start(1)
    image = images.oci_single
    pull_over(cluster, [(0, image)], tmp_path)
    assert wait_for(lambda: in_bucket(cluster, image), 60)
    clean = cluster.cli("verify")
    assert ": 0 corrupt" in clean.stdout and "every object" in clean.stdout, clean.stdout
    layer = image.layers[0]
    key = f"{cluster.prefix}{blob_key(layer.digest)}"
    damaged = ceph.s3.request("PUT", f"/{ceph.bucket}/{key}", body=b"x" * layer.size)
    assert damaged.status == 200
    sampled = cluster.cli("verify", "--sample", "1000", "--dry-run", check=False)
    assert sampled.returncode == 1 and f"CORRUPT blob:{layer.digest}" in sampled.stdout, sampled.stdout
    assert blob_key(layer.digest) in cluster.bucket()  # --dry-run: kept
    removed = cluster.cli("verify", check=False)
    assert removed.returncode == 1 and "(removed)" in removed.stdout
    assert blob_key(layer.digest) not in cluster.bucket()
    assert ": 0 corrupt" in cluster.cli("verify").stdout


def test_export_purge_import_round_trip_through_the_bucket(
    cluster: Cluster,
    images: ImageSet,
    tmp_path: Path,
) -> None:
    cluster.start(1)
    image = images.docker_multi
    pull_over(cluster, [(0, image)], tmp_path)
    assert wait_for(lambda: in_bucket(cluster, image), 60)
    ref = f"docker.io/{image.repo}:1"
    bundle = tmp_path / "bundle.tar"
    assert "exported 1 tags" in cluster.cli("export", "-o", str(bundle), ref).stdout
    purged = cluster.cli("purge", f"docker.io/{image.repo}")
    assert "removed" in purged.stdout, purged.stdout
    assert not any(blob_key(blob.digest) in cluster.bucket() for blob in image.blobs)
    assert ref not in cluster.cli("ls").stdout
    imported = cluster.cli("import", str(bundle))
    assert "into the cluster's store" in imported.stdout, imported.stdout
    assert in_bucket(cluster, image)
    fresh_node_pulls_from_the_bucket(cluster, image, tmp_path / "fresh")


def test_warm_fills_the_bucket_for_every_node(
    cluster: Cluster,
    images: ImageSet,
    tmp_path: Path,
) -> None:
    image = images.oci_multi
    warmed = cluster.cli("warm", f"docker.io/{image.repo}:1")
    assert "into the cluster's store" in warmed.stdout, warmed.stdout
    assert in_bucket(cluster, image)
    fresh_node_pulls_from_the_bucket(cluster, image, tmp_path / "pulled")


def test_command_line_mistakes_against_the_cluster_are_one_line(cluster: Cluster, tmp_path: Path) -> None:
    wrong_bucket = cluster.config()
    settings = yaml.safe_load(wrong_bucket.read_text())
    settings["shared"]["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(yaml.safe_dump(settings))
    cluster.one_line_error("ls", wanted="Redis", config=unreachable)
    cluster.one_line_error("pin", "docker.io/library/nothing:1", wanted="not in the cluster's store")
    cluster.one_line_error("purge", "not a ref!", wanted="is not a registry")
    cluster.one_line_error("verify", "--sample", "0", wanted="--sample")
    cluster.one_line_error("import", str(tmp_path / "absent.tar"), wanted="no such file")
