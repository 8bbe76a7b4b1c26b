"""Streaming FedAvg whose running sum is itself the durable record of the round.

Instead of writing every accepted update to LMDB (P floats per upload), the uploads that arrive while
one commit is syncing are folded together into a *new* sum, and that sum (P floats, once per group)
is committed with the group's task records in one synced transaction. Only then do the uploads get
their 2xx. So:

- an update that got a 2xx is in the stored sum (invariant 1), its task is marked done in the same
  transaction, and a restart restores exactly that sum: nothing lost, nothing counted twice;
- a failed commit puts the previous sum back (read from the store, where it is durable: the fold writes
  into the accumulator in place, which is 1.4-1.8x faster than into a fresh buffer), and every upload of
  the group gets the error, not a 2xx;
- disk writes per round are O(model * groups) instead of O(model * participants), and memory stays
  O(model): the old sum, the new one, and the bodies of uploads in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedscaled.core import aggregate, codec, privacy
from fedscaled.core.aligned import aligned_empty
from fedscaled.core.models import TensorSpec
from fedscaled.core.rounds import Task
from fedscaled.core.strategies import ServerStrategy
from fedscaled.errors import InvalidTensor
from fedscaled.store import layout
from fedscaled.store.lmdb_store import Store, WriteBatch

FloatArray = np.ndarray[Any, np.dtype[np.float32]]

# Uploads folded and committed together at most (bounded so one transaction stays short).
MAX_GROUP = 64


@dataclass
class _Pending:
    task: Task
    flat: FloatArray
    weight: float
    result: dict[str, Any]  # validated metadata (samples, loss), set on the task once durable
    done: asyncio.Future[None]
    norm_weight: float | None = None  # what the update adds to the normaliser, when not its weight (FedBuff)


@dataclass(frozen=True)
class FoldPlan:
    """How uploads enter the sum: the strategy's weights and scalars, and norm clipping around the
    phase's global model."""

    strategy: ServerStrategy
    global_model: jax.Array  # the model the phase's tasks were trained from (float32 [P])
    learning_rate: float  # the device learning rate of the round (q-FedAvg's L = 1 / lr)
    clip_norm: float = 0.0  # 0: no clipping

    @property
    def needs_norm(self) -> bool:
        """Whether each upload's distance to the global model must be measured."""
        return self.clip_norm > 0 or self.strategy.needs_delta_norm


@dataclass
class _Folded:
    """What one upload contributes, as the plan says."""

    weight: float  # weight of the upload itself in the sum (after clipping)
    base_weight: float  # weight of the global model standing in for the clipped-away part
    fold_weight: float  # the strategy's weight before clipping
    extras: dict[str, float]


