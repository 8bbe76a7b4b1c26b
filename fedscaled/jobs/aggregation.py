"""The aggregator seam: how a training round's accepted uploads become its combined model.

The round engine opens one :class:`RoundAggregator` per training phase, ``add``\\ s every accepted upload
to it (the call returns once the upload is durable: a 2xx means a restart restores it), and at close asks
for the :class:`Combined` result; it never knows which aggregator runs. Two implementations:

- :class:`StreamingMean` (``aggregator: fedavg``): uploads are folded into a running weighted sum that is
  itself the durable record (:mod:`fedscaled.jobs.durable_sum`); O(model) memory and disk per round. The
  strategy (:mod:`fedscaled.core.strategies`) sets each upload's weight and the scalars it needs, and
  turns the weighted mean into the combined model (q-FedAvg).
- :class:`StoredUpdates` (``median``, ``trimmed_mean``, ``krum``): each upload is stored with its task and
  the robust rule runs over the stored updates at close, streamed from LMDB in coordinate chunks.

Both clip each upload's distance to the global model to ``clip_norm`` when it is set.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import numpy as np

from fedscaled.core import aggregate, privacy
from fedscaled.core.models import TensorSpec
from fedscaled.core.rounds import Task
from fedscaled.jobs.durable_sum import DurableSum, FoldPlan
from fedscaled.jobs.robust import robust_aggregate
from fedscaled.store import layout
from fedscaled.store.lmdb_store import Store, WriteBatch

FloatArray = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class Combined:
    """A closed round's combined model, before the server step."""

    model: jax.Array
    total_weight: float  # sum of the uploads' weights
    max_weight: float  # the largest weight of one upload (differential privacy's sensitivity)
    sums: Mapping[str, float] = field(default_factory=dict)


class RoundAggregator(Protocol):
    """The uploads of one training phase."""

    spec: RoundSpec
    #: whether :meth:`add` checks the values itself (else the caller decodes with the finiteness check)
    checks_values: bool

    @property
    def accepted(self) -> int:
        """Uploads accepted (durable) so far."""
        ...

    @property
    def loss_sum(self) -> float:
        """Sum of weight * reported loss over the accepted uploads."""
        ...

    @property
    def loss_weight(self) -> float:
        """Sum of the weights of the reported losses."""
        ...

    async def add(self, task: Task, flat: FloatArray, weight: float, result: dict[str, Any]) -> None:
        """Make ``flat`` (the device's new weights) durable for ``task``; then it counts. Marks the task done
        (``task.done``, ``task.result``) once durable. Raises InvalidTensor, changing nothing, for bad values."""
        ...

    async def drain(self) -> None:
        """Wait for every add under way."""
        ...

    async def combined(self) -> Combined:
        """The round's combined model (at least one upload was accepted)."""
        ...


@dataclass(frozen=True)
class RoundSpec:
    """What a training phase's aggregation needs to know."""

    job: str
    phase_id: int
    specs: tuple[TensorSpec, ...]
    plan: FoldPlan
    aggregator: str  # fedavg | median | trimmed_mean | krum
    trim_fraction: float = 0.1
    krum_f: int = 1

    @property
    def num_params(self) -> int:
        """Parameters of the model."""
        return int(self.plan.global_model.shape[0])


class StreamingMean:
    """Weighted mean of the uploads, folded as they arrive (FedAvg and the strategies built on it)."""

    checks_values = True

    def __init__(self, store: Store, spec: RoundSpec, *, restore: bool = False) -> None:
        self.spec = spec
        make = DurableSum.restore if restore else DurableSum
        self.sum = make(store, spec.job, spec.phase_id, spec.specs, spec.plan)

    @property
    def accepted(self) -> int:
        """Uploads durable in the sum."""
        return self.sum.accepted

    @property
    def loss_sum(self) -> float:
        """Sum of weight * reported loss."""
        return self.sum.loss_sum

    @property
    def loss_weight(self) -> float:
        """Sum of the weights of the reported losses."""
        return self.sum.loss_weight

    async def add(self, task: Task, flat: FloatArray, weight: float, result: dict[str, Any]) -> None:
        """Fold the upload; returns once the sum that holds it is committed."""
        await self.sum.add(task, flat, weight, result)

    async def drain(self) -> None:
        """Wait for the folds under way."""
        await self.sum.drain()

    async def combined(self) -> Combined:
        """The strategy's combination of the weighted mean."""
        await self.sum.drain()
        mean = self.sum.mean()
        total = self.sum.total_weight
        model = self.spec.plan.strategy.combine(mean, self.spec.plan.global_model, self.sum.extras, total)
        return Combined(model=model, total_weight=total, max_weight=self.sum.max_weight, sums=dict(self.sum.extras))


