"""A single-node Ceph with radosgw on 127.0.0.1: the real S3 engine of the shared-store tests.

Owns: the cluster's ``ceph.conf`` (no cephx, pool size 1, a RAM-backed
memstore OSD, every port, socket, pid file and log under one temporary
directory), creating and starting its three daemons (one monitor, one OSD,
one radosgw; no manager: nothing here needs one), readiness by real checks
(the monitor answers ``ceph -s``, the OSD is ``up`` in ``ceph osd stat``,
radosgw answers HTTP), an S3 user with a known key pair and one bucket,
stopping and starting radosgw alone (fault tests) and stopping everything by
PID, and radosgw's access log (one line per S3 request) for counting requests.

Every wait is bounded: ``radosgw-admin`` and the ``ceph`` CLI hang while no
OSD or monitor answers, and radosgw's own start waits up to
``rgw init timeout`` for the OSD; all three get explicit timeouts here
(measured with no OSD: ``radosgw-admin user create`` exits 5 after 10 s,
radosgw is given up by the bed after its start timeout).

Measured on this machine (2 cores, Debian 12, Ceph 16.2.15): start-up 2.1-2.7 s
idle, 4.8-7.8 s while other work loads both cores (25 starts in a row, none
failed); stop 0.35-1 s; RSS with nothing stored: monitor 34 MB, OSD 48 MB,
radosgw 52 MB (a manager would add ~300 MB). memstore keeps what was written
in RAM, deleted objects' memory included: the OSD grew to 520 MB after ~600 MB
written and deleted.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from . import client
from ._process import Process, without_proxies
from .s3 import S3

# The programs the bed runs (Debian 12 packages ceph-mon, ceph-osd, radosgw; ceph-common for the CLIs).
COMMANDS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
REGION = "us-east-1"
ACCESS_KEY = "REGCACHEBEDACCESSKEY"
SECRET_KEY = "regcache-bed-secret-key-0123456789abcdef"  # a throwaway key for a loopback-only bed
DEFAULT_BUCKET = "regcache-bed"
# The OSD's messengers (public, cluster, two heartbeats) and radosgw's client bind ports in this block.
_PORT_BLOCK = 16
# How long a CLI call may take before the bed gives up on it (it would otherwise wait for ever).
_CLI_TIMEOUT = 20.0

# beast: 0x7fc6646606e0: 127.0.0.1 - bed [01/Dec/2026:21:34:28.987 +0000] "GET / HTTP/1.1" 200 231 - "curl/7.88.1" -
_BEAST_LINE = re.compile(
    r'beast: \S+ (?P<remote>\S+) - (?P<user>\S+) \[[^\]]+\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
)


class CephError(RuntimeError):
    pass


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int, low: int = 20000, high: int = 40000, tries: int = 200) -> int:
    """First port of ``count`` consecutive ports on 127.0.0.1 that were free a moment ago.

    Ceph daemons bind ``ms bind port min..max`` themselves and cannot be given
    port 0, so the bed reserves a known, currently free range.
    """
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(low, high - count)
        if all(_port_free(p) for p in range(base, base + count)):
            return base
    raise CephError(f"no block of {count} free ports in {low}..{high}")


@dataclass(frozen=True)
class CephPorts:
    """The monitor's and radosgw's ports, and the range the OSD's messengers bind in."""

    mon: int
    rgw: int
    bind_min: int
    bind_max: int

    @classmethod
    def pick(cls) -> CephPorts:
        base = free_port_block(_PORT_BLOCK + 2)
        return cls(mon=base, rgw=base + 1, bind_min=base + 2, bind_max=base + 1 + _PORT_BLOCK)


