"""Every error path of device protocol v1 (docs/protocol.md), against the real daemon.

Each rejected request is checked three ways: the HTTP status, the machine-readable ``error.code``, and
that nothing changed (invariant 6): the job's status (``fedscalectl status JOB --json``), every record of
the job in the daemon's LMDB store (read through a second, read-only LMDB environment), and every
Prometheus sample except the one outcome counter the rejection is meant to bump. Where it matters, a later
valid request for the same task still succeeds and is counted once.

One daemon serves the module; each group of tests gets its own job ("world") brought to the phase it
needs: a test phase with an open test task, or a training round with open training tasks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import lmdb
import numpy as np
import pytest
import safetensors.numpy as st

from fedscaled.ctl.client import ControlClient
from fedscaled.store.lmdb_store import DATABASES
from tests.daemon_proc import DaemonProcess, ctl
from tests.proto_client import (
    GOOD_STATE,
    MetricKey,
    ProtoClient,
    RawRequest,
    Reply,
    parse_metrics,
    sample_key,
)

Arrays = dict[str, np.ndarray[Any, Any]]

UPLOADS = "fedscaled_uploads_total"
RESULTS = "fedscaled_test_results_total"

# A tiny job: linear model, 51 parameters. selection_window is longer than any setup step here so that a
# training round always opens with every device of the world (it opens at once when all are waiting).
BASE_JOB: dict[str, object] = {
    "model": "linear", "input_shape": "4 4 1", "num_classes": 3, "rounds": 2, "num_participants": 2,
    "overcommitment": 1.0, "min_participants": 1, "test_participants": 1, "eval_interval": 100,
    "filter_less": 1, "selection_window": 5, "checkin_wait": 3, "round_deadline": 300, "retry_min": 0.1,
    "retry_max": 0.5,
}
GOOD_RESULT: dict[str, Any] = {"samples": 20, "correct_top1": 5, "correct_top5": 15, "loss_sum": 20.0}
SETUP_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------- harness
@dataclass
class Device:
    """An enrolled device."""

    device_id: str
    token: str


@dataclass
class Snapshot:
    """Everything a rejected request must leave alone."""

    status: dict[str, Any]
    store: dict[str, dict[bytes, bytes]]
    metrics: dict[MetricKey, float]


@dataclass
class World:
    """One job brought to a phase, with its devices and the tasks they hold."""

    env: Env
    job: str
    enrollment_token: str
    devices: list[Device]
    test_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # by device id
    train_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # by device id

    @property
    def client(self) -> ProtoClient:
        return self.env.client

    def upload(self, device: Device, task_id: str, body: bytes) -> Reply:
        return self.client.upload(self.job, device.token, task_id, body)

    def model(self, version: int = 0) -> Arrays:
        reply = self.client.model(self.job, self.devices[0].token, version)
        assert reply.status == 200, reply.describe()
        return cast(Arrays, st.load(reply.body))

    def trained(self, delta: float = 0.01) -> Arrays:
        """Weights as a device would upload them: the base model, moved a little."""
        return {name: (value + np.float32(delta)).astype(np.float32) for name, value in self.model().items()}


def _without_live(status: dict[str, Any]) -> dict[str, Any]:
    """A status without ``live`` (the pool and phase right now: deadline_in ticks, check-ins come and go)."""
    status.pop("live", None)
    return status


# Gauges that are not the daemon's state: free disk space moves with whatever else the machine writes, and
# the body pool keeps a refused upload's receive buffer for the next upload.
NOT_STATE = ("fedscaled_store_free_bytes", "fedscaled_body_pool_free_bytes")


class Env:
    """The module's daemon, a protocol client, and read access to the daemon's store."""

    def __init__(self, daemon: DaemonProcess, work: Path) -> None:
        self.daemon = daemon
        self.work = work
        self.client = ProtoClient(daemon.url)
        self.control = ControlClient(daemon.socket_path)
        # A second LMDB environment on the same files (LMDB supports readers in other processes).
        self.lmdb = lmdb.open(str(daemon.data_dir / "store"), readonly=True, lock=True, max_dbs=len(DATABASES) + 2)
        self.dbs = {name: self.lmdb.open_db(name.encode(), create=False) for name in DATABASES}

    def close(self) -> None:
        self.lmdb.close()

    # ---------------------------------------------------------------- control plane
    def ctl(self, *args: str) -> str:
        result = ctl(self.daemon.socket_path, *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def status(self, job: str) -> dict[str, Any]:
        """``fedscalectl status JOB --json``, through fedscalectl's own control client (in process: the
        same JSON without a Python start per call; test_status_matches_fedscalectl checks the CLI)."""
        return _without_live(cast(dict[str, Any], self.control.call("GET", f"/v1/jobs/{job}")))

    def ctl_status(self, job: str) -> dict[str, Any]:
        """``fedscalectl status JOB --json``, run as the operator would."""
        return _without_live(cast(dict[str, Any], json.loads(self.ctl("status", job, "--json"))))

    def submit(self, job: str, **overrides: object) -> str:
        """Submit a job; its enrollment token."""
        values = {"job_name": job, **BASE_JOB, **overrides}
        path = self.work / f"{job}.yml"
        path.write_text("job_conf:\n" + "".join(f"  - {k}: {v}\n" for k, v in values.items()))
        self.ctl("submit", str(path))
        return str(self.ctl_status(job)["enrollment_token"])

    # ---------------------------------------------------------------- observation
    def store_dump(self, job: str) -> dict[str, dict[bytes, bytes]]:
        """Every record of ``job`` in the daemon's store, by database."""
        name = job.encode()
        prefix = name + b"\0"

        def mine(db: str, k: bytes, v: bytes) -> bool:
            if db == "jobs":
                return k == name
            if db == "tokens":  # token hash -> job \0 device id
                return v.startswith(prefix)
            return k.startswith(prefix)

        with self._begin() as txn:
            return {db: {bytes(k): bytes(v) for k, v in txn.cursor(db=handle) if mine(db, bytes(k), bytes(v))}
                    for db, handle in self.dbs.items()}

    def record(self, job: str) -> dict[str, Any]:
        """The job's record as committed to the store (what survives a crash)."""
        with self._begin() as txn:
            raw = txn.get(job.encode(), db=self.dbs["jobs"])
        assert raw is not None, f"no stored record of job {job}"
        return cast(dict[str, Any], json.loads(bytes(raw)))

    def _begin(self) -> Any:
        try:
            return self.lmdb.begin()
        except lmdb.MapResizedError:  # the daemon grew the map: adopt its size
            self.lmdb.set_mapsize(0)
            return self.lmdb.begin()

    def metrics(self) -> dict[MetricKey, float]:
        # *_created samples are creation timestamps of label sets, not state; see NOT_STATE for the others.
        return {k: v for k, v in parse_metrics(self.client.metrics_text()).items()
                if not k[0].endswith("_created") and k[0] not in NOT_STATE}

    def snapshot(self, job: str) -> Snapshot:
        return Snapshot(self.status(job), self.store_dump(job), self.metrics())

    def wait_for(self, job: str, what: str, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float = 20.0) -> dict[str, Any]:
        """Poll the job's *stored* record until ``predicate`` holds (the daemon's status may show a change
        a moment before its commit lands; see the report on JobRegistry.update)."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.record(job)
            if predicate(record):
                return record
            assert time.monotonic() < deadline, f"job {job}: {what} not reached in {timeout}s: {record}"
            time.sleep(0.02)

    # ---------------------------------------------------------------- worlds
    def enroll(self, job: str, enrollment_token: str) -> Device:
        reply = self.client.enroll(job, enrollment_token, {"model": "pytest", "os": "linux"})
        assert reply.status == 201, reply.describe()
        return Device(reply.body["device_id"], reply.body["token"])

    def acquire(self, job: str, devices: list[Device], kind: str) -> dict[str, dict[str, Any]]:
        """Check every device in (concurrently, like a fleet) until each holds a task of ``kind``."""
        def one(device: Device) -> dict[str, Any]:
            deadline = time.monotonic() + SETUP_TIMEOUT
            while time.monotonic() < deadline:
                reply = self.client.checkin(job, device.token)
                assert reply.status == 200, reply.describe()
                if reply.body["action"] == kind:
                    return cast(dict[str, Any], reply.body["task"])
                assert reply.body["action"] == "wait", reply.describe()
                time.sleep(reply.body["retry_after"]["min"])
            raise AssertionError(f"device {device.device_id} got no {kind} task of {job} in {SETUP_TIMEOUT}s")

        with ThreadPoolExecutor(len(devices)) as pool:
            tasks = list(pool.map(one, devices))
        return {device.device_id: task for device, task in zip(devices, tasks, strict=True)}

    def world(self, job: str, phase: str, *, devices: int = 2, **overrides: object) -> World:
        """A new job in its initial test phase (``phase="test"``) or in training round 1 (``"train"``)."""
        token = self.submit(job, **overrides)
        world = World(self, job, token, [self.enroll(job, token) for _ in range(devices)])
        testers = int(cast(int, overrides.get("test_participants", BASE_JOB["test_participants"])))
        world.test_tasks = self.acquire(job, world.devices[:testers], "test")
        if phase == "test":
            return world
        for device in world.devices[:testers]:
            task_id = world.test_tasks[device.device_id]["task_id"]
            reply = self.client.post_result(job, device.token, task_id, GOOD_RESULT)
            # A short round_deadline may have closed the test phase already; that is fine here.
            assert reply.status == 200 or reply.error_code == "wrong_round", reply.describe()
        trainers = int(cast(int, overrides.get("num_participants", BASE_JOB["num_participants"])))
        world.train_tasks = self.acquire(job, world.devices[:trainers], "train")
        return world


def save(tensors: Arrays, **metadata: str) -> bytes:
    """A safetensors body, made by the real safetensors library as a phone SDK would."""
    return st.save(tensors, metadata=metadata or None)


def good_body(world: World) -> bytes:
    """A valid upload for any training task of ``world``."""
    return save(world.trained(), samples="10", loss="0.5")


def expect_rejected(env: Env, job: str, send: Callable[[], Reply], status: int, code: str, *,
                    counter: str | None = None, field_name: str | None = None) -> Reply:
    """Send a bad request; assert its status and code, and that only ``counter``'s outcome moved."""
    before = env.snapshot(job)
    reply = send()
    assert (reply.status, reply.error_code) == (status, code), reply.describe()
    assert reply.headers.get("content-type", "").startswith("application/json")
    assert isinstance(reply.body["error"]["message"], str) and reply.body["error"]["message"]
    if field_name is not None:
        assert reply.error_details.get("field") == field_name, reply.describe()
    after = env.snapshot(job)
    assert after.status == before.status, "job status changed"
    changed = sorted(f"{db}:{k!r}" for db in before.store
                     for k in set(before.store[db]) ^ set(after.store[db])
                     | {k for k in before.store[db].keys() & after.store[db].keys()
                        if before.store[db][k] != after.store[db][k]})
    assert not changed, f"store changed: {changed}"
    expected = dict(before.metrics)
    if counter is not None:
        key = sample_key(counter, job=job, outcome=code)
        expected[key] = expected.get(key, 0.0) + 1
    moved = {k: (expected.get(k), after.metrics.get(k)) for k in expected.keys() | after.metrics.keys()
             if expected.get(k) != after.metrics.get(k)}
    assert not moved, f"metrics moved unexpectedly: {moved}"
    return reply


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("proto")
    with DaemonProcess(work / "state") as daemon:
        harness = Env(daemon, work)
        try:
            yield harness
        finally:
            harness.close()


