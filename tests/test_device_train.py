"""Device data and local training: shards, SGD, evaluation counts, and offline FedAvg convergence."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedscaled.core.models import ModelDef, build
from fedscaled.device import datasets, train

MLP = build("mlp", (8, 8, 1), 10)


@pytest.fixture(scope="module")
def digits() -> datasets.Split:
    return datasets.load_digits_split(seed=0)


def test_digits_split_shapes_and_range(digits: datasets.Split) -> None:
    assert digits.x_train.shape[1:] == (8, 8, 1) and digits.x_train.dtype == np.float32
    assert digits.y_train.dtype == np.int32
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.x_train.min() >= 0.0 and digits.x_train.max() <= 1.0
    assert abs(len(digits.y_test) - 0.2 * 1797) <= 1


def test_dirichlet_shards_cover_every_sample_once(digits: datasets.Split) -> None:
    shards = datasets.dirichlet_shards(digits.y_train, 100, 0.5, seed=3, min_samples=2)
    assert len(shards) == 100
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(len(digits.y_train)))
    assert min(len(s) for s in shards) >= 2


def test_dirichlet_skew_grows_as_alpha_falls(digits: datasets.Split) -> None:
    skews = [datasets.label_skew(digits.y_train,
                                 datasets.dirichlet_shards(digits.y_train, 20, alpha, seed=1), 10)
             for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.2 and skews[2] > 0.5


def test_device_data_test_shards_partition_the_held_out_set(digits: datasets.Split) -> None:
    devices = datasets.make_device_data(digits, 50, 0.5, seed=0)
    assert sum(d.num_test for d in devices) == len(digits.y_test)
    assert sum(d.num_train for d in devices) == len(digits.y_train)
    assert all(d.num_test >= 1 and d.num_train >= 2 for d in devices)


def test_synthetic_data_any_shape_is_learnable() -> None:
    split = datasets.synthetic_split(400, 100, (6, 5, 2), 4, seed=0)
    assert split.x_train.shape == (400, 6, 5, 2) and split.y_train.max() < 4
    model = build("linear", (6, 5, 2), 4)
    params, _, _ = train.train_local(model, model.init(0), split.x_train, split.y_train,
                                     lr=0.1, local_steps=50, batch_size=32)
    assert train.evaluate(model, params, split.x_test, split.y_test).accuracy > 0.9


def test_device_datasets_rejects_a_digits_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="digits"):
        datasets.device_datasets("digits", 10, 0.5, 0, input_shape=(28, 28, 1))


def test_training_lowers_the_loss(digits: datasets.Split) -> None:
    params = MLP.init(0)
    before = train.evaluate(MLP, params, digits.x_train, digits.y_train)
    trained, mean_loss, used = train.train_local(
        MLP, params, digits.x_train, digits.y_train, lr=0.1, local_steps=100, batch_size=32, seed=0)
    after = train.evaluate(MLP, trained, digits.x_train, digits.y_train)
    assert after.loss_sum < 0.5 * before.loss_sum
    assert np.isfinite(mean_loss) and used == min(len(digits.y_train), 100 * 32)
    assert list(trained) == [name for name, _ in MLP.specs]
    assert all(trained[k].shape == params[k].shape and trained[k].dtype == np.float32 for k in params)


def test_epochs_mode_and_small_devices() -> None:
    x = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
    y = np.arange(5, dtype=np.int32)
    _, loss, used = train.train_local(MLP, MLP.init(1), x, y, lr=0.1, local_steps=0,
                                      batch_size=16, epochs=3)
    assert used == 5 and np.isfinite(loss)
    with pytest.raises(ValueError):
        train.train_local(MLP, MLP.init(1), x[:0], y[:0], lr=0.1, local_steps=3, batch_size=4)


def test_zero_learning_rate_keeps_weights() -> None:
    x = np.ones((7, 8, 8, 1), np.float32)
    y = np.zeros(7, np.int32)
    params = MLP.init(2)
    same, _, _ = train.train_local(MLP, params, x, y, lr=0.0, local_steps=3, batch_size=4)
    for k in params:
        np.testing.assert_array_equal(same[k], params[k])


def _numpy_logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x.reshape(len(x), -1) @ params["dense_0/kernel"] + params["dense_0/bias"], 0.0)
    out: np.ndarray = h @ params["dense_1/kernel"] + params["dense_1/bias"]
    return out


def test_evaluate_counts_match_numpy(digits: datasets.Split) -> None:
    params = MLP.init(5)
    x, y = digits.x_test[:101], digits.y_test[:101]  # Not a multiple of the batch: padding path.
    counts = train.evaluate(MLP, params, x, y, batch_size=32)
    logits = _numpy_logits(params, x).astype(np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert counts.samples == 101
    assert counts.correct_top1 == int((logits.argmax(axis=1) == y).sum())
    assert counts.correct_top5 == int((top5 == y[:, None]).any(axis=1).sum())
    assert counts.loss_sum == pytest.approx(float(-logp[np.arange(101), y].sum()), rel=1e-4)
    assert train.evaluate(MLP, params, x[:0], y[:0]) == train.TestCounts(0, 0, 0, 0.0)


def test_trainer_is_cached_per_model_definition() -> None:
    again: ModelDef = build("mlp", (8, 8, 1), 10)
    assert train.make_trainer(again) is train.make_trainer(MLP)


def fedavg_accuracy_by_round(rounds: int, *, lr: float = 0.1, local_steps: int = 20,
                             batch_size: int = 16, seed: int = 0) -> list[float]:
    """Plain numpy FedAvg over 100 Dirichlet(0.5) digit devices, 10 per round, sample-weighted."""
    split = datasets.load_digits_split(seed=seed)
    devices = datasets.make_device_data(split, 100, 0.5, seed)
    global_params = MLP.init(seed)
    rng = np.random.default_rng(seed)
    accuracy = []
    for r in range(rounds):
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_params.items()}
        weight = 0
        for c in rng.choice(len(devices), 10, replace=False):
            d = devices[int(c)]
            new, _, samples = train.train_local(
                MLP, global_params, d.x_train, d.y_train, lr=lr, local_steps=local_steps,
                batch_size=batch_size, seed=seed * 100_000 + r * 100 + int(c))
            for k in total:
                total[k] += samples * new[k]
            weight += samples
        global_params = {k: (v / weight).astype(np.float32) for k, v in total.items()}
        accuracy.append(train.evaluate(MLP, global_params, split.x_test, split.y_test).accuracy)
    return accuracy


def test_offline_fedavg_converges_on_non_iid_digits() -> None:
    # Measured: >= 0.85 by round 6-9 over seeds 0-4, 0.90-0.96 at round 30 (lr 0.1, 20 steps, batch 16).
    accuracy = fedavg_accuracy_by_round(15)
    assert max(accuracy) >= 0.85, accuracy
    assert accuracy[-1] >= 0.85, accuracy


def test_update_encoding_round_trips_with_protocol_metadata() -> None:
    from safetensors.numpy import load

    from fedscaled.device import client

    params = MLP.init(3)
    order = [name for name, _ in MLP.specs]
    body = client.encode_update(params, order, samples=17, loss=0.25, duration=1.5)
    decoded = load(body)
    assert sorted(decoded) == sorted(order)
    for name in order:
        np.testing.assert_array_equal(decoded[name], params[name])
    # The header's __metadata__ carries string values, as protocol.md asks.
    header_len = int.from_bytes(body[:8], "little")
    import json

    meta = json.loads(body[8:8 + header_len])["__metadata__"]
    assert meta == {"samples": "17", "loss": "0.25", "duration": "1.5"}


def test_retry_windows_backoff_and_error_bodies() -> None:
    from fedscaled.device import client

    c = client.DeviceClient.__new__(client.DeviceClient)  # Only the pure helpers are exercised.
    c.rng = random.Random(0)
    c.backoff_base, c.backoff_cap = 1.0, 60.0
    delays = [c.retry_window_delay({"min": 2, "max": 5}) for _ in range(200)]
    assert all(2 <= d <= 5 for d in delays) and max(delays) - min(delays) > 2
    assert all(0.5 <= c.backoff_delay(0) <= 1.0 for _ in range(50))
    assert all(30 <= c.backoff_delay(20) <= 60 for _ in range(50))
    err = client._protocol_error(409, b'{"error": {"code": "wrong_round", "message": "late"}}')
    assert err.code == "wrong_round" and err.code in client.DROP_TASK_CODES
    assert err.error_class.status == 409
    assert client._protocol_error(502, b"<html>").code == "http_502"
    assert client._retry_after_header("3") == 3.0 and client._retry_after_header("soon") is None
    state = client.DeviceState(num_samples=12).to_json()
    assert set(state) == {"battery", "charging", "idle", "unmetered", "free_storage_mb", "num_samples",
                          "backends"}
    assert state["backends"] == ["jax"]


def test_cli_help_mentions_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    from fedscaled.device import cli

    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    text = capsys.readouterr().out
    for option in ("--server", "--job", "--token", "--devices", "--dataset", "--alpha", "--seed",
                   "--input-shape", "--num-classes", "--dropout", "--slow", "--offline",
                   "--max-seconds", "--concurrency"):
        assert option in text
