"""Shared pytest set-up: the end-to-end test bed fixtures (tests/bed/), the shared store's engines,
and small file systems for disk-full tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed.tmpfs import Tmpfs

pytest_plugins = ("bed.fixtures", "bed.shared_fixtures")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """Mount small file systems (as root; skipped otherwise); unmounted after the test, failed or not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = Tmpfs(tmp_path)
    try:
        yield mounts
    finally:
        mounts.unmount_all()
