"""Enrollment limits, device revocation, enrollment-token rotation and the control plane's audit trail.

Unit tests of the token buckets first; then, against the real daemon (127.0.0.1 only): per-token and
per-address rate limits and ``max_devices`` (429/503, nothing stored), ``fedscalectl revoke`` (403 on every
route, no state change, out of the selection pool, durable), ``fedscalectl rotate-token`` (old token 401,
enrolled devices unaffected, durable), ``fedscalectl devices``, and the caller's uid/pid in the daemon log
and the job log.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from fedscaled.core.ratelimit import BucketMap, TokenBucket, retry_after_seconds
from fedscaled.jobs.enroll_gate import address_key
from tests.daemon_proc import DaemonProcess, ctl
from tests.proto_client import ProtoClient, parse_metrics, sample_key
from tests.test_protocol_errors import UPLOADS, World, expect_rejected, good_body
from tests.test_protocol_errors import Env as ProtocolEnv

# Jobs here lift the enrollment limits they do not test, so that each test sees only its own limit.
NO_LIMITS: dict[str, object] = {"enroll_rate_per_token": 0, "enroll_rate_per_address": 0}


# ---------------------------------------------------------------------------------------------- units
def test_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3, now=100.0)
    for _ in range(3):
        assert bucket.wait(100.0) == 0
        bucket.take(100.0)
    assert bucket.wait(100.0) == pytest.approx(0.5)
    assert bucket.wait(100.25) == pytest.approx(0.25)
    assert bucket.wait(100.5) == 0
    bucket.take(100.5)
    assert bucket.wait(200.0) == 0 and bucket.is_full(200.0)  # never above the burst
    assert bucket.wait(50.0) == 0  # a clock going backwards neither adds nor removes tokens
    assert retry_after_seconds(0.01) == 1 and retry_after_seconds(2.2) == 3


def test_zero_rate_is_unlimited() -> None:
    bucket = TokenBucket.full(rate=0.0, burst=1, now=0.0)
    for _ in range(1000):
        bucket.take(0.0)
    assert bucket.wait(0.0) == 0
    unlimited: BucketMap[str] = BucketMap(0.0, 1, max_keys=4)
    for index in range(1000):
        unlimited.take(str(index), 0.0)
    assert len(unlimited) == 0


def test_bucket_map_is_bounded_and_forgets_idle_keys_first() -> None:
    buckets: BucketMap[str] = BucketMap(rate=1.0, burst=2, max_keys=100)
    buckets.take("busy", 0.0)
    buckets.take("busy", 0.0)
    assert buckets.wait("busy", 0.0) == pytest.approx(1.0)
    for index in range(10_000):  # a flood of new addresses
        buckets.take(f"10.0.{index // 256}.{index % 256}", 0.0)
        assert len(buckets) <= 100
    assert buckets.wait("never-seen", 0.0) == 0
    # At a later time the old buckets are full again: they go before a busy one.
    keeper: BucketMap[str] = BucketMap(rate=1.0, burst=2, max_keys=3)
    keeper.take("a", 0.0)
    keeper.take("b", 0.0)
    keeper.take("busy", 5.0)
    keeper.take("busy", 5.0)
    keeper.take("new", 5.0)
    assert keeper.wait("busy", 5.0) > 0 and len(keeper) == 2


def test_address_keys() -> None:
    assert address_key("127.0.0.1") == "127.0.0.1"
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key(None) == address_key("") == ""


# ---------------------------------------------------------------------------------------------- live
class Env(ProtocolEnv):
    """test_protocol_errors' harness (its metrics leave out the gauges that are not state, NOT_STATE)."""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("enroll")
    with DaemonProcess(work / "state") as daemon:
        harness = Env(daemon, work)
        try:
            yield harness
        finally:
            harness.close()


def events(env: Env, job: str) -> list[dict[str, Any]]:
    out = env.ctl("logs", job, "--json")
    return [json.loads(line) for line in out.splitlines()]


def devices_json(env: Env, job: str) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], json.loads(env.ctl("devices", job, "--json")))


def test_default_limits_stop_an_enrollment_flood(env: Env) -> None:
    """The incident: one token, as fast as possible. With the defaults one address gets its burst (200)
    and then about one a second; every refusal is 429 rate_limited with Retry-After and stores nothing."""
    token = env.submit("flood")
    began = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda _: env.client.enroll("flood", token), range(400)))
    elapsed = time.monotonic() - began
    created = [r for r in replies if r.status == 201]
    refused = [r for r in replies if r.status != 201]
    assert 200 <= len(created) <= 200 + int(elapsed) + 1, (len(created), elapsed)
    assert refused and all(r.status == 429 and r.error_code == "rate_limited" for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 and r.error_details["limit"] == "per_address" for r in refused)
    assert len(devices_json(env, "flood")) == len(created)
    assert env.status("flood")["enrolled_devices"] == len(created)


