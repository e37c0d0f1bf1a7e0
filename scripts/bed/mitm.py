"""mitmdump subprocess runner for the bed.

Owns: running ``mitmdump`` on 127.0.0.1 with whatever arguments its user
builds for the port (a free one on first start, the same one on restart),
readiness (its ``HTTP(S) proxy listening at 127.0.0.1:PORT.`` line, which
also tells the port, plus whatever :meth:`MitmDump.ready` adds), the confdir whose CA clients must trust
(:attr:`MitmDump.ca_cert`), the process log, and its peak memory; and the
bed's own use of it, :func:`passthrough`: the hostmap addon that routes
Docker Hub host names to the bed's servers, after any extra addon scripts.

The passthrough without extra scripts is a plain, non-caching proxy: the
baseline a cache is compared against, and what ``test_bed.py`` uses to
check real clients against the bed. The end-to-end tests run regcache's
own addon with the same runner (:mod:`bed.regcache_run`).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ._process import Process, ProcessOwner, without_proxies

HOSTMAP_ADDON = Path(__file__).with_name("hostmap_addon.py")
CA_CERT = "mitmproxy-ca-cert.pem"
_LISTENING = re.compile(r"HTTP\(S\) proxy listening at 127\.0\.0\.1:(\d+)\.")
_PEAK_RSS = re.compile(r"VmHWM:\s+(\d+) kB")


def mitmdump_bin() -> str:
    venv = Path(sys.executable).with_name("mitmdump")
    if venv.exists():
        return str(venv)
    found = shutil.which("mitmdump")
    if not found:
        raise FileNotFoundError("mitmdump not found next to the interpreter or on PATH")
    return found


class MitmError(RuntimeError):
    pass


class MitmDump(ProcessOwner):
    """``mitmdump ARGS`` listening on 127.0.0.1.

    ``args``: the port to listen on → mitmdump's arguments. They must make it
    listen on ``127.0.0.1`` at that port (0: any free one) with ``confdir``.
    ``confdir``: where mitmproxy keeps its CA (default ``workdir/conf``).
    ``port``: 0 picks a free port on first start; restarts keep the port.
    ``env``: extra environment; proxy variables are never inherited.
    """

    def __init__(
        self,
        workdir: str | Path,
        args: Callable[[int], Sequence[str]],
        *,
        confdir: str | Path | None = None,
        port: int = 0,
        env: dict[str, str] | None = None,
        program: Callable[[], str] | None = None,
    ) -> None:
        """``program``: what to run instead of mitmdump (a command taking mitmdump's arguments)."""
        self.program = program or mitmdump_bin
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.confdir = Path(confdir) if confdir else self.workdir / "conf"
        self.log_path = self.workdir / "mitmdump.log"
        self.port = port
        self.args = args
        self.extra_env = env or {}
        self._process = Process("mitmdump", self.log_path)

    @property
    def url(self) -> str:
        """Proxy URL for ``HTTPS_PROXY``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate clients must trust (created on first start)."""
        return self.confdir / CA_CERT

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, on the same port) and wait for the listening line."""
        if self.running:
            return
        # Without it the "listening at" line sits in a pipe buffer.
        env = {**without_proxies(), "PYTHONUNBUFFERED": "1", **self.extra_env}
        cmd = [self.program(), *self.args(self.port)]
        self._process.start(cmd, env, self._listening, timeout=timeout, error=MitmError)

    def _listening(self) -> bool:
        started = self.started_log()
        match = _LISTENING.search(started)
        if match:
            self.port = int(match[1])
        return match is not None and self.ready(started)

    def ready(self, started_log: str) -> bool:
        """Is it serving, going by what it logged since it started? (Subclasses whose addons
        start listeners of their own after the proxy wait for their line here.)"""
        return True

    def started_log(self) -> str:
        """What the current (or last) process logged since it started."""
        with self.log_path.open("rb") as f:
            f.seek(self._process.log_offset)
            return f.read().decode(errors="replace")

    def stop(self, timeout: float = 15.0, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Stop by ``sig``; its exit status (None: it was not running)."""
        return self._process.stop(timeout, sig)

    def log(self) -> str:
        """The whole log, across restarts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mark(self) -> int:
        """Position in :meth:`log`, for slicing off what came before."""
        return len(self.log())

    def peak_rss(self) -> int:
        """mitmdump's peak resident memory so far, in bytes (VmHWM)."""
        if self.pid is None:
            raise MitmError("mitmdump is not running")
        match = _PEAK_RSS.search(Path(f"/proc/{self.pid}/status").read_text())
        if match is None:
            raise MitmError(f"no VmHWM for mitmdump (pid {self.pid})")
        return int(match[1]) * 1024

    def __enter__(self) -> MitmDump:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def passthrough(
    workdir: str | Path,
    hostmap: dict[str, str],
    *,
    scripts: tuple[str | Path, ...] = (),
    options: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> MitmDump:
    """mitmdump routing Docker Hub names to the bed (not started).

    ``hostmap``: host name → ``http://127.0.0.1:PORT`` (see :func:`bed.hostmap`).
    ``scripts``: addon scripts loaded before the hostmap addon.
    ``options``: extra ``--set`` options.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    confdir = workdir / "conf"
    hostmap_path = workdir / "hostmap.json"
    hostmap_path.write_text(json.dumps(hostmap, indent=2))
    settings = {
        "confdir": str(confdir),
        # Lazy: CONNECT to an unresolvable Docker Hub name must not fail
        # before the request is seen and re-targeted.
        "connection_strategy": "lazy",
        # Never buffer 100 MB blobs in the proxy.
        "stream_large_bodies": "1m",
        **(options or {}),
        "bed_hostmap": str(hostmap_path),
    }

    def args(port: int) -> list[str]:
        out = ["--listen-host", "127.0.0.1", "--listen-port", str(port)]
        for script in (*scripts, HOSTMAP_ADDON):
            out += ["-s", str(script)]
        for key, value in settings.items():
            out += ["--set", f"{key}={value}"]
        return out

    return MitmDump(workdir, args, confdir=confdir, env=env)
