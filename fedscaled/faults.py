"""Fault injection for tests: named faults armed by an environment variable, off in production.

``FEDSCALED_FAULTS="store_full=3,kill_after_upload_commit=2"`` arms each named fault for that many hits;
without the variable (production) every :func:`hit` is a dictionary lookup that returns False. The
kill -9 tests use it to crash the daemon at exact points (after an upload is durable, before its answer
is sent) so that the recovery paths run in every CI run rather than by luck.

Faults:
- ``store_full``: the next N store commits fail as if the disk were full (ENOSPC).
- ``store_full_while``: store commits fail as if the disk were full while the file named by the value
  exists (``store_full_while=/tmp/full``): a test fills and frees the "disk" by creating and removing it.
- ``kill_after_upload_commit``: the N-th durable training upload kills the process (SIGKILL) before the
  device gets its answer.
"""

from __future__ import annotations

import os
import signal

ENV = "FEDSCALED_FAULTS"


def _parse(text: str) -> tuple[dict[str, int], dict[str, str]]:
    armed: dict[str, int] = {}
    paths: dict[str, str] = {}
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        if name.endswith("_while"):
            paths[name] = value
        elif name:
            armed[name] = int(value or "1")
    return armed, paths


_armed, _paths = _parse(os.environ.get(ENV, ""))


def hit(name: str) -> bool:
    """Whether fault ``name`` fires now (consumes one hit; the last one fires)."""
    left = _armed.get(name)
    if left is None:
        return False
    if left <= 1:
        del _armed[name]
        return True
    _armed[name] = left - 1
    return False


def fail_if_store_full() -> None:
    """Raise the disk-full error a store commit would raise, when ``store_full`` is armed."""
    flag = _paths.get("store_full_while")
    if flag and os.path.exists(flag):
        raise OSError(28, "No space left on device (injected fault)")
    if _armed.get("store_full", 0) > 0:
        _armed["store_full"] -= 1
        if _armed["store_full"] == 0:
            del _armed["store_full"]
        raise OSError(28, "No space left on device (injected fault)")


def kill_if(name: str) -> None:
    """SIGKILL this process when fault ``name`` fires: a crash at this exact point."""
    if hit(name):
        os.kill(os.getpid(), signal.SIGKILL)
