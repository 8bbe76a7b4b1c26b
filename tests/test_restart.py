"""Durability by killing the process: kill -9 mid-round, restart, and nothing is lost or counted twice."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tests.daemon_proc import DaemonProcess, ctl

JOB = """\
job_conf:
  - job_name: durable
  - aggregator: {aggregator}
  - sample_mode: {sample_mode}
  - model: linear
  - input_shape: 4 4 1
  - num_classes: 3
  - rounds: 2
  - num_participants: 3
  - overcommitment: 1.0
  - min_participants: 3
  - test_participants: 3
  - eval_interval: 100
  - filter_less: 1
  - round_deadline: 120
  - selection_window: 0.2
  - checkin_wait: 10
  - retry_min: 0.1
  - retry_max: 0.3
"""

STATE = {"battery": 90, "charging": True, "idle": True, "unmetered": True, "free_storage_mb": 1000,
         "num_samples": 50, "backends": ["jax"]}


def call(method: str, url: str, body: bytes | None = None, token: str | None = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def checkin_all(url: str, job: str, tokens: list[str]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(len(tokens)) as pool:
        answers = list(pool.map(lambda t: call("POST", f"{url}/v1/jobs/{job}/checkin",
                                               json.dumps(STATE).encode(), t)[1], tokens))
    return answers


def trained(base: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    return {name: (value + scale).astype(np.float32) for name, value in base.items()}


@pytest.mark.parametrize(("aggregator", "sample_mode"), [("fedavg", "random"), ("median", "random"),
                                                        ("fedavg", "oort")])
def test_kill_mid_round_then_resume_counts_each_update_once(tmp_path: Path, aggregator: str,
                                                            sample_mode: str) -> None:
    job_file = tmp_path / "job.yml"
    job_file.write_text(JOB.format(aggregator=aggregator, sample_mode=sample_mode))
    data = tmp_path / "state"
    daemon = DaemonProcess(data).start()
    try:
        assert ctl(daemon.socket_path, "submit", str(job_file)).returncode == 0
        token = json.loads(ctl(daemon.socket_path, "status", "durable", "--json").stdout)["enrollment_token"]
        tokens = []
        for _ in range(3):
            status, body = call("POST", f"{daemon.url}/v1/jobs/durable/enroll",
                                json.dumps({"enrollment_token": token}).encode())
            assert status == 201
            tokens.append(body["token"])
        # The initial model is tested first.
        tests = checkin_all(daemon.url, "durable", tokens)
        assert {a["action"] for a in tests} == {"test"}
        for t, answer in zip(tokens, tests, strict=True):
            result = {"samples": 10, "correct_top1": 3, "correct_top5": 10, "loss_sum": 11.0}
            status, _ = call("POST", f"{daemon.url}/v1/jobs/durable/tasks/{answer['task']['task_id']}/result",
                             json.dumps(result).encode(), t)
            assert status == 200
        trains = checkin_all(daemon.url, "durable", tokens)
        assert {a["action"] for a in trains} == {"train"}
        status, raw = call("GET", f"{daemon.url}/v1/jobs/durable/models/0", token=tokens[0])
        assert status == 200
        base = st_load(raw)
        samples = [10, 20, 30]
        bodies = [st_save(trained(base, float(i + 1)), metadata={"samples": str(n), "loss": "0.5"})
                  for i, n in enumerate(samples)]
        paths = [f"/v1/jobs/durable/tasks/{a['task']['task_id']}/update" for a in trains]
        first_answers = []
        for i in range(2):
            status, answer = call("PUT", daemon.url + paths[i], bodies[i], tokens[i], "application/octet-stream")
            assert status == 200 and answer["duplicate"] is False
            first_answers.append(answer)
        daemon.kill()  # SIGKILL mid-round: two updates accepted, one outstanding
    finally:
        daemon.kill()

    with DaemonProcess(data) as again:
        status_json = json.loads(ctl(again.socket_path, "status", "durable", "--json").stdout)
        assert status_json["state"] == "running"
        assert status_json["phase"]["kind"] == "train" and status_json["phase"]["round"] == 1
        assert status_json["metrics"] == []
        # Re-sending an accepted upload after the restart: same answer, not counted again.
        status, answer = call("PUT", again.url + paths[0], bodies[0], tokens[0], "application/octet-stream")
        assert status == 200
        assert answer == {**first_answers[0], "duplicate": True}
        # The third device's upload completes the round.
        status, answer = call("PUT", again.url + paths[2], bodies[2], tokens[2], "application/octet-stream")
        assert status == 200 and answer["duplicate"] is False
        metrics: list[dict[str, Any]] = []
        for _ in range(200):
            metrics = json.loads(ctl(again.socket_path, "status", "durable", "--json").stdout)["metrics"]
            if metrics:
                break
        assert metrics and metrics[0]["participants"] == 3
        status, raw = call("GET", f"{again.url}/v1/jobs/durable/models/1", token=tokens[0])
        assert status == 200
        new = st_load(raw)
        weights = np.array(samples, dtype=np.float64)
        for name, value in base.items():
            uploaded = [value.astype(np.float64) + i + 1 for i in range(3)]
            if aggregator == "fedavg":
                expected = sum(w * u for w, u in zip(weights, uploaded, strict=True)) / weights.sum()
            else:
                expected = np.median(uploaded, axis=0)  # +2: a double-counted update would shift it
            np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-5)
        logs = ctl(again.socket_path, "logs", "durable").stdout
        assert "round: 1, Planned participants: 3, Succeed participants: 3" in logs


def test_stopping_mid_round_drops_the_round_state_and_replace_starts_clean(tmp_path: Path) -> None:
    from fedscaled.store.lmdb_store import SEP, Store, key

    job_file = tmp_path / "job.yml"
    job_file.write_text(JOB.format(aggregator="fedavg", sample_mode="random"))
    data = tmp_path / "state"
    with DaemonProcess(data) as daemon:
        assert ctl(daemon.socket_path, "submit", str(job_file)).returncode == 0
        token = json.loads(ctl(daemon.socket_path, "status", "durable", "--json").stdout)["enrollment_token"]
        tokens = [call("POST", f"{daemon.url}/v1/jobs/durable/enroll",
                       json.dumps({"enrollment_token": token}).encode())[1]["token"] for _ in range(3)]
        for t, answer in zip(tokens, checkin_all(daemon.url, "durable", tokens), strict=True):
            result = {"samples": 10, "correct_top1": 3, "correct_top5": 10, "loss_sum": 11.0}
            call("POST", f"{daemon.url}/v1/jobs/durable/tasks/{answer['task']['task_id']}/result",
                 json.dumps(result).encode(), t)
        trains = checkin_all(daemon.url, "durable", tokens)
        _, raw = call("GET", f"{daemon.url}/v1/jobs/durable/models/0", token=tokens[0])
        body = st_save(trained(st_load(raw), 1.0), metadata={"samples": "10", "loss": "0.5"})
        status, _ = call("PUT", f"{daemon.url}/v1/jobs/durable/tasks/{trains[0]['task']['task_id']}/update", body,
                         tokens[0], "application/octet-stream")
        assert status == 200
        assert ctl(daemon.socket_path, "stop", "durable").returncode == 0
        assert ctl(daemon.socket_path, "submit", str(job_file), "--replace").returncode == 0
    store = Store(data / "store")
    try:
        assert store.count("sums", key("durable") + SEP) == 0  # the old round's sum went with the old job
        assert store.count("updates", key("durable") + SEP) == 0
    finally:
        store.close()
    with DaemonProcess(data) as again:  # and a restart resumes the new job cleanly
        status_json = json.loads(ctl(again.socket_path, "status", "durable", "--json").stdout)
        assert status_json["state"] == "pending" and status_json["metrics"] == []
