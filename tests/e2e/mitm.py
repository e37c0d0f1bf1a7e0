"""regcache under test: a real ``mitmdump -s addon/cache.py``, started like ``regcache run``.

Owns: writing regcache's YAML config, starting mitmdump with exactly the
arguments ``regcache run`` uses (:func:`addon.cli.mitmdump_args`), and
reading regcache's one-line-per-request results from its log. Running the
process (port kept across restarts, readiness, stop, log, peak memory) is
:class:`bed.mitm.MitmDump`'s.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from bed.mitm import MitmDump

from addon.cli import mitmdump_args

RESULT_LINE = re.compile(r"\] (HIT|MISS|REVALIDATED|STALE|PASS|ERROR) (GET|HEAD) (\S+)")
METRICS_LINE = re.compile(r"regcache: metrics at (http://\S+/metrics)")


class Mitmdump(MitmDump):
    """regcache with ``config`` (written to ``workdir/regcache.yaml``), its CA in ``confdir``."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, object],
        confdir: Path,
        port: int = 0,
        options: dict[str, str] | None = None,
    ) -> None:
        """`options`: further mitmproxy options (`--set KEY=VALUE`), e.g. proxyauth."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "regcache.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        extra = [arg for key, value in (options or {}).items() for arg in ("--set", f"{key}={value}")]
        super().__init__(
            workdir,
            lambda port: mitmdump_args(str(self.config_path), "127.0.0.1", port, confdir) + extra,
            confdir=confdir,
            port=port,
        )

    def metrics_url(self) -> str:
        """Where this regcache serves its Prometheus metrics (the latest start's port)."""
        found = METRICS_LINE.findall(self.log())
        assert found, "regcache logged no metrics endpoint"
        return str(found[-1])

    def results(self, since: int = 0) -> list[tuple[str, str, str]]:
        """(result, method, what) for every registry request logged since `since` (a :meth:`mark`)."""
        return [(m[1], m[2], m[3]) for m in RESULT_LINE.finditer(self.log()[since:])]
