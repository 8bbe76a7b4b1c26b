"""Hostile input and bad conditions (issue: hostile phones and bad networks): each finding reproduced,
answered with a clear 4xx/5xx and no state change."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from tests.daemon_proc import DaemonProcess, ctl
from tests.test_restart import call

JOB = """\
job_conf:
  - job_name: {name}
  - model: linear
  - input_shape: 4 4 1
  - num_classes: 3
  - rounds: 2
  - num_participants: 2
  - overcommitment: 1.0
  - min_participants: 2
  - test_participants: 2
  - eval_interval: 100
  - filter_less: 1
  - round_deadline: 60
  - selection_window: 0.2
  - checkin_wait: 5
  - retry_min: 0.1
  - retry_max: 0.3
"""


def submit(daemon: DaemonProcess, tmp_path: Path, text: str, name: str = "job.yml") -> Any:
    path = tmp_path / name
    path.write_text(text)
    return ctl(daemon.socket_path, "submit", str(path))


def token_of(daemon: DaemonProcess, job: str) -> str:
    status = json.loads(ctl(daemon.socket_path, "status", job, "--json").stdout)
    return str(status["enrollment_token"])


def raw_request(daemon: DaemonProcess, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", int(daemon.port or 0)), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                if len(rest) >= length:
                    break
    reply = b"".join(chunks)
    status = int(reply.split(b" ", 2)[1])
    return status, reply.partition(b"\r\n\r\n")[2]


def test_yaml_alias_bombs_and_deep_documents_are_refused_quickly_with_short_messages(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in pairs)
    bomb += "job_conf:\n  - job_name: *i\n"
    assert len(bomb) < 600
    began = time.monotonic()
    result = submit(daemon, tmp_path, bomb)
    assert time.monotonic() - began < 10
    assert result.returncode == 2 and "YAML aliases" in result.stderr and len(result.stderr) < 500
    deep = "job_conf:\n  - job_name: " + "[" * 8 + "1" + "]" * 8 + "\n"
    result = submit(daemon, tmp_path, deep)
    assert result.returncode == 2 and len(result.stderr) < 500, result.stderr
    big = JOB.format(name="big") + "# " + "x" * 300_000 + "\n"
    result = submit(daemon, tmp_path, big)
    assert result.returncode == 2 and "limit is 262144" in result.stderr
    assert call("GET", f"{daemon.url}/healthz")[0] == 200


def test_refused_submits_leave_nothing_and_models_are_bounded(daemon: DaemonProcess, tmp_path: Path) -> None:
    cases = [
        (JOB.format(name="huge").replace("input_shape: 4 4 1", "input_shape: 4096 4096 3").replace(
            "num_classes: 3", "num_classes: 10"), "max_model_params"),
        (JOB.format(name="huge").replace("num_classes: 3", "num_classes: 1e9"), "num_classes must be at most"),
        (JOB.format(name="huge").replace("model: linear", "model: cnn").replace("4 4 1", "2 2 1"), "model cnn"),
        ("aggregator_entry: async_aggregator.py\n" + JOB.format(name="huge") + "  - noise_multiplier: 1\n",
         "are for synchronous rounds"),
    ]
    for text, message in cases:
        result = submit(daemon, tmp_path, text)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        # Nothing of it remains: no status, no enrollment, and the corrected file is accepted.
        assert ctl(daemon.socket_path, "status", "huge").returncode == 1
        assert call("POST", f"{daemon.url}/v1/jobs/huge/enroll",
                    json.dumps({"enrollment_token": "x"}).encode())[0] == 404
    assert "huge" not in ctl(daemon.socket_path, "status").stdout
    assert submit(daemon, tmp_path, JOB.format(name="huge")).returncode == 0


def test_hostile_json_and_headers_get_400_or_401_never_500(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert submit(daemon, tmp_path, JOB.format(name="j")).returncode == 0
    enroll = f"{daemon.url}/v1/jobs/j/enroll"
    deep = b'{"enrollment_token": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    status, body = call("POST", enroll, deep)
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = call("POST", enroll, b'{"enrollment_token": ' + b"9" * 5000 + b"}")
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = call("POST", enroll, b'{"enrollment_token": "\\ud800"}')
    assert status == 400 and body["error"]["code"] == "bad_request"
    request = (b"POST /v1/jobs/j/checkin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
               b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    status, _ = raw_request(daemon, request)
    assert status == 401
    logs = ctl(daemon.socket_path, "logs", "j", "--since", str(10**23))
    assert logs.returncode != 0 and "Traceback" not in logs.stderr
    assert "internal error" not in daemon.log()
    assert "Traceback" not in daemon.log()


def _enrolled(daemon: DaemonProcess, job: str, n: int) -> list[str]:
    token = token_of(daemon, job)
    return [call("POST", f"{daemon.url}/v1/jobs/{job}/enroll", json.dumps({"enrollment_token": token}).encode())
            [1]["token"] for _ in range(n)]


def test_a_test_result_with_absurd_counts_is_refused_and_cannot_fail_the_job(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    text = JOB.format(name="t").replace("eval_interval: 100", "eval_interval: 1")
    assert submit(daemon, tmp_path, text).returncode == 0
    tokens = _enrolled(daemon, "t", 2)
    from tests.test_restart import checkin_all

    answers = checkin_all(daemon.url, "t", tokens)
    assert all(a["action"] == "test" for a in answers), answers  # the initial model is tested first
    task = answers[0]["task"]["task_id"]
    huge = b'{"samples": 1' + b"0" * 400 + b', "correct_top1": 0, "correct_top5": 0, "loss_sum": 0}'
    status, body = call("POST", f"{daemon.url}/v1/jobs/t/tasks/{task}/result", huge, tokens[0])
    assert status == 400, body
    status, body = call("POST", f"{daemon.url}/v1/jobs/t/tasks/{task}/result",
                        json.dumps({"samples": 2**60, "correct_top1": 0, "correct_top5": 0,
                                    "loss_sum": 0}).encode(), tokens[0])
    assert status == 422 and body["error"]["code"] == "invalid_metadata"
    status, _ = call("POST", f"{daemon.url}/v1/jobs/t/tasks/{task}/result",
                     json.dumps({"samples": 10**15, "correct_top1": 0, "correct_top5": 0,
                                 "loss_sum": 0}).encode(), tokens[0])
    assert status == 200
    other = answers[1]["task"]["task_id"]
    status, _ = call("POST", f"{daemon.url}/v1/jobs/t/tasks/{other}/result",
                     json.dumps({"samples": 50, "correct_top1": 49, "correct_top5": 50,
                                 "loss_sum": 1.0}).encode(), tokens[1])
    assert status == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status_json = json.loads(ctl(daemon.socket_path, "status", "t", "--json").stdout)
        if status_json["initial_test"]:
            break
        time.sleep(0.1)
    assert status_json["state"] == "running"
    # The liar claimed 10^15 samples while reporting 50 at check-in: it counts as one device of two.
    assert abs(status_json["initial_test"]["test_accuracy"] - 0.49) < 1e-9


def test_a_full_disk_answers_507_reports_degraded_and_recovers(tmp_path: Path) -> None:
    flag = tmp_path / "disk-full"
    with DaemonProcess(tmp_path / "state", env={"FEDSCALED_FAULTS": f"store_full_while={flag}"}) as daemon:
        assert submit(daemon, tmp_path, JOB.format(name="d")).returncode == 0
        token = token_of(daemon, "d")
        body = json.dumps({"enrollment_token": token}).encode()
        flag.touch()
        for _ in range(3):
            request = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
            request.request("POST", "/v1/jobs/d/enroll", body, {"Content-Type": "application/json"})
            response = request.getresponse()
            payload = json.loads(response.read())
            assert response.status == 507 and payload["error"]["code"] == "storage_full"
            assert response.getheader("Retry-After") == "30"
            request.close()
        status, health = call("GET", f"{daemon.url}/healthz")
        assert status == 503 and health["status"] == "degraded" and health["reason"] == "storage_full"
        assert "fedscaled_store_full 1.0" in call("GET", f"{daemon.url}/metrics")[1].decode()
        assert daemon.log().count("is full") == 1  # logged once per interval, not per request
        assert json.loads(ctl(daemon.socket_path, "status", "d", "--json").stdout)["enrolled_devices"] == 0
        flag.unlink()
        status, answer = call("POST", f"{daemon.url}/v1/jobs/d/enroll", body)
        assert status == 201, answer
        assert call("GET", f"{daemon.url}/healthz")[0] == 200
        assert "fedscaled_store_free_bytes" in call("GET", f"{daemon.url}/metrics")[1].decode()


def test_a_crash_between_the_commit_and_the_answer_counts_the_update_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    faulty = DaemonProcess(data_dir, env={"FEDSCALED_FAULTS": "kill_after_upload_commit=1"}).start()
    try:
        assert submit(faulty, tmp_path, JOB.format(name="k")).returncode == 0
        tokens = _enrolled(faulty, "k", 2)
        from tests.test_restart import checkin_all

        tests = checkin_all(faulty.url, "k", tokens)  # the initial model is tested first
        for t, answer in zip(tokens, tests, strict=True):
            result = {"samples": 10, "correct_top1": 3, "correct_top5": 10, "loss_sum": 11.0}
            assert call("POST", f"{faulty.url}/v1/jobs/k/tasks/{answer['task']['task_id']}/result",
                        json.dumps(result).encode(), t)[0] == 200
        answers = checkin_all(faulty.url, "k", tokens)
        assert all(a["action"] == "train" for a in answers), answers
        status, model = call("GET", f"{faulty.url}/v1/jobs/k/models/0", token=tokens[0])
        from safetensors.numpy import load

        base = load(model)
        update = st_save({n: (v + 1.0).astype(np.float32) for n, v in base.items()},
                         metadata={"samples": "10", "loss": "0.5"})
        task = answers[0]["task"]["task_id"]
        # The daemon dies before answering: the device cannot know whether its update counted.
        with contextlib.suppress(ConnectionError, http.client.HTTPException, OSError):
            call("PUT", f"{faulty.url}/v1/jobs/k/tasks/{task}/update", update, tokens[0],
                 "application/octet-stream")
        assert faulty.proc is not None
        assert faulty.proc.wait(20) == -9
    finally:
        faulty.kill()
    env = {k: v for k, v in os.environ.items() if k != "FEDSCALED_FAULTS"}
    with DaemonProcess(data_dir, env=env) as daemon:
        daemon.env.pop("FEDSCALED_FAULTS", None)
        status, answer = call("PUT", f"{daemon.url}/v1/jobs/k/tasks/{task}/update", update, tokens[0],
                              "application/octet-stream")
        assert status == 200 and answer["duplicate"] is True, answer
        events = ctl(daemon.socket_path, "logs", "k").stdout
        assert "Succeed participants" not in events  # one of two updates: the round is still open
        other = answers[1]["task"]["task_id"]
        status, answer = call("PUT", f"{daemon.url}/v1/jobs/k/tasks/{other}/update", update, tokens[1],
                              "application/octet-stream")
        assert status == 200 and answer["duplicate"] is False
        deadline = time.monotonic() + 20
        while "Succeed participants: 2" not in ctl(daemon.socket_path, "logs", "k").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.1)
