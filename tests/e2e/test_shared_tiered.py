"""`TieredStore`'s sweep of the bucket against the real engines (Ceph radosgw, redis-server).

The sweep (one node at a time, under the sweep lock) removes least recently used entries from the
bucket and Redis until the bucket is under `shared.size_limit` (to 90 %), and what nobody used for
`shared.max_age`; pinned images and what they need stay; a layer two images share is as recently
used as the most recently used of them. What is left is read from the bucket by the bed's own S3
client and from Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from bed.ceph import Ceph
from bed.redis import Redis

from regcache.config import RedisSettings, S3Settings, SharedSettings
from regcache.oci.digest import digest_of
from regcache.oci.manifest import Manifest
from regcache.oci.reference import TagRef
from regcache.store import keys
from regcache.store.base import TagRecord
from regcache.store.disk import DiskStore
from regcache.store.shared.tiered import TieredStore, open_tiered

pytestmark = pytest.mark.shared_store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
ACCEPTED = (OCI_MANIFEST,)


@pytest.fixture
def tiered(ceph: Ceph, redis_server: Redis, tmp_path: Path) -> Iterator[TieredStore]:
    run = uuid.uuid4().hex[:12]
    s3 = S3Settings(ceph.endpoint, ceph.bucket, ceph.access_key, ceph.secret_key, region=ceph.region, prefix=f"{run}/")
    redis = RedisSettings(redis_server.url, timeout=1.0, prefix=f"t{run}:")
    settings = SharedSettings(s3, redis, node="sweeper", max_age=0, access_secret=b"s" * 32)
    store = open_tiered(DiskStore(tmp_path / "cache", 10**12), settings)
    yield store
    store.close()


class Image:
    """A small image put into the tiered store: config and layers (uploaded to the bucket), its
    manifest and tag."""

    def __init__(self, name: str, layers: list[bytes]) -> None:
        self.ref = TagRef("docker.io", f"library/{name}", "1")
        self.config = json.dumps({"name": name}).encode()
        self.blobs = {digest_of(data): data for data in [self.config, *layers]}
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": digest_of(self.config), "size": len(self.config)},
            "layers": [{"mediaType": LAYER, "digest": digest_of(data), "size": len(data)} for data in layers],
        }
        self.manifest = Manifest(OCI_MANIFEST, json.dumps(document).encode())
        self.digest = digest_of(self.manifest.body)

    def entry_keys(self) -> set[str]:
        return {keys.tag_key(self.ref), keys.manifest_key(self.digest), *map(keys.blob_key, self.blobs)}

    async def put(self, store: TieredStore, used: float) -> None:
        for digest, data in self.blobs.items():
            staging = store.stage_blob(digest)
            staging.write(data)
            store.commit_blob(staging, len(data))
            assert await store.upload_blob(digest)
        await asyncio.to_thread(store.put_manifest, self.digest, self.manifest)
        record = TagRecord(self.digest, OCI_MANIFEST, len(self.manifest.body), used)
        await asyncio.to_thread(store.put_tag, self.ref, ACCEPTED, record)
        await asyncio.to_thread(store.redis.inventory.record_uses, dict.fromkeys(self.entry_keys(), used))


def bucket_keys(ceph: Ceph, store: TieredStore) -> set[str]:
    """Store keys of the objects under the store's prefix, from the bed's own S3 client."""
    prefix = store.settings.s3.prefix
    found = set()
    for key in ceph.s3.list_keys(ceph.bucket, prefix):
        kind, _, hexdigest = key.removeprefix(prefix).partition("/sha256/")
        found.add(f"{kind.removesuffix('s')}:sha256:{hexdigest}")
    return found


def test_the_sweep_keeps_pins_and_shared_layers_and_goes_by_last_use(tiered: TieredStore, ceph: Ceph) -> None:
    shared_layer = b"s" * 100_000
    pinned = Image("pinned", [b"p" * 100_000])
    old = Image("old", [shared_layer, b"o" * 100_000])
    new = Image("new", [shared_layer, b"n" * 100_000])
    t0 = time.time() + 1000  # last uses only move forward: these are ahead of the uploads'

    async def scenario() -> list[object]:
        for image, used in ((pinned, t0), (old, t0 + 10), (new, t0 + 100)):
            await image.put(tiered, used)
        await asyncio.to_thread(tiered.pin, pinned.ref, pinned.digest)
        steps: list[object] = [await asyncio.to_thread(bucket_keys, ceph, tiered)]
        _, total = await asyncio.to_thread(tiered.redis.inventory.totals)
        # 90 % of the limit is just what is left without the old image's own entries: exactly those
        # go (the least recently used unpinned), not the layer it shares with the newer image.
        own = len(old.manifest.body) + len(old.config) + 100_000
        tiered.settings = replace(tiered.settings, size_limit=math.ceil((total - own) / 0.9) + 1)
        steps += [await tiered.sweep(now=t0 + 200), await asyncio.to_thread(bucket_keys, ceph, tiered)]
        steps.append(await asyncio.to_thread(tiered.redis.tags.records, old.ref))
        # Past max_age for everything: only the pinned image is left.
        tiered.settings = replace(tiered.settings, size_limit=None, max_age=50.0)
        steps += [await tiered.sweep(now=t0 + 200), await asyncio.to_thread(bucket_keys, ceph, tiered)]
        return steps

    blobs_and_manifests = {key for key in pinned.entry_keys() | old.entry_keys() | new.entry_keys()
                           if not key.startswith("tag:")}  # fmt: skip
    before, by_size, after_size, old_tag, _by_age, after_age = asyncio.run(scenario())
    assert before == blobs_and_manifests
    gone = old.entry_keys() - new.entry_keys()  # the old image's tag, manifest, config and own layer
    assert by_size is not None and by_size[0] == len(gone), by_size  # type: ignore[index]
    assert after_size == blobs_and_manifests - gone, after_size
    assert old_tag == {}
    assert after_age == {key for key in pinned.entry_keys() if not key.startswith("tag:")}, after_age
    assert tiered.redis.tags.records(new.ref) == {} and tiered.redis.tags.records(pinned.ref) != {}


def test_a_pinned_manifest_missing_from_the_inventory_still_keeps_its_blobs(tiered: TieredStore, ceph: Ceph) -> None:
    """A manifest written while Redis was down is in the bucket but not in the inventory: pinned, its
    blobs stay when the sweep removes everything past max_age."""
    pinned = Image("pinned-uncounted", [b"u" * 100_000])
    other = Image("other", [b"x" * 100_000])
    t0 = time.time() + 1000

    async def scenario() -> set[str]:
        for image in (pinned, other):
            await image.put(tiered, t0)
        await asyncio.to_thread(tiered.pin, pinned.ref, pinned.digest)
        await asyncio.to_thread(tiered.redis.inventory.forget, [keys.manifest_key(pinned.digest)])
        tiered.settings = replace(tiered.settings, max_age=50.0)
        await tiered.sweep(now=t0 + 200)
        return await asyncio.to_thread(bucket_keys, ceph, tiered)

    left = asyncio.run(scenario())
    assert left == {key for key in pinned.entry_keys() if not key.startswith("tag:")}, left