@pytest.fixture(scope="module")
def training(env: Env) -> World:
    """Job "main" in training round 1: devices 0 and 1 hold open training tasks; device 2 holds none;
    device 0 also holds its (finished) test task of the initial evaluation."""
    world = env.world("main", "train", devices=3)
    assert len(world.train_tasks) == 2
    return world


@pytest.fixture(scope="module")
def testing(env: Env) -> World:
    """Job "evalj" in its initial test phase: device 0 holds an open test task; device 1 holds none."""
    return env.world("evalj", "test")


@pytest.fixture(scope="module")
def ended(env: Env) -> World:
    """Job "over", stopped by the operator, with one device enrolled while it was active."""
    token = env.submit("over")
    world = World(env, "over", token, [env.enroll("over", token)])
    env.ctl("stop", "over")
    assert env.ctl_status("over")["state"] == "stopped"
    return world


def train_task(world: World, index: int = 0) -> str:
    return str(world.train_tasks[world.devices[index].device_id]["task_id"])


# ---------------------------------------------------------------------------------------------- enroll
def test_status_matches_fedscalectl(env: Env, training: World) -> None:
    assert env.status("main") == env.ctl_status("main")


def test_enroll_wrong_token(env: Env, training: World) -> None:
    expect_rejected(env, "main", lambda: env.client.enroll("main", "not-the-token"), 401, "unauthorized")
    expect_rejected(env, "main", lambda: env.client.enroll("main", 12345), 401, "unauthorized")
    expect_rejected(env, "main", lambda: env.client.enroll("main", training.enrollment_token + "x"), 401,
                    "unauthorized")
    env.enroll("main", training.enrollment_token)  # the right token still works


