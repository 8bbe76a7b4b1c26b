"""Round rules in-process, on a clock the test moves: deadlines of an hour checked in well under a second.

The engine and its runners take the wall clock as a parameter; here it is a number the test advances.
A real LMDB store, the real registry, engine and runner, no HTTP and no sleeping through deadlines.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

from fedscaled.core import codec
from fedscaled.core.rounds import DeviceStatus
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
