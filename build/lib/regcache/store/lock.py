"""One running cache per cache_dir: the process that runs it holds an exclusive `flock` on
`<cache_dir>/regcache.lock` (which names its PID), so a second one can neither clear the first's
`staging/` nor fill beside it. Admin tools open the store without it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class CacheDirBusy(OSError):
    """Another process runs a cache on this cache_dir."""


LOCK_FILE = "regcache.lock"
_held_locks: dict[Path, tuple[int, int]] = {}  # this process's cache_dir locks: dir → (fd, users)


def lock_cache_dir(cache_dir: Path) -> bool:
    """Hold `cache_dir` for this process (an exclusive flock on its lock file, which names our
    PID); True if this call took it, False if this process held it already. Raises CacheDirBusy
    naming the PID of the process that holds it."""
    key = cache_dir.resolve()
    if key in _held_locks:
        fd, users = _held_locks[key]
        _held_locks[key] = (fd, users + 1)
        return False
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        message = f"in use by another regcache (pid {holder}); stop it, or give this one another cache_dir"
        raise CacheDirBusy(message) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = (fd, 1)
    return True


def unlock_cache_dir(cache_dir: Path) -> None:
    key = cache_dir.resolve()
    fd, users = _held_locks.pop(key)
    if users > 1:
        _held_locks[key] = (fd, users - 1)
    else:
        os.close(fd)  # releases the flock
