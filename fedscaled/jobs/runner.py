"""One active job's round loop: the selection pool, open tasks, durable uploads, streaming FedAvg.

The pure rules live in :mod:`fedscaled.core.rounds`; this module applies them with I/O. Every accepted
upload is committed (synced) to the store *before* its answer, then folded into the running sum; a
restart rebuilds the sum from the stored updates of the open phase, so nothing is lost or counted twice.
All methods run on the event loop thread; store commits run on the store's writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from fedscaled.core import aggregate, codec, privacy, rounds
from fedscaled.core.config import JobConfig
from fedscaled.core.oort import DeviceStats, update_stats
from fedscaled.core.results import test_result, update_metadata
from fedscaled.core.retention import Retention
from fedscaled.core.rounds import TEST, TRAIN, DeviceStatus, Phase, Task
from fedscaled.core.selection import selector_for
from fedscaled.core.strategies import ServerStrategy, strategy_for
from fedscaled.errors import (
    JobNotActive,
    Overloaded,
    TaskExpired,
    UnknownTask,
    WrongRound,
    WrongTaskKind,
)
from fedscaled.jobs import server_state
from fedscaled.jobs.aggregation import RoundAggregator, RoundSpec, StoredUpdates, drop_round, open_round
from fedscaled.jobs.durable_sum import FoldPlan
from fedscaled.jobs.initial_model import model_of
from fedscaled.jobs.registry import ACTIVE_STATES, JobRecord, JobRegistry
from fedscaled.metrics import Metrics
from fedscaled.store import layout
from fedscaled.store.lmdb_store import WriteBatch

log = logging.getLogger("fedscaled.jobs")

FloatArray = np.ndarray[Any, np.dtype[np.float32]]

DRAIN_SECONDS = 30.0
SHUTDOWN_RETRY = {"min": 1.0, "max": 5.0}


class TaskBusy(Exception):
    """A result for this task is being received right now; wait on ``done`` and try again."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        super().__init__("task busy")
        self.done = done


@dataclass
class Waiter:
    """A device held in the selection pool by its long-polling check-in."""

    status: DeviceStatus
    since: float
    answer: asyncio.Future[dict[str, Any]]


def task_answer(config: JobConfig, strategy: ServerStrategy, task: Task, now: float) -> dict[str, Any]:
    """The check-in answer that hands ``task`` to its device (synchronous and asynchronous jobs alike)."""
    if task.kind == TRAIN:
        body_config = {"learning_rate": rounds.learning_rate(config, task.round), "local_steps": config["local_steps"],
                       "epochs": config["epochs"], "batch_size": config["batch_size"],
                       "weight_decay": config["weight_decay"], **strategy.task_config()}
    else:
        body_config = {"test_bsz": config["test_bsz"]}
    body = {"task_id": task.task_id, "kind": task.kind, "round": task.round, "model_version": task.model_version,
            "deadline": task.deadline, "deadline_in": round(max(0.0, task.deadline - now), 3), "config": body_config}
    return {"action": task.kind, "task": body}


def update_weight(config: JobConfig, task: Task, result: dict[str, Any]) -> float:
    """An accepted update's FedAvg weight: 1, or its samples capped at what the device reported when chosen
    (never trust a phone's claim beyond that)."""
    if config["weighting"] == "uniform":
        return 1.0
    samples = int(result["samples"])
    return float(min(samples, task.device_samples)) if task.device_samples > 0 else float(samples)


def accepted_answer(task: Task, duplicate: bool) -> dict[str, Any]:
    """The answer to an accepted (or re-sent) result."""
    return {"accepted": True, "task_id": task.task_id, "round": task.round, "duplicate": duplicate}


