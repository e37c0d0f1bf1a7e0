"""A private dockerd (Debian ``docker.io`` 20.10) as a real pull client.

Owns: starting dockerd as root with its own socket, data root, exec root,
pidfile and empty daemon config; putting the proxy into *dockerd's*
environment (the CLI's environment does not matter for pulls); trusting the
proxy CA through ``SSL_CERT_FILE`` (dockerd ignores ``/etc/docker/certs.d``
for Docker Hub); readiness via ``/_ping`` on the socket; and CLI wrappers
(``/usr/bin/docker``, not the ``/usr/local/bin`` one) for pull / inspect /
remove.

References are Docker Hub names (``library/oci-single:1``): dockerd
normalises them to ``docker.io/library/oci-single:1`` and fetches from
``registry-1.docker.io`` (token realm ``auth.docker.io``, blobs redirected
to ``production.cloudflare.docker.com``), all through ``HTTPS_PROXY``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ._process import Process, ProcessOwner, proxied_env, without_proxies

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
CTR = "/usr/bin/ctr"


class DockerdError(RuntimeError):
    pass


def _ping(sock: Path, timeout: float = 1.0) -> bool:
    """GET /_ping over the unix socket; True on ``200 OK``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            data = s.recv(64)
    except OSError:
        return False
    return data.startswith(b"HTTP/1.1 200")


