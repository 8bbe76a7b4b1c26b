"""Phones that train through artifacts: the daemon serves .tflite/.mnn, simulated devices train with
LiteRT and MNN, and the job converges as with the JAX reference trainer."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from tests.daemon_proc import REPO, DaemonProcess, ctl
from tests.test_e2e import job_status, simulate

DIGITS = (REPO / "configs" / "digits-mlp.yml").read_text()


def _named(text: str, name: str, **changes: Any) -> str:
    text = text.replace("job_name: digits-mlp", f"job_name: {name}")
    for key, value in changes.items():
        text, n = re.subn(rf"^  - {key}: .*$", f"  - {key}: {value}", text, flags=re.M)
        if not n:
            text += f"  - {key}: {value}\n"
    return text


def _submit(daemon: DaemonProcess, tmp_path: Path, text: str) -> None:
    path = tmp_path / f"job-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yml"
    path.write_text(text)
    result = ctl(daemon.socket_path, "submit", str(path))
    assert result.returncode == 0, result.stderr


class Device:
    """Just enough of protocol v1 to look at what the daemon serves."""

    def __init__(self, daemon: DaemonProcess, job: str) -> None:
        self.base = f"{daemon.url}/v1/jobs/{job}"
        token = job_status(daemon, job)["enrollment_token"]
        answer = self.call("POST", "/enroll", {"enrollment_token": token}, auth=False)
        self.token = answer["token"]

    def raw(self, method: str, path: str, body: Any = None, auth: bool = True,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        status, _, data = self.raw(method, path, body, auth)
        assert status in (200, 201), (status, data)
        return json.loads(data)

    def checkin(self, backends: list[str]) -> Any:
        state = {"battery": 90, "charging": True, "idle": True, "unmetered": True, "free_storage_mb": 1000,
                 "num_samples": 50, "backends": backends}
        return self.call("POST", "/checkin", state)


@pytest.mark.parametrize("backend", ["tflite", "mnn", "mixed"])
def test_digits_reach_85_percent_through_artifacts(daemon: DaemonProcess, tmp_path: Path, backend: str) -> None:
    job = f"digits-{backend}"
    _submit(daemon, tmp_path, _named(DIGITS, job))
    run = simulate(daemon, job, "--devices", "60", "--dataset", "digits", "--alpha", "0.5", "--seed", "3",
                   "--backend", backend)
    assert run.returncode == 0, run.stdout + run.stderr
    status = job_status(daemon, job)
    assert status["state"] == "finished" and status["round"] == 30
    accuracy = {m["round"]: m["test_accuracy"] for m in status["metrics"] if m["test_accuracy"] is not None}
    assert max(accuracy.values()) >= 0.85, accuracy
    logs = ctl(daemon.socket_path, "logs", job).stdout
    assert re.search(r"Backends served: jax, java, tflite \(\d+ bytes, [0-9a-f]{12}\), mnn", logs)


def test_artifacts_are_served_by_hash_and_named_in_tasks(daemon: DaemonProcess, tmp_path: Path) -> None:
    _submit(daemon, tmp_path, _named(DIGITS, "serve", selection_window=0, checkin_wait=5))
    device = Device(daemon, "serve")
    info = device.call("GET", "/model")
    assert list(info["backends"]) == ["jax", "java", "tflite", "mnn"]
    assert info["backends"]["java"] == {"backend": "java"}
    tensors = [(t["name"], t["shape"]) for t in info["tensors"]]
    for backend in ("tflite", "mnn"):
        ref = info["backends"][backend]
        status, headers, manifest_bytes = device.raw("GET", f"/artifacts/{backend}")
        assert status == 200 and hashlib.sha256(manifest_bytes).hexdigest() == ref["sha256"]
        assert headers["ETag"] == f'"{ref["sha256"]}"'
        manifest = json.loads(manifest_bytes)
        # The artifact's tensors are the safetensors model's, by name, shape and order.
        assert [(t["name"], t["shape"]) for t in manifest["tensors"]] == tensors
        for entry in manifest["files"]:
            status, headers, data = device.raw("GET", f"/artifacts/{backend}/{entry['name']}")
            assert status == 200 and hashlib.sha256(data).hexdigest() == entry["sha256"] == headers["ETag"][1:-1]
            again, _, empty = device.raw("GET", f"/artifacts/{backend}/{entry['name']}",
                                         headers={"If-None-Match": headers["ETag"]})
            assert again == 304 and empty == b""
    status, _, body = device.raw("GET", "/artifacts/tflite/nope.tflite")
    assert status == 404 and json.loads(body)["error"]["code"] == "no_artifact"
    status, _, body = device.raw("GET", "/artifacts/coreml")
    assert status == 404 and json.loads(body)["error"]["code"] == "no_artifact"
    status, _, body = device.raw("GET", "/artifacts/..%2F..")
    assert status in (400, 404)
    status, _, _ = device.raw("GET", "/artifacts/tflite", auth=False)
    assert status == 401
    # A device announcing MNN first is handed the MNN artifact with its task.
    answer = device.checkin(["mnn", "tflite"])
    assert answer["action"] in ("train", "test"), answer
    assert answer["task"]["artifact"] == {"backend": "mnn", "manifest": "/v1/jobs/serve/artifacts/mnn",
                                          "sha256": info["backends"]["mnn"]["sha256"]}


def test_a_device_whose_backends_the_job_cannot_serve_is_told_so(daemon: DaemonProcess, tmp_path: Path) -> None:
    # batch_size 17: no prebuilt artifact has that graph, so only the reference runtime can train it.
    _submit(daemon, tmp_path, _named(DIGITS, "odd-batch", batch_size=17))
    device = Device(daemon, "odd-batch")
    assert list(device.call("GET", "/model")["backends"]) == ["jax", "java"]
    answer = device.checkin(["tflite", "mnn"])
    assert answer.pop("state") in ("pending", "running")
    assert answer == {"action": "done", "reason": "unsupported_backend", "backends": ["jax", "java"]}
    status, _, body = device.raw("GET", "/artifacts/tflite")
    assert status == 404 and json.loads(body)["error"]["code"] == "no_artifact"
    logs = ctl(daemon.socket_path, "logs", "odd-batch").stdout
    assert "No tflite/mnn artifact for mlp-8x8x1-c10-w1-b17-t32" in logs
    run = simulate(daemon, "odd-batch", "--devices", "3", "--dataset", "digits", "--backend", "tflite",
                   max_seconds=60)
    assert "state=unsupported_backend" in run.stdout, run.stdout + run.stderr


MOBILENET = (REPO / "configs" / "mobilenetv3.yml").read_text()


def test_mobilenetv3_trains_end_to_end_and_fine_tunes(daemon: DaemonProcess, tmp_path: Path) -> None:
    text = MOBILENET
    # A deep net without normalisation starts slowly: enough local steps per round that 5 rounds show it learn.
    # Every round trains all 6 phones (the same data each round), so the rounds' losses compare.
    for key, value in {"rounds": 5, "num_participants": 6, "eval_interval": 5, "round_deadline": 90,
                       "local_steps": 30, "learning_rate": 0.05, "selection_window": 5}.items():
        text = re.sub(rf"^  - {key}: .*$", f"  - {key}: {value}", text, flags=re.M)
    text += "  - min_participants: 6\n  - overcommitment: 1.0\n"
    _submit(daemon, tmp_path, text)
    # Near-IID shards (alpha 100): every round's loss is measured on data alike, so the trend is the model's.
    run = simulate(daemon, "mobilenetv3", "--devices", "6", "--dataset", "synthetic", "--samples-per-device", "64",
                   "--backend", "mixed", "--seed", "2", "--alpha", "100", max_seconds=400)
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = job_status(daemon, "mobilenetv3")["metrics"]
    assert len(metrics) == 5
    losses = [m["train_loss"] for m in metrics]
    assert min(losses[1:]) < losses[0], losses

    # Fine-tuning from the finished job: the frozen feature extractor travels once, by hash.
    finetune = (REPO / "configs" / "mobilenetv3-finetune.yml").read_text()
    for key, value in {"rounds": 2, "num_participants": 3, "eval_interval": 2}.items():
        finetune = re.sub(rf"^  - {key}: .*$", f"  - {key}: {value}", finetune, flags=re.M)
    _submit(daemon, tmp_path, finetune)
    device = Device(daemon, "mobilenetv3-finetune")
    info = device.call("GET", "/model")
    assert [t["name"] for t in info["tensors"]] == ["head/dense_0/kernel", "head/dense_0/bias",
                                                     "head/dense_1/kernel", "head/dense_1/bias"]
    assert len(info["frozen_tensors"]) == 104
    status, _, frozen = device.raw("GET", "/frozen")
    assert status == 200 and hashlib.sha256(frozen).hexdigest() == info["frozen"]["sha256"]
    run = simulate(daemon, "mobilenetv3-finetune", "--devices", "4", "--dataset", "synthetic",
                   "--samples-per-device", "64", "--backend", "tflite", "--seed", "4", max_seconds=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert job_status(daemon, "mobilenetv3-finetune")["state"] == "finished"


def test_pretrained_file_seeds_the_model_and_bad_ones_leave_nothing(daemon: DaemonProcess, tmp_path: Path) -> None:
    weights = {"dense_0/kernel": np.full((64, 64), 0.01, np.float32), "dense_0/bias": np.ones(64, np.float32)}
    path = tmp_path / "w.safetensors"
    path.write_bytes(save(weights))
    _submit(daemon, tmp_path, _named(DIGITS, "seeded", pretrained=str(path)))
    device = Device(daemon, "seeded")
    _, _, body = device.raw("GET", "/models/0")
    from safetensors.numpy import load

    model = load(body)
    np.testing.assert_array_equal(model["dense_0/bias"], np.ones(64, np.float32))
    assert float(np.abs(model["dense_1/kernel"]).sum()) > 0  # absent from the file: the zoo's init
    logs = ctl(daemon.socket_path, "logs", "seeded").stdout
    assert "2 trainable tensors not in pretrained start from the zoo's initialisation" in logs

    bad = tmp_path / "bad.yml"
    for pretrained, message in [(str(tmp_path / "missing.safetensors"), "cannot read pretrained file"),
                                ("job:nobody", "pretrained names job 'nobody', which does not exist")]:
        bad.write_text(_named(DIGITS, "refused", pretrained=pretrained))
        result = ctl(daemon.socket_path, "submit", str(bad))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert ctl(daemon.socket_path, "status", "refused").returncode == 1  # nothing of it remains
    bad.write_text(MOBILENET.replace("model: mobilenetv3", "model: mobilenetv3_finetune"))
    result = ctl(daemon.socket_path, "submit", str(bad))
    assert result.returncode == 2 and "set pretrained" in result.stderr


@pytest.mark.parametrize("backend", ["tflite", "mnn"])
def test_fine_tune_through_an_artifact(daemon: DaemonProcess, tmp_path: Path, backend: str) -> None:
    job = f"ft-{backend}"
    _submit(daemon, tmp_path, _named(DIGITS, job))
    token = job_status(daemon, job)["enrollment_token"]
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "fedscaled.device.cli", "fine-tune", "--server", daemon.url, "--job", job,
         f"--token={token}", "--devices", "3", "--dataset", "digits", "--backend", backend, "--lr", "0.1",
         "--local-steps", "30", "--json", "--max-seconds", "120"],
        capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["devices"] == 3 and report["backends"] == [backend]
    assert report["mean_accuracy_after"] > report["mean_accuracy_before"] + 0.2, report
