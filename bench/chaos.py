"""Kill -9 harness: devices upload while the daemon is killed and restarted; every 2xx counts exactly once.

``python -m bench.chaos --kills 25 --devices 40 --rounds 30`` (the long run; docs/reliability.md) and
``tests/test_chaos.py`` (a short run in CI) drive the same code:

- a real daemon on a loopback port, a linear FedAvg job in which every round needs every selected
  device (``min_participants = num_participants``), no selection deadline pressure;
- ``devices`` threads that check in, answer test tasks, and answer training tasks with a *known*
  update: device i uploads (i + 1) in every weight, with 10 samples. Every request
  is retried through connection errors (the daemon is down) until it gets an answer;
- a killer that SIGKILLs the daemon at random moments (``--kill-every`` seconds apart on average), and
  with ``--crash-after-commit`` also arms the daemon's own fault point that dies between an upload's
  durable commit and its answer, then restarts it on the same data dir and port.

Verification does not trust the daemon's bookkeeping: for each round r the devices know which of their
uploads were answered 200 (accepted or duplicate). The round's model must equal the mean of (i + 1) over
exactly those devices (FedAvg with equal weights): an update counted twice, lost after a 200, or
counted though refused shows up as a wrong mean (off by at least 0.5 / (devices + 1)). Also reported:
requests sent, 5xx answers seen (expected 0: a killed daemon refuses connections, it does not answer 5xx), peak RSS.

With ``--attack`` a hostile client runs alongside: it keeps ``--idle-sockets`` connections open that never
send a request, starts uploads that send a few bytes and stall, and sends malformed requests. The daemon must
still serve every honest device (the per-round check still holds) and its peak RSS is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from bench.common import rss_peak_bytes, workdir

JOB = """\
job_conf:
  - job_name: chaos
  - model: linear
  - input_shape: 8 8 1
  - num_classes: 10
  - rounds: {rounds}
  - num_participants: {participants}
  - overcommitment: 1.0
  - min_participants: {participants}
  - eval_interval: 100000
  - test_participants: {participants}
  - filter_less: 1
  - round_deadline: 120
  - selection_window: 0.3
  - checkin_wait: 5
  - retry_min: 0.05
  - retry_max: 0.3
  - model_retention: 0               # every version is verified afterwards
