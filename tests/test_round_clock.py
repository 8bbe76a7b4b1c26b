"""Round rules in-process, on a clock the test moves: deadlines of an hour checked in well under a second.

The engine and its runners take the wall clock as a parameter; here it is a number the test advances.
A real LMDB store, the real registry, engine and runner, no HTTP and no sleeping through deadlines.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from fedscaled.core import codec
from fedscaled.core.rounds import DeviceStatus
from fedscaled.errors import TaskExpired
from fedscaled.jobs.engine import Engine
from fedscaled.jobs.joblog import JobLog
from fedscaled.jobs.registry import JobRegistry
from fedscaled.jobs.runner import JobRunner
from fedscaled.store.lmdb_store import open_store

PHONE = DeviceStatus(battery=80, charging=True, idle=True, unmetered=True, free_storage_mb=500, num_samples=10,
                     backends=("jax",))
JOB = """\
job_conf:
  - job_name: clocked
  - model: linear
  - input_shape: 2 2 1
  - num_classes: 2
  - rounds: 1
  - num_participants: 3
  - overcommitment: 1.0
  - min_participants: 2
  - eval_interval: 1000
  - test_participants: 3
  - filter_less: 1
  - round_deadline: 3600
  - selection_window: 600
  - checkin_wait: 7200
