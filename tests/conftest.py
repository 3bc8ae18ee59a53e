"""Markers of this test suite."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "container: boots a Debian container under a real systemd (root, systemd-nspawn, "
        "debootstrap); deselect with -m 'not container'",
    )
