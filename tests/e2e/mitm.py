"""A real `mitmdump -s addon/cache.py` subprocess for end-to-end tests, started like `regcache run`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from addon.cli import CA_CERT, mitmdump_args

LISTENING = re.compile(r"HTTP\(S\) proxy listening at 127\.0\.0\.1:(\d+)\.")
RESULT_LINE = re.compile(r"\] (HIT|MISS|REVALIDATED|STALE|PASS|ERROR) (GET|HEAD) (\S+)")


class Mitmdump:
    def __init__(self, workdir: Path, config: dict[str, object], confdir: Path, port: int = 0) -> None:
        self.workdir = workdir
        self.confdir = confdir
        self.config_path = workdir / "regcache.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "mitmdump.log"
        self.port = port  # 0: any free port; kept across restarts once known
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / CA_CERT

    def start(self, timeout: float = 30.0) -> None:
        mitmdump = Path(sys.executable).with_name("mitmdump")
        args = mitmdump_args(str(self.config_path), "127.0.0.1", self.port, self.confdir)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(mitmdump), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")[offset:]
            if match := LISTENING.search(text):
                self.port = int(match[1])
                return
            if self._process.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self._process.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"mitmdump did not start in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def peak_rss(self) -> int:
        """mitmdump's peak resident memory so far, in bytes (VmHWM)."""
        assert self._process is not None
        status = Path(f"/proc/{self._process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024  # type: ignore[index]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def mark(self) -> int:
        return len(self.log())

    def results(self, since: int = 0) -> list[tuple[str, str, str]]:
        """(result, method, what) for every registry request logged since `since`."""
        return [(m[1], m[2], m[3]) for m in RESULT_LINE.finditer(self.log()[since:])]
