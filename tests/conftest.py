"""Shared pytest set-up: the end-to-end test bed fixtures (tests/bed/)."""

pytest_plugins = ("bed.fixtures",)
