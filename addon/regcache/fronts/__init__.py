"""What clients talk to: the mitmproxy addon (proxy) and the lean master `regcache run` starts
(master), the registry mirror (mirror), the blob endpoint (blobserver, bloburls), their listening
sockets (listener), and one configuration running with its servers (node). Each front makes its
`RegistryRequest` through services.requests and turns an `Answer` into its own kind of response."""
