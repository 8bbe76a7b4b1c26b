"""The converter-friendly layers compute what the ordinary JAX operations compute, gradients included."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedscaled.core import layers

RNG = np.random.default_rng(7)


def _rand(*shape: int) -> jax.Array:
    return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def _same_value_and_grad(ours: Callable[..., jax.Array], ref: Callable[..., jax.Array], *args: jax.Array) -> None:
    probe = _rand(*ours(*args).shape)
    out_a, out_b = jax.jit(ours)(*args), ref(*args)
    np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_b), rtol=1e-5, atol=1e-5)
    argnums = tuple(range(len(args)))
    grads_a = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * probe), argnums=argnums))(*args)
    grads_b = jax.grad(lambda *a: jnp.sum(ref(*a) * probe), argnums=argnums)(*args)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=1e-4, atol=1e-4)


def test_matmul_and_dense() -> None:
    _same_value_and_grad(layers.matmul, jnp.matmul, _rand(5, 7), _rand(7, 3))
    _same_value_and_grad(layers.dense, lambda x, k, b: x @ k + b, _rand(2, 4, 4, 6), _rand(6, 5), _rand(5))


@pytest.mark.parametrize("fn, ref", [
    (layers.relu, jax.nn.relu),
    (layers.hard_sigmoid, lambda x: jnp.clip(x + 3.0, 0.0, 6.0) / 6.0),
    (layers.hard_swish, lambda x: x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0),
])
def test_activations(fn: Callable[[jax.Array], jax.Array], ref: Callable[[jax.Array], jax.Array]) -> None:
    _same_value_and_grad(fn, ref, _rand(3, 50) * 4.0)


def _padding(k: jax.Array) -> tuple[tuple[int, int], tuple[int, int]]:
    # Symmetric k//2 padding (PyTorch's and torchvision's MobileNetV3 convention): a stride-2 output
    # is centred on input rows 0, 2, 4 … whatever the parity of the size.
    p = k.shape[0] // 2
    return ((p, p), (p, p))


def _ref_conv(x: jax.Array, k: jax.Array, b: jax.Array, stride: int) -> jax.Array:
    y = lax.conv_general_dilated(x, k, (stride, stride), _padding(k), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


@pytest.mark.parametrize("size, ksize, stride", [(8, 3, 1), (8, 3, 2), (7, 3, 2), (6, 5, 1), (5, 1, 1)])
def test_conv2d(size: int, ksize: int, stride: int) -> None:
    x, k, b = _rand(2, size, size, 3), _rand(ksize, ksize, 3, 4), _rand(4)
    _same_value_and_grad(lambda x, k, b: layers.conv2d(x, k, b, stride=stride),
                         lambda x, k, b: _ref_conv(x, k, b, stride), x, k, b)


@pytest.mark.parametrize("size, ksize, stride", [(8, 3, 1), (8, 5, 2), (3, 5, 2), (2, 5, 2), (1, 3, 1)])
def test_depthwise(size: int, ksize: int, stride: int) -> None:
    c = 4
    x, k, b = _rand(2, size, size, c), _rand(ksize, ksize, c), _rand(c)

    def ref(x: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(x, k[:, :, None, :], (stride, stride), _padding(k),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        return y + b

    _same_value_and_grad(lambda x, k, b: layers.depthwise(x, k, b, stride=stride), ref, x, k, b)


@pytest.mark.parametrize("size", [8, 7])
def test_max_pool(size: int) -> None:
    def ref(x: jax.Array) -> jax.Array:
        out: jax.Array = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return out

    _same_value_and_grad(layers.max_pool2, ref, _rand(2, size, size, 3))


def test_pad_and_subsample() -> None:
    _same_value_and_grad(lambda x: layers.pad_hw(x, 1, 2, 0, 3),
                         lambda x: jnp.pad(x, ((0, 0), (1, 2), (0, 3), (0, 0))), _rand(2, 4, 5, 3))
    _same_value_and_grad(layers.subsample2, lambda x: x[:, ::2, ::2, :], _rand(2, 5, 6, 3))
