"""skopeo as a registry client that goes through a proxy.

Owns: the environment that makes skopeo 1.9 use ``HTTPS_PROXY`` and trust
the proxy CA (``SSL_CERT_FILE`` = system roots + CA), isolated from the
host's auth file, registries.conf and policy; and wrappers for the client
operations tests need (raw manifest inspect, copy to a local directory).

References are Docker Hub style (``library/oci-single:1``) and are addressed
as ``docker://registry-1.docker.io/...``, the name Docker Hub clients use.
Go clients never proxy ``127.0.0.1``, so real host names are required.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from ._process import proxied_env
from .images import SKOPEO, skopeo_env

DOCKER_HUB = "registry-1.docker.io"


def docker_ref(ref: str, registry: str = DOCKER_HUB) -> str:
    """``library/x:1`` → ``docker://registry-1.docker.io/library/x:1``.

    A reference whose first component looks like a host (has '.' or ':') or
    that already has a transport is kept as it is.
    """
    if "://" in ref:
        return ref
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return f"docker://{ref}"
    if "/" not in ref.split(":", 1)[0].split("@", 1)[0]:
        ref = f"library/{ref}"
    return f"docker://{registry}/{ref}"


class SkopeoError(RuntimeError):
    pass


class Skopeo:
    """skopeo with ``HTTPS_PROXY=proxy_url`` and the proxy's CA trusted."""

    def __init__(self, workdir: str | Path, proxy_url: str | None, ca_pem: str | Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proxy_url = proxy_url
        self.ca_pem = Path(ca_pem) if ca_pem else None
        self._policy = self.workdir / "policy.json"
        self._policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))

    def env(self) -> dict[str, str]:
        return proxied_env(skopeo_env(self.workdir), self.workdir, self.proxy_url, self.ca_pem)

    def command(self, *args: str, arch: str | None = None, os_: str | None = "linux") -> list[str]:
        cmd = [SKOPEO, "--policy", str(self._policy)]
        if arch:
            cmd += ["--override-arch", arch]
            if os_:
                cmd += ["--override-os", os_]
        return cmd + list(args)

    def start_copy(self, ref: str, dest: str | Path) -> subprocess.Popen[bytes]:
        """Start ``skopeo copy`` (amd64) without waiting: for tests that kill a client midway."""
        cmd = self.command("copy", "--quiet", docker_ref(ref), f"dir:{dest}", arch="amd64")
        return subprocess.Popen(cmd, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run(
        self,
        *args: str,
        arch: str | None = None,
        os_: str | None = "linux",
        check: bool = True,
        timeout: float = 300.0,
        text: bool = True,
    ) -> subprocess.CompletedProcess[str] | subprocess.CompletedProcess[bytes]:
        """``skopeo [--override-os/--override-arch] ARGS`` (global options go first)."""
        cmd = self.command(*args, arch=arch, os_=os_)
        proc = subprocess.run(cmd, check=False, env=self.env(), capture_output=True, text=text, timeout=timeout)
        if check and proc.returncode != 0:
            stderr = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
            raise SkopeoError(f"skopeo {' '.join(args)} failed ({proc.returncode}):\n{stderr}")
        return proc

    def inspect_raw(self, ref: str, *, arch: str | None = None) -> bytes:
        """The manifest bytes exactly as served (``skopeo inspect --raw``).

        For a list, ``--raw`` returns the list itself; ``arch`` then does not
        select a child.
        """
        proc = self.run("inspect", "--raw", docker_ref(ref), arch=arch, text=False)
        return proc.stdout  # type: ignore[return-value]

    def inspect_raw_digest(self, ref: str) -> str:
        return "sha256:" + hashlib.sha256(self.inspect_raw(ref)).hexdigest()

    def inspect(self, ref: str, *, arch: str = "amd64") -> dict[str, object]:
        """``skopeo inspect`` (resolves a list to the ``arch`` image, fetches its config)."""
        proc = self.run("inspect", docker_ref(ref), arch=arch)
        data: dict[str, object] = json.loads(proc.stdout)
        return data

    def copy_to_dir(
        self,
        ref: str,
        dest: str | Path,
        *,
        all_platforms: bool = False,
        transport: str = "dir",
        arch: str = "amd64",
        creds: str | None = None,
        tls_verify: bool = True,
        registries_conf: Path | None = None,
        timeout: float = 300.0,
    ) -> str:
        """Copy an image out through the proxy; return the digest skopeo reports.

        ``transport="dir"`` keeps manifests byte for byte, so the returned
        digest equals the registry's (the list's with ``all_platforms``, the
        ``arch`` image's otherwise). ``"oci"`` converts Docker manifests to
        OCI, so its digest differs for Docker-format images. ``tls_verify=False``:
        a plain-HTTP registry (``--src-tls-verify=false``). ``registries_conf``: skopeo's
        ``--registries-conf`` (skopeo 1.9 ignores ``CONTAINERS_REGISTRIES_CONF``).
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digestfile = dest.parent / f"{dest.name}.digest"
        args = ["--registries-conf", str(registries_conf)] if registries_conf else []
        args += ["copy", "--quiet", "--digestfile", str(digestfile)]
        if all_platforms:
            args.append("--all")
        if creds:
            args += ["--src-creds", creds]
        if not tls_verify:
            args.append("--src-tls-verify=false")
        args += [docker_ref(ref), f"{transport}:{dest}"]
        self.run(*args, arch=None if all_platforms else arch, timeout=timeout)
        return digestfile.read_text().strip()
