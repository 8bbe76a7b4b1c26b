"""Asynchronous federated learning: FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022).

There are no rounds to wait for. A device that checks in gets a training task on the *latest* model at
once, as long as fewer than ``max_concurrency`` tasks are out. Its upload is turned into a delta against
the model version it trained from, weighted by its samples times a function of its *staleness* (how many
versions the model moved on meanwhile; FedScale's 1/sqrt(1+s) by default), and folded into a buffer.
When the buffer holds ``async_buffer`` updates (default ``num_participants``), the server applies their
weighted mean delta through the job's strategy (FedAvg: add it; the adaptive optimizers: a server step)
and the model advances one version. Updates staler than ``max_staleness`` are refused (409
``stale_update``).

Durability follows the synchronous engine's rule: the buffer is a :class:`~fedscaled.jobs.durable_sum.
DurableSum` keyed by the version it will produce, committed with the task records of its updates before
any 2xx, and the new version, the emptied buffer and the job record are one commit. A restart restores
the open buffer (and a full one still to apply) exactly: no buffered update is lost or counted twice.

The model is evaluated like a synchronous job's: the initial model, every ``eval_interval``-th version
and the last one, by test tasks handed out (before training tasks) while the evaluation needs devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedscaled.core import aggregate, codec, rounds
from fedscaled.core.aligned import aligned_empty
from fedscaled.core.config import JobConfig
from fedscaled.core.results import test_result, update_metadata
from fedscaled.core.retention import Retention
from fedscaled.core.rounds import TEST, TRAIN, DeviceStatus, Task
from fedscaled.core.strategies import strategy_for
from fedscaled.errors import (
    JobNotActive,
    Overloaded,
    StaleUpdate,
    TaskExpired,
    UnknownTask,
    WrongRound,
    WrongTaskKind,
)
from fedscaled.jobs import server_state
from fedscaled.jobs.durable_sum import DurableSum
from fedscaled.jobs.initial_model import model_of
from fedscaled.jobs.registry import ACTIVE_STATES, JobRecord, JobRegistry
from fedscaled.jobs.runner import SHUTDOWN_RETRY, TaskBusy, accepted_answer, task_answer, update_weight
from fedscaled.metrics import Metrics
from fedscaled.store import layout
from fedscaled.store.lmdb_store import WriteBatch

log = logging.getLogger("fedscaled.jobs")

FloatArray = np.ndarray[Any, np.dtype[np.float32]]

DRAIN_SECONDS = 30.0
# How many decoded base models (by version) are kept for turning uploads into deltas.
BASE_CACHE = 3


def staleness_weight(config: JobConfig, staleness: int) -> float:
    """An update's weight factor for its staleness ``s``: 1/sqrt(1+s) (FedScale's and FedBuff's default),
    1, or (1+s)^-staleness_exponent."""
    function = str(config["staleness_function"])
    if function == "constant":
        return 1.0
    exponent = 0.5 if function == "sqrt" else float(config["staleness_exponent"])
    return float((1.0 + staleness) ** -exponent)


def buffer_size(config: JobConfig) -> int:
    """Updates per model version: ``async_buffer``, or ``num_participants`` when it is 0."""
    return int(config["async_buffer"]) or int(config["num_participants"])


class AsyncRunner:
    """Drives one asynchronous (FedBuff) job; the engine calls it exactly like a :class:`JobRunner`."""

    def __init__(self, registry: JobRegistry, name: str, metrics: Metrics, pool_limit: list[int],
                 clock: Callable[[], float] = time.time) -> None:
        del pool_limit  # nothing is held: every check-in is answered at once
        self.clock = clock
        self.registry = registry
        self.store = registry.store
        self.name = name
        self.metrics = metrics
        record = registry.get(name)
        self.config = JobConfig.from_record(record["config"])
        self.model = model_of(self.config)
        self.specs = codec.wire_order(self.model.specs)
        self.strategy = strategy_for(self.config.values)
        self.size = buffer_size(self.config)
        # Versions back to max_staleness stay stored: an update is turned into a delta against its own base.
        self.retention = Retention.of(self.config.values, needed_back=int(self.config["max_staleness"]))
        self.started_at = record["created_at"]
        self.tasks: dict[str, Task] = {}  # tasks out (not done), train and test, by id
        self.by_device: dict[str, str] = {}
        self.receiving: dict[str, asyncio.Future[None]] = {}
        self.buffers: dict[int, DurableSum] = {}  # by the version each will produce; the newest is open
        self.test_version: int | None = None  # the version being evaluated
        self.test_deadline = 0.0
        self.test_results: list[dict[str, Any]] = []
        self.shutting_down = False
        self.wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._latest: tuple[int, bytes] | None = None
        self._bases: dict[int, FloatArray] = {}
        self._applying: asyncio.Future[None] | None = None
        self._incoming: dict[int, int] = {}  # updates being folded (not yet committed), by buffer

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Restore the buffers and open tasks from the store and start the loop."""
        self._restore()
        self._task = asyncio.create_task(self._run(), name=f"async-job-{self.name}")

    async def cancel(self) -> None:
        """Stop the loop and wait for the commits it started (the job's state stays in the store)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            for buffer in list(self.buffers.values()):
                await asyncio.wait_for(buffer.drain(), DRAIN_SECONDS)

    def ended(self, state: str) -> None:
        """The job ended: stop the loop."""
        del state
        self.wake.set()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def release_waiters(self, window: dict[str, float], reason: str) -> None:
        """Nothing waits in an asynchronous job's pool."""
        del window, reason

    def drop_device(self, device_id: str, error: Exception) -> None:
        """A revoked device: its open task no longer counts against max_concurrency."""
        del error
        task_id = self.by_device.pop(device_id, None)
        if task_id is not None:
            self.tasks.pop(task_id, None)

    def _check_mine(self) -> None:
        if self.registry.get(self.name)["created_at"] != self.started_at:
            raise asyncio.CancelledError

    # ------------------------------------------------------------------ restore
    def _restore(self) -> None:
        record = self.registry.get(self.name)
        version = int(record["model_version"])
        now = self.clock()
        for _, raw in self.store.scan(layout.TASKS_DB, layout.tasks_prefix(self.name)):
            task = Task.from_record(json.loads(raw))
            if not task.done and not task.abandoned and task.deadline > now:
                self._track(task)
        # The open buffer produces version + 1; a full one whose apply did not commit may be followed by
        # later ones, already filling (an update goes to the oldest buffer with room).
        self.buffers[version + 1] = DurableSum.restore(self.store, self.name, version + 1, self.specs)
        prefix = layout.sums_prefix(self.name)
        stored = {int.from_bytes(k[len(prefix):len(prefix) + 8], "big")
                  for k in self.store.scan_keys(layout.SUMS_DB, prefix)}
        for produces in sorted(p for p in stored if p > version + 1):
            buffer = DurableSum.restore(self.store, self.name, produces, self.specs)
            if buffer.accepted > 0:
                self.buffers[produces] = buffer
        due = self._test_due(record)
        if due is not None:
            self._open_test(due, now)
            self.test_results = [t.result for t in self._stored_tasks() if t.kind == TEST and t.done
                                 and t.model_version == due]
        accepted = sum(b.accepted for b in self.buffers.values())
        log.info("job %s: resumed at model v%d with %d buffered updates", self.name, version, accepted)

    def _stored_tasks(self) -> list[Task]:
        return [Task.from_record(json.loads(raw))
                for _, raw in self.store.scan(layout.TASKS_DB, layout.tasks_prefix(self.name))]

    def _track(self, task: Task) -> None:
        self.tasks[task.task_id] = task
        self.by_device[task.device_id] = task.task_id

    def _untrack(self, task: Task) -> None:
        self.tasks.pop(task.task_id, None)
        if self.by_device.get(task.device_id) == task.task_id:
            del self.by_device[task.device_id]

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        try:
            while True:
                record = self.registry.get(self.name)
                if record["state"] not in ACTIVE_STATES:
                    return
                now = self.clock()
                self._expire(now)
                version = int(record["model_version"])
                due = self._test_due(record)
                if self.test_version is None and due is not None:
                    # Before applying the next buffer, which may be full already: this version is evaluated.
                    self._open_test(due, now)
                    continue
                full = self.buffers.get(version + 1)
                if full is not None and full.accepted >= self.size and version < int(self.config["rounds"]):
                    await self._apply(record, full)
                    continue
                if self.test_version is not None:
                    if len(self.test_results) >= self._test_target() or now >= self.test_deadline:
                        await self._close_test(record)
                        continue
                elif version >= int(self.config["rounds"]):
                    await self._finish(record)
                    return
                await self._sleep(self.test_deadline - now if self.test_version is not None else 5.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s failed", self.name)
            with contextlib.suppress(Exception):
                await self.registry.end(self.name, "failed", f"internal error: {exc}", level="ERROR")
            self.ended("failed")

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), max(0.01, min(seconds, 5.0)))

    def _expire(self, now: float) -> None:
        for task in [t for t in self.tasks.values() if t.deadline <= now and t.task_id not in self.receiving]:
            self._untrack(task)

    # ------------------------------------------------------------------ evaluation
    def _test_due(self, record: JobRecord) -> int | None:
        """The version to evaluate next, if any: the last one, else the newest eval_interval-th one (v0
        included) not evaluated yet; it may lie behind the model when it came due while another evaluation
        was open. None when there is none (or it is no longer stored)."""
        version = int(record["model_version"])
        tested = record["tested_version"]
        interval = int(self.config["eval_interval"])
        due = version if version >= int(self.config["rounds"]) else version - version % interval
        if (tested is not None and tested >= due) or not self.retention.keeps(due, version):
            return None
        return due

    def _test_target(self) -> int:
        return int(self.config["test_participants"]) or int(self.config["num_participants"])

    def _open_test(self, version: int, now: float) -> None:
        self.test_version = version
        self.test_deadline = now + float(self.config["round_deadline"])
        self.test_results = []

    async def _close_test(self, record: JobRecord) -> None:
        self._check_mine()
        version = self.test_version
        assert version is not None
        merged = rounds.merge_test_results(self.test_results)
        wall = self.clock() - self.started_at
        self.test_version = None
        for task in [t for t in self.tasks.values() if t.kind == TEST]:
            self._untrack(task)
        if merged is None:
            await self.registry.update(self.name, {"tested_version": version},
                                       f"FL Testing of model v{version}: no test results by the deadline; skipped",
                                       level="WARNING")
            return
        changes: dict[str, Any] = {"tested_version": version}
        summary = {"test_accuracy": merged["top_1"], "test_top5": merged["top_5"], "test_loss": merged["loss"],
                   "test_samples": int(merged["test_len"]), "test_devices": len(self.test_results)}
        if version == 0:
            changes["initial_test"] = summary
        else:
            metrics = [dict(m) for m in record["metrics"]]
            for entry in metrics:
                if entry["model_version"] == version:
                    entry.update(summary)
            changes["metrics"] = metrics
        self.metrics.accuracy.labels(self.name).set(merged["top_1"])
        await self.registry.update(self.name, changes, rounds.fedscale_test_line(max(1, version), wall, merged),
                                   event_fields={"round": version, "model_version": version, **summary})

    async def _finish(self, record: JobRecord) -> None:
        last = next((m for m in reversed(record["metrics"]) if m.get("test_accuracy") is not None), None)
        accuracy = f", final test accuracy {100 * last['test_accuracy']:.2f}%" if last else ""
        await self.registry.end(self.name, "finished", f"{record['model_version']} model versions done{accuracy}")
        self.ended("finished")

    # ------------------------------------------------------------------ applying a full buffer
    async def _apply(self, record: JobRecord, buffer: DurableSum) -> None:
        """Apply a full buffer: the new model version, the emptied buffer and the record in one commit."""
        self._check_mine()
        version = int(record["model_version"]) + 1
        # Later uploads go to the next buffer (they will be applied onto the version this one produces).
        if version + 1 not in self.buffers:
            self.buffers[version + 1] = DurableSum(self.store, self.name, version + 1, self.specs)
        loop = asyncio.get_running_loop()
        self._applying = loop.create_future()
        try:
            await buffer.drain()
            began = time.monotonic()
            base = aggregate.to_device(self._base(version - 1))
            # FedBuff's step: the staleness-weighted sum of deltas over the sum of their sample weights (not of
            # the staleness-weighted ones), so that stale updates move the model less, not just each other.
            norm = buffer.extras.get("norm_weight", float(buffer.state.weight))
            mean_delta = buffer.state.acc / np.float32(norm)
            state = (server_state.load(self.store, self.name, version - 1, self.strategy, base)
                     if self.strategy.stateful else None)
            new_model, opt_state = self.strategy.server_step(state, base, base + mean_delta)
            new_flat = np.asarray(new_model)
            if not np.isfinite(new_flat).all():
                raise RuntimeError(f"model v{version}: the server step produced non-finite weights")
            batch = layout.drop_round_state(WriteBatch(), self.name, version)
            if opt_state is not None:
                server_state.put(batch, self.name, version, opt_state)
            model_bytes = codec.encode_model(new_flat, self.specs)
            batch.put(layout.MODELS_DB, layout.model_key(self.name, version), model_bytes)
            dropped = self.retention.falls_out(version)
            if dropped is not None:
                batch.delete(layout.MODELS_DB, layout.model_key(self.name, dropped))
            loss = buffer.loss_sum / buffer.loss_weight if buffer.loss_weight > 0 else None
            entry = {"round": version, "participants": buffer.accepted, "planned": self.size, "train_loss": loss,
                     "model_version": version, "duration": None, "test_accuracy": None, "test_loss": None}
            self._latest = (version, model_bytes)
            wall = self.clock() - self.started_at
            await self.registry.update(
                self.name, {"round": version, "completed_rounds": version, "model_version": version,
                            "state": "running", "metrics": [*record["metrics"], entry]},
                rounds.fedscale_round_line(version, wall, self.size, buffer.accepted, loss), batch=batch,
                event_fields={"round": version, "participants": buffer.accepted, "train_loss": loss})
            del self.buffers[version]
            self._bases[version] = new_flat
            self.metrics.close_seconds.observe(time.monotonic() - began)
            self.metrics.rounds.labels(self.name, TRAIN, "closed").inc()
            self.metrics.round.labels(self.name).set(version)
        finally:
            self._applying.set_result(None)
            self._applying = None

    def _base(self, version: int) -> FloatArray:
        """Model ``version`` as one flat float32 vector (a few recent ones are kept decoded)."""
        flat = self._bases.get(version)
        if flat is None:
            data = self.model_bytes(version)
            if data is None:
                raise RuntimeError(f"job {self.name}: model v{version} is not in the store")
            flat = np.array(codec.decode_update(data, self.specs, check_finite=False).flat, dtype=np.float32)
            self._bases[version] = flat
        while len(self._bases) > BASE_CACHE:
            del self._bases[min(self._bases)]
        return flat

    # ------------------------------------------------------------------ check-in
    def live_view(self) -> dict[str, Any]:
        """What the job is doing right now, for ``fedscalectl status JOB``."""
        training = sum(1 for t in self.tasks.values() if t.kind == TRAIN)
        record = self.registry.get(self.name)
        version = int(record["model_version"])
        open_buffer = self.buffers.get(max(self.buffers)) if self.buffers else None
        return {"waiting": 0, "eligible": {TRAIN: 0, TEST: 0}, "ineligible": {TRAIN: {}, TEST: {}}, "phase": None,
                "async": {"model_version": version, "training": training,
                          "max_concurrency": int(self.config["max_concurrency"]),
                          "buffered": open_buffer.accepted if open_buffer is not None else 0, "buffer_size": self.size,
                          "testing": self.test_version}}

    def _train_eligible(self, status: DeviceStatus) -> bool:
        return rounds.ineligible_reason(self.config, status, TRAIN) is None

    async def checkin(self, device_id: str, status: DeviceStatus) -> dict[str, Any]:
        """A task on the latest model at once, or 'come back later' (at capacity, or not eligible)."""
        record = self.registry.get(self.name)
        if record["state"] not in ACTIVE_STATES:
            return {"action": "done", "state": record["state"]}
        if self.shutting_down:
            return {"action": "wait", "reason": "shutting_down", "retry_after": SHUTDOWN_RETRY}
        if self._task is not None and self._task.done():
            return {"action": "done", "state": "failed"}
        now = self.clock()
        self._expire(now)  # expired tasks free their max_concurrency slots now, not at the loop's next tick
        current = self.by_device.get(device_id)
        if current is not None:
            task = self.tasks[current]
            # A training task staler than max_staleness can never be accepted: a new one, not the same back.
            if now < task.deadline and not (task.kind == TRAIN
                                            and self._staleness(task) > int(self.config["max_staleness"])):
                return self.task_answer(task)
            self._untrack(task)
        version = int(record["model_version"])
        kind: str | None = None
        if (self.test_version is not None and rounds.ineligible_reason(self.config, status, TEST) is None
                and len(self.test_results) + sum(1 for t in self.tasks.values() if t.kind == TEST)
                < self._test_target()):
            kind = TEST
        elif self._train_eligible(status) and version < int(self.config["rounds"]):
            training = sum(1 for t in self.tasks.values() if t.kind == TRAIN)
            if training >= int(self.config["max_concurrency"]):
                return {"action": "wait", "reason": "round_in_progress",
                        "retry_after": rounds.retry_window(self.config)}
            kind = TRAIN
        if kind is None:
            eligible = (self._train_eligible(status)
                        or rounds.ineligible_reason(self.config, status, TEST) is None)
            return {"action": "wait", "reason": "no_round" if eligible else "not_eligible",
                    "retry_after": rounds.retry_window(self.config)}
        task_version = self.test_version if kind == TEST and self.test_version is not None else version
        deadline = (self.test_deadline if kind == TEST else now + float(self.config["round_deadline"]))
        task = Task(task_id="t-" + secrets.token_hex(10), device_id=device_id, phase_id=task_version, kind=kind,
                    round=max(1, task_version + (1 if kind == TRAIN else 0)), model_version=task_version,
                    issued_at=now, deadline=deadline, device_samples=status.num_samples)
        self._track(task)  # counted against max_concurrency before the commit's await
        try:
            batch = WriteBatch().put_json(layout.TASKS_DB, layout.task_key(self.name, task.task_id), task.to_record())
            if record["state"] == "pending":
                await self.registry.update(self.name, {"state": "running"}, f"Job {self.name} running", batch=batch)
            else:
                await self.store.commit(batch)
        except BaseException:
            self._untrack(task)
            raise
        return self.task_answer(task)

    def task_answer(self, task: Task) -> dict[str, Any]:
        """The check-in answer that hands ``task`` to its device."""
        return task_answer(self.config, self.strategy, task, self.clock())

    # ------------------------------------------------------------------ results
    def _target(self) -> int:
        """The version produced by the buffer that takes the next update: the oldest one with room (counting
        updates still being folded), else a new one after the newest. A buffer never holds more than
        ``async_buffer`` updates."""
        for produces in sorted(self.buffers):
            if self.buffers[produces].accepted + self._incoming.get(produces, 0) < self.size:
                return produces
        return max(self.buffers) + 1

    def _staleness(self, task: Task) -> int:
        """How many versions the model moved on from the task's, by the time its buffer is applied."""
        return self._target() - 1 - task.model_version

    def reserve(self, device_id: str, task_id: str, kind: str) -> tuple[Task, dict[str, Any] | None]:
        """Check that ``task_id`` may deliver its result now and hold a slot for it."""
        task = self.tasks.get(task_id)
        if task is None or task.device_id != device_id:
            raw = self.store.get_json(layout.TASKS_DB, layout.task_key(self.name, task_id))
            if raw is None or raw["device_id"] != device_id:
                raise UnknownTask(f"no task {task_id!r} was issued to this device", task_id=task_id)
            task = Task.from_record(raw)
        if task.kind != kind:
            raise WrongTaskKind(f"task {task_id} is a {task.kind} task", task_id=task_id, kind=task.kind)
        busy = self.receiving.get(task_id)
        if busy is not None:
            raise TaskBusy(busy)
        if task.done:
            return task, accepted_answer(task, duplicate=True)
        if task.abandoned:
            raise TaskExpired(f"task {task_id} was given up by this device; check in for another",
                              task_id=task_id, deadline=task.deadline)
        record = self.registry.get(self.name)
        if record["state"] not in ACTIVE_STATES:
            raise JobNotActive(f"job {self.name} is {record['state']}", state=record["state"])
        if self.clock() >= task.deadline:
            raise TaskExpired(f"the deadline of task {task_id} has passed", task_id=task_id, deadline=task.deadline)
        if kind == TEST and task.model_version != self.test_version:
            raise WrongRound(f"the evaluation of model v{task.model_version} has closed", task_id=task_id,
                             round=task.round)
        if kind == TRAIN:
            self._check_fresh(task)
        self.receiving[task_id] = asyncio.get_running_loop().create_future()
        return task, None

    async def abandon(self, device_id: str, task_id: str) -> dict[str, Any]:
        """The device gives its task up: durable, and its slot of max_concurrency is free again. Idempotent."""
        task = self.tasks.get(task_id)
        if task is None or task.device_id != device_id:
            raw = self.store.get_json(layout.TASKS_DB, layout.task_key(self.name, task_id))
            if raw is None or raw["device_id"] != device_id:
                raise UnknownTask(f"no task {task_id!r} was issued to this device", task_id=task_id)
            task = Task.from_record(raw)
        if task.done:
            return {"task_id": task_id, "abandoned": False, "reason": "result_delivered"}
        if task.abandoned:
            return {"task_id": task_id, "abandoned": True, "duplicate": True}
        if task_id in self.receiving:
            raise Overloaded("this task's result is being received; retry shortly", retry_after=2)
        record = {**task.to_record(), "abandoned": True}
        await self.store.commit(WriteBatch().put_json(layout.TASKS_DB, layout.task_key(self.name, task_id), record))
        task.abandoned = True
        self._untrack(task)
        self.wake.set()
        return {"task_id": task_id, "abandoned": True, "duplicate": False}

    def _check_fresh(self, task: Task) -> None:
        staleness = self._staleness(task)
        limit = int(self.config["max_staleness"])
        if staleness > limit:
            raise StaleUpdate(f"task {task.task_id} trained model v{task.model_version}, {staleness} versions old; "
                              f"this job takes updates at most {limit} versions old", task_id=task.task_id,
                              staleness=staleness, max_staleness=limit)

    def release(self, task_id: str) -> None:
        """Give back a slot taken by :meth:`reserve`."""
        busy = self.receiving.pop(task_id, None)
        if busy is not None and not busy.done():
            busy.set_result(None)
        self.wake.set()

    async def accept_update(self, task: Task, body: memoryview) -> dict[str, Any]:
        """Turn the upload into a delta against its base version and make it durable in the open buffer."""
        decoded = codec.decode_update(body, self.specs, check_finite=False)  # the fold checks the values
        result = update_metadata(decoded.metadata)
        if self._applying is not None:
            # A version is being applied: wait for it, so that the staleness below is the final one.
            await asyncio.wait_for(asyncio.shield(self._applying), DRAIN_SECONDS)
        self._check_fresh(task)
        staleness = self._staleness(task)
        produces = self._target()
        buffer = self.buffers.get(produces)
        if buffer is None:
            buffer = self.buffers[produces] = DurableSum(self.store, self.name, produces, self.specs)
        base = self._base(task.model_version)
        delta = aligned_empty(base.shape[0])
        np.subtract(decoded.flat, base, out=delta)
        weight = update_weight(self.config, task, result)  # before staleness
        self._incoming[produces] = self._incoming.get(produces, 0) + 1  # no await since _target(): its room
        try:
            await buffer.add(task, delta, weight * staleness_weight(self.config, staleness),
                             {**result, "staleness": staleness}, norm_weight=weight)
        finally:
            self._incoming[produces] -= 1
            if not self._incoming[produces]:
                del self._incoming[produces]
        self._untrack(task)
        if buffer.accepted >= self.size:
            self.wake.set()
        self.metrics.upload_bytes.labels(self.name).inc(len(body))
        return accepted_answer(task, duplicate=False)

    async def accept_result(self, task: Task, body: Any) -> dict[str, Any]:
        """Validate and persist a test task's result counts."""
        result = test_result(body)
        if task.device_samples > 0:
            result["max_samples"] = task.device_samples
        if task.model_version != self.test_version:
            raise WrongRound(f"the evaluation of model v{task.model_version} closed while the result of task "
                             f"{task.task_id} was arriving", task_id=task.task_id, round=task.round)
        record = {**task.to_record(), "done": True, "result": result}
        await self.store.commit(WriteBatch().put_json(layout.TASKS_DB, layout.task_key(self.name, task.task_id),
                                                      record))
        task.result = result
        task.done = True
        self._untrack(task)
        self.test_results.append(result)
        self.wake.set()
        return accepted_answer(task, duplicate=False)

    # ------------------------------------------------------------------ models
    def model_bytes(self, version: int) -> bytes | None:
        """Stored weights of ``version`` (the latest is cached in memory)."""
        if self._latest is not None and self._latest[0] == version:
            return self._latest[1]
        data = self.store.get(layout.MODELS_DB, layout.model_key(self.name, version))
        if data is not None and version == self.registry.get(self.name)["model_version"]:
            self._latest = (version, data)
        return data
