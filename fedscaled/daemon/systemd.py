"""sd_notify without a dependency: READY=1 / STOPPING=1 to ``$NOTIFY_SOCKET`` when systemd runs us."""

from __future__ import annotations

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
