"""FedProx on the reference device: a task's ``proxy_mu`` on the JAX, LiteRT and MNN backends.

FedProx (Li et al., MLSys 2020) adds ``mu/2 * ||w - w_global||^2`` to each local step's loss; its
gradient ``mu * (w - w_global)`` pulls the weights toward the model the task started from. The artifact
backends run a fixed plain-SGD graph and add ``-lr * mu * (w - w_global)`` after it
(``train.proximal_step``); the JAX trainer adds the same term inside its scan. Tolerance: 1e-5 absolute
on weights, as tests/test_artifacts.py (float32 rounding of a step is ~1e-7; the proximal term moves
the weights here by ~1e-3, a wrong sign or a missing term by as much).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscaled.artifacts import PREBUILT_DIR
from fedscaled.core import steps
from fedscaled.core.artifact_spec import ArtifactKey
from fedscaled.core.models import ModelDef
from fedscaled.device import client as client_mod
from fedscaled.device import datasets, train
from fedscaled.device.backends import ArtifactBackend, Backend, JaxBackend
from fedscaled.device.train import NumpyParams

ATOL = 1e-5
KEY = ArtifactKey("cnn", (8, 8, 1), 10, 1.0, 16, 32)  # configs/digits-*.yml's CNN, prebuilt
BACKENDS = ("jax", "tflite", "mnn")
LR, WD, MU = 0.1, 1e-4, 0.5


@pytest.fixture(scope="module")
def digits() -> datasets.Split:
    return datasets.load_digits_split(seed=0)


@pytest.fixture(scope="module")
def model() -> ModelDef:
    return KEY.model_def()


def _artifact(model: ModelDef, backend: str) -> ArtifactBackend:
    folder = PREBUILT_DIR / KEY.slug() / backend
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {entry["file"]: (folder / entry["file"]).read_bytes() for entry in manifest["programs"].values()}
    return ArtifactBackend(model, manifest, files)


_BACKENDS: dict[str, Backend] = {}


def _backend(model: ModelDef, name: str) -> Backend:
    if name not in _BACKENDS:
        _BACKENDS[name] = JaxBackend(model) if name == "jax" else _artifact(model, name)
    return _BACKENDS[name]


def _start_and_global(model: ModelDef) -> tuple[NumpyParams, NumpyParams]:
    """Weights ``w`` and a different global model (every tensor differs, biases included)."""
    rng = np.random.default_rng(3)
    w = model.init(1)
    w_global = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()}
    return w, w_global


def _one_step(backend: Backend, params: NumpyParams, split: datasets.Split, *, mu: float,
              w_global: NumpyParams | None = None) -> NumpyParams:
    new, _, _ = backend.train({}, params, split.x_train, split.y_train, lr=LR, local_steps=1,
                              batch_size=KEY.train_batch, weight_decay=WD, seed=4, proxy_mu=mu, w_global=w_global)
    return new


def _drift(a: NumpyParams, b: NumpyParams) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in b)))


@pytest.mark.parametrize("name", BACKENDS)
def test_one_step_with_mu_is_sgd_on_the_proximal_objective(name: str, model: ModelDef,
                                                           digits: datasets.Split) -> None:
    """new = w - lr*(grad + mu*(w - w_global)), grad (weight decay included) from the same backend's mu=0 step."""
    backend = _backend(model, name)
    w, w_global = _start_and_global(model)
    plain = _one_step(backend, w, digits, mu=0.0, w_global=w_global)
    prox = _one_step(backend, w, digits, mu=MU, w_global=w_global)
    for k in w:
        grad = (w[k].astype(np.float64) - plain[k]) / LR
        want = w[k] - LR * (grad + MU * (w[k].astype(np.float64) - w_global[k]))
        np.testing.assert_allclose(prox[k], want, rtol=0, atol=ATOL, err_msg=f"{name} {k}")
        # The term really moved the tensor, by far more than the tolerance.
        assert float(np.max(np.abs(prox[k] - plain[k]))) > 100 * ATOL, f"{name} {k}: proxy_mu had no effect"


def test_jax_step_equals_jax_grad_of_the_proximal_loss(model: ModelDef, digits: datasets.Split) -> None:
    """Independent of the correction formula: jax.grad of loss + wd/2 ||w||^2 + mu/2 ||w - w_global||^2."""
    w, w_global = _start_and_global(model)
    (idx,) = train.batch_plan(int(digits.y_train.shape[0]), KEY.train_batch, 1, np.random.default_rng(4))
    x, y = jnp.asarray(digits.x_train[idx]), jnp.asarray(digits.y_train[idx].astype(np.int32))
    mask = jnp.ones((len(idx),), jnp.float32)

    def objective(p: dict[str, jax.Array]) -> jax.Array:
        prox = sum(jnp.sum((p[k] - w_global[k]) ** 2) for k in p)
        l2 = sum(jnp.sum(p[k] ** 2) for k in p)
        return steps.masked_mean_loss(model, p, x, y, mask) + WD / 2 * l2 + MU / 2 * prox

    grads = jax.grad(objective)({k: jnp.asarray(v) for k, v in w.items()})
    got = _one_step(_backend(model, "jax"), w, digits, mu=MU, w_global=w_global)
    for k in w:
        np.testing.assert_allclose(got[k], w[k] - LR * np.asarray(grads[k]), rtol=0, atol=ATOL, err_msg=k)