"""
STATE = {"battery": 90, "charging": True, "idle": True, "unmetered": True, "free_storage_mb": 1000,
         "num_samples": 10, "backends": ["jax"]}


@dataclass
class Tally:
    """What the devices saw, shared by their threads."""

    requests: int = 0
    server_errors: int = 0
    connection_errors: int = 0
    accepted: dict[int, set[int]] = field(default_factory=dict)  # round -> devices answered 200
    lock: threading.Lock = field(default_factory=threading.Lock)


class DaemonUnderFire:
    """The daemon process, restartable on the same data dir and port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data_dir = folder / "state"
        self.socket = folder / "control.sock"
        self.log = folder / "daemon.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self.kills = 0
        self.fault_kills = 0  # deaths at the daemon's own fault point (between commit and answer)

    def start(self, faults: str = "") -> None:
        """Start (again) and wait until it listens."""
        run_json = self.data_dir / "run.json"
        if run_json.exists():
            run_json.unlink()
        env = {**os.environ, "FEDSCALED_FAULTS": faults} if faults else {
            k: v for k, v in os.environ.items() if k != "FEDSCALED_FAULTS"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedscaled.daemon.cli", "start", "--data-dir", str(self.data_dir),
                 "--listen", f"127.0.0.1:{self.port}", "--control-socket", str(self.socket),
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log}")
            try:
                info = json.loads(run_json.read_text())
                if info.get("pid") == self.proc.pid:
                    self.port = int(info["port"])
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise RuntimeError("daemon not ready after 60 s")

    def sample_rss(self) -> None:
        """Remember the largest peak RSS seen."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):  # it may exit between the check and the read
                self.peak_rss = max(self.peak_rss, rss_peak_bytes(self.proc.pid))

    def kill(self) -> None:
        """SIGKILL and reap (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.sample_rss()
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        if self.proc is not None:
            self.proc.wait(30)

    def dead(self) -> bool:
        """Whether the process has exited (it may kill itself at an armed fault point)."""
        return self.proc is None or self.proc.poll() is not None

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def ctl(daemon: DaemonUnderFire, *args: str) -> str:
    """``fedscalectl`` against the daemon; its stdout."""
    done = subprocess.run([sys.executable, "-m", "fedscaled.ctl.cli", "--socket", str(daemon.socket), *args],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def request(daemon: DaemonUnderFire, tally: Tally, method: str, path: str, body: bytes | None = None,
            token: str | None = None, deadline: float = 0.0) -> tuple[int, bytes]:
    """One request, retried through connection errors until an HTTP answer (or the deadline)."""
    while True:
        req = urllib.request.Request(f"http://127.0.0.1:{daemon.port}{path}", data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream" if method == "PUT" else "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with tally.lock:
            tally.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                with tally.lock:
                    tally.server_errors += 1
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            with tally.lock:
                tally.connection_errors += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def device(index: int, daemon: DaemonUnderFire, tally: Tally, token: str, stop: threading.Event,
           deadline: float) -> None:
    """One device: test tasks get a fixed result, training tasks the known weights (index + 1)."""
    state = json.dumps(STATE).encode()
    while not stop.is_set() and time.monotonic() < deadline:
        status, raw = request(daemon, tally, "POST", "/v1/jobs/chaos/checkin", state, token, deadline)
        if status != 200:
            time.sleep(0.2)
            continue
        answer = json.loads(raw)
        action = answer.get("action")
        if action == "done":
            return
        if action == "wait":
            time.sleep(random.uniform(answer["retry_after"]["min"], answer["retry_after"]["max"]))
            continue
        task = answer["task"]
        if action == "test":
            result = json.dumps({"samples": 10, "correct_top1": 1, "correct_top5": 5, "loss_sum": 20.0}).encode()
            request(daemon, tally, "POST", f"/v1/jobs/chaos/tasks/{task['task_id']}/result", result, token, deadline)
            continue
        status, model = request(daemon, tally, "GET", f"/v1/jobs/chaos/models/{task['model_version']}", None,
                                token, deadline)
        if status != 200:
            continue
        # Not base + c: a constant keeps the weights small, so float32 rounding stays far below a miscount.
        update = st_save({n: np.full(v.shape, index + 1, np.float32) for n, v in st_load(model).items()},
                         metadata={"samples": "10", "loss": "1.0"})
        status, raw = request(daemon, tally, "PUT", f"/v1/jobs/chaos/tasks/{task['task_id']}/update", update,
                              token, deadline)
        if status == 200:
            with tally.lock:
                tally.accepted.setdefault(int(task["round"]), set()).add(index)


def attacker(daemon: DaemonUnderFire, stop: threading.Event, idle_sockets: int, counts: dict[str, int]) -> None:
    """Idle sockets, stalled uploads and garbage against the device port until ``stop`` (reopened after kills)."""
    import socket

    held: list[socket.socket] = []
    while not stop.is_set():
        try:
            while len(held) < idle_sockets:
                held.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=2))
                counts["idle_opened"] += 1
            stalled = socket.create_connection(("127.0.0.1", daemon.port), timeout=2)
            stalled.sendall(b"PUT /v1/jobs/chaos/tasks/t-x/update HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: 1000000\r\n\r\n0123456789")
            held.append(stalled)
            counts["stalled_uploads"] += 1
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=2) as junk:
                junk.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
                counts["garbage"] += 1
        except OSError:
            pass  # the daemon is down (killed) or refused us: try again
        # Drop sockets the daemon has closed, so that the pressure stays at idle_sockets.
        alive = []
        for sock in held:
            try:
                sock.setblocking(False)
                closed = sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                sock.close()
            else:
                alive.append(sock)
        held = alive
        time.sleep(0.2)
    for sock in held:
        sock.close()


