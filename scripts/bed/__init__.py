"""End-to-end test bed for regcache (a Docker/OCI pull-through cache addon), shared by the tests
(pytest finds it through ``pythonpath = ["scripts"]`` in pyproject.toml) and the benchmarks
(``scripts/bench/``, run with ``scripts/`` on ``PYTHONPATH``). It imports nothing from ``tests/``.

Owns nothing itself; it ties the pieces together and names Docker Hub's hosts:

* :mod:`bed.tokens` — token server (``auth.docker.io``), in-process thread
* :mod:`bed.cdn` — blob CDN (``production.cloudflare.docker.com``), in-process thread
* :mod:`bed.registry` — distribution 2.8.2 (``registry-1.docker.io``), subprocess
* :mod:`bed.images` — synthetic images built in Python, pushed with skopeo
* :mod:`bed.dockerd` — a private dockerd as a pull client through a proxy
* :mod:`bed.skopeo` — skopeo as a client through a proxy
* :mod:`bed.mitm` / :mod:`bed.hostmap_addon` — mitmdump runner and the addon that
  routes Docker Hub host names to the local servers
* :mod:`bed.regcache_run` — regcache itself under test (``regcache run`` or mitmdump with
  ``addon/cache.py``), on that runner
* :mod:`bed.fixtures` — session-scoped pytest fixtures over all of the above
* :mod:`bed.ceph` / :mod:`bed.redis` — the shared store's real engines: a
  single-node Ceph with radosgw (S3) and ``redis-server``, subprocesses;
  :mod:`bed.s3` — the bed's own minimal S3 client (SigV4) for set-up and
  ground truth; :mod:`bed.shared_fixtures` — their session fixtures
* :mod:`bed.setup_scripts` — ``scripts/setup-*`` run against a temporary root, and
  the systemd drop-ins they write
* :mod:`bed._process` / :mod:`bed._http` — what the subprocess servers and the
  in-process servers above share (lifecycle, logs, proxy environments)

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cdn import Cdn
    from .registry import Registry
    from .tokens import TokenServer

REGISTRY_HOST = "registry-1.docker.io"
AUTH_HOST = "auth.docker.io"
# Docker Hub redirects blobs to either CDN, per request; the bed's registry
# only ever uses the first, the second is mapped too for completeness.
CDN_HOSTS = ("production.cloudflare.docker.com", "production.cloudfront.docker.com")
# crane and some tools address Docker Hub as index.docker.io.
REGISTRY_ALIASES = ("index.docker.io",)


def hostmap(registry: Registry, tokens: TokenServer, cdn: Cdn) -> dict[str, str]:
    """Docker Hub host name → local ``http://127.0.0.1:PORT`` of the bed server."""
    out = {REGISTRY_HOST: registry.url, AUTH_HOST: tokens.url}
    out.update({alias: registry.url for alias in REGISTRY_ALIASES})
    out.update({host: cdn.url for host in CDN_HOSTS})
    return out
