"""mitmdump subprocess runner for the bed.

Owns: starting ``mitmdump`` on 127.0.0.1 (free port on first start, the same
port on restart) with a private confdir (its CA becomes the clients' trust
anchor: :attr:`MitmDump.ca_cert`), the hostmap addon that routes Docker Hub
host names to the bed's servers, any extra addon scripts (the addon under
test goes *before* the hostmap), and the process log.

Without extra scripts it is a plain, non-caching pass-through proxy: the
baseline a cache is compared against, and what ``test_bed.py`` uses to
check real clients against the bed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HOSTMAP_ADDON = Path(__file__).with_name("hostmap_addon.py")
_LISTENING = re.compile(rb"HTTP\(S\) proxy listening at (?:\*|[\d.]+|\[[^\]]*\]):(\d+)")


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


class MitmDump:
    """``mitmdump`` listening on 127.0.0.1, routing Docker Hub names to the bed.

    ``hostmap``: host name → ``http://127.0.0.1:PORT`` (see :func:`bed.hostmap`).
    ``scripts``: addon scripts loaded before the hostmap addon.
    ``options``: extra ``--set`` options.
    """

    def __init__(
        self,
        workdir: str | Path,
        hostmap: dict[str, str],
        *,
        scripts: tuple[str | Path, ...] = (),
        options: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.confdir = self.workdir / "conf"
        self.log_path = self.workdir / "mitmdump.log"
        self.hostmap_path = self.workdir / "hostmap.json"
        self.hostmap_path.write_text(json.dumps(hostmap, indent=2))
        self.scripts = tuple(Path(s) for s in scripts)
        self.options = {
            # Lazy: CONNECT to an unresolvable Docker Hub name must not fail
            # before the request is seen and re-targeted.
            "connection_strategy": "lazy",
            # Never buffer 100 MB blobs in the proxy.
            "stream_large_bodies": "1m",
            **(options or {}),
        }
        self.extra_env = env or {}
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Proxy URL for ``HTTPS_PROXY``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate clients must trust (created on first start)."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        cmd = [
            mitmdump_bin(),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            f"confdir={self.confdir}",
        ]
        for script in (*self.scripts, HOSTMAP_ADDON):
            cmd += ["-s", str(script)]
        cmd += ["--set", f"bed_hostmap={self.hostmap_path}"]
        for key, value in self.options.items():
            cmd += ["--set", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        # Without it the "listening at" line sits in a pipe buffer.
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                m = _LISTENING.search(f.read())
            if m:
                self.port = int(m.group(1))
                return
            if self._proc.poll() is not None:
                raise MitmError(f"mitmdump exited with {self._proc.returncode} during start\n{self.log_tail()}")
            time.sleep(0.05)
        self.stop()
        raise MitmError(f"mitmdump not listening after {timeout}s\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> MitmDump:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
