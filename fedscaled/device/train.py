"""Local training and evaluation in JAX for the model zoo.

Shapes are kept fixed so that XLA compiles once per (model, batch size, step bucket): the last,
short batch is padded and masked out, and a run of SGD steps is one ``lax.scan`` over a step count
rounded up to a bucket (masked steps leave the weights untouched). Many simulated devices share one
process, so trainers are cached per model definition.

FedProx (a task's ``proxy_mu``): every step is followed by :func:`proximal_step`'s correction
``new -= lr * mu * (w - w_global)``, ``w`` the weights the step started from and ``w_global`` the
model the task started from. The step being plain SGD evaluated at ``w``, this is exactly the SGD step
on ``loss + mu/2 * ||w - w_global||^2``; the artifact backends apply the same numpy correction after
their fixed graph, so no artifact changes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedscaled.core import steps
from fedscaled.core.models import ModelDef, Params
from fedscaled.core.models import build as build_model

NumpyParams = dict[str, np.ndarray]


class TestCounts(NamedTuple):
    """Evaluation results as counts and sums, the form the daemon weights correctly."""

    samples: int
    correct_top1: int
    correct_top5: int
    loss_sum: float

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy (0 when there were no samples)."""
        return self.correct_top1 / self.samples if self.samples else 0.0


TrainStepsFn = Callable[..., tuple[Params, jax.Array, jax.Array]]
EvalBatchFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


@dataclass(frozen=True)
class Trainer:
    """Jitted functions for one model definition (see :func:`make_trainer`)."""

    model: ModelDef
    # (frozen, params, w_global, xs[S,B,...], ys[S,B], masks[S,B], lr, wd, mu) -> (params, loss_sum, valid_steps)
    train_steps: TrainStepsFn
    # (frozen and trainable params, x[B,...], y[B], mask[B]) -> (correct_top1, correct_top5, loss_sum)
    eval_batch: EvalBatchFn


def proximal_step(new: NumpyParams, before: NumpyParams, w_global: NumpyParams, lr: float, mu: float
                  ) -> NumpyParams:
    """The FedProx correction of one SGD step: ``new - lr * mu * (before - w_global)``, in float32.

    ``new`` is what a plain SGD step (weight decay included) made of ``before``; the result is then the
    SGD step on ``loss + mu/2 * ||w - w_global||^2``, whose gradient ``mu * (w - w_global)`` pulls the
    weights back toward the global model for ``mu > 0``. A negative ``mu`` pushes them away (FedScale's
    client has that sign wrong; tests/test_fedprox.py uses ``mu = -1`` to show the difference). ``mu == 0``
    returns ``new`` itself. The inputs are left untouched.
    """
    if mu == 0.0:
        return new
    scale = np.float32(lr) * np.float32(mu)
    out: NumpyParams = {}
    for name, value in new.items():
        delta = np.subtract(before[name], w_global[name], dtype=np.float32)
        delta *= scale
        np.subtract(value, delta, out=delta)
        out[name] = delta
    return out


