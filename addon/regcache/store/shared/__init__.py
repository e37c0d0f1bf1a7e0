"""The shared store of a regcache cluster: several nodes over one S3 bucket and one Redis.

- `s3`: blobs and manifests in the bucket (obstore), content-addressed, written whole after
  verification; presigned GET URLs; `sigv4`: the two multipart requests obstore lacks;
- `redis_client`, `redis`: what is small and mutable (tag records, pins, seen pairs, usage, the
  bucket's inventory and last uses, the node registry); `leases`: cluster-wide single flight and
  fill progress; `access`: the access records (`AccessRecords`) for the whole cluster;
- `errors`: `SharedUnavailable` (fall back to this node alone), `BucketUnusable` (stop start-up),
  the breaker that makes an outage fail fast and be logged once;
- `tiered`: `TieredStore`, the node's disk (L1) over the bucket (L2) and Redis, behind the same
  store protocols the services use (store/base.py).

obstore and redis are imported here only (the layer contract in pyproject.toml).
"""
