"""Debian's ``redis-server`` (7.0) on 127.0.0.1: the real Redis of the shared-store tests.

Owns: starting ``redis-server`` without persistence (``--save '' --appendonly no``)
in its own directory on a free loopback port, readiness by ``PING`` over a raw
socket (the bed depends on no Redis client: the clients are what the tests
examine), and stopping and starting it by PID on the same port (fault tests:
"Redis stopped → pulls go on"). A restarted server is empty: nothing is saved.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Self

from ._process import Process, ProcessOwner, without_proxies
from .registry import free_port

COMMAND = "redis-server"


class RedisError(RuntimeError):
    pass


def ping(port: int, timeout: float = 1.0) -> bool | str:
    """True when the server on 127.0.0.1:``port`` answers ``PING`` with ``+PONG``; else why not."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
    except OSError as e:
        return str(e)
    return answer == b"+PONG\r\n" or repr(answer)


class Redis(ProcessOwner):
    """One ``redis-server`` in ``workdir``; :attr:`url` is ``redis://127.0.0.1:PORT/0``."""

    def __init__(self, workdir: str | Path, *, port: int = 0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._process = Process(f"redis-server on 127.0.0.1:{self.port}", self.workdir / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            COMMAND, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--daemonize", "no", "--logfile", "",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start (again) on the same port; return once it answers PING."""
        self._process.start(self.command(), without_proxies(), lambda: ping(self.port), timeout=timeout,
                            error=RedisError, interval=0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID (SIGKILL after ``timeout``)."""
        self._process.stop(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
