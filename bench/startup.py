"""Startup: from the command to ready (run.json written and GET /healthz answering 200).

Measured for ``fedscaled start`` from the venv and, when it has been built (scripts/build-binary.sh
into ``dist/``), the PyInstaller binary. The baseline is the bare aiohttp server
(``python -m bench.bare_server``) from its command to its first /healthz answer.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import REPO, Daemon, Profile, Result, spawn, stop, wait_for, workdir


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def time_daemon(tmp: Path, command: list[str], name: str) -> float:
    """Seconds from spawning ``command start`` to a healthy daemon (a fresh data dir)."""
    daemon = Daemon(tmp, name, command=command)
    began = time.perf_counter()
    try:
        daemon.start(timeout=120.0)
        wait_for(lambda: _healthy(daemon.url), 30.0, "healthz", daemon.proc, interval=0.005)
        return time.perf_counter() - began
    finally:
        daemon.stop()


def time_bare(tmp: Path, index: int) -> float:
    """Seconds from spawning the bare aiohttp server to its first /healthz answer."""
    port_file = tmp / f"bare-start-{index}.port"
    began = time.perf_counter()
    proc = spawn([sys.executable, "-m", "bench.bare_server", "startup", str(port_file)])
    try:
        wait_for(lambda: port_file.exists(), 60.0, "bare server", proc, interval=0.005)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        wait_for(lambda: _healthy(url), 30.0, "bare healthz", proc, interval=0.005)
        return time.perf_counter() - began
    finally:
        stop(proc)


def binary() -> Path | None:
    """The PyInstaller binary in dist/ (onefile, or onedir's executable), if built."""
    for candidate in (REPO / "dist" / "fedscaled", REPO / "dist" / "fedscaled" / "fedscaled"):
        if candidate.is_file():
            return candidate
    return None


def run(profile: Profile) -> list[Result]:
    """Startup time of the venv daemon (and the binary when built), against the bare server."""
    results: list[Result] = []
    n = profile.startup_repeats
    venv_cmd = [str(Path(sys.executable).parent / "fedscaled")]
    if not Path(venv_cmd[0]).exists():
        venv_cmd = [sys.executable, "-m", "fedscaled.daemon.cli"]
    with workdir("startup") as tmp:
        bare = min(time_bare(tmp, i) for i in range(n))
        ours = min(time_daemon(tmp, venv_cmd, f"venv{i}") for i in range(n))
        results.append(Result("startup venv (fedscaled start)", ours, "s", "bare aiohttp server start", bare,
                              lower_is_better=True, params={"repeats": n, "command": " ".join(venv_cmd)},
                              notes=f"best of {n}; ready = run.json written and /healthz 200"))
        exe = binary()
        if exe is None:
            results.append(Result("startup binary (dist/fedscaled)", float("nan"), "s", "bare aiohttp server start",
                                  bare, lower_is_better=True,
                                  notes="skipped: no dist/fedscaled (build it with scripts/build-binary.sh)"))
        else:
            t = min(time_daemon(tmp, [str(exe)], f"bin{i}") for i in range(n))
            results.append(Result("startup binary (dist/fedscaled)", t, "s", "bare aiohttp server start", bare,
                                  lower_is_better=True, params={"repeats": n, "binary": str(exe)},
                                  notes=f"best of {n}"))
    return results
