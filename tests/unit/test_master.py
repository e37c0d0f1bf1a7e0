"""`regcache run`'s master (fronts/master.py): mitmproxy's deprecated `add_log` event is made
for a log line only while an addon implements it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mitmproxy import log, options

from regcache.fronts.master import RegcacheMaster

from .flows import write_config


class LogListener:
    """An addon (as a `-s` script would be) that still uses `add_log`."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def add_log(self, entry: log.LogEntry) -> None:
        self.entries.append(entry.msg)


def test_log_lines_become_add_log_events_only_while_an_addon_implements_it(tmp_path: Path) -> None:
    async def go() -> None:
        opts = options.Options()
        opts.update_defer(regcache_config=write_config(tmp_path, 9, timeout=5))
        master = RegcacheMaster(opts)
        (events,) = [h for h in logging.getLogger().handlers if isinstance(h, log.LegacyLogEvents)]
        record = logging.LogRecord("regcache", logging.INFO, __file__, 1, "HIT GET x", None, None)
        try:
            assert not events.filter(record)  # nobody listens: no event (its cost: a hook per addon)
            listener = LogListener()
            master.addons.add(listener)
            assert events.filter(record)
            events.handle(record)
            await asyncio.sleep(0)  # the event is delivered on the event loop
            assert [entry for entry in listener.entries if entry.endswith("HIT GET x")] != []
        finally:
            await master.done()

    asyncio.run(go())