def ceph_conf(root: Path, fsid: str, ports: CephPorts, store_bytes: int) -> str:
    """The cluster's configuration: everything under ``root``, everything on 127.0.0.1."""
    return f"""\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{ports.mon}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr2 = false
ms bind port min = {ports.bind_min}
ms bind port max = {ports.bind_max}
auth cluster required = none
auth service required = none
auth client required = none
# One OSD: one copy of everything, placed on OSDs rather than hosts.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
# The monitor commits map changes (each pool radosgw creates is one) every 0.1 s, not every 1 s.
paxos propose interval = 0.1
osd objectstore = memstore
memstore device bytes = {store_bytes}
run dir = {root}/run
crash dir = {root}/crash
mon data = {root}/mon/$name
osd data = {root}/osd/$name
rgw data = {root}/rgw/$name
keyring = {root}/keyring
# Clients (the CLIs, radosgw) give up instead of waiting for ever for a monitor or an OSD.
client mount timeout = 10
rados mon op timeout = 10
rados osd op timeout = 10
# The CLIs log nothing but errors (on stderr) and open no admin socket; daemons log to stderr below.
log file =
log to stderr = false
err to stderr = true
admin socket =
[mon]
log to stderr = true
admin socket = {root}/run/$name.asok
[osd]
log to stderr = true
admin socket = {root}/run/$name.asok
# The bed places the OSD in the CRUSH map itself: the OSD's own update at start-up is a monitor
# command sent before it has the monitor map, which the monitor sometimes refused with 'wrong fsid'
# (a zero fsid in the command) and the OSD exited.
osd crush update on start = false
osd class update on start = false
[client.rgw]
log to stderr = true
admin socket = {root}/run/$name.asok
rgw frontends = beast endpoint=127.0.0.1:{ports.rgw}
# Give up after 30 s without an OSD (default 300 s).
rgw init timeout = 30
rgw enable usage log = false
# Deleted objects' data is freed within seconds, not hours (the store is RAM).
rgw gc obj min wait = 5
rgw gc processor period = 5
"""


@dataclass(frozen=True)
class RgwRecord:
    """One S3 request as radosgw's access log shows it."""

    method: str
    path: str  # without query string
    query: str
    status: int
    user: str
    size: int = 0  # bytes radosgw sent


def parse_beast_line(line: str) -> RgwRecord | None:
    m = _BEAST_LINE.search(line)
    if not m:
        return None
    path, _, query = m.group("uri").partition("?")
    size = m.group("size")
    return RgwRecord(m.group("method"), path, query, int(m.group("status")), m.group("user"),
                     int(size) if size != "-" else 0)  # fmt: skip


