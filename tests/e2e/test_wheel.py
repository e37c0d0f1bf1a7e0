"""The wheel as users install it: built, installed into a fresh venv and run from another directory
(scripts/check-wheel): `import regcache`, no top-level `addon`, `regcache --version`,
`regcache setup dockerd --root DIR --dry-run`, and every imported dependency declared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).resolve().parents[2] / "scripts" / "check-wheel"


def test_the_wheel_installs_and_runs_from_another_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(CHECK), "--keep", str(tmp_path / "wheel")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "installs and runs (regcache " in done.stdout