def test_enroll_unknown_job(env: Env, training: World) -> None:
    expect_rejected(env, "main", lambda: env.client.enroll("no-such-job", training.enrollment_token), 404,
                    "job_not_found")


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe{}", b"[1, 2]", b'"token"',
                                  b'{"enrollment_token": "%s", "device_info": [1]}'],
                         ids=["malformed", "empty", "not-utf8", "array", "string", "device-info-not-object"])
def test_enroll_malformed(env: Env, training: World, body: bytes) -> None:
    body = body.replace(b"%s", training.enrollment_token.encode())
    expect_rejected(env, "main", lambda: env.client.request("POST", "/v1/jobs/main/enroll", body), 400,
                    "bad_request")


def test_enroll_oversized_body(env: Env, training: World) -> None:
    big = json.dumps({"enrollment_token": training.enrollment_token, "device_info": {"pad": "x" * 70_000}})
    expect_rejected(env, "main", lambda: env.client.request("POST", "/v1/jobs/main/enroll", big.encode()), 413,
                    "payload_too_large")


def test_enroll_ended_job(env: Env, ended: World) -> None:
    reply = expect_rejected(env, "over", lambda: env.client.enroll("over", ended.enrollment_token), 409,
                            "job_not_active")
    assert reply.error_details.get("state") == "stopped"


