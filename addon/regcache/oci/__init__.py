"""Pure registry and OCI knowledge, no I/O, importing nothing else of regcache: the API's request
grammar (api), manifest media types (media), digests (digest), what a manifest refers to (manifest),
image references (reference) and the token-auth protocol (auth)."""
