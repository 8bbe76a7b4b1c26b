"""Asynchronous (FedBuff) jobs on a real daemon: exact buffered arithmetic with staleness weights,
max_staleness, max_concurrency, kill -9 durability of the buffer, and the digits MLP end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tests.daemon_proc import DaemonProcess, ctl
from tests.proto_client import ProtoClient, Reply

ASYNC_ENTRY = "aggregator_entry: fedscale/cloud/aggregation/async_aggregator.py\n"

LINEAR_JOB = """\
job_conf:
  - job_name: {name}
  - model: linear
  - input_shape: 2 2 1
  - num_classes: 2
  - rounds: {rounds}
  - num_participants: {buffer}
  - async_buffer: {buffer}
  - test_participants: 1
  - eval_interval: 1000
  - filter_less: 1
  - round_deadline: {deadline}
  - checkin_wait: 5
  - retry_min: 0.1
  - retry_max: 0.3
"""

TEST_RESULT = {"samples": 10, "correct_top1": 6, "correct_top5": 10, "loss_sum": 7.0}

Model = dict[str, np.ndarray]


def submit(daemon: DaemonProcess, folder: Path, name: str, *, rounds: int = 2, buffer: int = 3, deadline: int = 120,
           **extra: Any) -> str:
    """Submit an asynchronous linear job; ``extra``: more ``job_conf`` keys, or other values."""
    text = ASYNC_ENTRY + LINEAR_JOB.format(name=name, rounds=rounds, buffer=buffer, deadline=deadline)
    for key, value in extra.items():  # replaces the template's line, or adds one
        line = f"  - {key}: {value}\n"
        text, found = re.subn(rf"^  - {key}: .*\n", line, text, flags=re.MULTILINE)
        text += "" if found else line
    path = folder / f"{name}.yml"
    path.write_text(text)
    done = ctl(daemon.socket_path, "submit", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    return name


def status(daemon: DaemonProcess, job: str) -> dict[str, Any]:
    done = ctl(daemon.socket_path, "status", job, "--json")
    assert done.returncode == 0, done.stderr
    view: dict[str, Any] = json.loads(done.stdout)
    return view


def live(daemon: DaemonProcess, job: str) -> dict[str, Any]:
    """The asynchronous part of the running job's live view."""
    view = status(daemon, job)["live"]
    assert view is not None and "async" in view, view
    info: dict[str, Any] = view["async"]
    return info


def wait_for(daemon: DaemonProcess, job: str, *, version: int | None = None, state: str | None = None,
             seconds: float = 20.0) -> dict[str, Any]:
    """Poll the job's status until it reaches ``version`` (and/or ``state``); bounded."""
    deadline = time.monotonic() + seconds
    view = status(daemon, job)
    while time.monotonic() < deadline:
        if ((version is None or view["model_version"] >= version)
                and (state is None or view["state"] == state)):
            return view
        time.sleep(0.05)
        view = status(daemon, job)
    shown = {key: view.get(key) for key in ("state", "reason", "model_version", "metrics", "live")}
    raise AssertionError(f"job {job} did not reach version {version} / state {state} in {seconds}s: {shown}")