# ---------------------------------------------------------------------------------------------- check-in
def checkin_raw(env: Env, token: str | None, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    return env.client.request("POST", "/v1/jobs/main/checkin", body, token=token,
                              headers={"Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Bearer ", "Basic dXNlcjpwYXNz", "token"],
                         ids=["missing", "unknown", "empty", "basic", "no-scheme"])
def test_checkin_bad_bearer(env: Env, training: World, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    expect_rejected(env, "main", lambda: checkin_raw(env, None, json.dumps(GOOD_STATE).encode(), headers), 401,
                    "unauthorized")


def test_checkin_token_of_another_job(env: Env, training: World, testing: World) -> None:
    other = testing.devices[1].token
    expect_rejected(env, "main", lambda: env.client.checkin("main", other), 401, "unauthorized")
    # ...and the same token still works for its own job.
    assert env.client.model_info("evalj", other).status == 200


@pytest.mark.parametrize("name", list(GOOD_STATE))
def test_checkin_missing_field(env: Env, training: World, name: str) -> None:
    state = {k: v for k, v in GOOD_STATE.items() if k != name}
    expect_rejected(env, "main", lambda: env.client.checkin("main", training.devices[2].token, state), 400,
                    "bad_request", field_name=name)


@pytest.mark.parametrize(("name", "value"), [
    ("battery", "90"), ("battery", 101), ("battery", -1), ("battery", True), ("battery", 50.5),
    ("charging", "yes"), ("charging", 1), ("idle", None), ("unmetered", "true"),
    ("free_storage_mb", -1), ("free_storage_mb", 1.5), ("num_samples", "50"), ("num_samples", -3),
    ("backends", "jax"), ("backends", [1]), ("backends", ["x" * 40]), ("backends", ["jax"] * 17),
])
def test_checkin_mistyped_field(env: Env, training: World, name: str, value: object) -> None:
    state = {**GOOD_STATE, name: value}
    expect_rejected(env, "main", lambda: env.client.checkin("main", training.devices[2].token, state), 400,
                    "bad_request", field_name=name)


@pytest.mark.parametrize("body", [b"{oops", b"[]", b"null"], ids=["malformed", "array", "null"])
def test_checkin_not_a_json_object(env: Env, training: World, body: bytes) -> None:
    expect_rejected(env, "main", lambda: checkin_raw(env, training.devices[2].token, body), 400, "bad_request")


def test_checkin_oversized_body(env: Env, training: World) -> None:
    big = json.dumps({**GOOD_STATE, "pad": "x" * 70_000}).encode()
    token = training.devices[2].token
    # Refused by its Content-Length...
    expect_rejected(env, "main", lambda: checkin_raw(env, token, big), 413, "payload_too_large")
    # ...and, sent chunked (no Content-Length), by the daemon's read limit.
    chunks = [big[i:i + 16_384] for i in range(0, len(big), 16_384)]
    expect_rejected(env, "main", lambda: env.client.request("POST", "/v1/jobs/main/checkin", iter(chunks),
                                                            token=token, chunked=True),
                    413, "payload_too_large")


def test_checkin_unknown_job(env: Env, training: World) -> None:
    expect_rejected(env, "main", lambda: env.client.checkin("no-such-job", training.devices[2].token), 404,
                    "job_not_found")


# ---------------------------------------------------------------------------------------------- uploads
def test_upload_unauthorized(env: Env, training: World, testing: World) -> None:
    task = train_task(training)
    body = good_body(training)
    expect_rejected(env, "main", lambda: env.client.upload("main", None, task, body), 401, "unauthorized",
                    counter=UPLOADS)
    expect_rejected(env, "main", lambda: env.client.upload("main", "forged", task, body), 401, "unauthorized",
                    counter=UPLOADS)
    other_job = testing.devices[0].token
    expect_rejected(env, "main", lambda: env.client.upload("main", other_job, task, body), 401, "unauthorized",
                    counter=UPLOADS)


def test_upload_unknown_task(env: Env, training: World) -> None:
    body = good_body(training)
    expect_rejected(env, "main", lambda: training.upload(training.devices[0], "t-00000000000000000000", body),
                    404, "unknown_task", counter=UPLOADS)


def test_upload_another_devices_task(env: Env, training: World) -> None:
    body = good_body(training)
    victim = train_task(training, 0)
    for thief in (training.devices[1], training.devices[2]):  # one with a task of its own, one without
        expect_rejected(env, "main", partial(training.upload, thief, victim, body), 404, "unknown_task",
                        counter=UPLOADS)


def test_upload_test_task_on_update_route(env: Env, training: World, testing: World) -> None:
    # A finished test task (job "main") and an open one (job "evalj"): both are the wrong kind.
    device = training.devices[0]
    finished = training.test_tasks[device.device_id]["task_id"]
    body = good_body(training)
    expect_rejected(env, "main", lambda: training.upload(device, finished, body), 409, "wrong_task_kind",
                    counter=UPLOADS)
    tester = testing.devices[0]
    open_task = testing.test_tasks[tester.device_id]["task_id"]
    expect_rejected(env, "evalj", lambda: testing.upload(tester, open_task, good_body(testing)), 409,
                    "wrong_task_kind", counter=UPLOADS)


def test_result_for_training_task(env: Env, training: World) -> None:
    device = training.devices[0]
    expect_rejected(env, "main", lambda: env.client.post_result("main", device.token, train_task(training),
                                                                GOOD_RESULT),
                    409, "wrong_task_kind", counter=RESULTS)


def test_upload_to_ended_job(env: Env, ended: World) -> None:
    device = ended.devices[0]
    expect_rejected(env, "over", lambda: env.client.upload("over", device.token, "t-00000000000000000000", b"x"),
                    409, "job_not_active", counter=UPLOADS)


def _bad_bodies(weights: Arrays) -> dict[str, bytes]:
    """Every malformed upload body, keyed by what is wrong with it."""
    meta = {"samples": "10", "loss": "0.5"}
    kernel, bias = "dense_0/kernel", "dense_0/bias"
    valid = save(weights, **meta)
    nan = {**weights, kernel: weights[kernel].copy()}
    nan[kernel][3, 1] = np.nan
    inf = {**weights, bias: weights[bias].copy()}
    inf[bias][2] = np.inf
    ninf = {**weights, bias: weights[bias].copy()}
    ninf[bias][0] = -np.inf
    not_json = b"{" * 16
    return {
        "wrong-name": save({kernel: weights[kernel], "dense_0/b": weights[bias]}, **meta),
        "missing-tensor": save({kernel: weights[kernel]}, **meta),
        "extra-tensor": save({**weights, "dense_1/kernel": np.zeros((3, 3), np.float32)}, **meta),
        "wrong-shape": save({**weights, kernel: weights[kernel].reshape(3, 16).copy()}, **meta),
        "transposed-shape": save({**weights, kernel: np.ascontiguousarray(weights[kernel].T)}, **meta),
        "scalar-bias": save({**weights, bias: np.array(1.0, dtype=np.float32)}, **meta),
        "f16": save({k: v.astype(np.float16) for k, v in weights.items()}, **meta),
        "f64": save({k: v.astype(np.float64) for k, v in weights.items()}, **meta),
        "f64-one-tensor": save({**weights, bias: weights[bias].astype(np.float64)}, **meta),
        "int32": save({**weights, bias: np.zeros(3, np.int32)}, **meta),
        "nan": save(nan, **meta),
        "inf": save(inf, **meta),
        "minus-inf": save(ninf, **meta),
        "truncated": valid[:-7],
        "truncated-header": valid[:20],
        "trailing-bytes": valid + b"\0" * 8,
        "garbage": bytes(range(256)) * 4,
        "text": b"this is not a safetensors file",
        "empty": b"",
        "header-not-json": struct.pack("<Q", len(not_json)) + not_json,
        "header-array": struct.pack("<Q", 2) + b"[]",
        "header-length-past-end": struct.pack("<Q", 10_000) + b"{}",
    }


BAD_BODY_CASES = list(_bad_bodies({"dense_0/kernel": np.zeros((16, 3), np.float32),
                                   "dense_0/bias": np.zeros(3, np.float32)}))


@pytest.mark.parametrize("case", BAD_BODY_CASES)
def test_upload_invalid_tensor(env: Env, training: World, case: str) -> None:
    body = _bad_bodies(training.trained())[case]
    expect_rejected(env, "main", lambda: training.upload(training.devices[0], train_task(training), body), 422,
                    "invalid_tensor", counter=UPLOADS)


def _bad_metadata() -> dict[str, dict[str, str]]:
    return {
        "none": {}, "no-samples": {"loss": "0.5"}, "no-loss": {"samples": "10"},
        "samples-word": {"samples": "ten", "loss": "0.5"}, "samples-zero": {"samples": "0", "loss": "0.5"},
        "samples-negative": {"samples": "-3", "loss": "0.5"}, "samples-float": {"samples": "1.5", "loss": "0.5"},
        "samples-empty": {"samples": "", "loss": "0.5"},
        "loss-nan": {"samples": "10", "loss": "nan"}, "loss-inf": {"samples": "10", "loss": "inf"},
        "loss-word": {"samples": "10", "loss": "low"},
        "utility-negative": {"samples": "10", "loss": "0.5", "utility": "-1"},
        "utility-nan": {"samples": "10", "loss": "0.5", "utility": "NaN"},
        "duration-negative": {"samples": "10", "loss": "0.5", "duration": "-2"},
    }


@pytest.mark.parametrize("case", list(_bad_metadata()))
def test_upload_invalid_metadata(env: Env, training: World, case: str) -> None:
    metadata = _bad_metadata()[case]
    body = save(training.trained(), **metadata)
    reply = expect_rejected(env, "main", lambda: training.upload(training.devices[0], train_task(training), body),
                            422, "invalid_metadata", counter=UPLOADS)
    named = reply.error_details.get("field")
    assert named in {"samples", "loss", "utility", "duration"}, reply.describe()


def test_upload_metadata_value_not_a_string(env: Env, training: World) -> None:
    # The safetensors library only writes string metadata; a hand-made header may not.
    weights = training.trained()
    header: dict[str, Any] = {"__metadata__": {"samples": 10, "loss": "0.5"}}
    offset = 0
    data = b""
    for name in sorted(weights):
        raw = weights[name].astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(weights[name].shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    body = struct.pack("<Q", len(text)) + text + data
    expect_rejected(env, "main", lambda: training.upload(training.devices[0], train_task(training), body), 422,
                    "invalid_tensor", counter=UPLOADS)


def test_upload_too_large_refused_by_content_length(env: Env, training: World) -> None:
    limit = upload_limit(env, training)
    path = env.client.job_path("main", "tasks", train_task(training), "update")
    headers = {"Authorization": f"Bearer {training.devices[0].token}",
               "Content-Type": "application/octet-stream"}

    def headers_only(length: int) -> Callable[[], Reply]:
        def send() -> Reply:
            # Only the headers go out: an answer proves the daemon judged the Content-Length alone.
            with RawRequest(env.client, timeout=10) as raw:
                raw.send_head("PUT", path, {**headers, "Content-Length": str(length)})
                return raw.reply()
        return send

    for length in (limit + 1, 10**12):
        reply = expect_rejected(env, "main", headers_only(length), 413, "payload_too_large", counter=UPLOADS)
        assert reply.error_details.get("limit") == limit


def upload_limit(env: Env, world: World) -> int:
    info = env.client.model_info(world.job, world.devices[0].token).body
    return int(info["num_params"]) * 4 + 64 * 1024


def test_chunked_upload(env: Env) -> None:
    world = env.world("chunked", "train")
    a = world.devices[0]
    path = env.client.job_path("chunked", "tasks", train_task(world, 0), "update")
    headers = {"Authorization": f"Bearer {a.token}", "Content-Type": "application/octet-stream"}
    body = good_body(world)
    before = env.snapshot("chunked")
    # Over the limit, streamed: refused once the bytes pass it, nothing changed.
    chunks = [b"\0" * 4096] * (upload_limit(env, world) // 4096 + 2)
    too_big = env.client.request("PUT", path, iter(chunks), headers=headers, chunked=True)
    assert (too_big.status, too_big.error_code) == (413, "payload_too_large"), too_big.describe()
    after = env.snapshot("chunked")
    assert (after.status, after.store) == (before.status, before.store)
    # A valid upload sent chunked (a phone SDK streaming a body of unknown length) is accepted.
    reply = env.client.request("PUT", path, iter([body[:100], body[100:]]), headers=headers, chunked=True)
    assert reply.status == 200, reply.describe()
    assert reply.body["duplicate"] is False


def test_an_uploads_buffer_is_kept_for_the_next_and_shown_in_metrics(env: Env) -> None:
    # A sized upload is read into a pooled buffer; once the upload is answered the buffer waits for the next
    # one (given back after 60 s idle), and /metrics says how many bytes are kept.
    world = env.world("pooled", "train")
    body = good_body(world)
    reply = world.upload(world.devices[0], train_task(world, 0), body)
    assert reply.status == 200, reply.describe()
    kept = parse_metrics(env.client.metrics_text())[sample_key("fedscaled_body_pool_free_bytes")]
    assert kept >= len(body)


def abort_upload(env: Env, world: World, device: Device, task_id: str, body: bytes) -> Reply | None:
    """Send half of an upload and hang up (a phone losing its network); the answer, if one came."""
    path = env.client.job_path(world.job, "tasks", task_id, "update")
    with RawRequest(env.client) as raw:
        raw.send_head("PUT", path, {"Authorization": f"Bearer {device.token}", "Content-Length": str(len(body))})
        raw.send_body(body[: len(body) // 2])
        assert raw.conn.sock is not None
        raw.conn.sock.shutdown(socket.SHUT_WR)
        try:
            return raw.reply()
        except (ConnectionError, OSError):
            return None


def test_upload_client_disconnects_mid_body(env: Env, training: World) -> None:
    body = good_body(training)
    before = env.snapshot("main")
    reply = abort_upload(env, training, training.devices[0], train_task(training), body)
    if reply is not None:
        assert 400 <= reply.status < 500, reply.describe()
    # The daemon notices the hang-up a moment later; nothing may have changed (no outcome is counted).
    deadline = time.monotonic() + 5
    while True:
        after = env.snapshot("main")
        if after.status == before.status and after.store == before.store:
            break
        assert time.monotonic() < deadline, "state changed after an aborted upload"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- accepted, duplicate
def test_valid_upload_after_errors_counts_once(env: Env) -> None:
    world = env.world("dup", "train")
    a, b = world.devices
    task_a, task_b = train_task(world, 0), train_task(world, 1)
    weights_a, weights_b = world.trained(0.25), world.trained(-0.5)
    # Every kind of bad upload first, on the same task...
    for case, body in {**_bad_bodies(weights_a),
                       **{f"meta-{k}": save(weights_a, **m) for k, m in _bad_metadata().items()}}.items():
        reply = world.upload(a, task_a, body)
        assert reply.status == 422, f"{case}: {reply.describe()}"
    # A hang-up mid-body must give back its slot too, or the round below could not close at its target.
    abort_upload(env, world, a, task_a, save(weights_a, samples="10", loss="0.5"))
    before = env.metrics()
    # ...then the valid upload is accepted,
    first = world.upload(a, task_a, save(weights_a, samples="10", loss="0.5"))
    assert first.status == 200, first.describe()
    assert first.body == {"accepted": True, "task_id": task_a, "round": 1, "duplicate": False}
    phase = env.status("dup")["phase"]
    # FedAvg keeps the round's running sum, not the updates: one accepted update in it.
    stored = env.store_dump("dup")["sums"]
    assert env.store_dump("dup")["updates"] == {}
    meta = next(json.loads(v) for k, v in stored.items() if k.endswith(b"meta"))
    assert meta["accepted"] == 1 and meta["weight"] == 10
    # ...and re-sending it (even a different body) is answered the same, marked duplicate, counted once.
    for body in (save(weights_a, samples="10", loss="0.5"), save(weights_b, samples="999", loss="9")):
        again = world.upload(a, task_a, body)
        assert again.status == 200, again.describe()
        assert again.body == {**first.body, "duplicate": True}
    status = env.status("dup")
    assert status["phase"] == phase and status["metrics"] == [], "a duplicate moved the round"
    assert env.store_dump("dup")["sums"] == stored
    after = env.metrics()
    assert after.get(sample_key(UPLOADS, job="dup", outcome="accepted"), 0) - \
        before.get(sample_key(UPLOADS, job="dup", outcome="accepted"), 0) == 1
    assert after.get(sample_key(UPLOADS, job="dup", outcome="duplicate"), 0) - \
        before.get(sample_key(UPLOADS, job="dup", outcome="duplicate"), 0) == 2
    # The second device's upload closes the round: two participants, weights averaged by samples once each.
    second = world.upload(b, task_b, save(weights_b, samples="30", loss="1.0"))
    assert second.status == 200 and second.body["duplicate"] is False, second.describe()
    status = env.wait_for("dup", "round 1 closed", lambda s: bool(s["metrics"]))
    entry = status["metrics"][0]
    assert (entry["round"], entry["participants"], entry["model_version"]) == (1, 2, 1)
    assert entry["train_loss"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    new = world.model(1)
    for name in weights_a:
        np.testing.assert_allclose(new[name], (10 * weights_a[name] + 30 * weights_b[name]) / 40, rtol=1e-5,
                                   atol=1e-6)
    # After the round closed, a re-send still gets the same answer.
    late = world.upload(a, task_a, save(weights_a, samples="10", loss="0.5"))
    assert (late.status, late.body) == (200, {**first.body, "duplicate": True})


def test_concurrent_resend_counts_once(env: Env) -> None:
    world = env.world("race", "train")
    a, b = world.devices
    task_a = train_task(world, 0)
    body = good_body(world)
    path = env.client.job_path("race", "tasks", task_a, "update")
    with RawRequest(env.client) as first:
        # The phone's first attempt: headers sent. aiohttp answers 100 Continue just before it runs the
        # handler, which checks the task (JobRunner.reserve) and then waits for the body...
        first.send_head("PUT", path, {"Authorization": f"Bearer {a.token}", "Content-Length": str(len(body)),
                                      "Expect": "100-continue"})
        first.await_continue()
        # ...when its retry (same task, same body) arrives complete on a second connection. The daemon
        # holds the retry until the first attempt is handled, then answers it as a duplicate.
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(world.upload, a, task_a, body)
            time.sleep(0.5)
            assert not pending.done(), "the retry must wait for the first attempt"
            first.send_body(body)
            original = first.reply()
            retry = pending.result(timeout=60)
    replies = [original, retry]
    assert all(r.status == 200 for r in replies), [r.describe() for r in replies]
    assert original.body["duplicate"] is False, original.describe()
    assert retry.body == {**original.body, "duplicate": True}, retry.describe()
    time.sleep(0.3)  # a double count would close the round (target 2) on its own now
    status = env.status("race")
    assert status["metrics"] == [] and status["phase"] is not None, status["metrics"]
    assert world.upload(b, train_task(world, 1), good_body(world)).status == 200
    entry = env.wait_for("race", "round 1 closed", lambda s: bool(s["metrics"]))["metrics"][0]
    assert entry["participants"] == 2


# ---------------------------------------------------------------------------------------------- deadlines
def test_upload_after_deadline_then_after_close(env: Env) -> None:
    world = env.world("late", "train", round_deadline=3)
    a, b = world.devices
    task_a, task_b = train_task(world, 0), train_task(world, 1)
    if float(world.train_tasks[a.device_id]["deadline"]) - time.time() < 1.0:
        pytest.skip("setup took most of the 3 s round deadline (machine too loaded to place uploads before it)")
    accepted = world.upload(a, task_a, good_body(world))
    assert accepted.status == 200, accepted.describe()
    body = good_body(world)
    deadline = float(world.train_tasks[b.device_id]["deadline"])
    path = env.client.job_path("late", "tasks", task_b, "update")
    assert env.daemon.proc is not None
    pid = env.daemon.proc.pid
    expired: Reply | None = None
    if deadline - time.time() > 0.25:
        # Pause the daemon across the deadline so that B's upload is read before the round loop's timer
        # closes the phase: the only window in which a task is expired but its round still open.
        with RawRequest(env.client) as raw:
            raw.warm_up()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(max(0.0, deadline - time.time()) + 0.1)
                raw.send_head("PUT", path, {"Authorization": f"Bearer {b.token}", "Content-Length": str(len(body))})
                raw.send_body(body)
            finally:
                os.kill(pid, signal.SIGCONT)
            expired = raw.reply()
    status = env.wait_for("late", "round 1 closed", lambda s: bool(s["metrics"]))
    entry = status["metrics"][0]
    assert (entry["participants"], entry["model_version"]) == (1, 1), entry
    tasks = env.store_dump("late")["tasks"]
    record = json.loads(next(v for k, v in tasks.items() if k.endswith(task_b.encode())))
    assert record["done"] is False
    # Now the round is closed: B's upload is late...
    reply = expect_rejected(env, "late", lambda: world.upload(b, task_b, body), 409, "wrong_round", counter=UPLOADS)
    assert reply.error_details.get("round") == 1
    # ...while A's re-send still gets its earlier answer.
    again = world.upload(a, task_a, good_body(world))
    assert (again.status, again.body) == (200, {**accepted.body, "duplicate": True})
    metrics = env.metrics()
    if expired is None:
        pytest.skip("setup took longer than the 3 s round deadline; could not place an upload before it")
    if expired.error_code == "wrong_round":
        pytest.skip("the round loop closed the phase before the paused daemon read the upload (event-loop "
                    "ordering); 410 task_expired not constructed")
    assert (expired.status, expired.error_code) == (410, "task_expired"), expired.describe()
    assert expired.error_details.get("task_id") == task_b
    assert metrics.get(sample_key(UPLOADS, job="late", outcome="task_expired")) == 1


# ---------------------------------------------------------------------------------------------- model download
def test_model_download_and_etag(env: Env, training: World) -> None:
    token = training.devices[0].token
    info = env.client.model_info("main", token)
    assert info.status == 200, info.describe()
    reply = env.client.model("main", token, 0)
    assert reply.status == 200, reply.describe()
    assert reply.headers["content-type"] == "application/octet-stream"
    etag = reply.headers["etag"]
    assert etag == '"main-0"'
    weights = st.load(reply.body)
    assert [(t["name"], t["shape"], t["dtype"]) for t in info.body["tensors"]] == \
        [(name, list(weights[name].shape), "F32") for name in (t["name"] for t in info.body["tensors"])]
    assert all(weights[name].dtype == np.float32 for name in weights)
    before = env.snapshot("main")
    cached = env.client.model("main", token, 0, etag=etag)
    assert cached.status == 304 and cached.body == b"", cached.describe()
    assert cached.headers["etag"] == etag
    assert env.client.model("main", token, 0, etag='"main-1"').status == 200  # another version's tag
    after = env.snapshot("main")
    assert (after.status, after.store, after.metrics) == (before.status, before.store, before.metrics)


def test_model_unknown_version(env: Env, training: World) -> None:
    token = training.devices[0].token
    reply = expect_rejected(env, "main", lambda: env.client.model("main", token, 999), 404, "unknown_model_version")
    assert reply.error_details.get("version") == 999


@pytest.mark.parametrize("version", ["abc", "-1", "1.0", "0x1", "+1", " 1", "1e3"])
def test_model_non_integer_version(env: Env, training: World, version: str) -> None:
    token = training.devices[0].token
    expect_rejected(env, "main", lambda: env.client.model("main", token, version), 400, "bad_request")


def test_model_version_unicode_digit(env: Env, training: World) -> None:
    token = training.devices[0].token
    expect_rejected(env, "main", lambda: env.client.model("main", token, "\u00b2"), 400, "bad_request")


def test_model_version_beyond_u64(env: Env, training: World) -> None:
    token = training.devices[0].token
    expect_rejected(env, "main", lambda: env.client.model("main", token, str(2**64)), 404, "unknown_model_version")


def test_model_routes_need_a_token(env: Env, training: World, testing: World) -> None:
    other_job = testing.devices[0].token
    for send in (lambda: env.client.request("GET", "/v1/jobs/main/models/0"),
                 lambda: env.client.request("GET", "/v1/jobs/main/model"),
                 lambda: env.client.model("main", other_job, 0)):
        expect_rejected(env, "main", send, 401, "unauthorized")


# ---------------------------------------------------------------------------------------------- test results
@pytest.mark.parametrize(("result", "field_name"), [
    ({**GOOD_RESULT, "correct_top1": 21}, "correct_top1"),
    ({**GOOD_RESULT, "correct_top5": 21}, "correct_top1"),
    ({**GOOD_RESULT, "correct_top1": 16}, "correct_top5"),  # top-5 below top-1
    ({**GOOD_RESULT, "samples": -1}, "samples"),
    ({**GOOD_RESULT, "samples": 0}, "samples"),
    ({**GOOD_RESULT, "correct_top1": -1}, "correct_top1"),
    ({**GOOD_RESULT, "samples": True}, "samples"),
    ({**GOOD_RESULT, "samples": 20.0}, "samples"),
    ({k: v for k, v in GOOD_RESULT.items() if k != "loss_sum"}, "loss_sum"),
    ({k: v for k, v in GOOD_RESULT.items() if k != "correct_top5"}, "correct_top5"),
    ({**GOOD_RESULT, "loss_sum": -0.5}, "loss_sum"),
    ({**GOOD_RESULT, "loss_sum": "20"}, "loss_sum"),
    ({**GOOD_RESULT, "loss_sum": math.nan}, "loss_sum"),
    ({**GOOD_RESULT, "loss_sum": math.inf}, "loss_sum"),
    ({**GOOD_RESULT, "duration": -1}, "duration"),
], ids=["top1-over-samples", "top5-over-samples", "top5-below-top1", "negative-samples", "zero-samples",
        "negative-correct", "bool-samples", "float-samples", "missing-loss-sum", "missing-top5",
        "negative-loss-sum", "string-loss-sum", "nan-loss-sum", "inf-loss-sum", "negative-duration"])
def test_result_invalid_metadata(env: Env, testing: World, result: dict[str, Any], field_name: str) -> None:
    device = testing.devices[0]
    task = testing.test_tasks[device.device_id]["task_id"]
    expect_rejected(env, "evalj", lambda: env.client.post_result("evalj", device.token, task, result), 422,
                    "invalid_metadata", counter=RESULTS, field_name=field_name)


def test_result_malformed_json(env: Env, testing: World) -> None:
    device = testing.devices[0]
    path = env.client.job_path("evalj", "tasks", testing.test_tasks[device.device_id]["task_id"], "result")
    for body in (b"{", b"[]"):
        expect_rejected(env, "evalj", partial(env.client.request, "POST", path, body, token=device.token), 400,
                        "bad_request", counter=RESULTS)


def test_result_oversized_body(env: Env, testing: World) -> None:
    device = testing.devices[0]
    path = env.client.job_path("evalj", "tasks", testing.test_tasks[device.device_id]["task_id"], "result")
    big = json.dumps({**GOOD_RESULT, "pad": "x" * 70_000}).encode()
    expect_rejected(env, "evalj", lambda: env.client.request("POST", path, big, token=device.token), 413,
                    "payload_too_large", counter=RESULTS)


def test_result_wrong_device_or_task(env: Env, testing: World) -> None:
    owner, other = testing.devices
    task = testing.test_tasks[owner.device_id]["task_id"]
    expect_rejected(env, "evalj", lambda: env.client.post_result("evalj", other.token, task, GOOD_RESULT), 404,
                    "unknown_task", counter=RESULTS)
    expect_rejected(env, "evalj", lambda: env.client.post_result("evalj", owner.token, "t-nope", GOOD_RESULT), 404,
                    "unknown_task", counter=RESULTS)
    expect_rejected(env, "evalj", lambda: env.client.post_result("evalj", "forged", task, GOOD_RESULT), 401,
                    "unauthorized", counter=RESULTS)


def test_result_accepted_once(env: Env) -> None:
    world = env.world("evaldup", "test", test_participants=2)
    a, b = world.devices
    task_a = world.test_tasks[a.device_id]["task_id"]
    task_b = world.test_tasks[b.device_id]["task_id"]
    bad = env.client.post_result("evaldup", a.token, task_a, {**GOOD_RESULT, "correct_top1": 99})
    assert bad.status == 422, bad.describe()
    first = env.client.post_result("evaldup", a.token, task_a, GOOD_RESULT)
    assert first.status == 200, first.describe()
    assert first.body == {"accepted": True, "task_id": task_a, "round": 1, "duplicate": False}
    phase = env.status("evaldup")["phase"]
    again = env.client.post_result("evaldup", a.token, task_a, {**GOOD_RESULT, "samples": 1000})
    assert (again.status, again.body) == (200, {**first.body, "duplicate": True})
    status = env.status("evaldup")
    assert status["phase"] == phase and status["initial_test"] is None, "a duplicate result closed the phase"
    last = env.client.post_result("evaldup", b.token, task_b, {**GOOD_RESULT, "correct_top1": 15})
    assert last.status == 200 and last.body["duplicate"] is False, last.describe()
    summary = env.wait_for("evaldup", "test phase closed", lambda s: s["initial_test"] is not None)["initial_test"]
    assert (summary["test_devices"], summary["test_samples"]) == (2, 40)
    assert summary["test_accuracy"] == pytest.approx(20 / 40)
    after_close = env.client.post_result("evaldup", a.token, task_a, GOOD_RESULT)
    assert (after_close.status, after_close.body) == (200, {**first.body, "duplicate": True})


# ---------------------------------------------------------------------------------------------- openapi, metrics
def device_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the device app."""
    from fedscaled.jobs.engine import Engine
    from fedscaled.server.app import build_device_app

    app = build_device_app(cast(Engine, object()))  # routes only; no request is served
    return {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
            if route.resource is not None and route.method != "HEAD"}


def test_openapi_describes_every_route(env: Env) -> None:
    reply = env.client.openapi()
    assert reply.status == 200, reply.describe()
    doc = reply.body
    assert isinstance(doc, dict)
    assert str(doc["openapi"]).startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops
                  if method in {"get", "put", "post", "delete", "patch"}}
    assert documented == device_routes()


# (path, method) -> statuses this module shows the daemon answering there.
OBSERVED_STATUSES: dict[tuple[str, str], set[int]] = {
    ("/v1/jobs/{job}/enroll", "post"): {201, 400, 401, 404, 409, 413},
    ("/v1/jobs/{job}/checkin", "post"): {200, 400, 401, 404, 413},
    ("/v1/jobs/{job}/models/{version}", "get"): {200, 304, 400, 401, 404},
    ("/v1/jobs/{job}/tasks/{task_id}/update", "put"): {200, 401, 404, 409, 410, 413, 422},
    ("/v1/jobs/{job}/tasks/{task_id}/result", "post"): {200, 400, 401, 404, 409, 413, 422},
}


def test_openapi_lists_every_status_answered(env: Env) -> None:
    doc = env.client.openapi().body
    missing = {}
    for (path, method), statuses in OBSERVED_STATUSES.items():
        documented = {int(status) for status in doc["paths"][path][method]["responses"]}
        if statuses - documented:
            missing[f"{method.upper()} {path}"] = sorted(statuses - documented)
    assert not missing, missing


def test_metrics_count_upload_outcomes(env: Env) -> None:
    world = env.world("metr", "train")
    a, b = world.devices
    task = train_task(world, 0)
    weights = world.trained()
    sends: dict[str, Callable[[], Reply]] = {
        "unauthorized": lambda: env.client.upload("metr", "forged", task, b"x"),
        "unknown_task": lambda: world.upload(b, task, save(weights, samples="1", loss="1")),
        "wrong_task_kind": lambda: world.upload(a, world.test_tasks[a.device_id]["task_id"], b"x"),
        "invalid_tensor": lambda: world.upload(a, task, save({**weights, "extra": weights["dense_0/bias"]},
                                                             samples="1", loss="1")),
        "invalid_metadata": lambda: world.upload(a, task, save(weights, samples="0", loss="1")),
        "payload_too_large": lambda: world.upload(a, task, b"\0" * 70_000),
    }
    for code, send in sends.items():
        reply = send()
        assert reply.error_code == code, reply.describe()
    assert world.upload(a, task, save(weights, samples="5", loss="1")).status == 200
    assert world.upload(a, task, save(weights, samples="5", loss="1")).body["duplicate"] is True
    text = env.client.metrics_text()
    assert f"# TYPE {UPLOADS} counter" in text
    samples = parse_metrics(text)
    for outcome in [*sends, "accepted", "duplicate"]:
        assert samples.get(sample_key(UPLOADS, job="metr", outcome=outcome)) == 1.0, outcome
    assert samples.get(sample_key("fedscaled_upload_bytes_total", job="metr"), 0) > 0


def test_metrics_no_series_for_unknown_jobs(env: Env) -> None:
    for index in range(3):
        reply = env.client.upload(f"made-up-{index}", "forged", "t-1", b"x")
        assert reply.error_code == "job_not_found", reply.describe()
        reply = env.client.post_result(f"made-up-{index}", "forged", "t-1", GOOD_RESULT)
        assert reply.error_code == "job_not_found", reply.describe()
    assert "made-up-" not in env.client.metrics_text()
