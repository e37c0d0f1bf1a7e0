"""Child processes of the test bed (dockerd, docker-registry, mitmdump) and their environments.

Owns: starting a command with its output appended to log files (kept across
restarts), waiting for it to become ready without fixed sleeps (polling a
check, failing at once if the process dies), stopping it by a signal with a
bounded wait before SIGKILL (and its exit status), the tail of its logs for error messages; and the
environment a child gets: proxy variables stripped (:func:`without_proxies`)
or, for a client that must go through a proxy, set to that proxy with its CA
trusted (:func:`proxied_env`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

SYSTEM_ROOTS = "/etc/ssl/certs/ca-certificates.crt"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def without_proxies(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) without any proxy variable, in either case."""
    source = os.environ if env is None else env
    return {k: v for k, v in source.items() if k.lower() not in PROXY_VARS}


def ca_bundle(dest: Path, *extra_pems: str | Path) -> Path:
    """System roots plus ``extra_pems`` in one file, for ``SSL_CERT_FILE``.

    Setting ``SSL_CERT_FILE`` replaces Go's system pool, so the system roots
    have to be in the bundle too.
    """
    parts = [Path(SYSTEM_ROOTS).read_text()]
    parts += [Path(p).read_text() for p in extra_pems]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(p.strip() + "\n" for p in parts))
    return dest


def proxied_env(env: Mapping[str, str], workdir: Path, proxy_url: str | None, ca_pem: Path | None) -> dict[str, str]:
    """``env`` for a Go client that sends everything through ``proxy_url`` and trusts ``ca_pem``.

    ``NO_PROXY`` is explicitly empty: Go never proxies loopback anyway, and an
    inherited one could exempt the Docker Hub names. ``SSL_CERT_FILE`` always
    points at a bundle in ``workdir`` (the machine may export its own).
    """
    out = dict(env)
    if proxy_url:
        out["HTTPS_PROXY"] = proxy_url
        out["HTTP_PROXY"] = proxy_url
    out["NO_PROXY"] = ""
    bundle = ca_bundle(workdir / "ca-bundle.pem", *([ca_pem] if ca_pem else []))
    out["SSL_CERT_FILE"] = str(bundle)
    out.pop("SSL_CERT_DIR", None)
    return out


class Process:
    """One child process: its ``Popen``, its log files, how it starts and stops.

    stdout is appended to ``log_path``; stderr to ``err_path``, or to the
    same file when that is None. ``name`` appears in error messages.
    """

    def __init__(self, name: str, log_path: Path, *, err_path: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self.err_path = err_path
        # Size of log_path when the current process started: its own output follows.
        self.log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str],
        ready: Callable[[], bool | str],
        *,
        timeout: float,
        error: type[Exception] = RuntimeError,
        interval: float = 0.05,
    ) -> None:
        """Start ``cmd`` and poll ``ready`` until it returns True.

        ``ready`` returns True once the process serves; anything else means
        not yet, and a string says why (shown if ``timeout`` passes). Raises
        ``error`` if the process exits first or never gets ready (then it is
        stopped).
        """
        if self.running:
            raise error(f"{self.name} is already running (pid {self.pid})")
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            if self.err_path is None:
                self._proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env)
                )
            else:
                with self.err_path.open("ab") as err:
                    self._proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=dict(env))
        deadline = time.monotonic() + timeout
        why: bool | str = False
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise error(f"{self.name} exited with {self._proc.returncode} during start\n{self.log_tail()}")
            why = ready()
            if why is True:
                return
            time.sleep(interval)
        self.stop(timeout=10.0)
        detail = f" ({why})" if isinstance(why, str) and why else ""
        raise error(f"{self.name} not ready after {timeout}s{detail}\n{self.log_tail()}")

    def stop(self, timeout: float, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """``sig`` (SIGTERM) by PID and wait up to ``timeout`` seconds, then SIGKILL. Its exit
        status (negative: killed by that signal); None when it was not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` of the log; of each log, headed by its name, when stderr has its own."""
        if self.err_path is None:
            if not self.log_path.exists():
                return ""
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        parts = []
        for f in (self.err_path, self.log_path):
            if f.exists():
                text = f.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {f.name} ---\n" + "\n".join(text))
        return "\n".join(parts)


class ProcessOwner:
    """Mixin for a server class whose child process is ``self._process``."""

    _process: Process

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)
