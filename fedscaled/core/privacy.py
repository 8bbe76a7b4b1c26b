"""Update clipping and central differential privacy, as small pure functions (kernels jitted).

Clipping bounds each device's influence on a round: an upload ``w`` around the global model ``g`` is
replaced by ``g + s * (w - g)`` with ``s = min(1, C / ||w - g||_2)``. The streaming fold never builds that
clipped copy; it uses the identity

    weight * (s * w + (1 - s) * g) = (weight * s) * w + (weight * (1 - s)) * g

so the fold takes the upload ``w`` unchanged with fold weight ``weight * s``, a scalar ``base_weight``
collects ``weight * (1 - s)``, and :func:`clipped_fedavg_result` adds ``base_weight * g`` once at close.

Central DP adds Gaussian noise to the round's (clipped) weighted mean at close, scaled to that mean's
sensitivity (:func:`noise_std`), and :func:`epsilon_spent` accounts the rounds with dp-accounting's RDP
accountant. The noise comes from JAX's threefry generator, which is *not* a cryptographically secure
generator (like Opacus without ``secure_mode``): its key is drawn from :mod:`secrets`, but an adversary
who could break threefry's output could in principle remove the noise.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedscaled.core.aggregate import FedAvgState, to_device

_F32_TINY = float(np.finfo(np.float32).tiny)  # 2**-126, the smallest normal float32
_F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23


# --- clipping --------------------------------------------------------------------------------------


def _scaled_norm(update: jax.Array, base: jax.Array) -> jax.Array:
    # Where update - base overflows, halve both first: halving is exact (for normal values), so the
    # halves' difference is fl(update - base) / 2 without the overflow. Then divide by a power of two
    # (exact) that puts the largest term in [1, 2): its square cannot overflow, and the terms that still
    # underflow are below 2**-126 of it. Scaling by the operands' magnitude instead would lose small deltas
    # next to a large weight that did not change.
    factor = jnp.where(jnp.all(jnp.isfinite(update - base)), jnp.float32(1.0), jnp.float32(0.5))
    diff = update * factor - base * factor
    _, exponent = jnp.frexp(jnp.max(jnp.abs(diff)))
    scale = jnp.ldexp(jnp.float32(1.0), exponent - 1)
    # scale * (... / factor), not (scale / factor) * ...: overflows only when the norm exceeds float32.
    return scale * (jnp.sqrt(jnp.sum(jnp.square(diff / scale))) / factor)


@jax.jit
def _delta_norm(update: jax.Array, base: jax.Array) -> jax.Array:
    # One fused pass in the common case: the differences are squared directly (never |w|^2 - 2wg + |g|^2,
    # which cancels catastrophically: uploads are close to the global model relative to their norms).
    # XLA's CPU reduction is tree-shaped: measured < 4e-7 relative error against float64 up to 10M params.
    ssq = jnp.sum(jnp.square(update - base))
    # float32 squares overflow above ~1.8e19 and lose precision below ~1e-19; only then take a second,
    # scaled pass. Below this floor the terms lost to underflow could matter at float32 precision.
    floor = jnp.float32(update.shape[0] * _F32_TINY / _F32_EPS)
    accurate = jnp.isfinite(ssq) & (ssq >= floor)
    out: jax.Array = jax.lax.cond(accurate, lambda: jnp.sqrt(ssq), lambda: _scaled_norm(update, base))
    return out


def delta_norm(update: np.ndarray[Any, np.dtype[Any]] | jax.Array,
               base: np.ndarray[Any, np.dtype[Any]] | jax.Array) -> jax.Array:
    """``||update - base||_2`` as a float32 scalar: the norm of an upload's delta from the global model.

    Both are float32 vectors ``[P]`` (numpy ones go through :func:`to_device`, zero-copy when aligned, so
    they must not be overwritten until the result is ready). Normally one pass with float32 accumulation;
    only when the sum of squares over- or underflows float32 is a scaled second pass taken, so any finite
    inputs give the norm to float32 precision (inf only if the norm itself exceeds float32's range).
    Subnormal values count as zero (XLA on CPU flushes them). Arrays of one shape share one compilation.
    """
    if update.shape != base.shape or len(update.shape) != 1:
        raise ValueError(f"update and base must be vectors of one shape, got {tuple(update.shape)} "
                         f"and {tuple(base.shape)}")
    out: jax.Array = _delta_norm(to_device(update), to_device(base))
    return out


def delta_norm_cache_size() -> int:
    """How many compilations the norm kernel holds (for no-recompile tests and metrics)."""
    return int(_delta_norm._cache_size())  # type: ignore[attr-defined]


def clip_scale(norm: float, clip_norm: float) -> float:
    """The factor ``s = min(1, clip_norm / norm)`` that clips a delta of L2 norm ``norm`` to ``clip_norm``.

    1.0 when ``norm <= clip_norm`` or ``clip_norm == 0`` (clipping off); 0.0 for an infinite norm. Fold
    the upload ``w`` with weight ``weight * s`` and add ``weight * (1 - s)`` to the round's ``base_weight``:
    ``weight * (s * w + (1 - s) * g) = (weight * s) * w + (weight * (1 - s)) * g``, so no clipped copy of
    ``w`` is ever built (see :func:`clipped_fedavg_result`).
    """
    norm = float(norm)
    clip_norm = float(clip_norm)
    if not (math.isfinite(clip_norm) and clip_norm >= 0):
        raise ValueError(f"clip_norm must be finite and >= 0 (0 turns clipping off), got {clip_norm!r}")
    if math.isnan(norm) or norm < 0:
        raise ValueError(f"a norm must be >= 0, got {norm!r}")
    if clip_norm == 0 or norm <= clip_norm:
        return 1.0
    return clip_norm / norm


@jax.jit
def clipped_fedavg_result(state: FedAvgState, base_weight: jax.Array, base: jax.Array) -> jax.Array:
    """The weighted mean of the clipped uploads: ``(acc + base_weight * base) / (weight + base_weight)``.

    ``state`` holds the uploads folded with weights ``weight_k * s_k``, ``base_weight`` is the sum of
    ``weight_k * (1 - s_k)``, ``base`` the global model ``g`` the deltas were taken from. Equals the
    weighted mean of ``g + s_k * (w_k - g)`` with the original weights. NaN if nothing was folded.
    """
    return (state.acc + base_weight * base) / (state.weight + base_weight)


# --- noise -----------------------------------------------------------------------------------------


def fresh_key() -> jax.Array:
    """A new threefry PRNG key with 64 bits from :mod:`secrets` (the OS's CSPRNG).

    The key is built from raw key data, not ``jax.random.key(seed)``: with 64-bit mode off (our default)
    that keeps only the seed's low 32 bits. JAX's threefry is *not* a cryptographically secure generator
    (like Opacus's default, non-secure mode): the noise is as private as threefry is unpredictable.
    """
    words = np.array([secrets.randbits(32), secrets.randbits(32)], dtype=np.uint32)
    key: jax.Array = jax.random.wrap_key_data(jnp.asarray(words))
    return key


@partial(jax.jit, donate_argnums=0)
def _add_gaussian_noise(mean: jax.Array, key: jax.Array, std: jax.Array) -> jax.Array:
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def add_gaussian_noise(mean: jax.Array, key: jax.Array, std: float | np.floating[Any] | jax.Array) -> jax.Array:
    """``mean + N(0, std^2 I)``: the Gaussian mechanism on a round's aggregate (float32 ``[P]``).

    ``mean`` is donated (deleted): the un-noised aggregate must not outlive this call. ``std`` travels as
    a traced float32 scalar, so rounds with different stds share one compilation; ``key`` (a typed key,
    see :func:`fresh_key`) must never be reused across rounds: the same key gives the same noise.
    """
    s = np.float32(std)
    if not (np.isfinite(s) and s >= 0):
        raise ValueError(f"noise std must be finite and >= 0, got {std!r}")
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise ValueError(f"key must be a typed PRNG key (jax.random.key or fresh_key), got dtype {key.dtype}")
    out: jax.Array = _add_gaussian_noise(mean, key, s)
    return out


def noise_cache_size() -> int:
    """How many compilations the noise kernel holds (for no-recompile tests and metrics)."""
    return int(_add_gaussian_noise._cache_size())  # type: ignore[attr-defined]


def noise_std(noise_multiplier: float, clip_norm: float, max_weight: float, total_weight: float) -> float:
    """The noise std for a round: ``noise_multiplier`` times the L2 sensitivity of the clipped weighted mean.

    The daemon divides by the round's actual total weight ``W``, so adding (or removing) one device ``k``
    with clipped delta ``d_k`` moves the mean by ``w_k * (d_k - mean) / W``, whose norm reaches
    ``2 * C * w_k / W`` (every other delta at ``+C u``, ``d_k`` at ``-C u``). The sensitivity is therefore
    ``2 * clip_norm * max_weight / total_weight`` (McMahan et al. 2018, "Learning Differentially Private
    Recurrent Language Models", the estimator with a data-dependent denominator); only a fixed,
    data-independent denominator would halve it. ``max_weight`` must bound any single device's weight,
    also a device not in this round (a cap the daemon enforces), not just the largest weight seen, and the
    weights themselves are treated as public.
    """
    for name, value in (("noise_multiplier", noise_multiplier), ("clip_norm", clip_norm),
                        ("max_weight", max_weight), ("total_weight", total_weight)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if max_weight > total_weight:
        raise ValueError(f"max_weight ({max_weight}) cannot exceed total_weight ({total_weight})")
    return float(noise_multiplier) * 2.0 * float(clip_norm) * float(max_weight) / float(total_weight)


# --- accounting ------------------------------------------------------------------------------------


def epsilon_spent(noise_multiplier: float, rounds: int | np.integer[Any], delta: float,
                  sampling_rate: float | None = None) -> float:
    """The epsilon of ``rounds`` rounds of the Gaussian mechanism at ``delta``, by the RDP accountant.

    Without ``sampling_rate`` there is no amplification: each round counts as a full Gaussian mechanism,
    which is what the daemon's selection (not Poisson sampling) honestly allows. With one, each round is
    a Poisson-sampled Gaussian at that rate. 0 rounds spend 0.0; the result may be ``inf``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer):
        raise ValueError(f"rounds must be an integer, got {rounds!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if sampling_rate is not None and not (0 < sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if rounds == 0:
        return 0.0
    q = None if sampling_rate is None or sampling_rate == 1 else float(sampling_rate)
    return _epsilon(float(noise_multiplier), int(rounds), float(delta), q)


@functools.lru_cache(maxsize=256)
def _epsilon(noise_multiplier: float, rounds: int, delta: float, sampling_rate: float | None) -> float:
    # Imported here: dp_accounting pulls in scipy and mpmath, ~1.3 s the daemon should not pay at startup
    # when DP is off. The cache serves the status view's repeated asks; a miss takes ~30 ms with sampling
    # and < 1 ms without (2-core machine), whatever the number of rounds.
    import dp_accounting  # type: ignore[import-untyped, unused-ignore]
    from dp_accounting.rdp import RdpAccountant  # type: ignore[import-untyped, unused-ignore]

    event: Any = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate is not None:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class PrivacySpent:
    """The privacy spent so far, for the status view."""

    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float
    clip_norm: float

    def to_record(self) -> dict[str, float | int | None]:
        """A JSON-ready dict; an infinite epsilon (no meaningful guarantee) becomes ``None``."""
        return {
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
            "delta": self.delta,
            "rounds": self.rounds,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
        }
