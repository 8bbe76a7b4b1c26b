"""A server optimizer's state survives kill -9: fed-adam's second step uses the moments of its first.

Devices upload known updates, so the pseudo-gradient of each round is known exactly: round 1 moves every
weight by +2 on average (g = -2), round 2 by +4 (g = -4). Adam's step 2 with the moments of step 1 differs
from a fresh step 1 on g = -4 by ~4 %; the daemon is killed after round 1 closed and again mid-round 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tests.daemon_proc import DaemonProcess, ctl
from tests.test_restart import call, checkin_all, trained

LR, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3
JOB = f"""\
job_conf:
  - job_name: adam
  - gradient_policy: fed-adam
  - server_lr: {LR}
  - server_beta1: {B1}
  - server_beta2: {B2}
  - server_tau: {TAU}
  - weighting: uniform
  - model: linear
  - input_shape: 2 2 1
  - num_classes: 2
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
RESULT = {"samples": 10, "correct_top1": 3, "correct_top5": 10, "loss_sum": 11.0}


def adam_steps(gradients: list[float]) -> list[float]:
    """Adam's updates (as optax computes them: bias-corrected moments, eps outside the root) for a
    constant-per-round gradient, by hand."""
    m = v = 0.0
    updates = []
    for t, g in enumerate(gradients, start=1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
        updates.append(-LR * m_hat / (math.sqrt(v_hat) + TAU))
    return updates


def answer_tests(url: str, tokens: list[str]) -> None:
    for token, answer in zip(tokens, checkin_all(url, "adam", tokens), strict=True):
        assert answer["action"] == "test", answer
        status, _ = call("POST", f"{url}/v1/jobs/adam/tasks/{answer['task']['task_id']}/result",
                         json.dumps(RESULT).encode(), token)
        assert status == 200


def upload(url: str, token: str, task_id: str, base: dict[str, np.ndarray], shift: float) -> None:
    body = st_save(trained(base, shift), metadata={"samples": "10", "loss": "0.5"})
    status, answer = call("PUT", f"{url}/v1/jobs/adam/tasks/{task_id}/update", body, token,
                          "application/octet-stream")
    assert status == 200 and answer["accepted"], answer


def model(url: str, token: str, version: int) -> dict[str, np.ndarray]:
    status, raw = call("GET", f"{url}/v1/jobs/adam/models/{version}", token=token)
    assert status == 200, raw
    return st_load(raw)


def test_fed_adam_moments_survive_kill_9(tmp_path: Path) -> None:
    job_file = tmp_path / "job.yml"
    job_file.write_text(JOB)
    data = tmp_path / "state"
    daemon = DaemonProcess(data).start()
    try:
        assert ctl(daemon.socket_path, "submit", str(job_file)).returncode == 0
        enrollment = json.loads(ctl(daemon.socket_path, "status", "adam", "--json").stdout)["enrollment_token"]
        tokens = []
        for _ in range(3):
            status, body = call("POST", f"{daemon.url}/v1/jobs/adam/enroll",
                                json.dumps({"enrollment_token": enrollment}).encode())
            assert status == 201
            tokens.append(body["token"])
        answer_tests(daemon.url, tokens)
        v0 = model(daemon.url, tokens[0], 0)
        # Round 1: uploads of +1, +2, +3: the combined model is v0 + 2, the pseudo-gradient -2.
        trains = checkin_all(daemon.url, "adam", tokens)
        for shift, (token, answer) in enumerate(zip(tokens, trains, strict=True), start=1):
            upload(daemon.url, token, answer["task"]["task_id"], v0, float(shift))
        expected = adam_steps([-2.0, -4.0])
        # Round 2 opens once the devices check in again; v1 must exist before that.
        trains = checkin_all(daemon.url, "adam", tokens)
        assert {a["action"] for a in trains} == {"train"}, trains
        v1 = model(daemon.url, tokens[0], 1)
        for name in v0:
            np.testing.assert_allclose(v1[name], v0[name] + expected[0], rtol=0, atol=1e-6)
        daemon.kill()  # after round 1 closed: the moments are on disk with v1, or lost
        daemon = DaemonProcess(data).start()
        # Round 2: uploads of v1 + 3, + 4, + 5 (pseudo-gradient -4); a kill after two of them.
        for later, (token, answer) in zip((3.0, 4.0), zip(tokens, trains, strict=False), strict=False):
            upload(daemon.url, token, answer["task"]["task_id"], v1, later)
        daemon.kill()
        daemon = DaemonProcess(data).start()
        upload(daemon.url, tokens[2], trains[2]["task"]["task_id"], v1, 5.0)
        answer_tests(daemon.url, tokens)  # the last version is evaluated; then the job finishes
        v2 = model(daemon.url, tokens[0], 2)
        fresh = adam_steps([-4.0])[0]
        assert abs(expected[1] - fresh) > 1e-3  # the test can tell carried moments from fresh ones
        for name in v0:
            np.testing.assert_allclose(v2[name], v1[name] + expected[1], rtol=0, atol=1e-6)
    finally:
        daemon.kill()