class StoredUpdates:
    """Every upload stored with its task; a Byzantine-robust rule over them at close."""

    checks_values = False

    def __init__(self, store: Store, spec: RoundSpec, tasks: Sequence[Task] = (), *, restore: bool = False) -> None:
        self.store = store
        self.spec = spec
        self._accepted = 0
        self._loss_sum = 0.0
        self._loss_weight = 0.0
        self.committing = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._aggregation: asyncio.Future[FloatArray] | None = None
        self._weights: list[float] = []
        if restore:
            prefix = layout.updates_prefix(spec.job, spec.phase_id)
            by_id = {t.task_id: t for t in tasks}
            for k in store.scan_keys(layout.UPDATES_DB, prefix):
                stored = by_id.get(k[len(prefix):].decode())
                if stored is not None and stored.done:
                    self._count(stored.result, float(stored.result.get("weight", 1.0)))

    @property
    def accepted(self) -> int:
        """Updates stored so far."""
        return self._accepted

    @property
    def loss_sum(self) -> float:
        """Sum of weight * reported loss."""
        return self._loss_sum

    @property
    def loss_weight(self) -> float:
        """Sum of the weights of the reported losses."""
        return self._loss_weight

    def _count(self, result: dict[str, Any], weight: float) -> None:
        self._accepted += 1
        self._loss_sum += float(result["loss"]) * weight
        self._loss_weight += weight
        self._weights.append(weight)

    def _clipped(self, flat: FloatArray) -> FloatArray:
        plan = self.spec.plan
        if plan.clip_norm <= 0:
            return flat
        base = plan.global_model
        norm = float(privacy.delta_norm(aggregate.to_device(flat), base))
        scale = privacy.clip_scale(norm, plan.clip_norm)
        if scale >= 1.0:
            return flat
        g = np.asarray(base)
        clipped: FloatArray = (g + np.float32(scale) * (flat - g)).astype(np.float32)
        return clipped

    async def add(self, task: Task, flat: FloatArray, weight: float, result: dict[str, Any]) -> None:
        """Store the (clipped) upload with its task record in one commit."""
        stored = await asyncio.to_thread(self._clipped, flat)
        result = {**result, "weight": weight}
        record = {**task.to_record(), "done": True, "result": result}
        batch = (WriteBatch().put(layout.UPDATES_DB, layout.update_key(self.spec.job, task.phase_id, task.task_id),
                                  stored.data)
                 .put_json(layout.TASKS_DB, layout.task_key(self.spec.job, task.task_id), record))
        self.committing += 1
        self._idle.clear()
        try:
            await self.store.commit(batch)
        finally:
            self.committing -= 1
            if self.committing == 0:
                self._idle.set()
        task.result = result
        task.done = True
        self._count(result, weight)

    async def drain(self) -> None:
        """Wait for the commits under way."""
        await self._idle.wait()

    async def combined(self) -> Combined:
        """The robust rule over the stored updates, off the event loop (a shutdown waits for it)."""
        await self.drain()
        spec = self.spec
        keys = self.store.scan_keys(layout.UPDATES_DB, layout.updates_prefix(spec.job, spec.phase_id))
        self._aggregation = asyncio.get_running_loop().run_in_executor(None, functools.partial(
            robust_aggregate, self.store, keys, spec.num_params, spec.aggregator,
            trim_fraction=spec.trim_fraction, krum_f=spec.krum_f))
        new_flat = await asyncio.shield(self._aggregation)
        total = float(sum(self._weights))
        return Combined(model=aggregate.to_device(new_flat), total_weight=total,
                        max_weight=max(self._weights, default=0.0))

    async def wait_aggregation(self) -> None:
        """Wait for a robust aggregation under way (before the store closes)."""
        if self._aggregation is not None:
            await asyncio.shield(self._aggregation)


def open_round(store: Store, spec: RoundSpec, tasks: Sequence[Task] = (), *, restore: bool = False
               ) -> RoundAggregator:
    """The aggregator of a training phase: a fresh one, or (``restore``) the one the store holds."""
    if spec.aggregator == "fedavg":
        return StreamingMean(store, spec, restore=restore)
    return StoredUpdates(store, spec, tasks, restore=restore)


def drop_round(batch: WriteBatch, job: str, phase_id: int) -> WriteBatch:
    """Add the deletion of a closed phase's stored updates and running sum to ``batch``."""
    return layout.drop_round_state(batch, job, phase_id)