def test_per_token_limit(env: Env) -> None:
    token = env.submit("pertoken", enroll_rate_per_token=1, enroll_burst_per_token=3, enroll_rate_per_address=0)
    for _ in range(3):
        env.enroll("pertoken", token)
    reply = expect_rejected(env, "pertoken", lambda: env.client.enroll("pertoken", token), 429, "rate_limited")
    assert reply.headers["retry-after"] == "1"
    assert reply.error_details == {"retry_after": 1, "limit": "per_token", "job": "pertoken"}
    # A wrong token is refused as before (401), and does not spend the job token's bucket.
    assert env.client.enroll("pertoken", "wrong").error_code == "unauthorized"
    time.sleep(1.05)
    env.enroll("pertoken", token)
    assert len(devices_json(env, "pertoken")) == 4


def test_per_address_limit_counts_wrong_tokens(env: Env) -> None:
    token = env.submit("peraddr", enroll_rate_per_address=0.5, enroll_burst_per_address=3, enroll_rate_per_token=0)
    env.enroll("peraddr", token)
    for _ in range(2):
        assert env.client.enroll("peraddr", "guess").status == 401
    reply = expect_rejected(env, "peraddr", lambda: env.client.enroll("peraddr", token), 429, "rate_limited")
    assert reply.error_details["limit"] == "per_address"
    assert reply.headers["retry-after"] == "2"
    # Refused while limited, even with a wrong token: guessing gets no answer but 429.
    assert env.client.enroll("peraddr", "guess").status == 429
    # Another job's buckets are its own.
    other = env.submit("peraddr2", enroll_rate_per_address=0.5, enroll_burst_per_address=3)
    env.enroll("peraddr2", other)


def test_max_devices_refuses_with_job_full_until_a_device_is_revoked(env: Env) -> None:
    token = env.submit("capped", max_devices=2, **NO_LIMITS)
    first = env.enroll("capped", token)
    env.enroll("capped", token)
    reply = expect_rejected(env, "capped", lambda: env.client.enroll("capped", token), 409, "job_full")
    assert reply.error_details["max_devices"] == 2
    env.ctl("revoke", "capped", first.device_id)
    env.enroll("capped", token)  # a revoked device no longer counts
    assert [d["state"] for d in devices_json(env, "capped")].count("active") == 2


def test_revoked_device_gets_403_everywhere_and_changes_nothing(env: Env) -> None:
    world: World = env.world("rev", "train", devices=3, **NO_LIMITS)
    revoked, other = world.devices[0], world.devices[1]
    task_id = str(world.train_tasks[revoked.device_id]["task_id"])
    body = good_body(world)
    result = ctl(env.daemon.socket_path, "revoke", "rev", revoked.device_id)
    assert result.returncode == 0, result.stderr
    assert f"device {revoked.device_id} of job rev revoked" in result.stdout
    # The upload for its open task: 403, counted as a refusal, nothing stored.
    reply = expect_rejected(env, "rev", lambda: world.upload(revoked, task_id, body), 403, "device_revoked",
                            counter=UPLOADS)
    assert reply.error_details["device_id"] == revoked.device_id
    for send in (lambda: env.client.checkin("rev", revoked.token), lambda: env.client.model_info("rev", revoked.token),
                 lambda: env.client.model("rev", revoked.token, 0)):
        expect_rejected(env, "rev", send, 403, "device_revoked")
    # Revoking again changes nothing and says so.
    again = ctl(env.daemon.socket_path, "revoke", "rev", revoked.device_id)
    assert again.returncode == 0 and "it already was" in again.stdout
    # Other devices carry on.
    accepted = world.upload(other, str(world.train_tasks[other.device_id]["task_id"]), body)
    assert accepted.status == 200, accepted.describe()
    logged = [e for e in events(env, "rev") if e["message"].startswith(f"Device {revoked.device_id} revoked")]
    assert len(logged) == 1 and logged[0]["uid"] == os.getuid() and logged[0]["device_id"] == revoked.device_id
    listed = {d["device_id"]: d for d in devices_json(env, "rev")}
    assert listed[revoked.device_id]["state"] == "revoked" and listed[revoked.device_id]["revoked_at"]
    assert listed[other.device_id]["state"] == "active"
    assert listed[revoked.device_id]["tasks_done"] == 1  # its initial test task
    assert listed[other.device_id]["tasks_done"] == 1  # its training update
    assert listed[other.device_id]["last_seen"] is not None
    unknown = ctl(env.daemon.socket_path, "revoke", "rev", "d-nope")
    assert unknown.returncode != 0 and "has no device 'd-nope'" in unknown.stderr


