"""The systemd unit in configs/: the settings the daemon relies on, and ``systemd-analyze verify``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fedscaled.daemon.config import DaemonConfig

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "configs" / "fedscaled.service"
EXEC_START = "/usr/local/bin/fedscaled start"


def unit_settings() -> dict[str, list[str]]:
    """``Key=value`` lines of the unit, by key (a key may repeat), comments skipped."""
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line in {UNIT.name}: {raw!r}"
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_what_the_daemon_relies_on() -> None:
    settings = unit_settings()
    expected = {
        "Type": "notify",  # the daemon sends READY=1 (fedscaled/daemon/systemd.py)
        "NotifyAccess": "all",  # the onefile binary notifies from a child of the bootloader
        "ExecStart": EXEC_START,
        "StateDirectory": "fedscaled",  # $STATE_DIRECTORY: the default data dir
        "RuntimeDirectory": "fedscaled",  # $RUNTIME_DIRECTORY: /run/fedscaled/control.sock
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], f"{key}= should be {value!r}, is {settings.get(key)}"
    assert settings.get("DynamicUser") == ["yes"] or "User" in settings
    # systemd must not kill the daemon before its own graceful shutdown has had its time.
    stop_timeout = float(settings["TimeoutStopSec"][0].rstrip("s"))
    assert stop_timeout > DaemonConfig(data_dir=Path("/")).shutdown_timeout
    # XLA writes executable code at run time; this setting would kill the daemon at its first jit.
    assert "MemoryDenyWriteExecute" not in settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    """``systemd-analyze verify`` exits 0 even on unknown keys (it only warns): any stderr output fails."""
    text = UNIT.read_text()
    assert f"\nExecStart={EXEC_START}\n" in text
    # verify insists that ExecStart's program exists; the binary is not installed here, so stand in for it.
    stub = tmp_path / "fedscaled"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "fedscaled.service"
    unit.write_text(text.replace(f"\nExecStart={EXEC_START}\n", f"\nExecStart={stub} start\n"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_daemon_notifies_ready_and_pings_the_watchdog(tmp_path: Path) -> None:
    import socket
    import time

    from tests.daemon_proc import DaemonProcess

    assert "WatchdogSec" in unit_settings()
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
        with DaemonProcess(tmp_path / "state", env=env):
            messages: list[str] = []
            deadline = time.monotonic() + 30
            while messages.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
                messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("READY=1")
        assert messages.count("WATCHDOG=1") >= 3
        # Not for this process (WATCHDOG_PID names another one): no pings.
        from fedscaled.daemon.systemd import watchdog_interval

        assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
        # (Not PID 1: a test run started in the background may have init as its parent, which counts as ours.)
        other = str(max(os.getpid(), os.getppid()) + 1)
        assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": other}) is None
        assert watchdog_interval({}) is None
