"""Aggregation kernels against numpy float64 references, always through jax.jit."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedscaled.core.aggregate import (
    SORT_NETWORK_MAX_K,
    FedAvgState,
    _fedavg_fold,
    fedavg_delta,
    fedavg_fold,
    fedavg_fold_cache_size,
    fedavg_fold_many_checked,
    fedavg_init,
    fedavg_result,
    krum_scores,
    krum_select,
    median_chunk,
    pairwise_sq_dists_accumulate,
    pairwise_sq_dists_init,
    to_device,
    trimmed_mean_chunk,
)
from fedscaled.core.aligned import aligned_empty, is_aligned

F32 = np.ndarray[Any, np.dtype[np.float32]]
SETTINGS = settings(max_examples=25, deadline=None)


def _updates(seed: int, k: int, p: int) -> F32:
    # Full weights: a shared base plus small per-client changes, like real uploads.
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(p)
    return (base + 0.1 * rng.standard_normal((k, p))).astype(np.float32)


def _fold_all(updates: F32, weights: list[float], order: list[int] | None = None) -> jax.Array:
    state = fedavg_init(updates.shape[1])
    for i in order if order is not None else range(len(updates)):
        state = fedavg_fold(state, updates[i], weights[i])
    result: jax.Array = fedavg_result(state)
    return result


# --- to_device -------------------------------------------------------------------------------------


def test_to_device_aliases_aligned_buffers() -> None:
    a = aligned_empty(1000)
    a[:] = np.arange(1000)
    dev = to_device(a)
    assert dev.dtype == jnp.float32 and np.array_equal(np.asarray(dev), a)
    if jax.default_backend() == "cpu":
        assert dev.unsafe_buffer_pointer() == a.ctypes.data  # zero copy


def test_to_device_handles_unaligned_and_other_dtypes() -> None:
    raw = np.arange(1001, dtype=np.float32).tobytes()
    unaligned = np.frombuffer(raw, dtype=np.float32, count=1000, offset=4)
    assert not is_aligned(unaligned)
    assert np.array_equal(np.asarray(to_device(unaligned)), unaligned)
    f64 = np.arange(10, dtype=np.float64)
    dev = to_device(f64)
    assert dev.dtype == jnp.float32 and np.array_equal(np.asarray(dev), f64)
    assert to_device(dev) is dev


# --- FedAvg ----------------------------------------------------------------------------------------


@SETTINGS
@given(
    p=st.integers(1, 300),
    weights=st.lists(st.floats(0.5, 1000.0), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_fedavg_matches_float64_reference(p: int, weights: list[float], seed: int) -> None:
    updates = _updates(seed, len(weights), p)
    w = np.asarray(weights, dtype=np.float64)
    expected = (w[:, None] * updates.astype(np.float64)).sum(axis=0) / w.sum()
    got = np.asarray(_fold_all(updates, weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    p=st.integers(1, 200),
    weights=st.lists(st.floats(0.5, 1000.0), min_size=2, max_size=8),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fedavg_order_invariant(p: int, weights: list[float], seed: int, data: st.DataObject) -> None:
    updates = _updates(seed, len(weights), p)
    order = data.draw(st.permutations(range(len(weights))))
    a = np.asarray(_fold_all(updates, weights))
    b = np.asarray(_fold_all(updates, weights, list(order)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(k=st.integers(1, 8), p=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_fedavg_uniform_weights_is_plain_mean(k: int, p: int, seed: int) -> None:
    updates = _updates(seed, k, p)
    got = np.asarray(_fold_all(updates, [1.0] * k))
    np.testing.assert_allclose(got, updates.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_fedavg_delta_and_weight() -> None:
    updates = _updates(0, 3, 50)
    base = jnp.asarray(updates[0])
    state = fedavg_init(50)
    for u, w in zip(updates, [1.0, 2.0, 3.0], strict=True):
        state = fedavg_fold(state, u, w)
    assert float(state.weight) == 6.0
    np.testing.assert_allclose(np.asarray(fedavg_delta(state, base)),
                               np.asarray(fedavg_result(state)) - updates[0], rtol=1e-6, atol=1e-6)


def test_fold_accepts_device_arrays_and_zero_weight() -> None:
    updates = _updates(1, 2, 20)
    state = fedavg_init(20)
    state = fedavg_fold(state, jnp.asarray(updates[0]), 2.0)
    state = fedavg_fold(state, updates[1], 0.0)  # a zero weight contributes nothing
    np.testing.assert_allclose(np.asarray(fedavg_result(state)), updates[0], rtol=1e-6)


def test_fold_no_recompile_across_weights() -> None:
    p = 1237  # a size no other test uses, so the count below is this test's own
    before = fedavg_fold_cache_size()
    updates = _updates(2, 10, p)
    state = fedavg_init(p)
    for i, w in enumerate([1.0, 2.5, 3, 17.0, 0.25, 100.0, 7, 1e-3, 42.0, 5.5]):
        state = fedavg_fold(state, updates[i], w)
    assert fedavg_fold_cache_size() == before + 1


def test_fold_traces_once() -> None:
    # Count Python traces directly as well: a fresh jit of the same kernel with a side-effect counter.
    traces = 0

    def counted(state: FedAvgState, update: jax.Array, weight: jax.Array) -> FedAvgState:
        nonlocal traces
        traces += 1
        return _fedavg_fold.__wrapped__(state, update, weight)  # type: ignore[attr-defined, no-any-return]

    fold = jax.jit(counted, donate_argnums=0)
    state = fedavg_init(64)
    for i in range(10):
        state = fold(state, jnp.full((64,), float(i), jnp.float32), np.float32(i + 0.5))
    assert traces == 1
    assert float(state.weight) == pytest.approx(sum(i + 0.5 for i in range(10)))


def test_fold_donates_the_accumulator() -> None:
    state = fedavg_init(100)
    old_acc, old_weight = state.acc, state.weight
    new = fedavg_fold(state, np.ones(100, np.float32), 1.0)
    assert old_acc.is_deleted() and old_weight.is_deleted()
    assert not new.acc.is_deleted()
    with pytest.raises(RuntimeError):
        np.asarray(old_acc)


def test_fold_rejects_bad_input() -> None:
    state = fedavg_init(10)
    with pytest.raises(ValueError, match="shape"):
        fedavg_fold(state, np.ones(11, np.float32), 1.0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="weight"):
            fedavg_fold(state, np.ones(10, np.float32), bad)
    assert not state.acc.is_deleted()  # rejected before the kernel ran


# --- robust kernels --------------------------------------------------------------------------------


def _stack(k: int, c: int, seed: int) -> F32:
    return np.random.default_rng(seed).standard_normal((k, c)).astype(np.float32)


@SETTINGS
@given(k=st.integers(1, 9), c=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_median_chunk(k: int, c: int, seed: int) -> None:
    stack = _stack(k, c, seed)
    np.testing.assert_allclose(np.asarray(median_chunk(stack)), np.median(stack.astype(np.float64), axis=0),
                               rtol=1e-6, atol=1e-6)


@SETTINGS
@given(k=st.integers(1, 9), c=st.integers(1, 64), seed=st.integers(0, 2**16), data=st.data())
def test_trimmed_mean_chunk(k: int, c: int, seed: int, data: st.DataObject) -> None:
    trim = data.draw(st.integers(0, (k - 1) // 2))
    stack = _stack(k, c, seed)
    ordered = np.sort(stack.astype(np.float64), axis=0)
    expected = ordered[trim : k - trim].mean(axis=0)
    np.testing.assert_allclose(np.asarray(trimmed_mean_chunk(stack, trim)), expected, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_drops_outliers_and_rejects_bad_trim() -> None:
    stack = np.ones((5, 3), np.float32)
    stack[0] = 1e6
    stack[1] = -1e6
    np.testing.assert_array_equal(np.asarray(trimmed_mean_chunk(stack, 1)), np.ones(3))
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean_chunk(stack, 3)


def _np_pairwise(stack: F32) -> np.ndarray[Any, np.dtype[np.float64]]:
    x = stack.astype(np.float64)
    return np.asarray(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1))


@SETTINGS
@given(k=st.integers(2, 8), chunks=st.integers(1, 5), c=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_chunked_pairwise_equals_unchunked(k: int, chunks: int, c: int, seed: int) -> None:
    full = _updates(seed, k, chunks * c)
    acc = pairwise_sq_dists_init(k)
    for j in range(chunks):
        acc = pairwise_sq_dists_accumulate(acc, full[:, j * c : (j + 1) * c])
    np.testing.assert_allclose(np.asarray(acc), _np_pairwise(full), rtol=1e-4, atol=1e-5)


def test_pairwise_donates_and_is_exact_for_close_updates() -> None:
    # Updates that differ by 1e-3 around weights of magnitude 100: the Gram form would lose this.
    base = np.full((1, 1000), 100.0, np.float32)
    stack = base + np.random.default_rng(0).uniform(-1e-3, 1e-3, (4, 1000)).astype(np.float32)
    acc = pairwise_sq_dists_init(4)
    new = pairwise_sq_dists_accumulate(acc, stack)
    assert acc.is_deleted()
    np.testing.assert_allclose(np.asarray(new), _np_pairwise(stack), rtol=1e-3, atol=1e-9)


def _np_krum(dists: np.ndarray[Any, np.dtype[np.float64]], f: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    k = len(dists)
    scores = []
    for i in range(k):
        others = np.sort(np.delete(dists[i], i))
        scores.append(others[: k - f - 2].sum())
    return np.asarray(scores)


@SETTINGS
@given(k=st.integers(3, 10), c=st.integers(1, 30), seed=st.integers(0, 2**16), data=st.data())
def test_krum_matches_reference(k: int, c: int, seed: int, data: st.DataObject) -> None:
    f = data.draw(st.integers(0, k - 3))
    stack = _stack(k, c, seed)
    dists = _np_pairwise(stack)
    ref = _np_krum(dists, f)
    got = np.asarray(krum_scores(jnp.asarray(dists, jnp.float32), f))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    chosen = krum_select(jnp.asarray(dists, jnp.float32), f)
    assert ref[chosen] <= ref.min() * (1 + 1e-5) + 1e-5


def test_krum_rejects_byzantine_outliers() -> None:
    honest = _updates(3, 7, 50)
    byzantine = np.full((2, 50), 50.0, np.float32)
    stack = np.concatenate([byzantine, honest])
    acc = pairwise_sq_dists_accumulate(pairwise_sq_dists_init(9), stack)
    assert krum_select(acc, 2) >= 2
    with pytest.raises(ValueError, match="krum"):
        krum_scores(acc, 7)


def test_robust_kernels_do_not_recompile_per_chunk() -> None:
    stacks = [_stack(5, 33, s) for s in range(4)]
    m0, t0 = median_chunk._cache_size(), trimmed_mean_chunk._cache_size()  # type: ignore[attr-defined]
    for s in stacks:
        median_chunk(s)
        trimmed_mean_chunk(s, 1)
    assert median_chunk._cache_size() - m0 <= 1  # type: ignore[attr-defined]
    assert trimmed_mean_chunk._cache_size() - t0 <= 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("k", [SORT_NETWORK_MAX_K, SORT_NETWORK_MAX_K + 1, SORT_NETWORK_MAX_K + 2])
def test_sort_network_and_fallback_agree_with_numpy(k: int) -> None:
    # Both sides of the switch between the compare-exchange network and jnp.sort, with ties.
    stack = np.round(_stack(k, 17, k), 1)
    ordered = np.sort(stack.astype(np.float64), axis=0)
    np.testing.assert_allclose(np.asarray(median_chunk(stack)), np.median(ordered, axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(trimmed_mean_chunk(stack, 3)), ordered[3 : k - 3].mean(axis=0),
                               rtol=1e-5, atol=1e-6)


@SETTINGS
@given(
    p=st.integers(1, 300),
    weights=st.lists(st.floats(0.5, 1000.0), min_size=1, max_size=19),
    seed=st.integers(0, 2**16),
)
def test_fold_many_matches_reference_and_single_folds(p: int, weights: list[float], seed: int) -> None:
    updates = _updates(seed, len(weights), p)
    w = np.asarray(weights, dtype=np.float64)
    expected = (w[:, None] * updates.astype(np.float64)).sum(axis=0) / w.sum()
    state, finite = fedavg_fold_many_checked(fedavg_init(p), [aligned_copy(u) for u in updates], weights)
    assert finite
    np.testing.assert_allclose(np.asarray(fedavg_result(state)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(state.weight), w.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fedavg_result(state)), np.asarray(_fold_all(updates, weights)),
                               rtol=1e-5, atol=1e-6)


def aligned_copy(u: np.ndarray[Any, np.dtype[Any]]) -> np.ndarray[Any, np.dtype[Any]]:
    out = aligned_empty(u.size)
    out[:] = u
    return out


def test_fold_many_rejects_bad_input() -> None:
    state, _ = fedavg_fold_many_checked(fedavg_init(4), [np.ones(4, np.float32)] * 3, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.asarray(fedavg_result(state)), np.ones(4))
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        fedavg_fold_many_checked(state, [np.ones(4, np.float32)] * 2, [1.0])
    with pytest.raises(ValueError, match="finite"):
        fedavg_fold_many_checked(state, [np.ones(4, np.float32)] * 2, [1.0, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        fedavg_fold_many_checked(state, [np.ones(4, np.float32), np.ones(5, np.float32)], [1.0, 1.0])


def test_fold_many_checked_keeps_the_input_and_flags_non_finite() -> None:
    state = fedavg_init(5)
    ups = [aligned_copy(np.full(5, v, np.float32)) for v in (1.0, 2.0, 3.0)]
    new, finite = fedavg_fold_many_checked(state, ups, [1.0, 1.0, 2.0])
    assert finite
    assert not state.acc.is_deleted()  # the old sum survives for a failed commit
    np.testing.assert_allclose(np.asarray(fedavg_result(new)), np.full(5, 2.25))
    bad = aligned_copy(np.array([0, 0, np.inf, 0, 0], np.float32))
    _, finite = fedavg_fold_many_checked(state, [*ups, bad], [1.0] * 4)
    assert not finite
    _, finite = fedavg_fold_many_checked(state, [aligned_copy(np.full(5, 3e38, np.float32))] * 2, [1.0, 1.0])
    assert not finite  # overflow is caught too
    np.testing.assert_array_equal(np.asarray(state.acc), np.zeros(5))