class DurableSum:
    """The open training phase's FedAvg sum, committed group by group."""

    def __init__(self, store: Store, job: str, phase_id: int, specs: Sequence[TensorSpec],
                 plan: FoldPlan | None = None) -> None:
        self.store = store
        self.plan = plan
        self.specs = tuple(specs)
        num_params = codec.num_params(specs)
        self.job = job
        self.phase_id = phase_id
        self.num_params = num_params
        self.state = aggregate.fedavg_init(num_params)
        self.accepted = 0
        self.loss_sum = 0.0
        self.loss_weight = 0.0
        # Clipping folds s * w with weight s and keeps (1 - s) * weight for the global model, added at the
        # end: weight * (s * w + (1 - s) * g) needs no copy of the update.
        self.base_weight = 0.0
        self.max_weight = 0.0  # the largest strategy weight of one upload (differential privacy's sensitivity)
        self.extras: dict[str, float] = {}
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def restore(cls, store: Store, job: str, phase_id: int, specs: Sequence[TensorSpec],
                plan: FoldPlan | None = None) -> DurableSum:
        """The sum as last committed for this phase (empty if no upload was accepted yet)."""
        durable = cls(store, job, phase_id, specs, plan)
        num_params = durable.num_params
        acc_key, meta_key = layout.sum_keys(job, phase_id)
        meta = store.get_json(layout.SUMS_DB, meta_key)
        if meta is not None:
            acc = aligned_empty(num_params)
            if store.get_into(layout.SUMS_DB, acc_key, acc.data.cast("B")):
                durable.state = aggregate.FedAvgState(acc=aggregate.to_device(acc),
                                                      weight=jnp.float32(meta["weight"]))
                durable.accepted = int(meta["accepted"])
                durable.loss_sum = float(meta["loss_sum"])
                durable.loss_weight = float(meta["loss_weight"])
                durable.base_weight = float(meta.get("base_weight", 0.0))
                durable.max_weight = float(meta.get("max_weight", 0.0))
                durable.extras = {str(k): float(v) for k, v in meta.get("extras", {}).items()}
        return durable

    async def add(self, task: Task, flat: FloatArray, weight: float, result: dict[str, Any],
                  norm_weight: float | None = None) -> None:
        """Fold ``flat`` (weight ``weight``) for ``task``; returns once it is durable in the stored sum.

        ``result`` is the validated metadata (samples, loss); ``task.result`` and ``task.done`` are set
        once the commit that makes the update durable returns. The values need not be checked
        beforehand: an update with NaN or Inf (or one that overflows the sum) raises InvalidTensor here
        and changes nothing. ``flat`` must stay untouched until this returns (or, if the caller is
        cancelled, until :meth:`drain` returns).
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(task, flat, weight, result, done, norm_weight))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"fedavg-{self.job}")
        await done

    async def drain(self) -> None:
        """Wait until every queued upload is committed (or failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        while self._queue:
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                await self._commit_group(group)
            except Exception as exc:
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
            else:
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_result(None)

    def _plan(self, pending: _Pending) -> _Folded:
        """An upload's weights and scalars under the fold plan (plain FedAvg without one)."""
        plan = self.plan
        if plan is None:
            extras = {} if pending.norm_weight is None else {"norm_weight": pending.norm_weight}
            return _Folded(pending.weight, 0.0, pending.weight, extras)
        loss = float(pending.result["loss"])
        fold_weight = plan.strategy.fold_weight(pending.weight, loss)
        scale, sq_norm = 1.0, 0.0
        if plan.needs_norm:
            norm = float(privacy.delta_norm(aggregate.to_device(pending.flat), plan.global_model))
            if math.isfinite(norm):  # a non-finite update is refused by the fold's check below
                scale = privacy.clip_scale(norm, plan.clip_norm) if plan.clip_norm > 0 else 1.0
                sq_norm = (scale * norm) ** 2
        extras = plan.strategy.fold_extras(fold_weight, loss, sq_norm, plan.learning_rate)
        return _Folded(fold_weight * scale, fold_weight * (1.0 - scale), fold_weight, extras)

    def _fold(self, group: list[_Pending]
              ) -> tuple[aggregate.FedAvgState, FloatArray, dict[int, InvalidTensor], list[_Folded]]:
        """Fold the group into a new state; (state, its sum as numpy, rejected uploads by index, weights)."""
        folded = [self._plan(p) for p in group]
        # In place: the accumulator is overwritten, and self.state with it. The last *committed* sum is in the
        # store, and that is what a failure below (or a failed commit) goes back to (_durable_state).
        new_state, finite = aggregate.fedavg_fold_many_checked(self.state, [p.flat for p in group],
                                                               [f.weight for f in folded], donate=True)
        self.state = new_state
        rejected: dict[int, InvalidTensor] = {}
        if not finite:
            # Rare: go back to the committed sum, find the culprits, then fold the others (not in place, so
            # that an overflowing candidate leaves its predecessor intact).
            new_state = self.state = self._durable_state()
            for index, pending in enumerate(group):
                error = codec.nonfinite_error(pending.flat, self.specs)
                candidate, ok = (new_state, False) if error else aggregate.fedavg_fold_many_checked(
                    new_state, [pending.flat], [folded[index].weight])
                if error is None and not ok:
                    error = InvalidTensor("update values are too large: the running sum would overflow float32")
                if error is not None:
                    rejected[index] = error
                else:
                    new_state = candidate
        return new_state, np.asarray(new_state.acc), rejected, folded  # waits for the fold; a view, no copy

    def _durable_state(self) -> aggregate.FedAvgState:
        """The sum as last committed for this phase (an empty one before the first commit)."""
        return DurableSum.restore(self.store, self.job, self.phase_id, self.specs, self.plan).state

    async def _commit_group(self, group: list[_Pending]) -> None:
        # The fold runs in a worker thread (XLA releases the GIL), so the event loop keeps reading the
        # next uploads off their sockets meanwhile.
        try:
            new_state, acc, rejected, all_folded = await asyncio.to_thread(self._fold, group)
        except BaseException:
            self.state = self._durable_state()  # the fold may have written into the accumulator
            raise
        for index, error in rejected.items():
            group[index].done.set_exception(error)
        folded = [f for index, f in enumerate(all_folded) if index not in rejected]
        group = [pending for index, pending in enumerate(group) if index not in rejected]
        if not group:
            return
        base_weight = self.base_weight + sum(f.base_weight for f in folded)
        max_weight = max([self.max_weight, *(f.fold_weight for f in folded)])
        extras = dict(self.extras)
        for f in folded:
            for name, value in f.extras.items():
                extras[name] = extras.get(name, 0.0) + value
        loss_sum = self.loss_sum + sum(float(p.result["loss"]) * p.weight for p in group)
        loss_weight = self.loss_weight + sum(p.weight for p in group)
        accepted = self.accepted + len(group)
        meta = {"weight": float(new_state.weight), "loss_sum": loss_sum, "loss_weight": loss_weight,
                "accepted": accepted, "base_weight": base_weight, "max_weight": max_weight, "extras": extras}
        acc_key, meta_key = layout.sum_keys(self.job, self.phase_id)
        batch = WriteBatch().put(layout.SUMS_DB, acc_key, acc.data.cast("B")).put(layout.SUMS_DB, meta_key,
                                                                          json.dumps(meta).encode())
        for pending in group:
            record = {**pending.task.to_record(), "done": True, "result": pending.result}
            batch.put_json(layout.TASKS_DB, layout.task_key(self.job, pending.task.task_id), record)
        try:
            await self.store.commit(batch)
        except BaseException:
            # Not durable: the uploads get the error, and the sum goes back to the committed one (the fold
            # wrote into the accumulator in place).
            del acc, batch
            self.state = self._durable_state()
            raise
        for pending in group:
            pending.task.result = pending.result
            pending.task.done = True
        self.state = new_state
        self.accepted, self.loss_sum, self.loss_weight = accepted, loss_sum, loss_weight
        self.base_weight, self.max_weight, self.extras = base_weight, max_weight, extras

    @property
    def total_weight(self) -> float:
        """The sum of the strategy weights of the folded uploads (clipped parts included)."""
        return float(self.state.weight) + self.base_weight

    def mean(self) -> jax.Array:
        """The weighted mean of the folded uploads, clipping's global-model share included."""
        if self.base_weight > 0 and self.plan is not None:
            mean: jax.Array = privacy.clipped_fedavg_result(self.state, jnp.float32(self.base_weight),
                                                            self.plan.global_model)
            return mean
        result: jax.Array = aggregate.fedavg_result(self.state)
        return result

