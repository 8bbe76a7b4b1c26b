"""The daemon, its store and fedscalectl, exercised as a user would: real processes, real socket."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_proc import SHARED_FEDSCALE, DaemonProcess, ctl

MINIMAL = """\
job_conf:
  - job_name: {name}
  - rounds: 3
  - num_participants: 2
  - model: mlp
  - input_shape: 8 8 1
  - num_classes: 10
"""


def write_job(tmp_path: Path, name: str = "demo", text: str | None = None) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(text if text is not None else MINIMAL.format(name=name))
    return path


def status_json(daemon: DaemonProcess, job: str | None = None) -> object:
    result = ctl(daemon.socket_path, "status", *([job] if job else []), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not SHARED_FEDSCALE.exists(), reason="FedScale fixtures not beside the checkout")
def test_fedscale_android_files_submit_unchanged(daemon: DaemonProcess) -> None:
    for name, job in (("android-tflite.yml", "android-tflite"), ("android-mnn.yml", "android-mnn")):
        result = ctl(daemon.socket_path, "submit", str(SHARED_FEDSCALE / name))
        assert result.returncode == 0, result.stderr
        assert f"submitted job {job}" in result.stdout
        assert "ignored keys: ps_ip, exp_path, aggregator_entry, auth, setup_commands" in result.stdout
        status = status_json(daemon, job)
        assert isinstance(status, dict)
        assert status["name"] == job
        assert status["state"] == "pending"
        assert status["input_shape"] == [32, 32, 3]
        assert status["num_classes"] == 10
        assert status["num_participants"] == 1
        assert status["rounds"] == 50  # FedScale's default
        assert status["config"]["test_bsz"] == 16
        assert status["mode"] == "sync"
        assert len(status["enrollment_token"]) >= 24
    listed = status_json(daemon)
    assert isinstance(listed, list)
    assert sorted(j["name"] for j in listed) == ["android-mnn", "android-tflite"]


def test_status_list_logs_stop(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert ctl(daemon.socket_path, "submit", str(write_job(tmp_path))).returncode == 0
    status = status_json(daemon, "demo")
    assert isinstance(status, dict)
    for field in ("name", "state", "round", "rounds", "created_at", "metrics"):
        assert field in status
    assert (status["state"], status["round"], status["rounds"], status["metrics"]) == ("pending", 0, 3, [])

    table = ctl(daemon.socket_path, "list")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "STATE", "ROUND"]
    assert table.stdout.splitlines()[1].split()[:3] == ["demo", "pending", "0/3"]

    logs = ctl(daemon.socket_path, "logs", "demo")
    assert logs.returncode == 0
    assert "Job demo submitted" in logs.stdout

    stopped = ctl(daemon.socket_path, "stop", "demo")
    assert stopped.returncode == 0, stopped.stderr
    status = status_json(daemon, "demo")
    assert isinstance(status, dict)
    assert status["state"] == "stopped"
    again = ctl(daemon.socket_path, "stop", "demo")
    assert again.returncode == 1
    assert "already stopped" in again.stderr

    missing = ctl(daemon.socket_path, "status", "nope")
    assert missing.returncode == 1
    assert "no job named 'nope'" in missing.stderr

    since = ctl(daemon.socket_path, "logs", "demo", "--since", "1", "--json")
    seqs = [json.loads(line)["seq"] for line in since.stdout.splitlines()]
    assert seqs and min(seqs) == 2


def test_logs_follow_streams_until_job_ends(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert ctl(daemon.socket_path, "submit", str(write_job(tmp_path))).returncode == 0
    follower = subprocess.Popen(
        [sys.executable, "-m", "fedscaled.ctl.cli", "--socket", str(daemon.socket_path), "logs", "demo", "-f"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert follower.poll() is None  # still following
    assert ctl(daemon.socket_path, "stop", "demo").returncode == 0
    out, _ = follower.communicate(timeout=20)
    assert follower.returncode == 0
    assert "Job demo submitted" in out
    assert "Job demo stopped" in out.splitlines()[-1]


def test_replace_only_ended_jobs(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = write_job(tmp_path)
    assert ctl(daemon.socket_path, "submit", str(path)).returncode == 0
    active = ctl(daemon.socket_path, "submit", str(path), "--replace")
    assert active.returncode == 1
    assert "exists and is pending" in active.stderr
    assert ctl(daemon.socket_path, "stop", "demo").returncode == 0
    plain = ctl(daemon.socket_path, "submit", str(path))
    assert plain.returncode == 1
    assert "--replace" in plain.stderr
    replaced = ctl(daemon.socket_path, "submit", str(path), "--replace")
    assert replaced.returncode == 0, replaced.stderr
    status = status_json(daemon, "demo")
    assert isinstance(status, dict)
    assert status["state"] == "pending"
    logs = ctl(daemon.socket_path, "logs", "demo").stdout
    assert "stopped" not in logs  # the old job's log went with it


def test_state_survives_restart(tmp_path: Path) -> None:
    data = tmp_path / "state"
    with DaemonProcess(data) as first:
        assert ctl(first.socket_path, "submit", str(write_job(tmp_path, "a"))).returncode == 0
        assert ctl(first.socket_path, "submit", str(write_job(tmp_path, "b"))).returncode == 0
        assert ctl(first.socket_path, "stop", "b").returncode == 0
        before = status_json(first)
        logs_before = ctl(first.socket_path, "logs", "b").stdout
    with DaemonProcess(data) as second:
        after = status_json(second)
        assert isinstance(before, list) and isinstance(after, list)
        assert [(j["name"], j["state"], j["enrollment_token"]) for j in after] == \
            [(j["name"], j["state"], j["enrollment_token"]) for j in before]
        assert ctl(second.socket_path, "logs", "b").stdout == logs_before


def test_socket_is_owner_only(daemon: DaemonProcess) -> None:
    mode = os.stat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_second_daemon_on_same_socket_refuses(daemon: DaemonProcess, tmp_path: Path) -> None:
    other = DaemonProcess(tmp_path / "other", socket_path=daemon.socket_path)
    with pytest.raises(RuntimeError, match="another fedscaled daemon is running"):
        other.start(timeout=60)
    assert other.proc is not None and other.proc.returncode == 1
    # the first daemon still serves
    assert ctl(daemon.socket_path, "status").returncode == 0


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    data = tmp_path / "state"
    first = DaemonProcess(data).start()
    first.kill()  # crash: leaves the socket file behind
    assert first.socket_path.exists()
    with DaemonProcess(data) as second:
        assert ctl(second.socket_path, "status").returncode == 0


def test_sigterm_shuts_down_cleanly_within_5s(daemon: DaemonProcess) -> None:
    began = time.monotonic()
    code = daemon.terminate(timeout=5)
    assert code == 0
    assert time.monotonic() - began < 5
    assert "stopped cleanly" in daemon.log()
    assert not daemon.socket_path.exists()


BAD_CONFIGS = {
    "malformed": ("job_conf:\n  - rounds: [1, 2\n", "malformed YAML at line"),
    "unknown_key": ("job_conf:\n  - job_name: x\n  - num_participant: 3\n",
                    "unknown job_conf key 'num_participant' (did you mean num_participants?)"),
    "wrong_type": ("job_conf:\n  - job_name: x\n  - learning_rate: fast\n", "learning_rate must be a number"),
    "negative_rounds": ("job_conf:\n  - job_name: x\n  - rounds: -3\n",
                        "rounds must be a positive integer, got -3"),
    "bad_shape": ("job_conf:\n  - job_name: x\n  - input_shape: 32 x 3\n", "input_shape must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exit_2_and_store_unchanged(daemon: DaemonProcess, tmp_path: Path, case: str) -> None:
    text, message = BAD_CONFIGS[case]
    before = status_json(daemon)
    result = ctl(daemon.socket_path, "submit", str(write_job(tmp_path, "bad", text)))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert status_json(daemon) == before


def test_missing_file_exit_2(daemon: DaemonProcess, tmp_path: Path) -> None:
    result = ctl(daemon.socket_path, "submit", str(tmp_path / "absent.yml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"fedscalectl: job file {tmp_path / 'absent.yml'} not found"
    assert status_json(daemon) == []


def test_no_daemon_exit_3_with_hint(tmp_path: Path) -> None:
    result = ctl(tmp_path / "nothing.sock", "status")
    assert result.returncode == 3
    assert "no fedscaled daemon" in result.stderr
    assert "fedscaled start" in result.stderr


def test_daemon_config_sources(tmp_path: Path) -> None:
    conf = tmp_path / "daemon.yml"
    conf.write_text("log_level: debug\nlisten: 127.0.0.1:0\n")
    data = tmp_path / "state"
    proc = DaemonProcess(data, extra=["--config", str(conf)], env={"FEDSCALED_SHUTDOWN_TIMEOUT": "3"})
    with proc:
        assert ctl(proc.socket_path, "status").returncode == 0
    bad = tmp_path / "bad.yml"
    bad.write_text("listen_addr: 1\n")
    result = subprocess.run([sys.executable, "-m", "fedscaled.daemon.cli", "start", "--config", str(bad),
                             "--data-dir", str(data)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "unknown daemon option 'listen_addr'" in result.stderr


def test_healthz(daemon: DaemonProcess) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{daemon.url}/healthz", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_impossible_models_are_refused_without_state_change(daemon: DaemonProcess, tmp_path: Path) -> None:
    async_job = write_job(tmp_path, "async", "aggregator_entry: aggregation/async_aggregator.py\n"
                          + MINIMAL.format(name="async") + "  - clip_norm: 1.0\n")
    result = ctl(daemon.socket_path, "submit", str(async_job))
    assert result.returncode == 2
    assert "clip_norm and noise_multiplier are for synchronous rounds" in result.stderr
    tiny_cnn = write_job(tmp_path, "tiny", "job_conf:\n  - job_name: tiny\n  - model: cnn\n  - input_shape: 2 2 1\n")
    result = ctl(daemon.socket_path, "submit", str(tiny_cnn))
    assert result.returncode == 2
    assert "model cnn" in result.stderr
    assert status_json(daemon) == []