class Fleet:
    """Enrolled devices of one job, driven over the device protocol."""

    def __init__(self, daemon: DaemonProcess, job: str, count: int) -> None:
        self.daemon = daemon
        self.job = job
        self.client = ProtoClient(daemon.url)
        enrollment = status(daemon, job)["enrollment_token"]
        self.tokens: list[str] = []
        for _ in range(count):
            reply = self.client.enroll(job, enrollment)
            assert reply.status == 201, reply.describe()
            self.tokens.append(reply.body["token"])

    def reconnect(self, daemon: DaemonProcess) -> None:
        """The daemon restarted (on another port)."""
        self.daemon = daemon
        self.client = ProtoClient(daemon.url)

    def checkin(self, device: int) -> Reply:
        reply = self.client.checkin(self.job, self.tokens[device])
        assert reply.status == 200, reply.describe()
        return reply

    def answer_test(self, device: int, task: dict[str, Any]) -> None:
        reply = self.client.post_result(self.job, self.tokens[device], task["task_id"], TEST_RESULT)
        assert reply.status == 200 and reply.body["duplicate"] is False, reply.describe()

    def train_task(self, device: int) -> dict[str, Any]:
        """Check in until a training task comes (test tasks on the way are answered); bounded."""
        for _ in range(40):
            answer = self.checkin(device).body
            if answer["action"] == "train":
                task: dict[str, Any] = answer["task"]
                return task
            if answer["action"] == "test":
                self.answer_test(device, answer["task"])
                continue
            assert answer["action"] == "wait", answer
            time.sleep(0.1)
        raise AssertionError(f"device {device} got no training task")

    def finish_tests(self, device: int = 0, seconds: float = 20.0) -> None:
        """Answer test tasks until the job has ended; bounded."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            answer = self.checkin(device).body
            if answer["action"] == "done":
                return
            if answer["action"] == "test":
                self.answer_test(device, answer["task"])
            else:
                assert answer["action"] == "wait", answer
                time.sleep(0.05)
        raise AssertionError("the job did not end")

    def model(self, version: int) -> Model:
        reply = self.client.model(self.job, self.tokens[0], version)
        assert reply.status == 200, reply.describe()
        assert isinstance(reply.body, bytes)
        return dict(st_load(reply.body))

    def upload_body(self, weights: Model, samples: int = 10, loss: float = 0.5) -> bytes:
        return st_save({name: value.astype(np.float32) for name, value in weights.items()},
                       metadata={"samples": str(samples), "loss": str(loss)})

    def upload(self, device: int, task: dict[str, Any], body: bytes) -> Reply:
        return self.client.upload(self.job, self.tokens[device], task["task_id"], body)


def deltas_for(model: Model, seed: int) -> Model:
    """A known, non-constant delta per tensor."""
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-2.0, 2.0, value.shape).astype(np.float32) for name, value in model.items()}


def plus(model: Model, delta: Model) -> Model:
    return {name: (model[name] + delta[name]).astype(np.float32) for name in model}


def weighted_step(base: Model, updates: list[tuple[Model, Model, float]], normalizer: float | None = None) -> Model:
    """``base`` + the weighted sum of the deltas (each upload minus ITS base version) over ``normalizer``, in
    float64. FedBuff's normaliser is the sum of the weights *before* staleness (default: of the given ones)."""
    total = normalizer if normalizer is not None else sum(weight for _, _, weight in updates)
    out = {}
    for name, value in base.items():
        step = sum(weight * (upload[name].astype(np.float64) - trained_on[name].astype(np.float64))
                   for upload, trained_on, weight in updates)
        out[name] = value.astype(np.float64) + step / total
    return out


