"""regcache under test (for the tests and the benchmarks): a real ``regcache run`` (or
``mitmdump -s addon/cache.py``).

Owns: writing regcache's YAML config, starting the venv's ``regcache run``
(by default) or mitmdump with the arguments the README gives for it
(:func:`regcache.ops.cli.mitmdump_args`), readiness (regcache's ready line: every
listener is up) and the listeners it names, and reading regcache's
one-line-per-request results from its log. Running the process (port kept across restarts,
readiness, stop, log, peak memory) is :class:`bed.mitm.MitmDump`'s.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from regcache.ops.cli import mitmdump_args

from .mitm import MitmDump

RESULT_LINE = re.compile(r"\] (HIT|MISS|REVALIDATED|STALE|PASS|ERROR) (GET|HEAD) (\S+)")
METRICS_LINE = re.compile(r"regcache: metrics at (http://\S+/metrics)")
# README, "Run it": the line to wait for, once every listener is up.
READY_LINE = re.compile(r"regcache ready: (.*)")


class Mitmdump(MitmDump):
    """regcache with ``config`` (written to ``workdir/regcache.yaml``), its CA in ``confdir``."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, object],
        confdir: Path,
        port: int = 0,
        options: dict[str, str] | None = None,
        mitmdump: bool = False,
    ) -> None:
        """`options`: further mitmproxy options (`--set KEY=VALUE`), e.g. proxyauth.
        `mitmdump`: run `mitmdump -s addon/cache.py` rather than `regcache run`."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "regcache.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        extra = [arg for key, value in (options or {}).items() for arg in ("--set", f"{key}={value}")]
        config_path = str(self.config_path)

        def run_args(port: int) -> list[str]:
            where = ["--listen-host", "127.0.0.1", "--port", str(port), "--confdir", str(confdir)]
            return ["run", "--config", config_path, *where, "--", *extra]

        super().__init__(
            workdir,
            (lambda port: mitmdump_args(config_path, "127.0.0.1", port, confdir) + extra) if mitmdump else run_args,
            confdir=confdir,
            port=port,
            program=None if mitmdump else lambda: str(Path(sys.executable).with_name("regcache")),
        )

    def metrics_url(self) -> str:
        """Where this regcache serves its Prometheus metrics (the latest start's port)."""
        found = METRICS_LINE.findall(self.log())
        assert found, "regcache logged no metrics endpoint"
        return str(found[-1])

    def ready(self, started_log: str) -> bool:
        return READY_LINE.search(started_log) is not None

    def listeners(self) -> dict[str, str]:
        """What the latest start's ready line names: `proxy`, `blob endpoint`, `mirror of HOST`,
        `metrics` → address."""
        found = READY_LINE.findall(self.started_log())
        assert found, "regcache logged no ready line"
        return dict(part.rsplit(" ", 1) for part in found[-1].split(", "))

    def mirror_url(self, registry: str = "registry-1.docker.io") -> str:
        """Where this regcache serves its registry mirror of `registry` (the latest start's port)."""
        url = self.listeners().get(f"mirror of {registry}")
        assert url is not None, f"regcache has no mirror of {registry}"
        return url

    def blob_endpoint(self) -> str:
        return self.listeners()["blob endpoint"]

    def results(self, since: int = 0) -> list[tuple[str, str, str]]:
        """(result, method, what) for every registry request logged since `since` (a :meth:`mark`)."""
        return [(m[1], m[2], m[3]) for m in RESULT_LINE.finditer(self.log()[since:])]