class JobRunner:
    """Drives one job from pending to finished."""

    def __init__(self, registry: JobRegistry, name: str, metrics: Metrics, pool_limit: list[int],
                 clock: Callable[[], float] = time.time) -> None:
        # Wall-clock time for every round rule (deadlines, selection windows, task ages): a parameter so that
        # tests can move time instead of sleeping through it.
        self.clock = clock
        self.registry = registry
        self.store = registry.store
        self.name = name
        self.metrics = metrics
        self._pool_budget = pool_limit  # shared [remaining] across jobs: bounds held check-ins daemon-wide
        record = registry.get(name)
        self.config = JobConfig.from_record(record["config"])
        self.model = model_of(self.config)
        # The daemon's flat order: tensors sorted by name, as the safetensors library writes them, so that
        # most uploads decode in place (see codec.decode_update).
        self.specs = codec.wire_order(self.model.specs)
        self.num_params = self.model.num_params
        self.strategy = strategy_for(self.config.values)
        self.selector = selector_for(self.config)
        self.pool: dict[str, Waiter] = {}
        self.phase: Phase | None = None
        self.tasks: dict[str, Task] = {}
        self.by_device: dict[str, str] = {}
        self.round: RoundAggregator | None = None  # the open training phase's uploads
        # The selector's view of each device (utility and speed of its last accepted update), rebuilt from
        # the stored task records at start (kept only for selectors that read it: Oort).
        self.device_stats: dict[str, DeviceStats] = {}
        self.committing = 0  # test results whose durable commit is under way
        self.sealed = False  # the open phase takes no more results (it is closing)
        self.receiving: dict[str, asyncio.Future[None]] = {}  # task id -> resolves when its upload is handled
        self.closing = False
        self.test_results: list[dict[str, Any]] = []
        self._explained: tuple[Any, ...] | None = None  # the last "cannot open" picture logged
        self.wake = asyncio.Event()
        self.shutting_down = False
        self.started_at = record["created_at"]
        self._task: asyncio.Task[None] | None = None
        self._latest: tuple[int, bytes] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Restore the open phase from the store and start the loop."""
        self._restore()
        self._task = asyncio.create_task(self._run(), name=f"job-{self.name}")

    async def cancel(self) -> None:
        """Stop the loop and wait for the work it started (the job's state stays in the store)."""
        self.release_waiters(SHUTDOWN_RETRY, "shutting_down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Commits and aggregation already under way finish before the store may close.
        with contextlib.suppress(Exception):
            if self.round is not None:
                await asyncio.wait_for(self.round.drain(), DRAIN_SECONDS)
                if isinstance(self.round, StoredUpdates):
                    await asyncio.wait_for(self.round.wait_aggregation(), DRAIN_SECONDS)

    def ended(self, state: str) -> None:
        """The job ended (stop from the operator): tell waiting devices, stop the loop."""
        for waiter in self.pool.values():
            if not waiter.answer.done():
                waiter.answer.set_result({"action": "done", "state": state})
        self._clear_pool()
        self.wake.set()
        if self._task is not None and self._task is not asyncio.current_task():
            # A round being closed must not write into the ended (or replacing) job's record.
            self._task.cancel()

    def _check_mine(self) -> None:
        """Stop when the job was replaced under this runner (same name, new job)."""
        if self.registry.get(self.name)["created_at"] != self.started_at:
            raise asyncio.CancelledError

    def release_waiters(self, window: dict[str, float], reason: str) -> None:
        """Answer every held check-in with 'come back later'."""
        for waiter in self.pool.values():
            if not waiter.answer.done():
                waiter.answer.set_result({"action": "wait", "reason": reason, "retry_after": window})
        self._clear_pool()

    def drop_device(self, device_id: str, error: Exception) -> None:
        """Take a device out of the selection pool (it was revoked); its held check-in gets ``error``."""
        waiter = self.pool.pop(device_id, None)
        if waiter is None:
            return
        self._pool_budget[0] += 1
        self.metrics.pool.labels(self.name).set(len(self.pool))
        if not waiter.answer.done():
            waiter.answer.set_exception(error)

    def _clear_pool(self) -> None:
        self._pool_budget[0] += len(self.pool)
        self.pool.clear()
        self.metrics.pool.labels(self.name).set(0)

    # ------------------------------------------------------------------ restore
    @property
    def accepted(self) -> int:
        """Updates accepted in the open training phase."""
        return self.round.accepted if self.round is not None else 0

    def _restore(self) -> None:
        if self.selector.uses_stats:
            done = [Task.from_record(json.loads(raw))
                    for _, raw in self.store.scan(layout.TASKS_DB, layout.tasks_prefix(self.name))]
            for task in sorted((t for t in done if t.done and t.kind == TRAIN), key=lambda t: t.round):
                self._record_device_stats(task, task.result)
        record = self.registry.get(self.name)
        if record.get("phase") is None:
            return
        phase = Phase.from_record(cast(dict[str, Any], record["phase"]))
        self.phase = phase
        for task_id in phase.task_ids:
            raw = self.store.get_json(layout.TASKS_DB, layout.task_key(self.name, task_id))
            if raw is None:
                continue
            task = Task.from_record(raw)
            self.tasks[task_id] = task
            self.by_device[task.device_id] = task_id
        if phase.kind == TRAIN:
            self.round = open_round(self.store, self._round_spec(phase), list(self.tasks.values()), restore=True)
            log.info("job %s: resumed round %d with %d accepted updates", self.name, phase.round, self.accepted)
        else:
            self.test_results = [t.result for t in self.tasks.values() if t.done]

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        try:
            while True:
                record = self.registry.get(self.name)
                if record["state"] not in ACTIVE_STATES:
                    return
                now = self.clock()
                if self.phase is None:
                    plan = rounds.next_plan(self.config, record["completed_rounds"], record["tested_version"])
                    if plan.kind == "finish":
                        await self._finish(record)
                        return
                    if self._ready_to_open(plan.kind, now):
                        await self._open(plan, record, now)
                        continue
                    await self._explain_stuck_pool(plan.kind, plan.round)
                    await self._sleep(self._selection_timeout(now))
                else:
                    if self._phase_complete() or now >= self.phase.deadline:
                        await self._close(record)
                        continue
                    await self._sleep(self.phase.deadline - now)
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

    def _eligible_pool(self, kind: str) -> list[str]:
        return [d for d, w in self.pool.items()
                if not w.answer.done() and rounds.ineligible_reason(self.config, w.status, kind) is None]

    def _ready_to_open(self, kind: str, now: float) -> bool:
        eligible = self._eligible_pool(kind)
        if not eligible:
            return False
        oldest = min(self.pool[d].since for d in eligible)
        return rounds.should_open(self.config, len(eligible), now - oldest, kind)

    def pool_reasons(self, kind: str) -> dict[str, int]:
        """Waiting devices that cannot take a ``kind`` task, counted by reason."""
        counts: dict[str, int] = {}
        for waiter in self.pool.values():
            if waiter.answer.done():
                continue
            reason = rounds.ineligible_reason(self.config, waiter.status, kind)
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
        return counts

    async def _explain_stuck_pool(self, kind: str, round_number: int) -> None:
        """Log once (and again when the picture changes) that no waiting device may take the next task."""
        waiting = sum(1 for w in self.pool.values() if not w.answer.done())
        reasons = self.pool_reasons(kind)
        picture = (kind, round_number, tuple(sorted(reasons.items())))
        if waiting == 0 or sum(reasons.values()) < waiting or picture == self._explained:
            return
        self._explained = picture
        detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
        await self.registry.log.append(
            self.name, f"Round {round_number} cannot open: none of the {waiting} waiting devices may take a "
            f"{kind} task ({detail})", level="WARNING", round=round_number, reasons=reasons)

    def live_view(self) -> dict[str, Any]:
        """What the job is doing right now, for ``fedscalectl status JOB``."""
        kinds = (TRAIN, TEST)
        waiting = [w for w in self.pool.values() if not w.answer.done()]
        view: dict[str, Any] = {
            "waiting": len(waiting),
            "eligible": {k: len(self._eligible_pool(k)) for k in kinds},
            "ineligible": {k: self.pool_reasons(k) for k in kinds},
            "phase": None,
        }
        if self.phase is not None:
            done = self.accepted if self.phase.kind == TRAIN else len(self.test_results)
            view["phase"] = {"kind": self.phase.kind, "round": self.phase.round, "chosen": len(self.tasks),
                             "answered": sum(1 for t in self.tasks.values() if t.done), "accepted": done,
                             "target": self.phase.target, "in_flight": self.inflight,
                             "deadline_in": round(max(0.0, self.phase.deadline - self.clock()), 1)}
        return view

    def _selection_timeout(self, now: float) -> float:
        if not self.pool:
            return 5.0
        oldest = min(w.since for w in self.pool.values())
        return max(0.05, float(self.config["selection_window"]) - (now - oldest))

    def _phase_complete(self) -> bool:
        """The phase has its target count, or every chosen device has answered or given its task up (nobody
        left to wait for)."""
        assert self.phase is not None
        done = self.accepted if self.phase.kind == TRAIN else len(self.test_results)
        everyone = bool(self.tasks) and all(task.done or task.abandoned for task in self.tasks.values())
        return (done >= self.phase.target or everyone) and self.inflight == 0

    # ------------------------------------------------------------------ opening a phase
    async def _open(self, plan: rounds.Plan, record: JobRecord, now: float) -> None:
        self._check_mine()
        planned, target, quorum = rounds.phase_sizes(self.config, plan.kind)
        phase_id = int(record["phase_seq"]) + 1
        seed = int(self.config["sample_seed"]) * 1_000_003 + phase_id
        selector_changes: dict[str, Any] = {}
        if plan.kind == TRAIN:
            # The selector's state is kept in the job record under its sample_mode (status shows Oort's).
            mode = str(self.config["sample_mode"])
            chosen, state = self.selector.select(self._eligible_pool(plan.kind), planned, self.device_stats,
                                                 cast(dict[str, Any], record).get(mode), plan.round, seed)
            if state is not None:
                selector_changes[mode] = state
        else:
            # Test tasks go to a uniform sample: an evaluation must not favour the devices a selector likes.
            chosen = rounds.select(self._eligible_pool(plan.kind), planned, seed)
        attempt = int(record["round_attempt"])
        deadline = now + float(self.config["round_deadline"])
        phase = Phase(phase_id=phase_id, kind=plan.kind, round=plan.round, attempt=attempt,
                      model_version=plan.model_version, opened_at=now, deadline=deadline, target=target,
                      quorum=quorum, planned=len(chosen))
        batch = WriteBatch()
        tasks: dict[str, Task] = {}
        for device_id in chosen:
            task = Task(task_id="t-" + secrets.token_hex(10), device_id=device_id, phase_id=phase_id,
                        kind=plan.kind, round=plan.round, model_version=plan.model_version, issued_at=now,
                        deadline=deadline, device_samples=self.pool[device_id].status.num_samples)
            tasks[task.task_id] = task
            batch.put_json(layout.TASKS_DB, layout.task_key(self.name, task.task_id), task.to_record())
        phase.task_ids = list(tasks)
        # Take the chosen out of the pool before the commit's await: their check-ins may time out meanwhile
        # (and must not find, or return budget for, a waiter that is gone). They are answered after it.
        chosen_waiters = [self.pool.pop(device_id) for device_id in chosen]
        self._pool_budget[0] += len(chosen_waiters)
        what = "training" if plan.kind == TRAIN else f"testing model v{plan.model_version}"
        retry = f" (attempt {attempt + 1})" if attempt else ""
        changes = {"phase": phase.to_record(), "phase_seq": phase_id, "round": plan.round, "state": "running",
                   **selector_changes}
        if record["state"] == "pending":
            self.registry.log.add(batch, self.name, f"Job {self.name} running")
        await self.registry.update(self.name, changes,
                                   f"Round {plan.round}{retry}: {what} with {len(chosen)} of "
                                   f"{len(self.pool) + len(chosen)} "
                                   f"waiting devices, deadline {self.config['round_deadline']:g} s",
                                   batch=batch)
        self.phase = phase
        self.tasks = tasks
        self.by_device = {t.device_id: t.task_id for t in tasks.values()}
        self.test_results = []
        self.closing = False
        self.sealed = False
        self.round = open_round(self.store, self._round_spec(phase)) if plan.kind == TRAIN else None
        self.metrics.round.labels(self.name).set(plan.round)
        for waiter, task in zip(chosen_waiters, tasks.values(), strict=True):
            if not waiter.answer.done():
                waiter.answer.set_result(self.task_answer(task))
        window = rounds.retry_window(self.config, deadline - now)
        for device_id, waiter in self.pool.items():
            if waiter.answer.done():
                continue
            if device_id in self.by_device:  # chosen, timed out during the commit, checked in again
                waiter.answer.set_result(self.task_answer(self.tasks[self.by_device[device_id]]))
                continue
            eligible = rounds.ineligible_reason(self.config, waiter.status, plan.kind) is None
            waiter.answer.set_result({"action": "wait", "reason": "not_selected" if eligible else "not_eligible",
                                      "retry_after": window})
        self._clear_pool()

    def _global_flat(self, version: int) -> FloatArray:
        """Model ``version`` as one float32 vector in the daemon's flat order."""
        data = self.model_bytes(version)
        if data is None:
            raise RuntimeError(f"job {self.name}: model v{version} is not in the store")
        flat: FloatArray = codec.decode_update(data, self.specs, check_finite=False).flat
        return flat

    def _round_spec(self, phase: Phase) -> RoundSpec:
        """How the training phase aggregates: the strategy, clipping and the model it started from."""
        base = aggregate.to_device(np.array(self._global_flat(phase.model_version), dtype=np.float32))
        plan = FoldPlan(strategy=self.strategy, global_model=base,
                        learning_rate=rounds.learning_rate(self.config, phase.round),
                        clip_norm=float(self.config["clip_norm"]))
        return RoundSpec(job=self.name, phase_id=phase.phase_id, specs=tuple(self.specs), plan=plan,
                         aggregator=str(self.config["aggregator"]), trim_fraction=float(self.config["trim_fraction"]),
                         krum_f=int(self.config["krum_f"]))

    def task_answer(self, task: Task) -> dict[str, Any]:
        """The check-in answer that hands ``task`` to its device."""
        return task_answer(self.config, self.strategy, task, self.clock())

    # ------------------------------------------------------------------ check-in
    async def checkin(self, device_id: str, status: DeviceStatus) -> dict[str, Any]:
        """Answer a check-in: the device's open task, a new one after selection, or 'not now'."""
        state = self.registry.state(self.name)
        if state not in ACTIVE_STATES:
            return {"action": "done", "state": state}
        if self.shutting_down:
            return {"action": "wait", "reason": "shutting_down", "retry_after": SHUTDOWN_RETRY}
        if self._task is not None and self._task.done():
            # The loop died and could not even record the failure: do not hold devices for nothing.
            return {"action": "done", "state": "failed"}
        now = self.clock()
        if self.phase is not None and device_id in self.by_device:
            task = self.tasks[self.by_device[device_id]]
            if not task.done and not task.abandoned and now < task.deadline and not self.closing:
                return self.task_answer(task)
            # Its part of this phase is over: it waits in the pool for the next selection.
        if (rounds.ineligible_reason(self.config, status, TRAIN) is not None
                and rounds.ineligible_reason(self.config, status, TEST) is not None):
            return {"action": "wait", "reason": "not_eligible", "retry_after": rounds.retry_window(self.config)}
        previous = self.pool.pop(device_id, None)
        if previous is not None:
            self._pool_budget[0] += 1
            if not previous.answer.done():
                previous.answer.set_result({"action": "wait", "reason": "superseded",
                                            "retry_after": rounds.retry_window(self.config)})
        if self._pool_budget[0] <= 0:
            raise Overloaded("too many devices are waiting; retry later", retry_after=5)
        waiter = Waiter(status=status, since=now, answer=asyncio.get_running_loop().create_future())
        self.pool[device_id] = waiter
        self._pool_budget[0] -= 1
        self.metrics.pool.labels(self.name).set(len(self.pool))
        self.wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.answer), float(self.config["checkin_wait"]))
        except TimeoutError:
            busy = self.phase.deadline - self.clock() if self.phase is not None else None
            return {"action": "wait", "reason": "round_in_progress" if self.phase is not None else "no_round",
                    "retry_after": rounds.retry_window(self.config, busy)}
        finally:
            if self.pool.get(device_id) is waiter:
                del self.pool[device_id]
                self._pool_budget[0] += 1
                self.metrics.pool.labels(self.name).set(len(self.pool))

    # ------------------------------------------------------------------ uploads
    def _find_task(self, device_id: str, task_id: str) -> tuple[Task, bool]:
        """The device's task and whether it belongs to the open phase."""
        task = self.tasks.get(task_id)
        if task is not None and task.device_id == device_id:
            return task, True
        raw = self.store.get_json(layout.TASKS_DB, layout.task_key(self.name, task_id))
        if raw is None or raw["device_id"] != device_id:
            raise UnknownTask(f"no task {task_id!r} was issued to this device", task_id=task_id)
        return Task.from_record(raw), False

    def reserve(self, device_id: str, task_id: str, kind: str) -> tuple[Task, dict[str, Any] | None]:
        """Check that ``task_id`` may take a result now and hold a slot for it.

        Returns (task, duplicate answer): a task already done answers as before and takes no slot.
        """
        task, current = self._find_task(device_id, task_id)
        if task.kind != kind:
            raise WrongTaskKind(f"task {task_id} is a {task.kind} task", task_id=task_id, kind=task.kind)
        busy = self.receiving.get(task_id)
        if busy is not None:
            # The same task's first upload is still arriving or committing: wait for its outcome rather
            # than count it twice (or call it a duplicate before it is durable).
            raise TaskBusy(busy)
        if task.done:
            return task, accepted_answer(task, duplicate=True)
        if task.abandoned:
            raise TaskExpired(f"task {task_id} was given up by this device; check in for another",
                              task_id=task_id, deadline=task.deadline)
        record = self.registry.get(self.name)
        if record["state"] not in ACTIVE_STATES:
            raise JobNotActive(f"job {self.name} is {record['state']}", state=record["state"])
        if not current or self.phase is None or self.closing:
            raise WrongRound(f"round {task.round} has closed; the result of task {task_id} came too late",
                             task_id=task_id, round=task.round)
        if self.clock() >= task.deadline:
            raise TaskExpired(f"the deadline of task {task_id} has passed", task_id=task_id,
                              deadline=task.deadline)
        done = self.accepted if kind == TRAIN else len(self.test_results)
        if done >= self.phase.target:
            raise WrongRound(f"round {task.round} already has its {self.phase.target} results",
                             task_id=task_id, round=task.round)
        if done + self.inflight >= self.phase.target:
            # Results still arriving would fill the round, but one of them may yet be refused: not a final no.
            raise Overloaded(f"round {task.round} has enough results in flight; retry shortly", retry_after=2)
        self.receiving[task_id] = asyncio.get_running_loop().create_future()
        return task, None

    @property
    def inflight(self) -> int:
        """Results of the open phase being received now. Counted from ``receiving`` and the open phase's
        tasks, not kept as a counter: a result of an earlier phase still arriving takes no slot of this
        one, and every phase starts with none. A task already done is counted as done, not also as in flight:
        the aggregator marks it done (and counts it) when its commit returns, before its handler releases it."""
        return sum(1 for task_id in self.receiving if task_id in self.tasks and not self.tasks[task_id].done)

    async def abandon(self, device_id: str, task_id: str) -> dict[str, Any]:
        """The device gives its task up: durable, and the phase stops waiting for it. Idempotent."""
        task, current = self._find_task(device_id, task_id)
        if task.done:
            return {"task_id": task_id, "abandoned": False, "reason": "result_delivered"}
        if task.abandoned:
            return {"task_id": task_id, "abandoned": True, "duplicate": True}
        busy = self.receiving.get(task_id)
        if busy is not None:
            raise Overloaded("this task's result is being received; retry shortly", retry_after=2)
        record = {**task.to_record(), "abandoned": True}
        await self.store.commit(WriteBatch().put_json(layout.TASKS_DB, layout.task_key(self.name, task_id), record))
        task.abandoned = True
        if current:
            self.wake.set()
        return {"task_id": task_id, "abandoned": True, "duplicate": False}

    def release(self, task_id: str) -> None:
        """Give back a slot taken by :meth:`reserve` (after the result was accepted or refused)."""
        busy = self.receiving.pop(task_id, None)
        if busy is not None and not busy.done():
            busy.set_result(None)
        self.wake.set()

    def _check_open(self, task: Task) -> None:
        """Refuse a result whose phase closed while it was being received."""
        if self.sealed or self.phase is None or self.phase.phase_id != task.phase_id:
            raise WrongRound(f"round {task.round} closed while the result of task {task.task_id} was arriving",
                             task_id=task.task_id, round=task.round)

    async def _commit_done(self, task: Task, result: dict[str, Any], batch: WriteBatch) -> None:
        """Commit ``batch`` with the task marked done; mark it in memory only once that is durable."""
        record = {**task.to_record(), "done": True, "result": result}
        self.committing += 1
        try:
            await self.store.commit(batch.put_json(layout.TASKS_DB, layout.task_key(self.name, task.task_id), record))
        finally:
            self.committing -= 1
        task.result = result
        task.done = True

    async def accept_update(self, task: Task, body: memoryview) -> dict[str, Any]:
        """Validate a training upload of a reserved task and make it durable; then it counts."""
        aggregator = self.round
        if aggregator is None:
            raise WrongRound(f"round {task.round} closed while the result of task {task.task_id} was arriving",
                             task_id=task.task_id, round=task.round)
        # The streaming mean checks the values while folding them (durable_sum); others are checked here.
        decoded = codec.decode_update(body, self.specs, check_finite=not aggregator.checks_values)
        result = update_metadata(decoded.metadata)
        self._check_open(task)
        await aggregator.add(task, decoded.flat, self._weight(task, result), result)
        self._record_device_stats(task, result)
        self.metrics.upload_bytes.labels(self.name).inc(len(body))
        return accepted_answer(task, duplicate=False)

    def _record_device_stats(self, task: Task, result: dict[str, Any]) -> None:
        """Oort's statistics of the device from an accepted update: its utility and how long it took."""
        if not self.selector.uses_stats:
            return
        # A device that reports no utility is scored by its loss times its samples (Oort's utility grows
        # with both); a missing duration is the time from the task's issue to now.
        utility = float(result.get("utility", float(result["loss"]) * int(result["samples"])))
        duration = float(result.get("duration", max(0.0, self.clock() - task.issued_at)))
        self.device_stats[task.device_id] = update_stats(self.device_stats, task.device_id, utility, duration,
                                                          task.round)

    def _weight(self, task: Task, result: dict[str, Any]) -> float:
        """The FedAvg weight of an accepted update."""
        return update_weight(self.config, task, result)

    async def accept_result(self, task: Task, body: Any) -> dict[str, Any]:
        """Validate and persist a test task's result counts."""
        result = test_result(body)
        if task.device_samples > 0:
            # Weighted at close by at most what the device said it holds (and the round's median).
            result["max_samples"] = task.device_samples
        self._check_open(task)
        await self._commit_done(task, result, WriteBatch())
        self.test_results.append(result)
        return accepted_answer(task, duplicate=False)

    # ------------------------------------------------------------------ closing a phase
    async def _close(self, record: JobRecord) -> None:
        assert self.phase is not None
        self._check_mine()
        phase = self.phase
        self.closing = True
        # Sealed: results still being received are refused when they finish (their deadline passed, or
        # the round is full); only commits already under way are waited for, so they count here.
        self.sealed = True
        drain_until = time.monotonic() + DRAIN_SECONDS
        while self.committing > 0 and time.monotonic() < drain_until:
            await self._sleep(0.02)
        if self.round is not None:
            await self.round.drain()
        if phase.kind == TRAIN:
            await self._close_training(phase, record)
        else:
            await self._close_testing(phase, record)
        self.phase = None
        self.tasks = {}
        self.by_device = {}
        self.round = None
        self.closing = False

    async def _close_training(self, phase: Phase, record: JobRecord) -> None:
        wall = self.clock() - self.started_at
        batch = drop_round(WriteBatch(), self.name, phase.phase_id)
        if self.accepted < phase.quorum:
            attempt = phase.attempt + 1
            self.metrics.rounds.labels(self.name, TRAIN, "below_quorum").inc()
            if self.config["on_low_quorum"] == "fail" or attempt > self.config["max_round_retries"]:
                await self.registry.update(self.name, {"phase": None}, batch=batch)
                await self.registry.end(
                    self.name, "failed", f"round {phase.round} got {self.accepted} updates by its deadline, "
                    f"below min_participants {phase.quorum} (after {attempt} attempts)", level="ERROR")
                self.ended("failed")
                return
            await self.registry.update(
                self.name, {"phase": None, "round_attempt": attempt},
                f"Round {phase.round}: {self.accepted} of {phase.quorum} required updates by the deadline; "
                f"retrying the round", level="WARNING", batch=batch)
            return
        began = time.monotonic()
        aggregator = self.round
        assert aggregator is not None
        combined = await aggregator.combined()
        self._check_mine()
        version = phase.model_version + 1
        model = combined.model
        changes: dict[str, Any] = {}
        noise = float(self.config["noise_multiplier"])
        if noise > 0:
            # Central differential privacy: Gaussian noise on the combined model, calibrated to the clip norm.
            std = privacy.noise_std(noise, float(self.config["clip_norm"]), combined.max_weight,
                                    combined.total_weight)
            model = privacy.add_gaussian_noise(model, privacy.fresh_key(), float(std))
            changes["privacy"] = self._privacy_after(record)
        base = aggregator.spec.plan.global_model
        state = (server_state.load(self.store, self.name, phase.model_version, self.strategy, base)
                 if self.strategy.stateful else None)
        new_model, opt_state = self.strategy.server_step(state, base, model)
        new_flat = np.asarray(new_model)
        if not np.isfinite(new_flat).all():
            raise RuntimeError(f"round {phase.round}: the server step produced non-finite weights")
        if opt_state is not None:
            server_state.put(batch, self.name, version, opt_state)
        model_bytes = codec.encode_model(new_flat, self.specs)
        batch.put(layout.MODELS_DB, layout.model_key(self.name, version), model_bytes)
        dropped = Retention.of(self.config.values).falls_out(version)
        if dropped is not None:
            batch.delete(layout.MODELS_DB, layout.model_key(self.name, dropped))
        loss = aggregator.loss_sum / aggregator.loss_weight if aggregator.loss_weight > 0 else None
        entry = {"round": phase.round, "participants": self.accepted, "planned": phase.planned,
                 "train_loss": loss, "model_version": version, "duration": round(self.clock() - phase.opened_at, 3),
                 "test_accuracy": None, "test_loss": None}
        metrics = [*record["metrics"], entry]
        # Cached before the record names it: status never shows a version that cannot be downloaded.
        self._latest = (version, model_bytes)
        await self.registry.update(
            self.name, {"phase": None, "round_attempt": 0, "completed_rounds": phase.round, "model_version": version,
                        "metrics": metrics, **changes},
            rounds.fedscale_round_line(phase.round, wall, phase.planned, self.accepted, loss), batch=batch,
            event_fields={"round": phase.round, "participants": self.accepted, "train_loss": loss})
        self.metrics.close_seconds.observe(time.monotonic() - began)
        self.metrics.rounds.labels(self.name, TRAIN, "closed").inc()

    def _privacy_after(self, record: JobRecord) -> dict[str, Any]:
        """The (epsilon, delta) spent once this round's noisy model is released."""
        noised = int((record.get("privacy") or {}).get("rounds", 0)) + 1
        noise, delta = float(self.config["noise_multiplier"]), float(self.config["dp_delta"])
        spent = privacy.epsilon_spent(noise, noised, delta)
        return privacy.PrivacySpent(epsilon=spent, delta=delta, rounds=noised, noise_multiplier=noise,
                                    clip_norm=float(self.config["clip_norm"])).to_record()

    async def _close_testing(self, phase: Phase, record: JobRecord) -> None:
        merged = rounds.merge_test_results(self.test_results)
        wall = self.clock() - self.started_at
        if merged is None:
            self.metrics.rounds.labels(self.name, TEST, "no_results").inc()
            await self.registry.update(self.name, {"phase": None, "tested_version": phase.model_version},
                                       f"FL Testing in round: {phase.round}: no test results for model "
                                       f"v{phase.model_version} by the deadline; skipped", level="WARNING")
            return
        changes: dict[str, Any] = {"phase": None, "tested_version": phase.model_version}
        summary = {"test_accuracy": merged["top_1"], "test_top5": merged["top_5"], "test_loss": merged["loss"],
                   "test_samples": int(merged["test_len"]), "test_devices": len(self.test_results)}
        if phase.model_version == 0:
            changes["initial_test"] = summary
        else:
            metrics = [dict(m) for m in record["metrics"]]
            for entry in metrics:
                if entry["model_version"] == phase.model_version:
                    entry.update(summary)
            changes["metrics"] = metrics
        self.metrics.accuracy.labels(self.name).set(merged["top_1"])
        self.metrics.rounds.labels(self.name, TEST, "closed").inc()
        await self.registry.update(self.name, changes, rounds.fedscale_test_line(phase.round, wall, merged),
                                   event_fields={"round": phase.round, "model_version": phase.model_version,
                                                 **summary})

    async def _finish(self, record: JobRecord) -> None:
        last = next((m for m in reversed(record["metrics"]) if m.get("test_accuracy") is not None), None)
        accuracy = f", final test accuracy {100 * last['test_accuracy']:.2f}%" if last else ""
        await self.registry.end(self.name, "finished", f"{record['completed_rounds']} rounds done{accuracy}")
        self.ended("finished")

    # ------------------------------------------------------------------ models
    def model_bytes(self, version: int) -> bytes | None:
        """Stored weights of ``version`` (the latest is cached in memory)."""
        if self._latest is not None and self._latest[0] == version:
            return self._latest[1]
        data = self.store.get(layout.MODELS_DB, layout.model_key(self.name, version))
        if data is not None and version == self.registry.get(self.name)["model_version"]:
            self._latest = (version, data)
        return data
