"""MobileNetV3-Small (Howard et al., 2019) written with the converter-friendly layers.

The block table is the paper's (and torchvision's ``mobilenet_v3_small``); every channel count is
scaled by the width multiplier and rounded to a multiple of 8. Two differences from the paper, both
for on-device training: no batch normalisation (a bias per convolution instead — batch statistics
would have to travel as extra tensors and do not survive tiny per-phone batches), and no dropout.
The feature extractor (stem, 11 blocks, last 1x1 convolution, global pooling) and the head (two
dense layers) are separate tensor groups, so ``mobilenetv3_finetune`` can freeze the first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from fedscaled.core import layers

Params = dict[str, jax.Array]
TensorSpec = tuple[str, tuple[int, ...]]


class Block(NamedTuple):
    """One inverted-residual block of the table."""

    kernel: int
    expanded: int
    out: int
    squeeze_excite: bool
    hard_swish: bool
    stride: int


# MobileNetV3-Small: kernel, expanded channels, output channels, SE, h-swish, stride (width 1.0).
SMALL: tuple[Block, ...] = (
    Block(3, 16, 16, True, False, 2),
    Block(3, 72, 24, False, False, 2),
    Block(3, 88, 24, False, False, 1),
    Block(5, 96, 40, True, True, 2),
    Block(5, 240, 40, True, True, 1),
    Block(5, 240, 40, True, True, 1),
    Block(5, 120, 48, True, True, 1),
    Block(5, 144, 48, True, True, 1),
    Block(5, 288, 96, True, True, 2),
    Block(5, 576, 96, True, True, 1),
    Block(5, 576, 96, True, True, 1),
)
STEM = 16
LAST_CONV = 576
HEAD = 1024


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10 % below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _dense(prefix: str, fan_in: int, fan_out: int) -> list[TensorSpec]:
    return [(f"{prefix}/kernel", (fan_in, fan_out)), (f"{prefix}/bias", (fan_out,))]


def build(channels: int, num_classes: int, width: float
          ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], Callable[[Params, jax.Array], jax.Array]]:
    """(feature-extractor specs, head specs, forward) for ``channels`` input channels."""
    def scaled(c: int) -> int:
        return make_divisible(c * width)

    features: list[TensorSpec] = []
    stem = scaled(STEM)
    features += [("stem/kernel", (3, 3, channels, stem)), ("stem/bias", (stem,))]
    plan: list[tuple[str, Block, int, int, int]] = []  # prefix, block, in, expanded, out
    cin = stem
    for i, block in enumerate(SMALL, start=1):
        prefix = f"block_{i:02d}"
        exp, out = scaled(block.expanded), scaled(block.out)
        if exp != cin:
            features += _dense(f"{prefix}/expand", cin, exp)
        k = block.kernel
        features += [(f"{prefix}/depthwise/kernel", (k, k, exp)), (f"{prefix}/depthwise/bias", (exp,))]
        if block.squeeze_excite:
            squeeze = make_divisible(exp // 4)
            features += _dense(f"{prefix}/se_reduce", exp, squeeze) + _dense(f"{prefix}/se_expand", squeeze, exp)
        features += _dense(f"{prefix}/project", exp, out)
        plan.append((prefix, block, cin, exp, out))
        cin = out
    last = scaled(LAST_CONV)
    features += _dense("last_conv", cin, last)
    head_width = scaled(HEAD)
    head = _dense("head/dense_0", last, head_width) + _dense("head/dense_1", head_width, num_classes)

    def dense(params: Params, prefix: str, x: jax.Array) -> jax.Array:
        return layers.dense(x, params[f"{prefix}/kernel"], params[f"{prefix}/bias"])

    def forward(params: Params, x: jax.Array) -> jax.Array:
        y = layers.hard_swish(layers.conv2d(x, params["stem/kernel"], params["stem/bias"], stride=2))
        for prefix, block, c_in, exp, out in plan:
            act = layers.hard_swish if block.hard_swish else layers.relu
            h = act(dense(params, f"{prefix}/expand", y)) if exp != c_in else y
            h = act(layers.depthwise(h, params[f"{prefix}/depthwise/kernel"], params[f"{prefix}/depthwise/bias"],
                                     stride=block.stride))
            if block.squeeze_excite:
                s = layers.global_avg_pool(h)
                s = layers.relu(dense(params, f"{prefix}/se_reduce", s))
                s = layers.hard_sigmoid(dense(params, f"{prefix}/se_expand", s))
                h = h * s[:, None, None, :]
            h = dense(params, f"{prefix}/project", h)
            y = y + h if block.stride == 1 and c_in == out else h
        y = layers.hard_swish(dense(params, "last_conv", y))
        pooled = layers.global_avg_pool(y)
        z = layers.hard_swish(dense(params, "head/dense_0", pooled))
        return dense(params, "head/dense_1", z)

    return tuple(features), tuple(head), forward
