"""The on-device programs of a model, one definition for every backend.

Three pure functions of flat, positional arrays — the form a .tflite signature and an MNN graph
take — built from a zoo model:

- ``train``: (frozen…, weights…, x, y, mask, lr, wd) → (new:weights…, loss). One step of plain
  minibatch SGD with L2 weight decay as in torch.optim.SGD: ``w ← w - lr · (∇w + wd · w)``, on the
  softmax cross-entropy averaged over the rows whose ``mask`` is 1 (a short last batch is padded
  with rows of mask 0). Frozen tensors are inputs only.
- ``test``: (frozen…, weights…, x, y, mask) → (loss_sum, correct_top1, correct_top5), float32 sums
  over the rows whose mask is 1. A row counts as top-k correct when fewer than k classes have a
  strictly higher logit than its label (the same rule in every backend; ties favour the label).
- ``infer``: (frozen…, weights…, x) → logits.

``x`` is float32 ``(batch, *input_shape)`` (NHWC for images), ``y`` int32 ``(batch,)``, ``mask``
float32 ``(batch,)``, ``lr`` and ``wd`` 0-d float32. The JAX reference trainer (device/train.py)
runs these same functions; the artifact builder lowers them (fedscaled_build/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from fedscaled.core.models import ModelDef, Params

TRAIN, TEST, INFER = "train", "test", "infer"
TRAIN_DATA_INPUTS = ("x", "y", "mask", "lr", "wd")
# A train step's output for tensor ``w`` is named ``new:w``: an ONNX graph cannot give an output the
# name of an input, and one convention for every backend keeps the device code backend-agnostic.
NEW_PREFIX = "new:"
TEST_DATA_INPUTS = ("x", "y", "mask")
TEST_OUTPUTS = ("loss_sum", "correct_top1", "correct_top5")
LOSS_OUTPUT = "loss"
LOGITS_OUTPUT = "logits"
OPTIMIZER = "sgd: w <- w - lr * (grad + wd * w); loss = masked mean softmax cross-entropy"


def per_sample_ce(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy of each row (labels as int class indices)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    onehot = (y[:, None] == jnp.arange(logits.shape[-1], dtype=y.dtype)[None, :]).astype(logits.dtype)
    return -jnp.sum(logp * onehot, axis=-1)


def masked_mean_loss(model: ModelDef, params: Params, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the rows whose mask is 1 (0 when none is)."""
    ce = per_sample_ce(model.apply(params, x), y)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sgd_step(model: ModelDef, frozen: Params, params: Params, x: jax.Array, y: jax.Array, mask: jax.Array,
             lr: jax.Array, wd: jax.Array) -> tuple[Params, jax.Array]:
    """One SGD step on the trainable ``params`` (``frozen`` held fixed): (new params, loss)."""
    def loss_fn(trainable: Params) -> jax.Array:
        return masked_mean_loss(model, {**frozen, **trainable}, x, y, mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return {k: params[k] - lr * (grads[k] + wd * params[k]) for k in params}, loss


def test_counts(model: ModelDef, params: Params, x: jax.Array, y: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss sum, top-1 correct, top-5 correct) over the rows whose mask is 1, as float32."""
    logits = model.apply(params, x)
    ce = per_sample_ce(logits, y)
    onehot = (y[:, None] == jnp.arange(logits.shape[-1], dtype=y.dtype)[None, :]).astype(logits.dtype)
    label_logit = jnp.sum(logits * onehot, axis=-1)
    higher = jnp.sum((logits > label_logit[:, None]).astype(jnp.float32), axis=-1)
    top_k = float(min(5, model.num_classes))
    return (jnp.sum(ce * mask), jnp.sum((higher < 1.0).astype(jnp.float32) * mask),
            jnp.sum((higher < top_k).astype(jnp.float32) * mask))


@dataclass(frozen=True)
class Program:
    """A flat function and the names of its inputs and outputs, in order."""

    name: str
    fn: Callable[..., tuple[jax.Array, ...]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def tensor_names(model: ModelDef) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(frozen tensor names, trainable tensor names) in spec order."""
    return tuple(n for n, _ in model.frozen_specs), tuple(n for n, _ in model.specs)


def programs(model: ModelDef) -> dict[str, Program]:
    """The train, test and infer programs of a model, with flat positional arguments."""
    frozen_names, names = tensor_names(model)
    nf, nt = len(frozen_names), len(names)

    def split(args: tuple[jax.Array, ...]) -> tuple[Params, Params, tuple[jax.Array, ...]]:
        frozen = dict(zip(frozen_names, args[:nf], strict=True))
        params = dict(zip(names, args[nf:nf + nt], strict=True))
        return frozen, params, args[nf + nt:]

    def train(*args: jax.Array) -> tuple[jax.Array, ...]:
        frozen, params, (x, y, mask, lr, wd) = split(args)
        new, loss = sgd_step(model, frozen, params, x, y, mask, lr, wd)
        return (*(new[n] for n in names), loss)

    def test(*args: jax.Array) -> tuple[jax.Array, ...]:
        frozen, params, (x, y, mask) = split(args)
        return test_counts(model, {**frozen, **params}, x, y, mask)

    def infer(*args: jax.Array) -> tuple[jax.Array, ...]:
        frozen, params, (x,) = split(args)
        return (model.apply({**frozen, **params}, x),)

    weights = (*frozen_names, *names)
    return {
        TRAIN: Program(TRAIN, train, (*weights, *TRAIN_DATA_INPUTS), (*(NEW_PREFIX + n for n in names), LOSS_OUTPUT)),
        TEST: Program(TEST, test, (*weights, *TEST_DATA_INPUTS), TEST_OUTPUTS),
        INFER: Program(INFER, infer, (*weights, "x"), (LOGITS_OUTPUT,)),
    }


def _struct(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)  # type: ignore[no-untyped-call]


def input_shapes(model: ModelDef, program: str, batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes and dtypes of a program's inputs for a fixed batch size."""
    f32, i32 = jnp.float32, jnp.int32
    weights = [_struct(s, f32) for _, s in (*model.frozen_specs, *model.specs)]
    x = _struct((batch, *model.input_shape), f32)
    y = _struct((batch,), i32)
    mask = _struct((batch,), f32)
    scalar = _struct((), f32)
    if program == TRAIN:
        return (*weights, x, y, mask, scalar, scalar)
    if program == TEST:
        return (*weights, x, y, mask)
    return (*weights, x)