"""


class Clock:
    """A wall clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def upload_body(engine: Engine, version_bytes: bytes, shift: float) -> bytes:
    specs = codec.wire_order(engine.model_def("clocked").specs)
    flat = codec.decode_update(version_bytes, specs, check_finite=False).flat + np.float32(shift)
    tensors = codec.unflatten(flat, specs)
    return st_save({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
                   metadata={"samples": "10", "loss": "1.0"})


async def wait_until(predicate: object, what: str, limit: float = 5.0) -> None:
    """Yield to the engine's loop until ``predicate()`` holds (real time, bounded)."""
    began = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - began > limit:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_selection_window_and_deadline_follow_the_injected_clock(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        store = open_store(tmp_path / "data")
        registry = JobRegistry(store, JobLog(store))
        engine = Engine(registry, clock=clock)
        await engine.start()
        try:
            await registry.submit(JOB)
            token = registry.get("clocked")["enrollment_token"]
            devices = [(await engine.enroll("clocked", token, {}))["device_id"] for _ in range(2)]
            runner = engine.runners["clocked"]
            assert isinstance(runner, JobRunner)
            # Two devices wait for a test of v0 that wants three: the selection window (600 s) holds the phase.
            checkins = [asyncio.ensure_future(engine.checkin("clocked", d, PHONE)) for d in devices]
            await wait_until(lambda: len(runner.pool) == 2, "two devices in the pool")
            await asyncio.sleep(0.2)
            assert runner.phase is None, "the phase opened before the selection window passed"
            clock.now += 601
            runner.wake.set()
            answers = await asyncio.wait_for(asyncio.gather(*checkins), 5)
            assert [a["action"] for a in answers] == ["test", "test"], answers
            # Nobody answers the test: it closes at its deadline (3600 s), which only the clock decides.
            await asyncio.sleep(0.2)
            assert runner.phase is not None and runner.phase.kind == "test"
            clock.now += 3601
            runner.wake.set()
            await wait_until(lambda: registry.get("clocked")["tested_version"] == 0, "the test phase to close")
            # Training round 1: both devices chosen (the window passes on the clock again), one uploads.
            checkins = [asyncio.ensure_future(engine.checkin("clocked", d, PHONE)) for d in devices]
            await wait_until(lambda: len(runner.pool) == 2, "two devices in the pool again")
            clock.now += 601
            runner.wake.set()
            answers = await asyncio.wait_for(asyncio.gather(*checkins), 5)
            assert [a["action"] for a in answers] == ["train", "train"], answers
            model = engine.model_bytes("clocked", 0)
            for shift, (device, answer) in zip((1.0, 3.0), zip(devices, answers, strict=True), strict=True):
                async with engine.result_slot("clocked", device, answer["task"]["task_id"], "train") as slot:
                    body = upload_body(engine, model, shift)
                    await slot.accept_update(memoryview(body))
            # Every chosen device answered: the round closes now, not at its deadline an hour away.
            await wait_until(lambda: registry.get("clocked")["model_version"] == 1, "round 1 to close")
            base = codec.decode_update(model, runner.specs, check_finite=False).flat
            new = codec.decode_update(engine.model_bytes("clocked", 1), runner.specs, check_finite=False).flat
            np.testing.assert_allclose(new, base + 2.0, atol=1e-6)  # FedAvg of +1 and +3, equal weights
        finally:
            engine.begin_shutdown()
            await engine.stop()
            store.close()

    began = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - began < 30  # two hours of round rules, no sleeping through them


PACED = JOB.replace("  - min_participants: 2\n", "  - min_participants: 1\n").replace("rounds: 1", "rounds: 2")


def test_a_round_closes_when_every_chosen_device_answered_or_gave_up(tmp_path: Path) -> None:
    """Three devices chosen for a round of three; two upload and one gives its task up: the round closes
    at once (its deadline is an hour away), the upload after giving up is refused, and the device whose
    upload closed the round is chosen for the next one."""

    async def scenario() -> None:
        clock = Clock()
        store = open_store(tmp_path / "data")
        registry = JobRegistry(store, JobLog(store))
        engine = Engine(registry, clock=clock)
        await engine.start()
        try:
            await registry.submit(PACED.replace("eval_interval: 1000", "eval_interval: 1000\n  - test_participants: 1"
                                                ).replace("  - test_participants: 3\n", ""))
            token = registry.get("clocked")["enrollment_token"]
            devices = [(await engine.enroll("clocked", token, {}))["device_id"] for _ in range(3)]
            runner = engine.runners["clocked"]
            assert isinstance(runner, JobRunner)
            # v0's test goes to one device; it answers.
            first = await asyncio.wait_for(engine.checkin("clocked", devices[0], PHONE), 5)
            assert first["action"] == "test", first
            async with engine.result_slot("clocked", devices[0], first["task"]["task_id"], "test") as slot:
                await slot.accept_result({"samples": 10, "correct_top1": 5, "correct_top5": 10, "loss_sum": 9.0})
            await wait_until(lambda: registry.get("clocked")["tested_version"] == 0, "v0's test to close")
            checkins = [asyncio.ensure_future(engine.checkin("clocked", d, PHONE)) for d in devices]
            answers = await asyncio.wait_for(asyncio.gather(*checkins), 5)  # a full pool opens at once
            assert [a["action"] for a in answers] == ["train"] * 3, answers
            tasks = [a["task"]["task_id"] for a in answers]
            model = engine.model_bytes("clocked", 0)
            for device, task_id, shift in ((devices[0], tasks[0], 1.0), (devices[1], tasks[1], 3.0)):
                async with engine.result_slot("clocked", device, task_id, "train") as slot:
                    await slot.accept_update(memoryview(upload_body(engine, model, shift)))
            await asyncio.sleep(0.2)
            assert registry.get("clocked")["model_version"] == 0, "closed before the third device answered"
            given_up = await engine.abandon("clocked", devices[2], tasks[2])
            assert given_up == {"task_id": tasks[2], "abandoned": True, "duplicate": False}
            assert (await engine.abandon("clocked", devices[2], tasks[2]))["duplicate"] is True
            await wait_until(lambda: registry.get("clocked")["model_version"] == 1, "the round to close")
            with pytest.raises(TaskExpired):
                async with engine.result_slot("clocked", devices[2], tasks[2], "train"):
                    pass
            # The device whose upload closed the round (devices[1]) takes part in round 2.
            pending = asyncio.ensure_future(engine.checkin("clocked", devices[1], PHONE))
            await wait_until(lambda: devices[1] in runner.pool, "the device in the pool for round 2")
            clock.now += 601  # alone in the pool: the selection window opens round 2 with it
            runner.wake.set()
            again = await asyncio.wait_for(pending, 5)
            assert again["action"] == "train" and again["task"]["round"] == 2, again
        finally:
            engine.begin_shutdown()
            await engine.stop()
            store.close()

    asyncio.run(scenario())


def test_a_noised_round_reports_its_privacy_spent_in_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    """Clipping, noise and accounting wired through a real round: the model moved by the clipped mean plus
    noise of the calibrated size, and (epsilon, delta) is in the record, the status view and the CLI text."""
    from fedscaled.core import privacy
    from fedscaled.ctl.cli import _print_job
    from fedscaled.jobs.registry import status_view

    # 514 parameters, so that the noise's measured std is within a few per cent of the calibrated one.
    noised = (PACED.replace("rounds: 2", "rounds: 1").replace("  - test_participants: 3\n", "")
              .replace("input_shape: 2 2 1", "input_shape: 16 16 1")
              .replace("eval_interval: 1000", "eval_interval: 1000\n  - test_participants: 1\n  - clip_norm: 0.5\n"
                       "  - noise_multiplier: 1.0\n  - weighting: uniform\n  - dp_delta: 0.00001"))

    async def scenario() -> None:
        clock = Clock()
        store = open_store(tmp_path / "data")
        registry = JobRegistry(store, JobLog(store))
        engine = Engine(registry, clock=clock)
        await engine.start()
        try:
            await registry.submit(noised)
            token = registry.get("clocked")["enrollment_token"]
            devices = [(await engine.enroll("clocked", token, {}))["device_id"] for _ in range(3)]
            first = await asyncio.wait_for(engine.checkin("clocked", devices[0], PHONE), 5)
            async with engine.result_slot("clocked", devices[0], first["task"]["task_id"], "test") as slot:
                await slot.accept_result({"samples": 10, "correct_top1": 5, "correct_top5": 10, "loss_sum": 9.0})
            await wait_until(lambda: registry.get("clocked")["tested_version"] == 0, "v0's test")
            answers = await asyncio.wait_for(asyncio.gather(
                *(engine.checkin("clocked", d, PHONE) for d in devices)), 5)
            model = engine.model_bytes("clocked", 0)
            for device, answer in zip(devices, answers, strict=True):
                async with engine.result_slot("clocked", device, answer["task"]["task_id"], "train") as slot:
                    await slot.accept_update(memoryview(upload_body(engine, model, 10.0)))  # far beyond the clip
            await wait_until(lambda: registry.get("clocked")["model_version"] == 1, "the noised round")
            runner = engine.runners.get("clocked")
            specs = runner.specs if isinstance(runner, JobRunner) else codec.wire_order(
                engine.model_def("clocked").specs)
            base = codec.decode_update(model, specs, check_finite=False).flat.astype(np.float64)
            new = codec.decode_update(engine.model_bytes("clocked", 1), specs, check_finite=False).flat
            # Every upload moved every weight by +10; clipped to norm 0.5 that is +0.5/sqrt(P) per weight, and
            # the noise has std 2 * 1.0 * 0.5 / 3.
            clipped_step = 0.5 / np.sqrt(base.size)
            noise = new - (base + clipped_step)
            assert abs(float(np.std(noise)) / (2 * 0.5 / 3) - 1) < 0.2, float(np.std(noise))
            spent = registry.get("clocked")["privacy"]
            assert spent["rounds"] == 1 and spent["delta"] == 1e-5
            assert spent["epsilon"] == pytest.approx(privacy.epsilon_spent(1.0, 1, 1e-5))
            view = status_view(registry.get("clocked"))
            assert view["privacy"] == spent and view["strategy"] == "fed-avg"
            _print_job({**view, "enrolled_devices": 3, "live": None})
        finally:
            engine.begin_shutdown()
            await engine.stop()
            store.close()

    asyncio.run(scenario())
    out = capsys.readouterr().out
    assert "privacy spent:" in out and "at delta 1e-05 over 1 noised rounds" in out, out