class Ceph:
    """One monitor, one memstore OSD and one radosgw, all under ``workdir``.

    ``store_bytes``: the OSD's RAM-backed capacity (only what is written
    takes memory). S3: :attr:`endpoint`, :attr:`region`, :attr:`access_key`,
    :attr:`secret_key`, :attr:`bucket` (created by :meth:`start`).
    """

    def __init__(self, workdir: str | Path, *, store_bytes: int = 2 << 30, bucket: str = DEFAULT_BUCKET) -> None:
        self.workdir = Path(workdir)
        self.store_bytes = store_bytes
        self.bucket = bucket
        self.region = REGION
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.ports = CephPorts.pick()
        self.conf = self.workdir / "ceph.conf"
        self.log_dir = self.workdir / "log"
        self._mon = Process("ceph-mon", self.log_dir / "mon.log")
        self._osd = Process("ceph-osd", self.log_dir / "osd.log")
        self._rgw = Process(f"radosgw on {self.endpoint}", self.log_dir / "rgw.log")
        self._osd_id: int | None = None
        self.startup_seconds: float | None = None
        self._env = without_proxies()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.rgw}"

    @property
    def s3(self) -> S3:
        """The bed's own S3 client (ground truth for tests; not what the product uses)."""
        return S3(self.endpoint, self.region, self.access_key, self.secret_key)

    @property
    def rgw_running(self) -> bool:
        return self._rgw.running

    def pids(self) -> dict[str, int]:
        """PID of each running daemon by name (``mon``, ``osd``, ``rgw``)."""
        procs = {"mon": self._mon, "osd": self._osd, "rgw": self._rgw}
        return {name: p.pid for name, p in procs.items() if p.running and p.pid is not None}

    # -- CLIs ------------------------------------------------------------------

    def _run(self, *cmd: str, timeout: float = _CLI_TIMEOUT) -> str:
        """Run a Ceph CLI against this cluster; its stdout. Raises CephError on failure or timeout."""
        argv = [cmd[0], "-c", str(self.conf), *cmd[1:]]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self._env)
        except subprocess.TimeoutExpired as e:
            raise CephError(f"{' '.join(cmd)}: no answer after {timeout}s") from e
        if done.returncode != 0:
            raise CephError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def ceph_json(self, *args: str, timeout: float = 10.0) -> dict[str, object]:
        """``ceph ARGS --format json``, parsed (``--connect-timeout`` bounds the wait for the monitor)."""
        out = self._run("ceph", "--connect-timeout", str(int(timeout)), *args, "--format", "json", timeout=timeout + 5)
        data = json.loads(out)
        if not isinstance(data, dict):
            raise CephError(f"ceph {' '.join(args)}: unexpected {out[:200]!r}")
        return data

    # -- readiness -------------------------------------------------------------

    def _mon_ready(self) -> bool | str:
        try:
            status = self.ceph_json("status", timeout=2)
        except CephError as e:
            return str(e)
        return "mon0" in status.get("quorum_names", []) or "no quorum"  # type: ignore[operator]

    def osd_up(self) -> bool:
        """Whether the monitor counts our OSD as up (False while the monitor does not answer)."""
        try:
            stat = self.ceph_json("osd", "stat", timeout=2)
        except CephError:
            return False
        return stat.get("num_up_osds") == 1

    def _rgw_ready(self) -> bool | str:
        try:
            status = client.request("GET", f"{self.endpoint}/", timeout=1).status
        except OSError as e:
            return str(e)
        return status == 200 or f"HTTP {status}"

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Create the cluster and start it; return once the bucket exists (2-8 s here)."""
        began = time.monotonic()
        deadline = began + timeout
        for sub in ("run", "crash", "mon/mon.mon0", "rgw/client.rgw"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(ceph_conf(self.workdir, self.fsid, self.ports, self.store_bytes))
        try:
            self._start_mon(deadline)
            self._start_osd(deadline)
            self.start_radosgw(max(1.0, deadline - time.monotonic()))
            self._create_user_and_bucket()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - began

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CephError("Ceph start-up timed out")
        return left

    def _start_mon(self, deadline: float) -> None:
        monmap = self.workdir / "monmap"
        self._run("monmaptool", "--create", "--add", "mon0", f"v1:127.0.0.1:{self.ports.mon}", "--fsid", self.fsid,
                  str(monmap))
        self._run("ceph-mon", "--mkfs", "-i", "mon0", "--monmap", str(monmap))
        self._mon.start(["ceph-mon", "-c", str(self.conf), "-f", "-i", "mon0"], self._env, self._mon_ready,
                        timeout=self._left(deadline), error=CephError, interval=0.1)

    def _start_osd(self, deadline: float) -> None:
        self._osd_id = int(self._run("ceph", "osd", "create", self.osd_uuid).strip())
        self._run("ceph", "osd", "crush", "add", f"osd.{self._osd_id}", "1.0", "root=default", "host=bed")
        (self.workdir / "osd" / f"osd.{self._osd_id}").mkdir(parents=True, exist_ok=True)
        self._run("ceph-osd", "-i", str(self._osd_id), "--mkfs", "--osd-uuid", self.osd_uuid)
        self._osd.start(["ceph-osd", "-c", str(self.conf), "-f", "-i", str(self._osd_id)], self._env,
                        lambda: self.osd_up() or "OSD not up", timeout=self._left(deadline), error=CephError,
                        interval=0.2)

    def _create_user_and_bucket(self) -> None:
        self._run("radosgw-admin", "user", "create", "--uid", "bed", "--display-name", "regcache bed",
                  "--access-key", self.access_key, "--secret", self.secret_key)
        self.s3.create_bucket(self.bucket)

    def start_radosgw(self, timeout: float = 30.0) -> None:
        """Start radosgw (again) on the same port; wait until it answers HTTP."""
        self._rgw.start(["radosgw", "-c", str(self.conf), "-f", "-n", "client.rgw"], self._env, self._rgw_ready,
                        timeout=timeout, error=CephError, interval=0.05)

    def stop_radosgw(self, timeout: float = 10.0) -> None:
        """Stop radosgw (SIGTERM by PID, SIGKILL after ``timeout``); the monitor and the OSD keep running."""
        self._rgw.stop(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every daemon (radosgw, OSD, monitor: the OSD says goodbye to a live monitor) and
        delete the cluster's data; the logs stay in ``workdir/log``."""
        for proc in (self._rgw, self._osd, self._mon):
            proc.stop(timeout)
        for sub in ("mon", "osd", "rgw", "run", "crash", "monmap"):
            path = self.workdir / sub
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # -- radosgw's access log ----------------------------------------------------

    def mark(self) -> int:
        """Position in radosgw's log; pass to :meth:`requests`."""
        log = self._rgw.log_path
        return log.stat().st_size if log.exists() else 0

    def requests(self, since: int = 0) -> list[RgwRecord]:
        """S3 requests radosgw logged after ``since`` (it logs after answering: poll if a count races)."""
        log = self._rgw.log_path
        if not log.exists():
            return []
        with log.open("rb") as f:
            f.seek(since)
            data = f.read().decode(errors="replace")
        return [rec for rec in map(parse_beast_line, data.splitlines()) if rec is not None]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(lines)}" for p in (self._mon, self._osd, self._rgw))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