def test_revoking_a_waiting_device_answers_its_checkin_and_empties_the_pool(env: Env) -> None:
    # Three testers wanted and a long selection window: a lone device waits in the pool.
    token = env.submit("pool", test_participants=3, num_participants=3, selection_window=60, checkin_wait=20,
                       **NO_LIMITS)
    device = env.enroll("pool", token)
    with ThreadPoolExecutor(1) as executor:
        waiting = executor.submit(env.client.checkin, "pool", device.token)
        pool_key = sample_key("fedscaled_waiting_devices", job="pool")
        deadline = time.monotonic() + 10
        while parse_metrics(env.client.metrics_text()).get(pool_key) != 1.0:
            assert time.monotonic() < deadline, "the device never entered the pool"
            time.sleep(0.05)
        began = time.monotonic()
        env.ctl("revoke", "pool", device.device_id)
        reply = waiting.result(timeout=10)
    assert (reply.status, reply.error_code) == (403, "device_revoked"), reply.describe()
    assert time.monotonic() - began < 5
    assert parse_metrics(env.client.metrics_text())[pool_key] == 0.0


def test_rotate_token(env: Env) -> None:
    old = env.submit("rot", checkin_wait=0.5, **NO_LIMITS)
    enrolled = env.enroll("rot", old)
    result = ctl(env.daemon.socket_path, "rotate-token", "rot")
    assert result.returncode == 0, result.stderr
    new = result.stdout.split("new enrollment token of job rot: ", 1)[1].split()[0]
    assert new != old and len(new) == 40
    status = env.status("rot")
    assert status["enrollment_token"] == status["config"]["enrollment_token"] == new
    expect_rejected(env, "rot", lambda: env.client.enroll("rot", old), 401, "unauthorized")
    env.enroll("rot", new)
    assert env.client.model_info("rot", enrolled.token).status == 200
    assert env.client.checkin("rot", enrolled.token).status == 200
    rotated = [e for e in events(env, "rot") if e["message"].startswith("Enrollment token rotated by")]
    assert len(rotated) == 1 and rotated[0]["uid"] == os.getuid()
    assert new not in json.dumps(events(env, "rot")) and old not in json.dumps(rotated)
    as_json = json.loads(env.ctl("rotate-token", "rot", "--json"))
    assert as_json["enrollment_token"] not in (old, new)


def test_control_actions_log_the_callers_uid_and_pid(env: Env) -> None:
    env.submit("audit", **NO_LIMITS)
    env.control.call("POST", "/v1/jobs/audit/stop")  # in this process: its pid is known
    uid, pid = os.getuid(), os.getpid()
    line = f"control: POST /v1/jobs/audit/stop by uid {uid}, pid {pid}: 200"
    deadline = time.monotonic() + 5
    while line not in env.daemon.log():
        assert time.monotonic() < deadline, f"no line {line!r} in the daemon log:\n{env.daemon.log()[-3000:]}"
        time.sleep(0.05)
    assert f"control: POST /v1/jobs by uid {uid}, pid " in env.daemon.log()  # the submit, via fedscalectl
    logged = events(env, "audit")
    submitted = next(e for e in logged if e["message"].startswith("Job audit submitted"))
    assert f"by uid {uid}, pid " in submitted["message"] and submitted["uid"] == uid
    stopped = next(e for e in logged if e.get("state") == "stopped")
    assert stopped["message"].endswith(f"stopped by the operator (uid {uid}, pid {pid})")
    assert (stopped["uid"], stopped["pid"]) == (uid, pid)


def test_devices_table(env: Env) -> None:
    token = env.submit("table", **NO_LIMITS)
    devices = [env.enroll("table", token) for _ in range(2)]
    env.ctl("revoke", "table", devices[1].device_id)
    lines = env.ctl("devices", "table").splitlines()
    assert lines[0].split() == ["DEVICE", "ENROLLED", "LAST", "SEEN", "TASKS", "DONE", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[devices[0].device_id][-2:] == ["0", "active"]
    assert rows[devices[1].device_id][-2:] == ["0", "revoked"]
    missing = ctl(env.daemon.socket_path, "devices", "nope")
    assert missing.returncode == 1 and "no job named 'nope'" in missing.stderr


def test_revocation_and_rotation_survive_a_restart(tmp_path: Path) -> None:
    work = tmp_path
    daemon = DaemonProcess(work / "state").start()
    try:
        env = Env(daemon, work)
        old = env.submit("durable", **NO_LIMITS)
        keep, gone = env.enroll("durable", old), env.enroll("durable", old)
        env.ctl("revoke", "durable", gone.device_id)
        new = json.loads(env.ctl("rotate-token", "durable", "--json"))["enrollment_token"]
        env.close()
        daemon.kill()  # a crash: only what was committed counts
        daemon.start()
        env = Env(daemon, work)
        client = ProtoClient(daemon.url)
        assert client.model_info("durable", gone.token).error_code == "device_revoked"
        assert client.model_info("durable", keep.token).status == 200
        assert client.enroll("durable", old).error_code == "unauthorized"
        assert client.enroll("durable", new).status == 201
        states = {d["device_id"]: d["state"] for d in devices_json(env, "durable")}
        assert (states[keep.device_id], states[gone.device_id]) == ("active", "revoked")
        env.close()
    finally:
        daemon.kill()