@pytest.mark.parametrize("name", ["tflite", "mnn"])
def test_local_training_with_mu_through_an_artifact_matches_jax(name: str, model: ModelDef) -> None:
    """Several steps, a short last batch and (in JAX) padded bucket steps: the same weights everywhere."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, 37).astype(np.int32)
    params = model.init(1)
    kwargs: dict[str, Any] = {"lr": 0.1, "local_steps": 0, "batch_size": KEY.train_batch, "epochs": 2,
                              "weight_decay": 1e-4, "seed": 9, "proxy_mu": 0.3}
    new_a, loss_a, _ = _backend(model, name).train({}, params, x, y, **kwargs)
    new_b, loss_b, _ = _backend(model, "jax").train({}, params, x, y, **kwargs)
    assert abs(loss_a - loss_b) < 1e-4
    for k in new_b:
        np.testing.assert_allclose(new_a[k], new_b[k], rtol=0, atol=ATOL, err_msg=k)


@pytest.mark.parametrize("name", BACKENDS)
def test_the_proximal_term_pulls_toward_the_global_model(name: str, model: ModelDef,
                                                         digits: datasets.Split) -> None:
    """The sign. K local steps from w_global on digits; drift = ||w_K - w_global||.

    With mu = 1 (FedProx, gradient +mu*(w - w_global)) the drift is strictly smaller than with mu = 0
    (plain SGD); with mu = -1 — the sign FedScale's client uses, which pushes the weights away from the
    global model — it is strictly larger. mu = -1 goes through the same internal path (Backend.train ->
    train.proximal_step / the JAX scan); the device's task parser refuses a negative proxy_mu.
    """
    backend = _backend(model, name)
    w_global = model.init(7)
    drift = {}
    for mu in (0.0, 1.0, -1.0):
        new, _, _ = backend.train({}, w_global, digits.x_train, digits.y_train, lr=0.1, local_steps=20,
                                  batch_size=KEY.train_batch, weight_decay=0.0, seed=2, proxy_mu=mu)
        drift[mu] = _drift(new, w_global)
    assert drift[0.0] > 0.1, drift  # the steps do move the model
    assert drift[1.0] < 0.98 * drift[0.0], drift
    assert drift[-1.0] > 1.02 * drift[0.0], drift


def test_proximal_step_is_exact_and_leaves_its_inputs_alone() -> None:
    new = {"w": np.array([1.0, 2.0], np.float32)}
    before = {"w": np.array([3.0, -1.0], np.float32)}
    anchor = {"w": np.array([1.0, 1.0], np.float32)}
    out = train.proximal_step(new, before, anchor, lr=0.5, mu=0.25)
    # 1 - 0.5*0.25*(3-1) = 0.75; 2 - 0.5*0.25*(-1-1) = 2.25: pulled toward the anchor.
    np.testing.assert_array_equal(out["w"], np.array([0.75, 2.25], np.float32))
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(new["w"], [1.0, 2.0])
    np.testing.assert_array_equal(before["w"], [3.0, -1.0])
    assert train.proximal_step(new, before, anchor, lr=0.5, mu=0.0) is new


def test_task_proxy_mu_defaults_to_zero_and_refuses_bad_values() -> None:
    assert client_mod.task_proxy_mu({}) == 0.0
    assert client_mod.task_proxy_mu({"proxy_mu": None}) == 0.0
    assert client_mod.task_proxy_mu({"proxy_mu": 0.01}) == pytest.approx(0.01)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="proxy_mu"):
            client_mod.task_proxy_mu({"proxy_mu": bad})


@pytest.mark.parametrize("name", BACKENDS)
def test_a_task_without_proxy_mu_trains_exactly_as_mu_zero(name: str, model: ModelDef,
                                                            digits: datasets.Split) -> None:
    """Through DeviceClient.do_train (network calls replaced): the uploaded weights, bit for bit."""
    backend = _backend(model, name)
    start = model.init(5)
    data = datasets.DeviceData(digits.x_train[:300], digits.y_train[:300], digits.x_test[:10], digits.y_test[:10])

    def uploaded(config: dict[str, Any]) -> NumpyParams:
        async def go() -> NumpyParams:
            device = client_mod.DeviceClient(None, "http://unused", "job", data, seed=3)  # type: ignore[arg-type]
            sent: dict[str, NumpyParams] = {}

            async def weights(version: int) -> NumpyParams:
                return dict(start)

            async def engine(task: Any) -> tuple[Backend, NumpyParams]:
                return backend, {}

            async def upload(task_id: str, params: NumpyParams, **kw: Any) -> dict[str, Any]:
                sent["params"] = params
                return {"accepted": True}

            device._weights = weights  # type: ignore[method-assign]
            device._engine = engine  # type: ignore[method-assign]
            device.upload_update = upload  # type: ignore[method-assign]
            await device.do_train({"task_id": "t", "model_version": 1, "config": config})
            return sent["params"]

        return asyncio.run(go())

    base = {"learning_rate": 0.1, "local_steps": 5, "batch_size": KEY.train_batch, "weight_decay": 1e-4}
    absent = uploaded(base)
    zero = uploaded({**base, "proxy_mu": 0.0})
    prox = uploaded({**base, "proxy_mu": 1.0})
    direct, _, _ = backend.train({}, start, data.x_train, data.y_train, lr=0.1, local_steps=5,
                                 batch_size=KEY.train_batch, weight_decay=1e-4, seed=3 * 1_000_003)
    for k in start:
        np.testing.assert_array_equal(absent[k], zero[k], err_msg=k)
        np.testing.assert_array_equal(absent[k], direct[k], err_msg=k)
    # ...and the config value does reach the backend.
    assert _drift(prox, start) < _drift(zero, start)
