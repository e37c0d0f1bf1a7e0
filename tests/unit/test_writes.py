"""Store writes that must not fail an answer: last uses noted in memory and written in batches,
a batch the store refuses dropped with one warning."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

import pytest

from regcache.store.errors import UseRecorder, best_effort


def test_uses_are_written_in_batches_with_the_latest_use_of_each_entry() -> None:
    recorder = UseRecorder()
    for key, when in (("blob:a", 1.0), ("blob:a", 3.0), ("blob:a", 2.0), ("manifest:m", 5.0)):
        recorder.note(key, when)
    assert recorder.pending() == {"blob:a": 3.0, "manifest:m": 5.0}
    batches: list[dict[str, float]] = []
    assert recorder.flush(lambda batch: batches.append(dict(batch))) == 2
    assert recorder.flush(lambda batch: batches.append(dict(batch))) == 0  # nothing new: no write
    assert batches == [{"blob:a": 3.0, "manifest:m": 5.0}]


def test_a_batch_the_store_refuses_is_dropped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    best_effort("last uses", lambda: None)  # the warning comes once per run of failures: none yet
    recorder = UseRecorder()
    refused: list[dict[str, float]] = []

    def disk_full(batch: Mapping[str, float]) -> None:
        refused.append(dict(batch))
        raise sqlite3.OperationalError("database or disk is full")

    recorder.note("blob:a", 1.0)
    assert recorder.flush(disk_full) == 0
    recorder.note("blob:b", 2.0)
    assert recorder.flush(disk_full) == 0
    assert refused == [{"blob:a": 1.0}, {"blob:b": 2.0}]  # each batch once: dropped, never retried
    assert recorder.pending() == {}
    assert caplog.text.count("last uses not saved, carrying on without: database or disk is full") == 1

    written: list[dict[str, float]] = []
    recorder.note("blob:c", 3.0)
    assert recorder.flush(lambda batch: written.append(dict(batch))) == 1
    assert written == [{"blob:c": 3.0}] and "last uses saved again" in caplog.text


def test_best_effort_says_why_and_raises_nothing_but_bugs() -> None:
    def refused() -> None:
        raise OSError(28, "No space left on device")

    assert best_effort("test writes", refused) == "[Errno 28] No space left on device"
    assert best_effort("test writes", lambda: None) == ""
    with pytest.raises(ZeroDivisionError):
        best_effort("test writes", lambda: 1 / 0)
