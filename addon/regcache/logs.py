"""regcache's log: the `regcache` logger, its one line per registry request (`log_request`), and log
lines that cannot drive a terminal: control characters from requests are escaped.

Request paths, query strings and headers reach log lines (regcache's per-request line, error
messages, mitmproxy's own lines). A raw ESC or BEL in them would reach the terminal or the journal
as a control sequence (an `ESC ] 0 ; … BEL` retitles a terminal), and a raw newline could forge a
line. `EscapeControls` rewrites every record that passes a handler it sits on: C0 and C1 control
characters and DEL become `\\xNN`, so one record stays one line. `install` puts it on every
handler of the root logger, which is where mitmproxy's handlers (its terminal log, the start-up
error check, its event log) and anything a test adds listen: regcache's loggers and mitmproxy's
own propagate there.
"""

from __future__ import annotations

import logging

_CONTROLS = {*range(0x20), 0x7F, *range(0x80, 0xA0)}
_ESCAPES = {code: f"\\x{code:02x}" for code in _CONTROLS}
_TRACEBACK_ESCAPES = {code: text for code, text in _ESCAPES.items() if code != 0x0A}
_ESCAPED = "regcache_escaped"  # a LogRecord attribute: rewritten already

log = logging.getLogger("regcache")


def escape_controls(text: str) -> str:
    """`text` with every control character (newlines too) as `\\xNN`."""
    return text.translate(_ESCAPES)


class EscapeControls(logging.Filter):
    """Escapes control characters in the formatted message (and in a traceback, line by line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _ESCAPED, False):  # by the filter of another handler
            return True
        setattr(record, _ESCAPED, True)
        message = escape_controls(record.getMessage())
        if record.exc_info:
            # The traceback keeps its lines; its text (an exception's message) is escaped too.
            message += "\n" + logging.Formatter().formatException(record.exc_info).translate(_TRACEBACK_ESCAPES)
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = message, None
        return True


_FILTER = EscapeControls()


def install(logger: logging.Logger | None = None) -> None:
    """Escape on every handler of `logger` (default: the root logger) that does not yet."""
    for handler in (logger or logging.getLogger()).handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def log_request(
    result: str, method: str, what: str, outcome: str, ms: float, note: str, level: int = logging.INFO
) -> None:
    """The one line per registry request: `HIT GET docker.io/library/alpine:3 200 1234 B 3 ms (note)`."""
    log.log(level, "%s %s %s %s %.0f ms%s", result, method, what, outcome, ms, f" ({note})" if note else "")
