"""Layers written so that a whole train step converts to TFLite built-ins and to ONNX for MNN.

Every model of the zoo is written with these functions only. The forward passes are ordinary; what
is special is the gradient. JAX's own gradients of a few operations lower to graphs the mobile
converters cannot take or get wrong (docs/mobile.md, "How the models are written"):

- a matmul's backward ``Gemm`` loses its transpose flag in jax2onnx: :func:`matmul` writes
  ``a.T @ b`` explicitly;
- a convolution's gradient uses layouts jax2onnx cannot export, and a strided convolution's input
  gradient converts wrongly to TFLite: :func:`conv2d` is a stride-1 convolution whose backward pass
  is two ordinary convolutions, and striding is a separate subsample;
- grouped (depthwise) convolutions do not convert: :func:`depthwise` is KxK shifted slices times
  per-channel weights;
- ``max``/``min`` gradients (ReLU, hard-sigmoid, max-pool) make jax2onnx store batch-sized
  constants: they get explicit mask gradients;
- the gradient of ``jnp.pad`` is a Pad with negative amounts, which MNN computes wrongly: padding
  here has an explicit ``lax.slice`` gradient.

Layout: activations are NHWC (the input layout of a phone's camera and of TFLite); convolution
kernels on the wire are HWIO, depthwise kernels HWC, dense kernels (in, out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# --------------------------------------------------------------------------- matmul


@jax.custom_vjp
def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` for 2-D ``a`` (rows, k) and ``b`` (k, cols)."""
    return a @ b


