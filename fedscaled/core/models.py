"""The model zoo: JAX models named by a job's ``model`` key.

A model is an ordered list of named float32 tensors (``dense_0/kernel``, ``dense_0/bias`` …) — the
same names, shapes and order in JAX, in safetensors files on the wire and in the on-device artifacts
(.tflite, .mnn; see fedscaled/core/steps.py and docs/mobile.md). Inputs are ``(batch, *input_shape)``
with input_shape in height-width-channels order; outputs are logits.

Every forward pass is written with fedscaled/core/layers.py only, so that one definition gives the
JAX trainer, the TFLite train step and the MNN train step.

A model may have *frozen* tensors (``frozen_specs``): inputs of the forward pass that training never
changes and that never travel per round (``mobilenetv3_finetune``'s feature extractor). Only
``specs`` — the trainable tensors — are the job's model on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from fedscaled.core import layers

Params = dict[str, jax.Array]
TensorSpec = tuple[str, tuple[int, ...]]

MLP_HIDDEN = 64
CNN_CHANNELS = (16, 32)
CNN_DENSE = 64
# Largest width multiplier a job may ask for: a wider MobileNetV3-Small is not a phone model.
MAX_WIDTH = 2.0


@dataclass(frozen=True)
class ModelDef:
    """A model of the zoo: its tensor layout and its forward function."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    specs: tuple[TensorSpec, ...]
    forward: Callable[[Params, jax.Array], jax.Array]
    frozen_specs: tuple[TensorSpec, ...] = ()
    width_multiplier: float = 1.0
    # "glorot": uniform ±sqrt(6 / (fan_in + fan_out)); "he": ±sqrt(6 / fan_in), which keeps the signal of
    # a deep ReLU/h-swish network without batch normalisation from vanishing.
    init_scheme: str = "glorot"

    @property
    def num_params(self) -> int:
        """Number of trainable float32 parameters (the model on the wire)."""
        return sum(math.prod(shape) for _, shape in self.specs)

    @property
    def num_frozen_params(self) -> int:
        """Number of frozen float32 parameters."""
        return sum(math.prod(shape) for _, shape in self.frozen_specs)

    def init(self, seed: int) -> dict[str, np.ndarray]:
        """Initial trainable weights (Glorot-style uniform kernels, zero biases), in spec order."""
        return _init(self.specs, seed, self.init_scheme)

    def init_frozen(self, seed: int) -> dict[str, np.ndarray]:
        """Random frozen weights, for tests and benchmarks; a job takes them from ``pretrained``."""
        return _init(self.frozen_specs, seed + 1, self.init_scheme)

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Logits for a batch ``x`` of shape ``(batch, *input_shape)``; ``params`` holds frozen tensors too."""
        return self.forward(params, x)


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 4:  # HWIO convolution
        receptive = shape[0] * shape[1]
        return receptive * shape[2], receptive * shape[3]
    if len(shape) == 3:  # HWC depthwise: one input channel per output channel
        receptive = shape[0] * shape[1]
        return receptive, receptive
    return math.prod(shape[:-1]), shape[-1]


def _init(specs: tuple[TensorSpec, ...], seed: int, scheme: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in specs:
        if name.endswith("/bias"):
            params[name] = np.zeros(shape, dtype=np.float32)
        else:
            fan_in, fan_out = _fans(shape)
            bound = math.sqrt(6.0 / (fan_in + fan_out)) if scheme == "glorot" else math.sqrt(6.0 / fan_in)
            params[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return params


def _flat_dim(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def _dense(params: Params, prefix: str, x: jax.Array) -> jax.Array:
    return layers.dense(x, params[f"{prefix}/kernel"], params[f"{prefix}/bias"])


def _dense_specs(prefix: str, fan_in: int, fan_out: int) -> tuple[TensorSpec, TensorSpec]:
    return (f"{prefix}/kernel", (fan_in, fan_out)), (f"{prefix}/bias", (fan_out,))


def _linear(input_shape: tuple[int, ...], num_classes: int, width: float) -> ModelDef:
    d = _flat_dim(input_shape)

    def forward(params: Params, x: jax.Array) -> jax.Array:
        return _dense(params, "dense_0", x.reshape((x.shape[0], -1)))

    return ModelDef("linear", input_shape, num_classes, _dense_specs("dense_0", d, num_classes), forward)


def _mlp(input_shape: tuple[int, ...], num_classes: int, width: float) -> ModelDef:
    d = _flat_dim(input_shape)

    def forward(params: Params, x: jax.Array) -> jax.Array:
        h = layers.relu(_dense(params, "dense_0", x.reshape((x.shape[0], -1))))
        return _dense(params, "dense_1", h)

    specs = (*_dense_specs("dense_0", d, MLP_HIDDEN), *_dense_specs("dense_1", MLP_HIDDEN, num_classes))
    return ModelDef("mlp", input_shape, num_classes, specs, forward)


def _need_image(name: str, input_shape: tuple[int, ...], smallest: int) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {name} needs input_shape 'height width channels', got {input_shape}")
    h, w, c = input_shape
    if h < smallest or w < smallest:
        raise ValueError(f"model {name} needs height and width of at least {smallest}, got {input_shape}")
    return h, w, c


def _cnn(input_shape: tuple[int, ...], num_classes: int, width: float) -> ModelDef:
    h, w, c = _need_image("cnn", input_shape, 4)
    c1, c2 = CNN_CHANNELS
    # Two 3x3 'SAME' convolutions, each followed by 2x2 max pooling (floor division of the size).
    flat = (h // 4) * (w // 4) * c2

    def conv(params: Params, prefix: str, x: jax.Array) -> jax.Array:
        return layers.relu(layers.conv2d(x, params[f"{prefix}/kernel"], params[f"{prefix}/bias"]))

    def forward(params: Params, x: jax.Array) -> jax.Array:
        y = layers.max_pool2(conv(params, "conv_0", x))
        y = layers.max_pool2(conv(params, "conv_1", y))
        y = layers.relu(_dense(params, "dense_0", y.reshape((y.shape[0], -1))))
        return _dense(params, "dense_1", y)

    specs = (
        ("conv_0/kernel", (3, 3, c, c1)),
        ("conv_0/bias", (c1,)),
        ("conv_1/kernel", (3, 3, c1, c2)),
        ("conv_1/bias", (c2,)),
        *_dense_specs("dense_0", flat, CNN_DENSE),
        *_dense_specs("dense_1", CNN_DENSE, num_classes),
    )
    return ModelDef("cnn", input_shape, num_classes, specs, forward)


def _mobilenet(name: str, input_shape: tuple[int, ...], num_classes: int, width: float) -> ModelDef:
    # Imported here: the MobileNetV3 module is larger than the rest of the zoo together.
    from fedscaled.core import mobilenetv3

    _need_image(name, input_shape, 1)
    if not 0.0 < width <= MAX_WIDTH:
        raise ValueError(f"width_multiplier must be in (0, {MAX_WIDTH}], got {width}")
    features, head, forward = mobilenetv3.build(input_shape[2], num_classes, width)
    if name == "mobilenetv3_finetune":
        return ModelDef(name, input_shape, num_classes, head, forward, frozen_specs=features,
                        width_multiplier=width, init_scheme="he")
    return ModelDef(name, input_shape, num_classes, (*features, *head), forward, width_multiplier=width,
                    init_scheme="he")


def _mobilenetv3(input_shape: tuple[int, ...], num_classes: int, width: float) -> ModelDef:
    return _mobilenet("mobilenetv3", input_shape, num_classes, width)


def _mobilenetv3_finetune(input_shape: tuple[int, ...], num_classes: int, width: float) -> ModelDef:
    return _mobilenet("mobilenetv3_finetune", input_shape, num_classes, width)


_ZOO: dict[str, Callable[[tuple[int, ...], int, float], ModelDef]] = {
    "linear": _linear, "mlp": _mlp, "cnn": _cnn,
    "mobilenetv3": _mobilenetv3, "mobilenetv3_finetune": _mobilenetv3_finetune,
}
# Models whose size depends on width_multiplier.
WIDTH_MODELS = ("mobilenetv3", "mobilenetv3_finetune")


def model_names() -> tuple[str, ...]:
    """Names of the models in the zoo."""
    return tuple(_ZOO)


def build(name: str, input_shape: tuple[int, ...], num_classes: int, width_multiplier: float = 1.0) -> ModelDef:
    """The zoo's model ``name`` for this input shape and class count. Raises ValueError."""
    try:
        factory = _ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(_ZOO)}") from None
    return factory(tuple(input_shape), num_classes, float(width_multiplier))
