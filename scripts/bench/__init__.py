"""regcache's benchmarks: `small_big` (a big and a small multi-arch image pulled with dockerd and skopeo,
directly, through Debian's docker-registry in proxy mode and through regcache; `scripts/bench/run`),
`concurrency` (N skopeo clients at once; `scripts/bench/run-concurrent`), and `store` (the disk
store's operations at 10k, 100k and 1M entries; `scripts/bench/run-store`). What they share: `common`.
They run as `python -m bench.NAME` with `scripts/` on `PYTHONPATH`, so they import the test bed
(`scripts/bed`) as the tests do, and nothing from `tests/`."""
