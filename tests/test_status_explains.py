"""A job whose waiting devices are all ineligible says so: in its log (once per picture) and in status."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.daemon_proc import DaemonProcess, ctl
from tests.test_hardening import JOB, submit, token_of
from tests.test_restart import STATE, call


def test_a_round_that_cannot_open_explains_why(daemon: DaemonProcess, tmp_path: Path) -> None:
    text = JOB.format(name="few").replace("filter_less: 1", "filter_less: 32").replace(
        "checkin_wait: 5", "checkin_wait: 3")
    assert submit(daemon, tmp_path, text).returncode == 0
    token = token_of(daemon, "few")
    tokens = [call("POST", f"{daemon.url}/v1/jobs/few/enroll", json.dumps({"enrollment_token": token}).encode())
              [1]["token"] for _ in range(2)]
    small = json.dumps({**STATE, "num_samples": 10}).encode()
    # The initial model is tested first (filter_less applies to training only).
    with ThreadPoolExecutor(2) as pool:
        tests = list(pool.map(lambda t: call("POST", f"{daemon.url}/v1/jobs/few/checkin", small, t)[1], tokens))
    assert all(a["action"] == "test" for a in tests), tests
    for t, answer in zip(tokens, tests, strict=True):
        result = json.dumps({"samples": 10, "correct_top1": 3, "correct_top5": 9, "loss_sum": 11.0}).encode()
        assert call("POST", f"{daemon.url}/v1/jobs/few/tasks/{answer['task']['task_id']}/result", result, t)[0] == 200
    # Both wait for round 1's training, which none of them may do: the log says why, once.
    threads = [threading.Thread(target=call, args=("POST", f"{daemon.url}/v1/jobs/few/checkin", small, t))
               for t in tokens]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    logs = ""
    while "cannot open" not in logs and time.monotonic() < deadline:
        time.sleep(0.2)
        logs = ctl(daemon.socket_path, "logs", "few").stdout
    assert "Round 1 cannot open: none of the 2 waiting devices may take a train task " \
           "(fewer than 32 samples: 2)" in logs, logs
    status = ctl(daemon.socket_path, "status", "few").stdout
    assert "2 may not train: fewer than 32 samples" in status, status
    live = json.loads(ctl(daemon.socket_path, "status", "few", "--json").stdout)["live"]
    assert live["waiting"] == 2 and live["eligible"]["train"] == 0
    assert live["ineligible"]["train"] == {"fewer than 32 samples": 2}
    # Logged when the picture changes (1 then 2 waiting devices), not at every pass of the loop.
    before = ctl(daemon.socket_path, "logs", "few").stdout.count("cannot open")
    assert before <= 2
    time.sleep(1.0)
    assert ctl(daemon.socket_path, "logs", "few").stdout.count("cannot open") == before
    for thread in threads:
        thread.join(10)


def test_fedscalectl_model_exports_a_version(daemon: DaemonProcess, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import load

    assert submit(daemon, tmp_path, JOB.format(name="exp")).returncode == 0
    out = tmp_path / "m.safetensors"
    result = ctl(daemon.socket_path, "model", "exp", "--out", str(out))
    assert result.returncode == 0 and "model version 0 of job exp" in result.stdout, result.stderr
    tensors = load(out.read_bytes())
    assert sorted(tensors) == ["dense_0/bias", "dense_0/kernel"] and tensors["dense_0/kernel"].shape == (16, 3)
    npz = tmp_path / "m.npz"
    assert ctl(daemon.socket_path, "model", "exp", "--version", "0", "--out", str(npz), "--format",
               "npz").returncode == 0
    with np.load(npz) as loaded:
        np.testing.assert_array_equal(loaded["dense_0/kernel"], tensors["dense_0/kernel"])
    missing = ctl(daemon.socket_path, "model", "exp", "--version", "7", "--out", str(tmp_path / "x"))
    assert missing.returncode == 1 and "no model version 7" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_fedscalectl_report_writes_csv_and_png(daemon: DaemonProcess, tmp_path: Path) -> None:
    import csv

    assert submit(daemon, tmp_path, JOB.format(name="rep")).returncode == 0
    out = tmp_path / "report"
    result = ctl(daemon.socket_path, "report", "rep", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows == []  # nothing run yet: a header only
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
