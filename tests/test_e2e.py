"""End to end: daemon + job + the device simulator, read back through fedscalectl."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, ctl

REPO = Path(__file__).resolve().parent.parent


def job_status(daemon: DaemonProcess, job: str) -> dict[str, Any]:
    result = ctl(daemon.socket_path, "status", job, "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def simulate(daemon: DaemonProcess, job: str, *extra: str, max_seconds: int = 240) -> subprocess.CompletedProcess[str]:
    token = job_status(daemon, job)["enrollment_token"]
    return subprocess.run(
        [sys.executable, "-m", "fedscaled.device.cli", "simulate", "--server", daemon.url, "--job", job,
         f"--token={token}", "--max-seconds", str(max_seconds), *extra],
        capture_output=True, text=True, timeout=max_seconds + 60, check=False)


def test_digits_mlp_reaches_85_percent_within_30_rounds(daemon: DaemonProcess, tmp_path: Path) -> None:
    submitted = ctl(daemon.socket_path, "submit", str(REPO / "configs" / "digits-mlp.yml"))
    assert submitted.returncode == 0, submitted.stderr
    run = simulate(daemon, "digits-mlp", "--devices", "100", "--dataset", "digits", "--alpha", "0.5", "--seed", "7")
    assert run.returncode == 0, run.stdout + run.stderr
    status = job_status(daemon, "digits-mlp")
    assert status["state"] == "finished"
    assert status["round"] == 30
    assert status["enrolled_devices"] == 100
    metrics = status["metrics"]
    assert [m["round"] for m in metrics] == list(range(1, 31))
    assert all(m["participants"] == 10 for m in metrics)
    evaluated = {m["round"]: m["test_accuracy"] for m in metrics if m["test_accuracy"] is not None}
    assert sorted(evaluated) == [5, 10, 15, 20, 25, 30]
    assert max(evaluated.values()) >= 0.85, evaluated
    assert status["initial_test"]["test_accuracy"] < 0.5  # the untrained model is near chance
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    logs = ctl(daemon.socket_path, "logs", "digits-mlp").stdout
    assert "round: 30, Planned participants: 13, Succeed participants: 10, Training loss:" in logs
    assert "FL Testing in round: 30" in logs
    report = ctl(daemon.socket_path, "report", "digits-mlp", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    rows = (tmp_path / "report" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 31 and rows[0].startswith("round,model_version,participants")  # v0's test + 30
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"


DROPOUT_JOB = """\
job_conf:
  - job_name: flaky
  - model: mlp
  - input_shape: 8 8 1
  - num_classes: 10
  - rounds: 4
  - num_participants: 10
  - overcommitment: 1.3
  - min_participants: 4
  - eval_interval: 100
  - test_participants: 10
  - learning_rate: 0.1
  - local_steps: 10
  - batch_size: 16
  - filter_less: 1
  - round_deadline: 4
  - selection_window: 0.5
  - checkin_wait: 5
  - retry_min: 0.2
  - retry_max: 1
"""


def test_vanishing_devices_never_stall_a_round(daemon: DaemonProcess, tmp_path: Path) -> None:
    job_file = tmp_path / "flaky.yml"
    job_file.write_text(DROPOUT_JOB)
    assert ctl(daemon.socket_path, "submit", str(job_file)).returncode == 0
    began = time.monotonic()
    run = simulate(daemon, "flaky", "--devices", "40", "--dataset", "digits", "--dropout", "0.3", "--seed", "3",
                   max_seconds=120)
    elapsed = time.monotonic() - began
    assert run.returncode == 0, run.stdout + run.stderr
    status = job_status(daemon, "flaky")
    assert status["state"] == "finished"
    metrics = status["metrics"]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert all(4 <= m["participants"] <= 10 for m in metrics)
    # every round closed by its deadline (plus the time to aggregate and answer)
    assert all(m["duration"] <= 4 + 1.5 for m in metrics), metrics
    assert elapsed < 90
    assert "vanished=" in run.stdout
    assert "vanished=0 " not in run.stdout


TWO_JOBS = """\
job_conf:
  - job_name: {name}
  - model: {model}
  - input_shape: 8 8 1
  - num_classes: 10
  - rounds: 3
  - num_participants: 5
  - overcommitment: 1.0
  - eval_interval: 3
  - test_participants: 5
  - local_steps: 5
  - filter_less: 1
  - round_deadline: 20
  - selection_window: 0.5
  - checkin_wait: 5
  - retry_min: 0.2
  - retry_max: 1
