"""Constants shared by the control API and ``fedscalectl`` (kept free of heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path

API_VERSION = 1
SOCKET_NAME = "control.sock"


def default_data_dir() -> Path:
    """Where the daemon keeps its state when no --data-dir is given.

    Under systemd (``StateDirectory=fedscaled`` sets ``$STATE_DIRECTORY``) it is that directory,
    otherwise the per-user state dir ``$XDG_STATE_HOME/fedscaled`` (``~/.local/state/fedscaled``).
    """
    state_dir = os.environ.get("STATE_DIRECTORY")
    if state_dir:
        return Path(state_dir.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "fedscaled"


def default_socket(data_dir: Path | None = None) -> Path:
    """The control socket: ``$RUNTIME_DIRECTORY/control.sock`` under systemd, else in the data dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    return (data_dir if data_dir is not None else default_data_dir()) / SOCKET_NAME


SYSTEM_SOCKET = Path("/run/fedscaled") / SOCKET_NAME
