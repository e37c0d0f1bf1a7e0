"""Shared pytest set-up: the end-to-end test bed fixtures (tests/bed/) and the shared store's engines."""

pytest_plugins = ("bed.fixtures", "bed.shared_fixtures")