def assert_model(actual: Model, expected: Model) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(("function", "weighting", "stale_factor"), [
    ("constant", "uniform", 1.0),
    ("sqrt", "uniform", 1 / math.sqrt(2)),
    ("polynomial", "samples", 0.25),  # staleness_exponent 2: (1 + 1)^-2, times the samples
])
def test_buffered_versions_are_the_exact_staleness_weighted_mean_of_deltas(
        daemon: DaemonProcess, tmp_path: Path, function: str, weighting: str, stale_factor: float) -> None:
    extra: dict[str, Any] = {"staleness_function": function, "weighting": weighting}
    if function == "polynomial":
        extra["staleness_exponent"] = 2
    job = submit(daemon, tmp_path, "exact", **extra)
    assert status(daemon, job)["mode"] == "async"
    fleet = Fleet(daemon, job, 6)
    samples = [10, 20, 30, 40, 25, 5]
    weight = [float(n) if weighting == "samples" else 1.0 for n in samples]

    # Four training tasks on v0 (the v0 test task is answered on the way).
    tasks = [fleet.train_task(i) for i in range(4)]
    assert [t["model_version"] for t in tasks] == [0, 0, 0, 0]
    assert len({t["task_id"] for t in tasks}) == 4
    v0 = fleet.model(0)
    uploads = [plus(v0, deltas_for(v0, seed=i)) for i in range(6)]
    for i in range(3):
        reply = fleet.upload(i, tasks[i], fleet.upload_body(uploads[i], samples[i]))
        assert reply.status == 200 and reply.body["duplicate"] is False, reply.describe()
        if i < 2:
            assert live(daemon, job)["buffered"] == i + 1
            assert status(daemon, job)["model_version"] == 0
    view = wait_for(daemon, job, version=1)
    assert view["metrics"][0]["participants"] == 3
    v1 = fleet.model(1)
    expected_v1 = weighted_step(v0, [(uploads[i], v0, weight[i]) for i in range(3)])
    assert_model(v1, expected_v1)
    if weighting == "uniform":  # the plain mean of the uploads
        assert_model(v1, {n: np.mean([uploads[i][n].astype(np.float64) for i in range(3)], axis=0) for n in v0})

    # Device 3 still holds its v0 task; devices 4 and 5 train v1. Device 3's update is one version stale.
    fresh = [fleet.train_task(i) for i in (4, 5)]
    assert [t["model_version"] for t in fresh] == [1, 1]
    uploads[4] = plus(v1, deltas_for(v1, seed=4))
    uploads[5] = plus(v1, deltas_for(v1, seed=5))
    for device, task in ((3, tasks[3]), (4, fresh[0]), (5, fresh[1])):
        reply = fleet.upload(device, task, fleet.upload_body(uploads[device], samples[device]))
        assert reply.status == 200 and reply.body["duplicate"] is False, reply.describe()
    view = wait_for(daemon, job, version=2)
    expected_v2 = weighted_step(v1, [(uploads[3], v0, weight[3] * stale_factor), (uploads[4], v1, weight[4]),
                                     (uploads[5], v1, weight[5])], normalizer=weight[3] + weight[4] + weight[5])
    assert_model(fleet.model(2), expected_v2)
    if stale_factor != 1.0:  # the staleness weight made a measurable difference
        unweighted = weighted_step(v1, [(uploads[3], v0, weight[3]), (uploads[4], v1, weight[4]),
                                        (uploads[5], v1, weight[5])])
        assert max(float(np.abs(unweighted[n] - expected_v2[n]).max()) for n in v0) > 1e-2

    # v2 is the last version: it is tested, then the job finishes.
    fleet.finish_tests()
    view = wait_for(daemon, job, state="finished")
    assert view["model_version"] == 2
    assert [(m["model_version"], m["participants"]) for m in view["metrics"]] == [(1, 3), (2, 3)]
    assert view["metrics"][-1]["test_accuracy"] == pytest.approx(0.6)
    assert view["initial_test"]["test_accuracy"] == pytest.approx(0.6)


def test_a_burst_of_uploads_fills_buffers_of_exactly_async_buffer_updates(tmp_path: Path) -> None:
    """Twelve uploads on v0 at once into buffers of 4: v1, v2 and v3 take exactly four each (not all twelve
    in the open buffer), each weighted by the staleness of the buffer it went to."""
    from fedscaled.store import layout
    from fedscaled.store.lmdb_store import Store

    data = tmp_path / "state"
    samples = [5 + 3 * i for i in range(12)]
    with DaemonProcess(data) as daemon:
        job = submit(daemon, tmp_path, "burst", rounds=3, buffer=4, max_concurrency=12)
        fleet = Fleet(daemon, job, 12)
        tasks = [fleet.train_task(i) for i in range(12)]
        assert {t["model_version"] for t in tasks} == {0}
        v0 = fleet.model(0)
        uploads = [plus(v0, deltas_for(v0, seed=40 + i)) for i in range(12)]
        bodies = [fleet.upload_body(uploads[i], samples[i]) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda i: fleet.upload(i, tasks[i], bodies[i]), range(12)))
        assert all(r.status == 200 and r.body["duplicate"] is False for r in replies), [r.describe() for r in replies]
        view = wait_for(daemon, job, version=3)
        assert [m["participants"] for m in view["metrics"]] == [4, 4, 4], view["metrics"]
        models = [fleet.model(v) for v in range(4)]
    store = Store(data / "store")
    try:
        staleness = {}
        for _, raw in store.scan(layout.TASKS_DB, layout.tasks_prefix(job)):
            record = json.loads(raw)
            if record["kind"] == "train":
                assert record["done"], record
                staleness[record["task_id"]] = record["result"]["staleness"]
    finally:
        store.close()
    members: dict[int, list[int]] = {}
    for i, task in enumerate(tasks):
        members.setdefault(staleness[task["task_id"]] + 1, []).append(i)  # the version its buffer produced
    assert sorted(members) == [1, 2, 3] and all(len(m) == 4 for m in members.values()), members
    for version in (1, 2, 3):
        factor = 1 / math.sqrt(version)  # staleness version - 1; the same for the whole buffer
        expected = weighted_step(models[version - 1], [(uploads[i], v0, samples[i] * factor)
                                                       for i in members[version]],
                                 normalizer=sum(samples[i] for i in members[version]))
        assert_model(models[version], expected)


