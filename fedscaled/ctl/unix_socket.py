"""Binding the control socket safely (supervisor's habits).

A socket file left by a crashed daemon is replaced only after a connect probe shows nobody answers;
a live socket means another daemon runs, and we refuse to start. The socket is created under a
restrictive umask so that it is never reachable by others, even for an instant.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from pathlib import Path

from fedscaled.errors import FedError, InvalidConfig


class SocketInUse(FedError):
    code = "socket_in_use"
    status = 409
    description = "Another daemon answers on the control socket (or the path is not a socket)."


def probe(path: Path, timeout: float = 1.0) -> bool:
    """True if something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return False
        return True


def prepare(path: Path) -> None:
    """Make ``path`` free to bind: refuse if a daemon answers there, remove a stale socket file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    if probe(path):
        raise SocketInUse(f"another fedscaled daemon is running on {path}")
    path.unlink()


def bind(path: Path, group: str | None = None) -> socket.socket:
    """Create the listening socket at ``path`` with mode 0600 (0660 with ``group``)."""
    prepare(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            path.unlink()
            raise InvalidConfig(f"socket_group {group!r} is not a group on this system") from None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def remove(path: Path, sock: socket.socket | None) -> None:
    """Close our listening socket and remove its file at shutdown."""
    if sock is not None:
        sock.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