def _make_trainer(model: ModelDef) -> Trainer:
    def train_steps(frozen: Params, params: Params, w_global: Params, xs: jax.Array, ys: jax.Array,
                    masks: jax.Array, lr: jax.Array, wd: jax.Array, mu: jax.Array
                    ) -> tuple[Params, jax.Array, jax.Array]:
        def step(carry: Params, batch: tuple[jax.Array, jax.Array, jax.Array]
                 ) -> tuple[Params, tuple[jax.Array, jax.Array]]:
            x, y, mask = batch
            new, loss = steps.sgd_step(model, frozen, carry, x, y, mask, lr, wd)
            # FedProx, as proximal_step: the same float32 expression the artifact backends apply.
            new = {k: new[k] - lr * mu * (carry[k] - w_global[k]) for k in new}
            # A step whose batch is all padding (the bucket's tail) must not move the weights.
            live = jnp.sum(mask) > 0
            kept = {k: jnp.where(live, new[k], carry[k]) for k in carry}
            return kept, (loss * live, live.astype(jnp.float32))

        params, (losses, lives) = jax.lax.scan(step, params, (xs, ys, masks))
        return params, jnp.sum(losses), jnp.sum(lives)

    def eval_batch(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
        loss_sum, top1, top5 = steps.test_counts(model, params, x, y, mask)
        return top1.astype(jnp.int32), top5.astype(jnp.int32), loss_sum

    return Trainer(model, jax.jit(train_steps), jax.jit(eval_batch))


@functools.lru_cache(maxsize=32)
def _trainer_for(name: str, input_shape: tuple[int, ...], num_classes: int, width: float) -> Trainer:
    return _make_trainer(build_model(name, input_shape, num_classes, width))


def make_trainer(model_def: ModelDef) -> Trainer:
    """The (cached) jitted trainer for a zoo model: one compile per model and shapes, shared process-wide.

    ModelDef holds a closure, so two ``build`` calls give unequal objects; the cache is keyed by the
    model's name, input shape, class count and width instead.
    """
    return _trainer_for(model_def.name, tuple(model_def.input_shape), model_def.num_classes,
                        model_def.width_multiplier)


def _step_bucket(steps: int) -> int:
    """Round a step count up so that few distinct scan lengths (and compiles) occur."""
    if steps <= 64:
        return 8 * math.ceil(steps / 8)
    return 1 << (steps - 1).bit_length()


def batch_plan(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches for ``steps`` SGD steps: shuffled passes without replacement, wrapping around.

    Like a DataLoader with ``shuffle=True, drop_last=False`` re-iterated until the step count is
    reached: every pass is a fresh permutation cut into batches, the last one possibly short.
    """
    plan: list[np.ndarray] = []
    while len(plan) < steps:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            plan.append(order[start:start + batch_size])
            if len(plan) == steps:
                break
    return plan


def _to_device(specs: tuple[tuple[str, tuple[int, ...]], ...], params: NumpyParams) -> Params:
    missing = [name for name, _ in specs if name not in params]
    if missing:
        raise ValueError(f"params lack tensors {missing}")
    return {name: jnp.asarray(params[name], dtype=jnp.float32) for name, _ in specs}


def _to_numpy(model: ModelDef, params: Params) -> NumpyParams:
    return {name: np.asarray(params[name], dtype=np.float32) for name, _ in model.specs}


def train_local(
    model_def: ModelDef,
    params: NumpyParams,
    x: np.ndarray,
    y: np.ndarray,
    *,
    lr: float,
    local_steps: int,
    batch_size: int,
    epochs: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    frozen: NumpyParams | None = None,
    proxy_mu: float = 0.0,
    w_global: NumpyParams | None = None,
) -> tuple[NumpyParams, float, int]:
    """Plain minibatch SGD on softmax cross-entropy from ``params`` over local data ``(x, y)``.

    FedScale semantics: ``local_steps`` minibatch steps, or ``epochs`` full passes when ``epochs > 0``.
    Batches are drawn from shuffled passes without replacement and wrap around into the next pass;
    a device with fewer samples than ``batch_size`` trains on all of them at every step.
    Returns ``(new_params, mean_loss, samples_used)``: the new weights (numpy, in spec order), the
    mean minibatch loss over the steps, and the number of distinct local samples the steps touched
    (the FedAvg weight). ``frozen`` holds the model's frozen tensors, when it has any.
    ``proxy_mu`` adds FedProx's ``mu/2 * ||w - w_global||^2`` to every step's loss (see
    :func:`proximal_step`); ``w_global`` defaults to ``params``, the model the task started from.
    """
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("no local training samples")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    # Always the job's batch size (short batches padded and masked): a device with fewer samples
    # than a batch then costs some wasted rows, but every device of the process shares one compile.
    b = batch_size
    steps = epochs * math.ceil(n / b) if epochs > 0 else local_steps
    if steps < 1:
        raise ValueError("need local_steps >= 1 or epochs >= 1")
    trainer = make_trainer(model_def)
    plan = batch_plan(n, b, steps, np.random.default_rng(seed))
    total = _step_bucket(steps)
    xs = np.zeros((total, b, *x.shape[1:]), dtype=np.float32)
    ys = np.zeros((total, b), dtype=np.int32)
    masks = np.zeros((total, b), dtype=np.float32)
    for i, idx in enumerate(plan):
        xs[i, :len(idx)] = x[idx]
        ys[i, :len(idx)] = y[idx]
        masks[i, :len(idx)] = 1.0
    start = _to_device(model_def.specs, params)
    # Without an explicit anchor the same device arrays serve as w_global: no extra copy.
    anchor = start if w_global is None else _to_device(model_def.specs, w_global)
    new, loss_sum, live = trainer.train_steps(
        _to_device(model_def.frozen_specs, frozen or {}), start, anchor, xs, ys, masks,
        jnp.float32(lr), jnp.float32(weight_decay), jnp.float32(proxy_mu))
    mean_loss = float(loss_sum) / max(1.0, float(live))
    samples_used = n if epochs > 0 else min(n, steps * b)
    return _to_numpy(model_def, new), mean_loss, samples_used


def evaluate(model_def: ModelDef, params: NumpyParams, x: np.ndarray, y: np.ndarray,
             batch_size: int = 64, frozen: NumpyParams | None = None) -> TestCounts:
    """Top-1/top-5 correct counts and the summed cross-entropy of ``params`` on ``(x, y)``.

    Batches have a fixed size (the last one padded and masked) so evaluation compiles once per model.
    """
    n = int(y.shape[0])
    if n == 0:
        return TestCounts(0, 0, 0, 0.0)
    trainer = make_trainer(model_def)
    device_params = {**_to_device(model_def.frozen_specs, frozen or {}), **_to_device(model_def.specs, params)}
    b = max(1, batch_size)
    top1 = top5 = 0
    loss_sum = 0.0
    for start in range(0, n, b):
        xb = np.zeros((b, *x.shape[1:]), dtype=np.float32)
        yb = np.zeros((b,), dtype=np.int32)
        mb = np.zeros((b,), dtype=np.float32)
        m = min(b, n - start)
        xb[:m] = x[start:start + m]
        yb[:m] = y[start:start + m]
        mb[:m] = 1.0
        c1, c5, ls = trainer.eval_batch(device_params, xb, yb, mb)
        top1 += int(c1)
        top5 += int(c5)
        loss_sum += float(ls)
    return TestCounts(n, top1, top5, loss_sum)