def test_a_version_that_comes_due_during_another_evaluation_is_still_evaluated(daemon: DaemonProcess,
                                                                              tmp_path: Path) -> None:
    job = submit(daemon, tmp_path, "evals", rounds=4, buffer=1, eval_interval=2, test_participants=2)
    fleet = Fleet(daemon, job, 6)
    first, second = fleet.checkin(0).body, fleet.checkin(1).body
    assert (first["action"], second["action"]) == ("test", "test")
    fleet.answer_test(0, first["task"])  # v0's evaluation stays open: device 1 still holds its test task
    for device in (2, 3, 4):  # v1, v2 (due, but v0's evaluation is open) and v3
        task = fleet.train_task(device)
        model = fleet.model(task["model_version"])
        assert fleet.upload(device, task, fleet.upload_body(plus(model, deltas_for(model, device)))).status == 200
        wait_for(daemon, job, version=task["model_version"] + 1)
    assert live(daemon, job)["testing"] == 0
    fleet.answer_test(1, second["task"])
    # v0 closes at v3: v2, the newest eval_interval-th version, is evaluated now (not skipped).
    deadline = time.monotonic() + 10
    while live(daemon, job)["testing"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live(daemon, job)["testing"] == 2
    tests = [fleet.checkin(d).body for d in (0, 1)]
    assert [(t["action"], t["task"]["model_version"]) for t in tests] == [("test", 2), ("test", 2)], tests
    for device, answer in zip((0, 1), tests, strict=True):
        fleet.answer_test(device, answer["task"])
    task = fleet.train_task(5)
    assert task["model_version"] == 3
    v3 = fleet.model(3)
    assert fleet.upload(5, task, fleet.upload_body(plus(v3, deltas_for(v3, 9)))).status == 200
    fleet.finish_tests()
    view = wait_for(daemon, job, state="finished")
    assert [m["test_accuracy"] is not None for m in view["metrics"]] == [False, True, False, True], view["metrics"]
    assert view["initial_test"] is not None


def test_max_staleness_refuses_an_old_update_and_changes_nothing(daemon: DaemonProcess, tmp_path: Path) -> None:
    job = submit(daemon, tmp_path, "fresh-only", rounds=3, buffer=2, max_staleness=0, weighting="uniform")
    fleet = Fleet(daemon, job, 4)
    tasks = [fleet.train_task(i) for i in range(3)]
    assert [t["model_version"] for t in tasks] == [0, 0, 0]
    v0 = fleet.model(0)
    uploads = [plus(v0, deltas_for(v0, seed=10 + i)) for i in range(3)]
    for i in (1, 2):
        assert fleet.upload(i, tasks[i], fleet.upload_body(uploads[i])).status == 200
    wait_for(daemon, job, version=1)
    v1 = fleet.model(1)
    assert_model(v1, weighted_step(v0, [(uploads[1], v0, 1.0), (uploads[2], v0, 1.0)]))

    stale_body = fleet.upload_body(uploads[0])
    for _ in range(2):  # and a re-send is refused the same way (it never counted)
        reply = fleet.upload(0, tasks[0], stale_body)
        assert reply.status == 409, reply.describe()
        assert reply.error_code == "stale_update", reply.describe()
        assert reply.error_details == {"task_id": tasks[0]["task_id"], "staleness": 1, "max_staleness": 0}
    info = live(daemon, job)
    assert (info["model_version"], info["buffered"]) == (1, 0), info
    assert status(daemon, job)["model_version"] == 1

    # The refused device checks in again: a task on the latest model, not its stale one back.
    retry = fleet.train_task(0)
    assert retry["task_id"] != tasks[0]["task_id"]
    assert retry["model_version"] == 1
    other = fleet.train_task(3)
    assert other["model_version"] == 1
    uploads_v1 = [plus(v1, deltas_for(v1, seed=20)), plus(v1, deltas_for(v1, seed=21))]
    assert fleet.upload(0, retry, fleet.upload_body(uploads_v1[0])).status == 200
    assert fleet.upload(3, other, fleet.upload_body(uploads_v1[1])).status == 200
    view = wait_for(daemon, job, version=2)
    assert view["metrics"][1]["participants"] == 2
    # v2 holds exactly the two fresh updates: the refused one left no trace.
    assert_model(fleet.model(2), weighted_step(v1, [(uploads_v1[0], v1, 1.0), (uploads_v1[1], v1, 1.0)]))


def test_max_concurrency_makes_devices_wait_until_a_task_is_done_or_expires(daemon: DaemonProcess,
                                                                          tmp_path: Path) -> None:
    job = submit(daemon, tmp_path, "capped", rounds=5, buffer=5, deadline=3, max_concurrency=2)
    fleet = Fleet(daemon, job, 5)
    held = [fleet.train_task(0), fleet.train_task(1)]
    for _ in range(3):
        waiting = fleet.checkin(2).body
        assert waiting["action"] == "wait" and "task" not in waiting, waiting
        assert waiting["reason"] == "round_in_progress"
        assert 0 < waiting["retry_after"]["min"] <= waiting["retry_after"]["max"]
    assert live(daemon, job)["training"] == 2
    # A device that already holds a task gets the same one back, not a second.
    assert fleet.checkin(1).body["task"]["task_id"] == held[1]["task_id"]

    # Done: device 0's upload frees its slot.
    v0 = fleet.model(0)
    assert fleet.upload(0, held[0], fleet.upload_body(plus(v0, deltas_for(v0, 1)))).status == 200
    third = fleet.checkin(2).body
    assert third["action"] == "train", third
    assert fleet.checkin(3).body["action"] == "wait"

    # Expired: devices 1 and 2 never upload; once their deadlines (3 s) pass, device 3 gets a task.
    expires = max(held[1]["deadline"], third["task"]["deadline"])
    answer: dict[str, Any] = {}
    while time.time() < expires + 6:
        answer = fleet.checkin(3).body
        if answer["action"] == "train":
            break
        assert answer["action"] == "wait", answer
        time.sleep(0.1)
    assert answer["action"] == "train", answer
    assert time.time() < expires + 1.5, "the slot of an expired task came back late"
    late = fleet.upload(1, held[1], fleet.upload_body(plus(v0, deltas_for(v0, 2))))
    assert late.status == 410 and late.error_code == "task_expired", late.describe()


def test_buffered_updates_survive_kill_9_and_count_once(tmp_path: Path) -> None:
    data = tmp_path / "state"
    samples = [10, 20, 30, 40, 50]
    daemon = DaemonProcess(data).start()
    try:
        job = submit(daemon, tmp_path, "durable", rounds=1, buffer=5)
        fleet = Fleet(daemon, job, 5)
        tasks = [fleet.train_task(i) for i in range(5)]
        v0 = fleet.model(0)
        uploads = [plus(v0, deltas_for(v0, seed=30 + i)) for i in range(5)]
        bodies = [fleet.upload_body(uploads[i], samples[i], loss=0.1 * (i + 1)) for i in range(5)]
        first = []
        for i in range(3):
            reply = fleet.upload(i, tasks[i], bodies[i])
            assert reply.status == 200 and reply.body["duplicate"] is False, reply.describe()
            first.append(reply.body)
        assert live(daemon, job)["buffered"] == 3
        daemon.kill()  # SIGKILL: three updates buffered, two tasks still out
    finally:
        daemon.kill()

    with DaemonProcess(data) as again:
        fleet.reconnect(again)
        info = live(again, job)
        assert (info["model_version"], info["buffered"], info["training"]) == (0, 3, 2), info
        # A pre-kill upload sent again: its first answer, marked duplicate, and not buffered again.
        reply = fleet.upload(0, tasks[0], bodies[0])
        assert reply.status == 200, reply.describe()
        assert reply.body == {**first[0], "duplicate": True}
        assert live(again, job)["buffered"] == 3
        for i in (3, 4):
            reply = fleet.upload(i, tasks[i], bodies[i])
            assert reply.status == 200 and reply.body["duplicate"] is False, reply.describe()
        view = wait_for(again, job, version=1)
        assert view["metrics"][0]["participants"] == 5
        expected = weighted_step(v0, [(uploads[i], v0, float(samples[i])) for i in range(5)])
        assert_model(fleet.model(1), expected)
        loss = sum(0.1 * (i + 1) * samples[i] for i in range(5)) / sum(samples)
        assert view["metrics"][0]["train_loss"] == pytest.approx(loss, rel=1e-6)
        fleet.finish_tests()
        assert wait_for(again, job, state="finished")["model_version"] == 1


DIGITS_ASYNC = ASYNC_ENTRY + """\
job_conf:
  - job_name: digits-async
  - model: mlp
  - input_shape: 8 8 1
  - num_classes: 10
  - rounds: 30
  - num_participants: 10
  - max_concurrency: 20
  - learning_rate: 0.1
  - local_steps: 20
  - batch_size: 16
  - filter_less: 1
  - round_deadline: 30
  - checkin_wait: 10
  - retry_min: 0.2
  - retry_max: 2
  - eval_interval: 5
  - test_participants: 40
"""


def test_digits_mlp_async_end_to_end_with_the_simulator(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "digits-async.yml"
    path.write_text(DIGITS_ASYNC)
    assert ctl(daemon.socket_path, "submit", str(path)).returncode == 0
    token = status(daemon, "digits-async")["enrollment_token"]
    began = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "fedscaled.device.cli", "simulate", "--server", daemon.url, "--job", "digits-async",
         f"--token={token}", "--max-seconds", "120", "--devices", "60", "--dataset", "digits", "--seed", "7"],
        capture_output=True, text=True, timeout=180, check=False)
    elapsed = time.monotonic() - began
    assert run.returncode == 0, run.stdout + run.stderr
    view = status(daemon, "digits-async")
    assert view["state"] == "finished", view
    assert view["model_version"] == 30
    metrics = view["metrics"]
    assert [m["model_version"] for m in metrics] == list(range(1, 31))
    assert all(m["participants"] == 10 for m in metrics), [m["participants"] for m in metrics]
    evaluated = {m["model_version"]: m["test_accuracy"] for m in metrics if m["test_accuracy"] is not None}
    assert sorted(evaluated) == [5, 10, 15, 20, 25, 30], evaluated
    # With FedBuff's normaliser (the sum of the pre-staleness weights) v20 measured 0.87-0.91 in five runs, idle or
    # under two CPU burners (16 of 16 >= 0.806 in an earlier sweep); with the staleness weights normalising
    # themselves away it had been >= 0.80 in only ~70 % of 31 runs. One CI run under load reached only 0.77 by
    # v20 (staler updates learn slower), so the job runs 30 versions and the bounds apply to all of them.
    assert max(evaluated.values()) >= 0.80, evaluated
    assert evaluated[30] >= 0.75, evaluated
    assert view["initial_test"]["test_accuracy"] < 0.5
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    print(f"async digits MLP: accuracy by version {evaluated}, {elapsed:.1f}s")