def run(kills: int, devices: int, rounds: int, kill_every: float, crash_after_commit: bool,
        max_seconds: float, seed: int = 0, attack: bool = False, idle_sockets: int = 300) -> dict[str, Any]:
    """Run the harness; the figures and the per-round verification (raises AssertionError on a miscount)."""
    rng = random.Random(seed)
    random.seed(seed)
    tally = Tally()
    with workdir("chaos") as folder:
        daemon = DaemonUnderFire(folder)
        daemon.start()
        job = folder / "chaos.yml"
        job.write_text(JOB.format(rounds=rounds, participants=devices))
        ctl(daemon, "submit", str(job))
        token = json.loads(ctl(daemon, "status", "chaos", "--json"))["enrollment_token"]
        began = time.monotonic()
        deadline = began + max_seconds
        tokens = []
        for _ in range(devices):
            _, raw = request(daemon, tally, "POST", "/v1/jobs/chaos/enroll",
                             json.dumps({"enrollment_token": token}).encode(), None, deadline)
            tokens.append(json.loads(raw)["token"])
        stop = threading.Event()
        threads = [threading.Thread(target=device, args=(i, daemon, tally, tokens[i], stop, deadline), daemon=True)
                   for i in range(devices)]
        for thread in threads:
            thread.start()
        counts = {"idle_opened": 0, "stalled_uploads": 0, "garbage": 0}
        hostile = threading.Thread(target=attacker, args=(daemon, stop, idle_sockets, counts), daemon=True)
        if attack:
            hostile.start()
        try:
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.2, 2.0 * kill_every))
                daemon.sample_rss()
                if daemon.kills < kills or daemon.dead():
                    if not daemon.dead():
                        daemon.kill()
                    elif daemon.proc is not None and daemon.proc.returncode == -signal.SIGKILL:
                        daemon.kills += 1  # it died at its armed fault point
                        daemon.fault_kills += 1
                    faults = "kill_after_upload_commit=" + str(rng.randint(1, devices)) if (
                        crash_after_commit and daemon.kills < kills and rng.random() < 0.5) else ""
                    daemon.start(faults)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
            if attack:
                hostile.join(30)
        if daemon.dead():
            daemon.start()
        daemon.sample_rss()
        status = json.loads(ctl(daemon, "status", "chaos", "--json"))
        # Verify each completed round against what the devices were told.
        previous = None
        checked = 0
        for version in range(0, int(status["model_version"]) + 1):
            code, raw = request(daemon, tally, "GET", f"/v1/jobs/chaos/models/{version}", None, tokens[0],
                                time.monotonic() + 30)
            assert code == 200, f"model {version}: HTTP {code}"
            model = st_load(raw)
            if previous is not None:
                accepted = tally.accepted.get(version, set())
                assert accepted, f"round {version} closed but no device was told its upload counted"
                expected = float(np.mean([i + 1 for i in accepted]))
                for name, value in model.items():
                    # One update counted twice or lost moves the mean by at least 0.5 / (devices + 1).
                    assert np.allclose(value, expected, atol=1e-4), (
                        f"round {version} {name}: model is {float(value.mean()):.5f}, the mean over the "
                        f"{len(accepted)} devices answered 200 is {expected:.5f}")
                checked += 1
            previous = model
        daemon.stop()
        return {"kills": daemon.kills, "kills_between_commit_and_answer": daemon.fault_kills,
                "devices": devices, "rounds_completed": int(status["completed_rounds"]),
                "rounds_verified": checked, "state": status["state"], "requests": tally.requests,
                "server_errors_5xx": tally.server_errors, "connection_errors": tally.connection_errors,
                "peak_rss_mb": round(daemon.peak_rss / 2**20, 1), "seconds": round(time.monotonic() - began, 1),
                **({"attack": counts} if attack else {})}


def main(argv: list[str] | None = None) -> int:
    """Command line: run the harness and print its figures as JSON; 1 on a miscount."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=25, help="SIGKILLs to deliver (25)")
    parser.add_argument("--devices", type=int, default=40, help="devices, all selected every round (40)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the job (30)")
    parser.add_argument("--kill-every", type=float, default=1.5, help="mean seconds between kills (1.5)")
    parser.add_argument("--crash-after-commit", action="store_true",
                        help="also crash at the daemon's fault point between an upload's commit and its answer")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="give up after this long (900)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attack", action="store_true",
                        help="also hold idle sockets, stall uploads and send garbage while the devices work")
    parser.add_argument("--idle-sockets", type=int, default=300, help="idle connections held with --attack (300)")
    args = parser.parse_args(argv)
    try:
        figures = run(args.kills, args.devices, args.rounds, args.kill_every, args.crash_after_commit,
                      args.max_seconds, args.seed, args.attack, args.idle_sockets)
    except AssertionError as exc:
        print(f"chaos: MISCOUNT: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0 if figures["server_errors_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