class Dockerd(ProcessOwner):
    """One dockerd with its own state, talking to the world through ``proxy_url``.

    ``ca_pem``: the proxy's CA certificate (PEM file) or None.
    ``storage_driver``: overlay2 works on this machine's ext4 root; pass
    "vfs" where overlayfs is unavailable (much slower, copies each layer).
    """

    def __init__(
        self,
        workdir: str | Path,
        proxy_url: str | None,
        ca_pem: str | Path | None = None,
        *,
        storage_driver: str = "overlay2",
        debug: bool = False,
        extra_args: tuple[str, ...] = (),
        daemon_config: dict[str, object] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proxy_url = proxy_url
        self.ca_pem = Path(ca_pem) if ca_pem else None
        self.storage_driver = storage_driver
        self.debug = debug
        self.extra_args = extra_args
        self.daemon_config = daemon_config or {}
        self.data_root = self.workdir / "root"
        self.log_path = self.workdir / "dockerd.log"
        self.cli_config = self.workdir / "cli"
        self._rundir: Path | None = None
        self._process = Process("dockerd", self.log_path)

    # -- paths -------------------------------------------------------------------

    @property
    def rundir(self) -> Path:
        """Socket, exec root and pidfile.

        Kept short: unix socket paths are limited to 107 bytes, and containerd
        puts ``containerd.sock.ttrpc`` two levels below the exec root; a
        pytest tmp path can be too long for that.
        """
        if self._rundir is None:
            if len(str(self.workdir)) <= 40:
                self._rundir = self.workdir
            else:
                self._rundir = Path(tempfile.mkdtemp(prefix="bed-dk-", dir="/tmp"))
        return self._rundir

    @property
    def socket(self) -> Path:
        return self.rundir / "docker.sock"

    @property
    def host(self) -> str:
        """Value for ``docker -H`` / ``DOCKER_HOST``."""
        return f"unix://{self.socket}"

    # -- lifecycle -----------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = proxied_env(without_proxies(), self.workdir, self.proxy_url, self.ca_pem)
        env.pop("DOCKER_HOST", None)
        # dockerd's containerd inherits it: a containerd that does not stop in time gets SIGUSR1
        # before SIGKILL and writes its goroutine dump to $TMPDIR, which close() removes.
        env["TMPDIR"] = str(self.rundir)
        return env

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        daemon_json = self.workdir / "daemon.json"
        # An explicit config (empty unless `daemon_config`) keeps /etc/docker/daemon.json
        # (mirrors, proxies, insecure registries) out of the test.
        daemon_json.write_text(json.dumps(self.daemon_config) + "\n")
        exec_root = self.rundir / "exec"
        cmd = [
            DOCKERD,
            "--host",
            self.host,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(exec_root),
            "--pidfile",
            str(self.rundir / "dockerd.pid"),
            "--config-file",
            str(daemon_json),
            "--storage-driver",
            self.storage_driver,
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--ip-masq=false",
            *(["--debug"] if self.debug else []),
            *self.extra_args,
        ]
        self._process.start(cmd, self.env(), lambda: _ping(self.socket), timeout=timeout, error=DockerdError)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM by PID and wait; dockerd stops its own containerd."""
        self._process.stop(timeout)

    def close(self) -> None:
        """Stop and remove the short run directory if one was made."""
        self.stop()
        if self._rundir is not None and self._rundir != self.workdir:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    # -- CLI -----------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H <our socket> ARGS``."""
        self.cli_config.mkdir(exist_ok=True)
        env = without_proxies()
        env.pop("DOCKER_HOST", None)
        # Own CLI config: no credentials or context from the host's ~/.docker.
        env["DOCKER_CONFIG"] = str(self.cli_config)
        proc = subprocess.run(
            [DOCKER, "-H", self.host, *args], check=False, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise DockerdError(
                f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}\n--- dockerd log ---\n"
                + self.log_tail(20)
            )
        return proc

    def pull(self, ref: str, *, check: bool = True, platform: str | None = None) -> subprocess.CompletedProcess[str]:
        args = ["pull", "--quiet"]
        if platform:
            args += ["--platform", platform]
        return self.cli(*args, ref, check=check)

    def inspect(self, ref: str) -> dict[str, object]:
        out = self.cli("image", "inspect", ref).stdout
        data: list[dict[str, object]] = json.loads(out)
        return data[0]

    def repo_digests(self, ref: str) -> list[str]:
        """``RepoDigests`` of a pulled image, e.g. ``["oci-single@sha256:…"]``.

        dockerd shortens ``docker.io/library/x`` to ``x`` here, and records the
        digest of what the tag resolved to: the index / manifest list for
        multi-arch images, not the platform manifest.
        """
        digests = self.inspect(ref).get("RepoDigests")
        return [str(d) for d in digests] if isinstance(digests, list) else []

    def image_id(self, ref: str) -> str:
        """Image ID = the config blob digest of the platform image."""
        return str(self.inspect(ref)["Id"])

    def images(self) -> list[str]:
        out = self.cli("image", "ls", "--all", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}").stdout
        return [line for line in out.splitlines() if line.strip()]

    def rmi(self, ref: str, *, prune: bool = True) -> None:
        """Remove ``ref``; with ``prune`` also every other image, fully cold.

        Layers shared with another image survive a plain ``rmi``, and dockerd
        skips downloading any layer it still has; pruning all images makes
        the next pull fetch every layer again. See :meth:`remove_all_images`
        for the manifests.
        """
        self.cli("rmi", "--force", ref, check=False)
        if prune:
            self.remove_all_images()

    def remove_all_images(self, timeout: float = 15.0) -> None:
        """Remove every image and wait until dockerd's manifest cache is empty.

        dockerd 20.10 keeps pulled manifests in its containerd content store
        (namespace ``moby``) and, after resolving a tag with HEAD, reads the
        manifest from there instead of GETting it. containerd garbage-collects
        them about 0.7 s after the images are removed; until then a re-pull
        sends no manifest GET. Waiting for the store to empty makes the next
        pull fully cold, deterministically.
        """
        self.cli("image", "prune", "--all", "--force")
        started = time.monotonic()
        removed_by_hand = False
        while leftovers := self.content_digests():
            waited = time.monotonic() - started
            if waited > timeout:
                raise DockerdError(f"containerd content store not emptied after {timeout}s: {leftovers}")
            if waited > 3 and not removed_by_hand:
                # Seen once on a loaded machine: an entry containerd's GC left behind. Removing it
                # ourselves keeps the next pull cold without waiting on the GC's schedule.
                self._ctr("content", "rm", *leftovers)
                removed_by_hand = True
            time.sleep(0.05)

    @property
    def containerd_socket(self) -> Path:
        """dockerd's managed containerd (it starts its own under the exec root)."""
        return self.rundir / "exec" / "containerd" / "containerd.sock"

    def content_digests(self) -> list[str]:
        """Blobs in dockerd's containerd content store: the manifests it has cached."""
        return self._ctr("content", "ls", "--quiet").split()

    def _ctr(self, *args: str) -> str:
        command = [CTR, "--address", str(self.containerd_socket), "--namespace", "moby", *args]
        proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise DockerdError(f"ctr {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def __enter__(self) -> Dockerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
