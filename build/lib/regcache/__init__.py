"""regcache: a Docker/OCI registry pull-through cache that runs as a mitmproxy addon.

Entry points: `mitmdump -s addon/cache.py` (a checkout), `regcache run` and the other commands
(`regcache.ops.cli`), `python -m regcache`. The package is in layers, each importing only the ones
below it (pyproject's `[tool.importlinter]` checks it):

- `ops`: the commands (cli, admin, bundle, warm, client set-up);
- `fronts`: what clients talk to (the mitmproxy addon and its lean master, the registry mirror,
  the blob endpoint, their listeners, and `node`: one configuration running);
- `services`: the registry services both fronts use (upstream client, access, tokens, manifests,
  blobs and fills, completion, and `runtime`: their wiring and `decide`);
- `store`: the store protocols, their diskcache implementation, the access records;
- `metrics`, `config`, `logs`; at the bottom `oci` (pure registry and OCI knowledge) and
  `addresses` (host and URL helpers).

This module holds the version only, and imports nothing but the standard library: the client
set-up tools (`regcache.ops.setup`) import the package on nodes without regcache's dependencies.
"""

from importlib import metadata

try:
    __version__ = metadata.version("regcache")
except metadata.PackageNotFoundError:  # a checkout run without installing it (scripts/setup-*)
    __version__ = "0+unknown"
