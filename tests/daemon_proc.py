"""Start the real daemon as a subprocess on a temp data dir and a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_FEDSCALE = REPO.parent / "shared" / "fedscale"


class DaemonProcess:
    """A ``fedscaled start`` child process; use as a context manager."""

    def __init__(self, data_dir: Path, *, socket_path: Path | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.socket_path = socket_path or data_dir / "control.sock"
        self.extra = extra or []
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-daemon.log"

    @property
    def url(self) -> str:
        """Base URL of the device API."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the daemon."""
        return [sys.executable, "-m", "fedscaled.daemon.cli", "start", "--data-dir", str(self.data_dir),
                "--listen", "127.0.0.1:0", "--control-socket", str(self.socket_path), *self.extra]

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        """Start and wait until run.json names the listening port."""
        run_json = self.data_dir / "run.json"
        if run_json.exists():
            run_json.unlink()
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            if run_json.exists():
                try:
                    info: dict[str, Any] = json.loads(run_json.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == self.proc.pid:
                    self.port = int(info["port"])
                    return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon not ready after {timeout}s: {self.log()}")

    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()


def ctl(socket_path: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``fedscalectl --socket SOCKET ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "fedscaled.ctl.cli", "--socket", str(socket_path), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
