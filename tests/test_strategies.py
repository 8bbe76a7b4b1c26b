"""Server strategies, the strategy-aware streaming sum, server optimizer state and selectors.

Optimizer steps go through ``ServerStrategy.server_step`` (the jitted production path) and are checked
against the optimizer definitions as optax 0.2.x implements them, written out in numpy; q-FedAvg and
clipping go through a real DurableSum on a real LMDB store.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedscaled.core import rounds
from fedscaled.core.aligned import aligned_empty
from fedscaled.core.config import GRADIENT_POLICIES, JOB_KEYS
from fedscaled.core.oort import DeviceStats, OortState
from fedscaled.core.rounds import Task
from fedscaled.core.selection import SELECTORS, OortSelector, RandomSelector, selector_for
from fedscaled.core.strategies import ALIASES, STRATEGIES, ServerStrategy, canonical, strategy_for
from fedscaled.core.strategies.fedavg import FedAvg
from fedscaled.core.strategies.q_fedavg import QFedAvg
from fedscaled.jobs import server_state
from fedscaled.jobs.aggregation import RoundSpec, open_round
from fedscaled.jobs.durable_sum import DurableSum, FoldPlan
from fedscaled.store.lmdb_store import Store, WriteBatch

F32 = np.ndarray[Any, np.dtype[np.float32]]
F64 = np.ndarray[Any, np.dtype[np.float64]]
SETTINGS = settings(max_examples=15, deadline=None)
STATEFUL = ("fed-yogi", "fed-adam", "fed-adagrad", "fed-avgm")
SPECS = (("a/bias", (3,)), ("b/kernel", (2, 2)))  # 7 parameters
P = 7
ROOT = Path(__file__).resolve().parent.parent


def job_values(**overrides: Any) -> dict[str, Any]:
    """A job's config values: every key's default, with overrides."""
    values = {key: spec.default for key, spec in JOB_KEYS.items()}
    values.update(overrides)
    return values


def f32(values: Any) -> F32:
    out: F32 = np.asarray(values, dtype=np.float32)
    return out


def aligned(values: Any) -> F32:
    out: F32 = aligned_empty(P)
    out[:] = np.asarray(values, dtype=np.float32)
    return out


def step(strategy: ServerStrategy, state: Any, global_model: F32, combined: F32) -> tuple[F32, Any]:
    new_model, new_state = strategy.server_step(state, jnp.asarray(global_model), jnp.asarray(combined))
    return f32(new_model), new_state


# --- 1. server optimizers: the first step by hand -----------------------------------------------------

G0 = f32([1.0, -2.0, 0.5, 3.0, 0.25])
D0 = f32([0.5, -1.0, 2.0, 0.0, -0.125])  # the pseudo-gradient global - combined (one coordinate unchanged)
C0 = f32(G0 - D0)


def test_fed_yogi_first_step_by_hand() -> None:
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-3
    s = strategy_for(job_values(gradient_policy="fed-yogi", yogi_eta=eta, yogi_beta=b1, yogi_beta2=b2, yogi_tau=tau))
    got, state = step(s, None, G0, C0)
    g, d = G0.astype(np.float64), D0.astype(np.float64)
    mu0 = nu0 = 1e-6  # optax.yogi: both moments start at initial_accumulator_value 1e-6 (not 0, not tau^2)
    mu1 = (1 - b1) * d + b1 * mu0  # first moment: an EMA of the pseudo-gradient
    nu1 = nu0 - (1 - b2) * np.sign(nu0 - d * d) * d * d  # Yogi's additive second moment
    mu_hat = mu1 / (1 - b1**1)  # bias correction with count 1
    nu_hat = nu1 / (1 - b2**1)
    update = mu_hat / (np.sqrt(nu_hat) + tau)  # eps (yogi_tau) outside the square root
    expected = g - eta * update  # scale_by_learning_rate(eta) flips the sign; apply_updates adds
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # The zero pseudo-gradient coordinate still moves: optax's first moment starts at 1e-6.
    assert got[3] != G0[3]
    count, mu, nu = state[0]
    assert int(count) == 1
    np.testing.assert_allclose(np.asarray(mu), mu1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nu), nu1, rtol=1e-6)


def test_fed_adam_first_step_by_hand() -> None:
    lr, b1, b2, tau = 0.2, 0.8, 0.95, 1e-2
    s = strategy_for(job_values(gradient_policy="fed-adam", server_lr=lr, server_beta1=b1, server_beta2=b2,
                                server_tau=tau))
    got, state = step(s, None, G0, C0)
    g, d = G0.astype(np.float64), D0.astype(np.float64)
    mu1 = (1 - b1) * d + b1 * 0.0  # optax.adam: moments start at 0
    nu1 = (1 - b2) * d * d + b2 * 0.0
    mu_hat = mu1 / (1 - b1)  # bias correction, count 1: mu_hat = d
    nu_hat = nu1 / (1 - b2)  # nu_hat = d^2
    update = mu_hat / (np.sqrt(nu_hat + 0.0) + tau)  # eps_root 0 inside, eps (server_tau) outside the root
    expected = g - lr * update
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, g - lr * d / (np.abs(d) + tau), rtol=1e-6, atol=1e-7)  # the closed form
    count, mu, nu = state[0]
    assert int(count) == 1
    np.testing.assert_allclose(np.asarray(mu), mu1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nu), nu1, rtol=1e-6)


def test_fed_adagrad_first_step_by_hand() -> None:
    lr, tau = 0.2, 1e-2
    s = strategy_for(job_values(gradient_policy="fed-adagrad", server_lr=lr, server_tau=tau))
    got, state = step(s, None, G0, C0)
    g, d = G0.astype(np.float64), D0.astype(np.float64)
    acc0 = tau * tau  # initial_accumulator_value = server_tau^2
    acc1 = acc0 + d * d  # scale_by_rss: the sum of squares
    # optax: rsqrt(acc + eps), eps INSIDE the root; fedscaled sets eps = tau^2, so the floor of the denominator is
    # tau as in the paper's sqrt(v) + tau
    update = np.where(acc1 > 0, d / np.sqrt(acc1 + tau * tau), 0.0)
    expected = g - lr * update
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(state[0].sum_of_squares), acc1, rtol=1e-6)


def test_fed_avgm_first_step_by_hand() -> None:
    lr, momentum = 0.5, 0.7
    s = strategy_for(job_values(gradient_policy="fed-avgm", server_lr=lr, server_momentum=momentum))
    got, state = step(s, None, G0, C0)
    g, d = G0.astype(np.float64), D0.astype(np.float64)
    trace1 = d + momentum * 0.0  # optax.trace: trace = g + decay * trace, starting at 0 (no dampening)
    expected = g - lr * trace1
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(state[0].trace), trace1, rtol=1e-6)
    # Second step: the momentum carries the first pseudo-gradient.
    c1 = f32(got - D0)
    got2, _ = step(s, state, got, c1)
    np.testing.assert_allclose(got2, got.astype(np.float64) - lr * (d + momentum * trace1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("policy", "default_lr"), [("fed-adam", 0.01), ("fed-adagrad", 0.1), ("fed-avgm", 1.0)])
def test_server_lr_zero_takes_the_strategy_default(policy: str, default_lr: float) -> None:
    tau = 1e-3
    s = strategy_for(job_values(gradient_policy=policy, server_lr=0.0, server_tau=tau, server_momentum=0.9))
    got, _ = step(s, None, G0, C0)
    g, d = G0.astype(np.float64), D0.astype(np.float64)
    unit = {"fed-adam": d / (np.abs(d) + tau), "fed-adagrad": d / np.sqrt(tau * tau + d * d + tau * tau),
            "fed-avgm": d}[policy]
    np.testing.assert_allclose(got, g - default_lr * unit, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("policy", [*STATEFUL, "fed-avg", "fed-prox", "q-fedavg"])
def test_pseudo_gradient_sign_every_strategy_moves_down(policy: str) -> None:
    # Every upload moved the weights down by 1: the new global model must move down too.
    s = strategy_for(job_values(gradient_policy=policy))
    g = f32(np.linspace(-3.0, 3.0, 11))
    got, _ = step(s, None, g, f32(g - 1.0))
    assert np.all(got < g), (policy, got - g)
    assert np.all(got >= g - 1.0 - 1e-6), (policy, got - g)  # and by at most the mean's own move at these lrs


# --- 1b. three steps against a numpy re-implementation -------------------------------------------------


def _reference(policy: str, hp: dict[str, float]) -> tuple[Callable[[F64], dict[str, Any]],
                                                             Callable[[dict[str, Any], F64], F64]]:
    """(init, update) of the optax optimizer in float64: update(state, pseudo_gradient) -> the step to subtract,
    mutating state."""
    if policy == "fed-yogi":
        def init(p: F64) -> dict[str, Any]:
            return {"t": 0, "mu": np.full_like(p, 1e-6), "nu": np.full_like(p, 1e-6)}

        def update(s: dict[str, Any], d: F64) -> F64:
            s["t"] += 1
            s["mu"] = (1 - hp["b1"]) * d + hp["b1"] * s["mu"]
            s["nu"] = s["nu"] - (1 - hp["b2"]) * np.sign(s["nu"] - d * d) * d * d
            mu_hat = s["mu"] / (1 - hp["b1"] ** s["t"])
            nu_hat = s["nu"] / (1 - hp["b2"] ** s["t"])
            out: F64 = hp["lr"] * mu_hat / (np.sqrt(nu_hat) + hp["tau"])
            return out
    elif policy == "fed-adam":
        def init(p: F64) -> dict[str, Any]:
            return {"t": 0, "mu": np.zeros_like(p), "nu": np.zeros_like(p)}

        def update(s: dict[str, Any], d: F64) -> F64:
            s["t"] += 1
            s["mu"] = (1 - hp["b1"]) * d + hp["b1"] * s["mu"]
            s["nu"] = (1 - hp["b2"]) * d * d + hp["b2"] * s["nu"]
            mu_hat = s["mu"] / (1 - hp["b1"] ** s["t"])
            nu_hat = s["nu"] / (1 - hp["b2"] ** s["t"])
            out: F64 = hp["lr"] * mu_hat / (np.sqrt(nu_hat) + hp["tau"])
            return out
    elif policy == "fed-adagrad":
        def init(p: F64) -> dict[str, Any]:
            return {"acc": np.full_like(p, hp["tau"] ** 2)}

        def update(s: dict[str, Any], d: F64) -> F64:
            s["acc"] = s["acc"] + d * d
            out: F64 = hp["lr"] * d / np.sqrt(s["acc"] + hp["tau"] ** 2)
            return out
    else:
        def init(p: F64) -> dict[str, Any]:
            return {"trace": np.zeros_like(p)}

        def update(s: dict[str, Any], d: F64) -> F64:
            s["trace"] = d + hp["momentum"] * s["trace"]
            out: F64 = hp["lr"] * s["trace"]
            return out
    return init, update


def _values(policy: str, hp: dict[str, float]) -> dict[str, Any]:
    if policy == "fed-yogi":
        return job_values(gradient_policy=policy, yogi_eta=hp["lr"], yogi_beta=hp["b1"], yogi_beta2=hp["b2"],
                          yogi_tau=hp["tau"])
    return job_values(gradient_policy=policy, server_lr=hp["lr"], server_beta1=hp["b1"], server_beta2=hp["b2"],
                      server_tau=hp["tau"], server_momentum=hp["momentum"])


@SETTINGS
@given(policy=st.sampled_from(STATEFUL), p=st.sampled_from([1, 6, 33]), seed=st.integers(0, 2**16),
       lr=st.floats(0.01, 1.0), b1=st.floats(0.5, 0.95), b2=st.floats(0.9, 0.999), tau=st.floats(1e-4, 1e-1),
       momentum=st.floats(0.0, 0.95))
@example(policy="fed-yogi", p=6, seed=0, lr=1.0, b1=0.5, b2=0.999, tau=0.0625, momentum=0.0)
def test_three_steps_match_numpy_recurrence(policy: str, p: int, seed: int, lr: float, b1: float, b2: float,
                                            tau: float, momentum: float) -> None:
    hp = {"lr": lr, "b1": b1, "b2": b2, "tau": tau, "momentum": momentum}
    s = strategy_for(_values(policy, hp))
    rng = np.random.default_rng(seed)
    g = f32(rng.uniform(-2.0, 2.0, p))
    # The rounds' combined models: each moves every weight by 0.05..1 (away from the ill-conditioned d ~ 0).
    moves = rng.uniform(0.05, 1.0, (3, p)) * rng.choice([-1.0, 1.0], (3, p))
    init, update = _reference(policy, hp)
    ref_state, ref = init(g.astype(np.float64)), g.astype(np.float64)
    state: Any = None
    for t in range(3):
        combined = f32(g - moves[t])
        g, state = step(s, state, g, combined)
        ref = ref - update(ref_state, ref - combined.astype(np.float64))
        # float32 against float64: the moments' bias correction divides by 1 - b2^t (~1/500 at b2 = 0.999, t = 2),
        # which magnifies float32 rounding of the second moment; measured up to 2.2e-5 relative (yogi, lr 1).
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5, err_msg=f"{policy} step {t + 1}")


# --- 2. fed-avg ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fed-avg", "fed-prox", "q-fedavg"])
def test_stateless_strategies_take_combined(policy: str) -> None:
    s = strategy_for(job_values(gradient_policy=policy))
    assert not s.stateful
    assert s.init_state(jnp.ones(4)) is None
    combined = jnp.asarray([0.5, -1.0, 2.0, 7.0], dtype=jnp.float32)
    new_model, state = s.server_step(None, jnp.zeros(4, dtype=jnp.float32), combined)
    assert state is None
    np.testing.assert_array_equal(np.asarray(new_model), np.asarray(combined))
    assert s.step_cache_size() == 0


def test_fed_prox_sends_mu_and_stateful_strategies_say_so() -> None:
    assert strategy_for(job_values(gradient_policy="fed-prox", proxy_mu=0.25)).task_config() == {"proxy_mu": 0.25}
    assert strategy_for(job_values(gradient_policy="fed-avg")).task_config() == {}
    for policy in STATEFUL:
        assert strategy_for(job_values(gradient_policy=policy)).stateful, policy


# --- 3. no recompilation -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", STATEFUL)
def test_server_steps_compile_once(policy: str, tmp_path: Path) -> None:
    s = strategy_for(job_values(gradient_policy=policy))
    rng = np.random.default_rng(1)
    g = f32(rng.standard_normal(64))
    state: Any = None
    for _ in range(5):
        g, state = step(s, state, g, f32(g - rng.standard_normal(64)))
    assert s.step_cache_size() == 1
    # A state read back from the store (what a restart or a reload hands the step) hits the same compilation.
    store = Store(tmp_path / "s", sync=False)
    store.commit_sync(server_state.put(WriteBatch(), "job", 5, state))
    loaded = server_state.load(store, "job", 5, s, jnp.asarray(g))
    step(s, loaded, g, f32(g - 0.5))
    assert s.step_cache_size() == 1
    store.close()


# --- 4. q-FedAvg against Li et al. ICLR 2020, Algorithm 2 ------------------------------------------------


def qfedavg_reference(w: F64, uploads: F64, losses: F64, q: float, lr: float) -> F64:
    lip = 1.0 / lr  # L = 1 / learning rate
    delta_w = lip * (w[None, :] - uploads)  # Δw_k = L (w - w_k)
    deltas = (losses**q)[:, None] * delta_w  # Δ_k = F_k^q Δw_k
    h = q * losses ** (q - 1) * np.sum(delta_w**2, axis=1) + lip * losses**q  # h_k
    out: F64 = w - deltas.sum(axis=0) / h.sum()  # w - ΣΔ_k / Σh_k
    return out


def _task(i: int, phase_id: int = 1) -> Task:
    return Task(task_id=f"t{i}", device_id=f"d{i}", phase_id=phase_id, kind="train", round=1, model_version=0,
                issued_at=0.0, deadline=1e12)


async def _add_all(agg: Any, uploads: list[F32], weights: list[float], losses: list[float], first: int = 0) -> None:
    tasks = [_task(first + i) for i in range(len(uploads))]
    await asyncio.gather(*(agg.add(t, u, w, {"samples": w, "loss": f})
                           for t, u, w, f in zip(tasks, uploads, weights, losses, strict=True)))
    assert all(t.done for t in tasks)


def _q_round(store: Store, g: F32, uploads: list[F32], losses: list[float], weights: list[float], q: float,
             lr: float, clip_norm: float = 0.0) -> F32:
    plan = FoldPlan(strategy=QFedAvg(job_values(gradient_policy="q-fedavg", qfed_q=q)), global_model=jnp.asarray(g),
                    learning_rate=lr, clip_norm=clip_norm)
    agg = open_round(store, RoundSpec(job="job", phase_id=1, specs=SPECS, plan=plan, aggregator="fedavg"))

    async def run() -> F32:
        await _add_all(agg, uploads, weights, losses)
        return f32((await agg.combined()).model)

    return asyncio.run(run())


@settings(max_examples=20, deadline=None)
@given(q=st.sampled_from([0.0, 0.5, 1.0, 2.0]), k=st.integers(1, 6), seed=st.integers(0, 2**16),
       lr=st.sampled_from([0.01, 0.1, 0.5]))
def test_qfedavg_streaming_matches_algorithm_2(q: float, k: int, seed: int, lr: float) -> None:
    rng = np.random.default_rng(seed)
    g = f32(rng.standard_normal(P))
    uploads = [aligned(g + rng.uniform(0.01, 0.3) * rng.standard_normal(P)) for _ in range(k)]
    losses = [float(x) for x in rng.uniform(0.1, 5.0, k)]
    weights = [float(x) for x in rng.integers(1, 100, k)]  # sample counts: q-FedAvg ignores them
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s", sync=False)
        got = _q_round(store, g, uploads, losses, weights, q, lr)
        store.close()
    expected = qfedavg_reference(g.astype(np.float64), np.stack(uploads).astype(np.float64), np.asarray(losses), q, lr)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    if q == 0.0:
        np.testing.assert_allclose(got, np.stack(uploads).astype(np.float64).mean(axis=0), rtol=1e-4, atol=1e-5)


def test_qfedavg_q_zero_is_the_unweighted_mean_and_q_favours_high_loss(tmp_path: Path) -> None:
    g = f32(np.zeros(P))
    uploads = [aligned(np.full(P, 1.0)), aligned(np.full(P, -1.0))]
    losses, weights = [4.0, 1.0], [1.0, 99.0]
    store = Store(tmp_path / "s0", sync=False)
    np.testing.assert_allclose(_q_round(store, g, uploads, losses, weights, 0.0, 0.1), 0.0, atol=1e-6)
    store.close()
    store = Store(tmp_path / "s1", sync=False)
    got = _q_round(store, g, uploads, losses, weights, 1.0, 0.1)
    store.close()
    assert np.all(got > 0)  # the high-loss device (moving up) outweighs the other, samples notwithstanding
    ref = qfedavg_reference(g.astype(np.float64), np.stack(uploads).astype(np.float64), np.asarray(losses), 1.0, 0.1)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


# --- 5. clipping in the streaming mean -------------------------------------------------------------------


def clipped_mean(g: F64, uploads: F64, weights: F64, c: float) -> F64:
    deltas = uploads - g[None, :]
    norms = np.linalg.norm(deltas, axis=1)
    scale = np.minimum(1.0, c / np.where(norms > 0, norms, 1.0))
    clipped = g[None, :] + scale[:, None] * deltas
    out: F64 = (weights[:, None] * clipped).sum(axis=0) / weights.sum()
    return out


@settings(max_examples=15, deadline=None)
@given(k=st.integers(2, 6), seed=st.integers(0, 2**16), c=st.floats(0.05, 2.0), split=st.integers(1, 5))
def test_clipped_streaming_mean_matches_explicit_clipping_and_survives_restart(k: int, seed: int, c: float,
                                                                              split: int) -> None:
    rng = np.random.default_rng(seed)
    g = f32(rng.standard_normal(P))
    # Update norms spread on both sides of c; the first is always clipped.
    norms = [c * 3.0, *(float(x) for x in c * rng.uniform(0.1, 3.0, k - 1))]
    uploads = []
    for norm in norms:
        direction = rng.standard_normal(P)
        uploads.append(aligned(g + norm * direction / np.linalg.norm(direction)))
    weights = [float(x) for x in rng.integers(1, 50, k)]
    losses = [1.0] * k
    expected = clipped_mean(g.astype(np.float64), np.stack(uploads).astype(np.float64), np.asarray(weights), c)
    plan = FoldPlan(strategy=FedAvg(job_values()), global_model=jnp.asarray(g), learning_rate=0.1, clip_norm=c)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s", sync=False)
        durable = DurableSum(store, "job", 1, SPECS, plan)
        asyncio.run(_add_all(durable, uploads, weights, losses))
        assert durable.base_weight > 0  # the first upload was clipped
        mean = f32(durable.mean())
        np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(durable.total_weight, sum(weights), rtol=1e-6)
        # A restart restores the sum and the clipping's base weight: the same mean, bit for bit.
        again = DurableSum.restore(store, "job", 1, SPECS, plan)
        assert again.base_weight == durable.base_weight and again.accepted == k
        np.testing.assert_array_equal(f32(again.mean()), mean)
        # A restart in the middle of the round (another phase) still gives the clipped mean.
        cut = min(split, k - 1)
        first = DurableSum(store, "job", 2, SPECS, plan)
        asyncio.run(_add_all(first, uploads[:cut], weights[:cut], losses[:cut]))
        second = DurableSum.restore(store, "job", 2, SPECS, plan)
        asyncio.run(_add_all(second, uploads[cut:], weights[cut:], losses[cut:], first=cut))
        np.testing.assert_allclose(f32(second.mean()), expected, rtol=1e-5, atol=1e-5)
        store.close()


def test_uploads_inside_the_clip_norm_are_unchanged(tmp_path: Path) -> None:
    g = f32(np.arange(P) * 0.1)
    uploads = [aligned(g + 0.3), aligned(g - 0.2)]  # norms 0.79 and 0.53
    weights = [3.0, 1.0]
    plan = FoldPlan(strategy=FedAvg(job_values()), global_model=jnp.asarray(g), learning_rate=0.1, clip_norm=1.0)
    store = Store(tmp_path / "s", sync=False)
    durable = DurableSum(store, "job", 1, SPECS, plan)
    asyncio.run(_add_all(durable, uploads, weights, [1.0, 1.0]))
    assert durable.base_weight == 0.0
    expected = (3.0 * uploads[0].astype(np.float64) + uploads[1]) / 4.0
    np.testing.assert_allclose(f32(durable.mean()), expected, rtol=1e-6)
    store.close()


def test_qfedavg_with_clipping_is_qfedavg_of_the_clipped_uploads(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    g = f32(rng.standard_normal(P))
    uploads = [aligned(g + s * rng.standard_normal(P)) for s in (0.05, 1.0, 2.0)]
    losses, c, q, lr = [0.5, 2.0, 1.5], 0.5, 1.0, 0.1
    store = Store(tmp_path / "s", sync=False)
    got = _q_round(store, g, uploads, losses, [1.0, 1.0, 1.0], q, lr, clip_norm=c)
    store.close()
    g64 = g.astype(np.float64)
    deltas = np.stack(uploads).astype(np.float64) - g64
    scale = np.minimum(1.0, c / np.linalg.norm(deltas, axis=1))
    assert scale[0] == 1.0 and scale[2] < 1.0
    clipped = g64 + scale[:, None] * deltas
    np.testing.assert_allclose(got, qfedavg_reference(g64, clipped, np.asarray(losses), q, lr), rtol=1e-4, atol=1e-5)


# --- 6. server optimizer state persistence --------------------------------------------------------------


def _trained_state(s: ServerStrategy, g: F32) -> tuple[F32, Any]:
    state: Any = None
    for shift in (0.3, -0.7):
        g, state = step(s, state, g, f32(g - shift))
    return g, state


@pytest.mark.parametrize("policy", STATEFUL)
def test_server_state_round_trip(policy: str, tmp_path: Path) -> None:
    s = strategy_for(job_values(gradient_policy=policy))
    g, state = _trained_state(s, f32(np.linspace(-1.0, 1.0, 9)))
    store = Store(tmp_path / "s")
    asyncio.run(store.commit(server_state.put(WriteBatch(), "job", 3, state)))
    store.close()
    store = Store(tmp_path / "s")  # a restart
    loaded = server_state.load(store, "job", 3, s, jnp.asarray(g))
    assert str(jax.tree_util.tree_structure(loaded)) == str(jax.tree_util.tree_structure(state))
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(state), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The restored state continues exactly as the live one would.
    np.testing.assert_array_equal(step(s, loaded, g, f32(g - 0.1))[0], step(s, state, g, f32(g - 0.1))[0])
    with pytest.raises(RuntimeError, match="v3"):
        server_state.load(store, "job", 4, s, jnp.asarray(g))
    with pytest.raises(RuntimeError, match="v3"):
        server_state.load(store, "job", 2, s, jnp.asarray(g))
    # Another job's state is not this one's.
    with pytest.raises(RuntimeError):
        server_state.load(store, "other", 3, s, jnp.asarray(g))
    store.close()


@pytest.mark.parametrize("policy", STATEFUL)
def test_server_state_fresh_at_version_zero_missing_later_raises(policy: str, tmp_path: Path) -> None:
    s = strategy_for(job_values(gradient_policy=policy))
    g = jnp.asarray(np.linspace(-1.0, 1.0, 9), dtype=jnp.float32)
    store = Store(tmp_path / "s")
    fresh = server_state.load(store, "job", 0, s, g)
    init = s.init_state(g)
    assert str(jax.tree_util.tree_structure(fresh)) == str(jax.tree_util.tree_structure(init))
    for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(init), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(RuntimeError, match="no server optimizer state"):
        server_state.load(store, "job", 1, s, g)
    store.close()


def test_server_state_of_a_stateless_strategy_is_none(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    assert server_state.load(store, "job", 7, strategy_for(job_values()), jnp.zeros(3)) is None
    store.close()


# --- 7. the registry --------------------------------------------------------------------------------------


def test_every_name_and_alias_resolves() -> None:
    for name, cls in STRATEGIES.items():
        assert cls.name == name
        s = strategy_for(job_values(gradient_policy=name))
        assert type(s) is cls
        assert s.describe().startswith(name)
        for key in cls.keys:
            assert key in s.describe()
    for alias, name in ALIASES.items():
        assert name in STRATEGIES and canonical(alias) == name
        assert type(strategy_for(job_values(gradient_policy=alias))) is STRATEGIES[name]
    assert set(GRADIENT_POLICIES) == set(STRATEGIES) | set(ALIASES)
    assert set(JOB_KEYS["gradient_policy"].choices) == set(STRATEGIES) | set(ALIASES)


def test_strategy_keys_are_job_keys() -> None:
    for name, cls in STRATEGIES.items():
        for key in cls.keys:
            assert key in JOB_KEYS, (name, key)
            assert JOB_KEYS[key].used, (name, key)


def test_docs_list_every_strategy() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    heading = re.search(r"^(#{2,4}) Strategies\s*$", text, re.MULTILINE)
    if heading is None:
        pytest.skip("docs pending: no 'Strategies' section in docs/config.md yet")
    level = len(heading.group(1))
    following = re.search(rf"^#{{1,{level}}} ", text[heading.end():], re.MULTILINE)
    section = text[heading.end():heading.end() + following.start()] if following else text[heading.end():]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| `")}
    for name, cls in STRATEGIES.items():
        assert f"`{name}`" in rows, f"no row for {name} in docs/config.md's Strategies table"
        for key in cls.keys:
            assert f"`{key}`" in rows[f"`{name}`"], (name, key)


# --- 8. selectors ------------------------------------------------------------------------------------------


def _pool(n: int) -> list[str]:
    return [f"dev{i:03d}" for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30), count=st.integers(0, 40), seed=st.integers(0, 2**32), round_number=st.integers(1, 50))
def test_random_selector_is_rounds_select(n: int, count: int, seed: int, round_number: int) -> None:
    pool = _pool(n)
    selector = selector_for(job_values(sample_mode="random"))
    assert isinstance(selector, RandomSelector)
    chosen, state = selector.select(list(reversed(pool)), count, {}, None, round_number, seed)
    assert chosen == rounds.select(pool, count, seed)
    assert state is None
    assert len(chosen) == min(count, n) and chosen == sorted(set(chosen)) and set(chosen) <= set(pool)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30), count=st.integers(0, 40), explored=st.integers(0, 30), seed=st.integers(0, 2**32),
       round_number=st.integers(1, 50), rounds_run=st.integers(1, 3))
def test_oort_selector_state_is_json_and_deterministic(n: int, count: int, explored: int, seed: int,
                                                       round_number: int, rounds_run: int) -> None:
    config = job_values(sample_mode="oort")
    pool = _pool(n)
    stats = {d: DeviceStats(float(1 + i % 5), float(1 + i % 7), max(1, round_number - i % 4), 1 + i % 3)
             for i, d in enumerate(_pool(explored))}
    selector = selector_for(config)
    assert isinstance(selector, OortSelector) and SELECTORS["oort"] is OortSelector
    state: dict[str, Any] | None = None
    for r in range(round_number, round_number + rounds_run):
        chosen, new_state = selector.select(pool, count, stats, state, r, seed + r)
        again, again_state = OortSelector(config).select(pool, count, stats, state, r, seed + r)
        assert (chosen, new_state) == (again, again_state)  # deterministic for a seed
        assert len(chosen) <= count and len(chosen) == min(count, n)
        assert chosen == sorted(set(chosen)) and set(chosen) <= set(pool)
        assert new_state is not None
        assert json.loads(json.dumps(new_state, allow_nan=False)) == new_state  # strict JSON, exactly
        assert OortState.from_record(new_state).to_record() == new_state
        state = new_state