def _matmul_fwd(a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return a @ b, (a, b)


def _matmul_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = res
    return g @ jnp.transpose(b), jnp.transpose(a) @ g


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A dense layer on the last axis of ``x`` (any leading shape)."""
    lead = x.shape[:-1]
    y = matmul(x.reshape((-1, x.shape[-1])), kernel)
    return y.reshape((*lead, kernel.shape[-1])) + bias


# --------------------------------------------------------------------------- activations


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """max(x, 0) with a mask gradient."""
    return jnp.maximum(x, 0.0)


def _relu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.maximum(x, 0.0), x


def _relu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (jnp.where(x > 0.0, g, 0.0),)


relu.defvjp(_relu_fwd, _relu_bwd)


@jax.custom_vjp
def hard_sigmoid(x: jax.Array) -> jax.Array:
    """relu6(x + 3) / 6, as in MobileNetV3, with a mask gradient."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _hard_sigmoid_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return hard_sigmoid(x), x


def _hard_sigmoid_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    inside = (x > -3.0) & (x < 3.0)
    return (jnp.where(inside, g * (1.0 / 6.0), 0.0),)


hard_sigmoid.defvjp(_hard_sigmoid_fwd, _hard_sigmoid_bwd)


def hard_swish(x: jax.Array) -> jax.Array:
    """x · hard_sigmoid(x)."""
    return x * hard_sigmoid(x)


# --------------------------------------------------------------------------- padding and striding


def _pad_hw(x: jax.Array, top: int, bottom: int, left: int, right: int) -> jax.Array:
    # A Pad op, not a concatenation with zeros: zeros would be stored in the files as batch-sized constants.
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def pad_hw(x: jax.Array, top: int, bottom: int, left: int, right: int) -> jax.Array:
    """Zero-pad the H and W axes of an NHWC tensor; the gradient is a plain slice (never a negative Pad)."""

    @jax.custom_vjp
    def padded(v: jax.Array) -> jax.Array:
        return _pad_hw(v, top, bottom, left, right)

    def fwd(v: jax.Array) -> tuple[jax.Array, None]:
        return _pad_hw(v, top, bottom, left, right), None

    def bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
        n, h, w, c = g.shape
        return (lax.slice(g, (0, top, left, 0), (n, h - bottom, w - right, c)),)

    padded.defvjp(fwd, bwd)
    result: jax.Array = padded(x)
    return result


def subsample2(x: jax.Array) -> jax.Array:
    """Every second row and column of an NHWC tensor, starting at 0 (what a stride-2 'SAME' conv keeps).

    Odd sizes are zero-padded at the end first, so the result has ceil(H/2) x ceil(W/2) positions.
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        x = pad_hw(x, 0, h % 2, 0, w % 2)
        h, w = h + h % 2, w + w % 2
    # Rows, then columns, each through a 5-D reshape: TFLite's Pad (the slice's gradient) takes at most 5-D.
    x = x.reshape((n, h // 2, 2, w, c))[:, :, 0]
    return x.reshape((n, h // 2, w // 2, 2, c))[:, :, :, 0]


# --------------------------------------------------------------------------- convolutions


def _conv_nchw(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
    return lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"))


def _conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """Stride-1 'SAME' convolution, NCHW input and OIHW kernel of odd size K."""

    @jax.custom_vjp
    def conv(v: jax.Array, k: jax.Array) -> jax.Array:
        return _conv_nchw(v, k, k.shape[2] // 2)

    def fwd(v: jax.Array, k: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return _conv_nchw(v, k, k.shape[2] // 2), (v, k)

    def bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
        v, k = res
        p = k.shape[2] // 2
        # d/dx: correlate g with the kernel flipped in space, in and out channels swapped.
        k_t = jnp.transpose(jnp.flip(k, axis=(2, 3)), (1, 0, 2, 3))
        dx = _conv_nchw(g, k_t, p)
        # d/dk: correlate x (channels as batch) with g (batch as input channels).
        dk = _conv_nchw(jnp.transpose(v, (1, 0, 2, 3)), jnp.transpose(g, (1, 0, 2, 3)), p)
        return dx, jnp.transpose(dk, (1, 0, 2, 3))

    conv.defvjp(fwd, bwd)
    result: jax.Array = conv(x, w)
    return result


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1) -> jax.Array:
    """A convolution of NHWC ``x`` with an HWIO ``kernel`` of odd size K, padding K//2 on every side.

    Stride 1 or 2; a stride-2 output is centred on input rows and columns 0, 2, 4 … (PyTorch's
    ``padding=K//2``; TensorFlow's 'SAME' pads even sizes at the end only and centres on 1, 3, 5 …).
    """
    y = _conv_same(jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(kernel, (3, 2, 0, 1)))
    y = jnp.transpose(y, (0, 2, 3, 1)) + bias
    return subsample2(y) if stride == 2 else y


def depthwise(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1) -> jax.Array:
    """A depthwise convolution of NHWC ``x`` with an HWC ``kernel``, padded and strided like :func:`conv2d`."""
    k = kernel.shape[0]
    p = k // 2
    _, h, w, _ = x.shape
    xp = pad_hw(x, p, p, p, p)
    # Start from the bias, not from zeros_like(x): a zero tensor of the batch's shape would be stored in
    # the exported files as a constant.
    y = bias + xp[:, 0:h, 0:w, :] * kernel[0, 0]
    for i in range(k):
        for j in range(k):
            if i or j:
                y = y + xp[:, i:i + h, j:j + w, :] * kernel[i, j]
    return subsample2(y) if stride == 2 else y


# --------------------------------------------------------------------------- pooling


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, of NHWC ``x`` (odd trailing rows/columns dropped), mask gradient."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    if (h, w) != (2 * h2, 2 * w2):
        x = x[:, :2 * h2, :2 * w2, :]

    @jax.custom_vjp
    def pool(v: jax.Array) -> jax.Array:
        return jnp.max(v.reshape((n, h2, 2, w2, 2, c)), axis=(2, 4))

    def fwd(v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        out = jnp.max(v.reshape((n, h2, 2, w2, 2, c)), axis=(2, 4))
        return out, (v, out)

    def bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
        v, out = res
        windows = v.reshape((n, h2, 2, w2, 2, c))
        hit = (windows == out[:, :, None, :, None, :]).astype(g.dtype)
        return ((hit * g[:, :, None, :, None, :]).reshape((n, 2 * h2, 2 * w2, c)),)

    pool.defvjp(fwd, bwd)
    pooled: jax.Array = pool(x)
    return pooled


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W of NHWC ``x``: (N, C).

    A sum times 1/(H·W): jax2onnx writes ``jnp.mean`` as a ReduceMean with its axes as an input, which
    opset 17 (what MNN reads) does not allow.
    """
    return jnp.sum(x, axis=(1, 2)) * (1.0 / (x.shape[1] * x.shape[2]))