"""


def test_two_jobs_run_at_once_and_a_failing_one_does_not_stall_the_other(daemon: DaemonProcess,
                                                                         tmp_path: Path) -> None:
    for name, model in (("job-a", "linear"), ("job-b", "cnn")):
        path = tmp_path / f"{name}.yml"
        path.write_text(TWO_JOBS.format(name=name, model=model))
        assert ctl(daemon.socket_path, "submit", str(path)).returncode == 0
    token_a = job_status(daemon, "job-a")["enrollment_token"]
    token_b = job_status(daemon, "job-b")["enrollment_token"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "fedscaled.device.cli", "simulate", "--server", daemon.url,
                          "--job", job, f"--token={token}", "--devices", "12", "--dataset", "digits",
                          "--max-seconds", "150"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for job, token in (("job-a", token_a), ("job-b", token_b))
    ]
    # A third job whose devices never come: it stays pending and must not hold the others back.
    idle = tmp_path / "idle.yml"
    idle.write_text(TWO_JOBS.format(name="idle", model="mlp"))
    assert ctl(daemon.socket_path, "submit", str(idle)).returncode == 0
    for proc in procs:
        out, err = proc.communicate(timeout=210)
        assert proc.returncode == 0, out + err
    for job in ("job-a", "job-b"):
        status = job_status(daemon, job)
        assert status["state"] == "finished"
        assert len(status["metrics"]) == 3
        assert status["metrics"][-1]["test_accuracy"] is not None
    assert job_status(daemon, "idle")["state"] == "pending"


HOSTILE_JOB = """\
job_conf:
  - job_name: {name}
  - aggregator: {aggregator}
  - model: mlp
  - input_shape: 8 8 1
  - num_classes: 10
  - rounds: 12
  - num_participants: 10
  - overcommitment: 1.0
  - min_participants: 8
  - eval_interval: 4
  - test_participants: 30
  - learning_rate: 0.1
  - local_steps: 20
  - batch_size: 16
  - filter_less: 1
  - round_deadline: 20
  - selection_window: 0.5
  - checkin_wait: 5
  - retry_min: 0.2
  - retry_max: 1
"""


def test_median_survives_poisoning_devices_that_wreck_fedavg(daemon: DaemonProcess, tmp_path: Path) -> None:
    accuracy = {}
    for aggregator in ("fedavg", "median"):
        name = f"poisoned-{aggregator.replace('_', '-')}"
        path = tmp_path / f"{name}.yml"
        # Every round takes all 10 updates (rounds close as soon as their chosen devices answered, so on a
        # loaded machine a round could otherwise open with only its quorum of 8, where a median is more
        # often outvoted by chance).
        path.write_text(HOSTILE_JOB.format(name=name, aggregator=aggregator).replace(
            "min_participants: 8", "min_participants: 10").replace("selection_window: 0.5", "selection_window: 2"))
        assert ctl(daemon.socket_path, "submit", str(path)).returncode == 0
        run = simulate(daemon, name, "--devices", "40", "--dataset", "digits", "--alpha", "1.0", "--seed", "5",
                       "--hostile", "0.2", max_seconds=150)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "poisoned=0 " not in run.stdout
        status = job_status(daemon, name)
        assert status["state"] == "finished"
        evaluated = [m["test_accuracy"] for m in status["metrics"] if m["test_accuracy"] is not None]
        assert len(evaluated) == 3
        accuracy[aggregator] = sum(evaluated) / len(evaluated)
    # Mean test accuracy over the evaluations of rounds 4, 8 and 12.
    assert accuracy["median"] >= 0.75, accuracy
    assert accuracy["fedavg"] < 0.5, accuracy
    print(f"mean test accuracy with 20% poisoning devices: {accuracy}")


def test_oort_selection_runs_a_job_and_keeps_its_state(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "oort.yml"
    path.write_text(HOSTILE_JOB.format(name="oort", aggregator="fedavg").replace(
        "  - rounds: 12\n", "  - rounds: 8\n  - sample_mode: oort\n  - exploration_factor: 0.5\n"
        "  - exploration_decay: 0.8\n"))
    assert ctl(daemon.socket_path, "submit", str(path)).returncode == 0
    run = simulate(daemon, "oort", "--devices", "40", "--dataset", "digits", "--alpha", "1.0", "--seed", "2",
                   max_seconds=150)
    assert run.returncode == 0, run.stdout + run.stderr
    status = job_status(daemon, "oort")
    assert status["state"] == "finished"
    assert [m["round"] for m in status["metrics"]] == list(range(1, 9))
    assert status["metrics"][-1]["test_accuracy"] >= 0.75
    # Exploration decayed from 0.5 by 0.8 per round (floored at exploration_min 0.3).
    assert status["oort"]["exploration"] == pytest.approx(0.3)
