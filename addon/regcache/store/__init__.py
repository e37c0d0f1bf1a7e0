"""The store: small protocols for what regcache keeps (base), the keys entries live under (keys),
walks over what refers to what (walk), blob staging (staging), the cache_dir lock (lock), write
failures that must not fail an answer (errors), the access records (access), and `DiskStore`, the
implementation on diskcache (disk: the only module that touches diskcache's internals). A second
implementation provides the same protocols."""
