"""regcache: a Docker/OCI registry pull-through cache that runs as a mitmproxy addon.

Entry point: `mitmdump -s addon/cache.py`. Modules: routes (parsing, no I/O), config (YAML →
settings), store (content-addressed store), upstream (our HTTP client), manifests and blobs (the
registry services), blobserver (loopback streaming of blob bytes), cache (the mitmproxy addon).
"""
