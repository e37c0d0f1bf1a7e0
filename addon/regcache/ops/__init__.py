"""The operations: the `regcache` command (cli), the store walks behind ls/purge/verify/gc/stats
(admin), bundles (bundle), `regcache warm` (warm) and the client set-up tools (setup)."""
