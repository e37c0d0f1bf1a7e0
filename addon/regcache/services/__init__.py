"""The registry services both fronts use, free of mitmproxy and of any server: the upstream client
(upstream), who may read what (access, identity), the token service (tokens), manifests, blobs and
their fills (manifests, blobs), completing images (completion), the one `RegistryRequest` factory
(requests), what a request gets back (answers), and one configuration's wiring with `decide`
(runtime)."""
