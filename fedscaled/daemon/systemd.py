"""sd_notify without a dependency: READY=1 / STOPPING=1 / WATCHDOG=1 to ``$NOTIFY_SOCKET`` under systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket; False when not under ``Type=notify``."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.connect(address)
        sock.sendall(message.encode())
        return True
    return False


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of systemd's ``WatchdogSec``), or None when not asked.

    ``WATCHDOG_PID``, when set, names the process systemd watches: this one, or (PyInstaller onefile)
    the bootloader that is this process's parent, whose notifications ``NotifyAccess=all`` accepts.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) not in (os.getpid(), os.getppid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def watchdog(interval: float) -> None:
    """Ping systemd's watchdog from the event loop: a stuck loop stops the pings and systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
