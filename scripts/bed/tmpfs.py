"""Small file systems for tests of a disk that is full or fills up: tmpfs mounts (root only),
and a filler file that takes a file system's last byte."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path


class Tmpfs:
    """tmpfs mounts under one directory, for tests of a disk that is full or fills up."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._mounted: list[Path] = []

    def mount(self, size: str) -> Path:
        """A fresh tmpfs of `size` (mount's syntax: `100m`)."""
        mountpoint = self._base / f"tmpfs{len(self._mounted)}"
        mountpoint.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True)
        self._mounted.append(mountpoint)
        return mountpoint

    @staticmethod
    def fill(mountpoint: Path) -> Path:
        """Fill the file system to its last byte with one file (delete it to free the space)."""
        filler = mountpoint / "filler"
        with filler.open("wb", buffering=0) as out:  # unbuffered: nothing left to flush at close
            for size in (1 << 20, 4096, 1):
                try:
                    while True:
                        out.write(b"\0" * size)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
        assert shutil.disk_usage(mountpoint).free == 0
        return filler

    def unmount_all(self) -> None:
        for mountpoint in reversed(self._mounted):
            # Lazy: a process that still has a file open there (a regcache being stopped) lets go later.
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)
