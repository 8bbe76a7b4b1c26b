"""Shared fixtures: a running daemon on a temp dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A fresh daemon per test."""
    with DaemonProcess(tmp_path / "state") as proc:
        yield proc
