"""Streaming FedAvg whose running sum is itself the durable record of the round.

Instead of writing every accepted update to LMDB (P floats per upload), the uploads that arrive while
one commit is syncing are folded together into a *new* sum, and that sum (P floats, once per group)
is committed with the group's task records in one synced transaction. Only then do the uploads get
their 2xx. So:

- an update that got a 2xx is in the stored sum (invariant 1), its task is marked done in the same
  transaction, and a restart restores exactly that sum: nothing lost, nothing counted twice;
- a failed commit leaves the previous sum in place (the fold does not donate it), and every upload of
  the group gets the error, not a 2xx;
- disk writes per round are O(model * groups) instead of O(model * participants), and memory stays
  O(model): the old sum, the new one, and the bodies of uploads in flight.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedscaled.core import aggregate, codec
from fedscaled.core.aligned import aligned_empty
from fedscaled.core.models import TensorSpec
from fedscaled.core.rounds import Task
from fedscaled.errors import InvalidTensor
from fedscaled.store.lmdb_store import Store, WriteBatch, key

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


def sum_keys(job: str, phase_id: int) -> tuple[bytes, bytes]:
    """Store keys of a phase's running sum and of its metadata."""
    return key(job, phase_id, "acc"), key(job, phase_id, "meta")


class DurableSum:
    """The open training phase's FedAvg sum, committed group by group."""

    def __init__(self, store: Store, job: str, phase_id: int, specs: Sequence[TensorSpec]) -> None:
        self.store = store
        self.specs = tuple(specs)
        num_params = codec.num_params(specs)
        self.job = job
        self.phase_id = phase_id
        self.num_params = num_params
        self.state = aggregate.fedavg_init(num_params)
        self.accepted = 0
        self.loss_sum = 0.0
        self.loss_weight = 0.0
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def restore(cls, store: Store, job: str, phase_id: int, specs: Sequence[TensorSpec]) -> DurableSum:
        """The sum as last committed for this phase (empty if no upload was accepted yet)."""
        durable = cls(store, job, phase_id, specs)
        num_params = durable.num_params
        acc_key, meta_key = sum_keys(job, phase_id)
        meta = store.get_json("sums", meta_key)
        if meta is not None:
            acc = aligned_empty(num_params)
            if store.get_into("sums", acc_key, acc.data.cast("B")):
                durable.state = aggregate.FedAvgState(acc=aggregate.to_device(acc),
                                                      weight=jnp.float32(meta["weight"]))
                durable.accepted = int(meta["accepted"])
                durable.loss_sum = float(meta["loss_sum"])
                durable.loss_weight = float(meta["loss_weight"])
        return durable

    async def add(self, task: Task, flat: FloatArray, weight: float, result: dict[str, Any]) -> None:
        """Fold ``flat`` (weight ``weight``) for ``task``; returns once it is durable in the stored sum.

        ``result`` is the validated metadata (samples, loss); ``task.result`` and ``task.done`` are set
        once the commit that makes the update durable returns. The values need not be checked
        beforehand: an update with NaN or Inf (or one that overflows the sum) raises InvalidTensor here
        and changes nothing. ``flat`` must stay untouched until this returns (or, if the caller is
        cancelled, until :meth:`drain` returns).
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(task, flat, weight, result, done))
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

    def _fold(self, group: list[_Pending]
              ) -> tuple[aggregate.FedAvgState, FloatArray, dict[int, InvalidTensor]]:
        """Fold the group into a new state; (state, its sum as numpy, rejected uploads by index)."""
        new_state, finite = aggregate.fedavg_fold_many_checked(self.state, [p.flat for p in group],
                                                               [p.weight for p in group])
        rejected: dict[int, InvalidTensor] = {}
        if not finite:
            # Rare: find the culprits, then fold the others. The old state was not donated, so it is intact.
            new_state = self.state
            for index, pending in enumerate(group):
                error = codec.nonfinite_error(pending.flat, self.specs)
                candidate, ok = (new_state, False) if error else aggregate.fedavg_fold_many_checked(
                    new_state, [pending.flat], [pending.weight])
                if error is None and not ok:
                    error = InvalidTensor("update values are too large: the running sum would overflow float32")
                if error is not None:
                    rejected[index] = error
                else:
                    new_state = candidate
        return new_state, np.asarray(new_state.acc), rejected  # waits for the fold; a view, no copy

    async def _commit_group(self, group: list[_Pending]) -> None:
        # The fold runs in a worker thread (XLA releases the GIL), so the event loop keeps reading the
        # next uploads off their sockets meanwhile.
        new_state, acc, rejected = await asyncio.to_thread(self._fold, group)
        for index, error in rejected.items():
            group[index].done.set_exception(error)
        group = [pending for index, pending in enumerate(group) if index not in rejected]
        if not group:
            return
        loss_sum = self.loss_sum + sum(float(p.result["loss"]) * p.weight for p in group)
        loss_weight = self.loss_weight + sum(p.weight for p in group)
        accepted = self.accepted + len(group)
        meta = {"weight": float(new_state.weight), "loss_sum": loss_sum, "loss_weight": loss_weight,
                "accepted": accepted}
        acc_key, meta_key = sum_keys(self.job, self.phase_id)
        batch = WriteBatch().put("sums", acc_key, acc.data.cast("B")).put("sums", meta_key,
                                                                          json.dumps(meta).encode())
        for pending in group:
            record = {**pending.task.to_record(), "done": True, "result": pending.result}
            batch.put_json("tasks", key(self.job, pending.task.task_id), record)
        await self.store.commit(batch)
        for pending in group:
            pending.task.result = pending.result
            pending.task.done = True
        self.state = new_state
        self.accepted, self.loss_sum, self.loss_weight = accepted, loss_sum, loss_weight
