"""The model zoo: small JAX models named by a job's ``model`` key.

A model is an ordered list of named float32 tensors (``dense_0/kernel``, ``dense_0/bias`` …) — the
same names and shapes in JAX, in safetensors files on the wire and in on-device artifacts. Inputs are
``(batch, *input_shape)`` with input_shape in height-width-channels order; outputs are logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array]
TensorSpec = tuple[str, tuple[int, ...]]

MLP_HIDDEN = 64
CNN_CHANNELS = (16, 32)
CNN_DENSE = 64


@dataclass(frozen=True)
class ModelDef:
    """A model of the zoo: its tensor layout and its forward function."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    specs: tuple[TensorSpec, ...]
    forward: Callable[[Params, jax.Array], jax.Array]

    @property
    def num_params(self) -> int:
        """Total number of float32 parameters."""
        return sum(math.prod(shape) for _, shape in self.specs)

    def init(self, seed: int) -> dict[str, np.ndarray]:
        """Initial weights (He/Glorot-style uniform kernels, zero biases), in spec order."""
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for name, shape in self.specs:
            if name.endswith("/bias"):
                params[name] = np.zeros(shape, dtype=np.float32)
            else:
                fan_in = math.prod(shape[:-1])
                bound = math.sqrt(6.0 / (fan_in + shape[-1]))
                params[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        return params

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Logits for a batch ``x`` of shape ``(batch, *input_shape)``."""
        return self.forward(params, x)


def _flat_dim(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def _dense(params: Params, prefix: str, x: jax.Array) -> jax.Array:
    return x @ params[f"{prefix}/kernel"] + params[f"{prefix}/bias"]


def _linear(input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
    d = _flat_dim(input_shape)

    def forward(params: Params, x: jax.Array) -> jax.Array:
        return _dense(params, "dense_0", x.reshape((x.shape[0], -1)))

    specs = (("dense_0/kernel", (d, num_classes)), ("dense_0/bias", (num_classes,)))
    return ModelDef("linear", input_shape, num_classes, specs, forward)


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
    d = _flat_dim(input_shape)

    def forward(params: Params, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(_dense(params, "dense_0", x.reshape((x.shape[0], -1))))
        return _dense(params, "dense_1", h)

    specs = (
        ("dense_0/kernel", (d, MLP_HIDDEN)),
        ("dense_0/bias", (MLP_HIDDEN,)),
        ("dense_1/kernel", (MLP_HIDDEN, num_classes)),
        ("dense_1/bias", (num_classes,)),
    )
    return ModelDef("mlp", input_shape, num_classes, specs, forward)


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
    if len(input_shape) != 3:
        raise ValueError(f"model cnn needs input_shape 'height width channels', got {input_shape}")
    h, w, c = input_shape
    c1, c2 = CNN_CHANNELS
    # Two 3x3 'SAME' convolutions, each followed by 2x2 max pooling (floor division of the size).
    flat = (h // 4) * (w // 4) * c2
    if flat == 0:
        raise ValueError(f"model cnn needs height and width of at least 4, got {input_shape}")

    def conv(params: Params, prefix: str, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, params[f"{prefix}/kernel"], window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + params[f"{prefix}/bias"])

    def pool(x: jax.Array) -> jax.Array:
        pooled: jax.Array = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return pooled

    def forward(params: Params, x: jax.Array) -> jax.Array:
        y = pool(conv(params, "conv_0", x))
        y = pool(conv(params, "conv_1", y))
        y = jax.nn.relu(_dense(params, "dense_0", y.reshape((y.shape[0], -1))))
        return _dense(params, "dense_1", y)

    specs = (
        ("conv_0/kernel", (3, 3, c, c1)),
        ("conv_0/bias", (c1,)),
        ("conv_1/kernel", (3, 3, c1, c2)),
        ("conv_1/bias", (c2,)),
        ("dense_0/kernel", (flat, CNN_DENSE)),
        ("dense_0/bias", (CNN_DENSE,)),
        ("dense_1/kernel", (CNN_DENSE, num_classes)),
        ("dense_1/bias", (num_classes,)),
    )
    return ModelDef("cnn", input_shape, num_classes, specs, forward)


_ZOO: dict[str, Callable[[tuple[int, ...], int], ModelDef]] = {"linear": _linear, "mlp": _mlp, "cnn": _cnn}


def model_names() -> tuple[str, ...]:
    """Names of the models in the zoo."""
    return tuple(_ZOO)


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
    """The zoo's model ``name`` for this input shape and class count. Raises ValueError."""
    try:
        factory = _ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(_ZOO)}") from None
    return factory(tuple(input_shape), num_classes)
