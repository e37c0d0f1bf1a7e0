"""scripts/setup-* as tests run them, and reading what they write.

Owns: running a set-up script as a subprocess (the real executable, its own Python), against a
temporary root directory; and reading the environment a systemd drop-in gives a service
(``Environment=`` lines, unquoted and unescaped the way systemd does for the values we write).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]  # scripts/, where the setup-* wrappers are


@dataclass(frozen=True)
class SetupRun:
    status: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def verbs(self) -> list[str]:
        """The first word of every output line but notes and the dry-run header."""
        return [line.split()[0] for line in self.lines if not line.startswith(("note:", "dry run:", "    "))]


def run_setup(tool: str, *args: str, root: Path | None = None, check: bool = True) -> SetupRun:
    """``scripts/setup-TOOL ARGS --root ROOT``; with ``check``, a non-zero exit fails the test."""
    command = [str(SCRIPTS / f"setup-{tool}"), *args, *(["--root", str(root)] if root else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    result = SetupRun(done.returncode, done.stdout, done.stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return result


def systemd_environment(dropin: str) -> dict[str, str]:
    """NAME → value of every ``Environment="NAME=VALUE"`` line (double-quoted, C escapes, ``%%``)."""
    environment = {}
    for line in dropin.splitlines():
        if found := re.fullmatch(r'Environment="((?:[^"\\]|\\.)*)"', line.strip()):
            name, _, value = re.sub(r"\\(.)", r"\1", found.group(1)).replace("%%", "%").partition("=")
            environment[name] = value
    return environment
