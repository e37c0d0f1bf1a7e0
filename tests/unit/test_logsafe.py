"""Log records cannot carry control characters to a terminal or forge a line."""

from __future__ import annotations

import io
import logging

from regcache.logs import escape_controls, install


def test_control_characters_become_escapes_and_text_stays() -> None:
    assert escape_controls("tag \x1b]0;pwned\x07 ok") == "tag \\x1b]0;pwned\\x07 ok"
    assert escape_controls("a\nb\r\tc\x7f\x9b") == "a\\x0ab\\x0d\\x09c\\x7f\\x9b"
    assert escape_controls("ünïcode → fine") == "ünïcode → fine"


def test_every_handler_on_the_root_logger_gets_escaped_records() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install()
        install()  # once is enough, twice changes nothing
        assert len(handler.filters) == 1
        logger = logging.getLogger("regcache.test")
        logger.warning("GET %s", "x:\x1b]0;pwned\x07")
        try:
            raise ValueError("bad \x1b[2J value")
        except ValueError:
            logger.exception("failed on %s", "line\nforged")
    finally:
        root.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == "GET x:\\x1b]0;pwned\\x07"
    assert lines[1] == "failed on line\\x0aforged"
    assert lines[2] == "Traceback (most recent call last):"  # the traceback keeps its lines
    assert lines[-1] == "ValueError: bad \\x1b[2J value"
    assert not any(char in out.getvalue() for char in "\x1b\x07\r")
