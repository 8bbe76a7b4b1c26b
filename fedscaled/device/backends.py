"""How the reference device trains and tests: with JAX, or through a downloaded artifact (LiteRT, MNN).

A :class:`Backend` trains a model from given weights on local data and evaluates it. Every backend
follows the same plan, so that a job's devices do the same work whatever engine they embed:
minibatches from shuffled passes without replacement (``train.batch_plan``), a short batch padded to
the artifact's fixed batch size with mask-0 rows, SGD with weight decay as fedscaled/core/steps.py
defines it (plus FedProx's proximal term when a task sets ``proxy_mu``: ``train.proximal_step``, applied
after each step), and test counts summed over the real rows.

:class:`ArtifactBackend` is what an Android app does with the same files: load the artifact, feed
weights and a batch by input name, read ``new:NAME`` outputs back as the next weights.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from fedscaled.core import steps
from fedscaled.core.models import ModelDef
from fedscaled.device import train
from fedscaled.device.train import NumpyParams, TestCounts

# Engines of the reference runtime, by the name a device announces at check-in.
BACKEND_NAMES = ("jax", "tflite", "mnn")


class Backend(Protocol):
    """Local training and evaluation of one model."""

    name: str

    def train(self, frozen: NumpyParams, params: NumpyParams, x: np.ndarray, y: np.ndarray, *, lr: float,
              local_steps: int, batch_size: int, epochs: int = 0, weight_decay: float = 0.0, seed: int = 0,
              proxy_mu: float = 0.0, w_global: NumpyParams | None = None) -> tuple[NumpyParams, float, int]:
        """(new trainable weights, mean minibatch loss, samples used), as train.train_local.

        ``proxy_mu`` > 0 makes every step FedProx's (``train.proximal_step``): pulled toward
        ``w_global``, by default ``params``, the model the task started from.
        """

    def evaluate(self, frozen: NumpyParams, params: NumpyParams, x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> TestCounts:
        """Test counts and loss sum over ``(x, y)``."""


class JaxBackend:
    """The reference trainer (fedscaled/device/train.py), jitted once per model."""

    name = "jax"

    def __init__(self, model: ModelDef) -> None:
        self.model = model

    def train(self, frozen: NumpyParams, params: NumpyParams, x: np.ndarray, y: np.ndarray, *, lr: float,
              local_steps: int, batch_size: int, epochs: int = 0, weight_decay: float = 0.0, seed: int = 0,
              proxy_mu: float = 0.0, w_global: NumpyParams | None = None) -> tuple[NumpyParams, float, int]:
        """See :class:`Backend`."""
        return train.train_local(self.model, params, x, y, lr=lr, local_steps=local_steps, batch_size=batch_size,
                                 epochs=epochs, weight_decay=weight_decay, seed=seed, frozen=frozen,
                                 proxy_mu=proxy_mu, w_global=w_global)

    def evaluate(self, frozen: NumpyParams, params: NumpyParams, x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> TestCounts:
        """See :class:`Backend`."""
        return train.evaluate(self.model, params, x, y, batch_size=batch_size, frozen=frozen)


# program name, inputs -> outputs
RunFn = Callable[[str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def _load_programs(backend: str, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> RunFn:
    """A function running the manifest's programs with LiteRT or MNN."""
    programs = manifest["programs"]
    if backend == "tflite":
        from fedscaled.device.litert_runner import LiteRTProgram

        # Usually one file holds every signature; load each distinct file once.
        by_file = {entry["file"]: LiteRTProgram(files[entry["file"]]) for entry in programs.values()}

        def run_tflite(name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            entry = programs[name]
            return by_file[entry["file"]].run(str(entry["signature"]), inputs)

        return run_tflite
    if backend == "mnn":
        from fedscaled.device.mnn_runner import MNNProgram

        graphs = {name: MNNProgram(files[entry["file"]], [i["name"] for i in entry["inputs"]],
                                   [o["name"] for o in entry["outputs"]]) for name, entry in programs.items()}

        def run_mnn(name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return graphs[name].run(inputs)

        return run_mnn
    raise ValueError(f"unknown artifact backend {backend!r}")


class ArtifactBackend:
    """Training and testing through an artifact's programs, as a phone runs them.

    One instance may be shared by many simulated devices: runs are serialized by a lock (LiteRT
    interpreters and MNN modules are not thread-safe).
    """

    def __init__(self, model: ModelDef, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> None:
        self.model = model
        self.name = str(manifest["backend"])
        self.manifest = manifest
        self.train_batch = int(manifest["programs"][steps.TRAIN]["batch_size"])
        self.test_batch = int(manifest["programs"][steps.TEST]["batch_size"])
        self._run = _load_programs(self.name, manifest, files)
        self._lock = threading.Lock()
        self.frozen_names, self.names = steps.tensor_names(model)

    def run(self, program: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one program (train, test, infer) by input name."""
        with self._lock:
            return self._run(program, inputs)

    def train(self, frozen: NumpyParams, params: NumpyParams, x: np.ndarray, y: np.ndarray, *, lr: float,
              local_steps: int, batch_size: int, epochs: int = 0, weight_decay: float = 0.0, seed: int = 0,
              proxy_mu: float = 0.0, w_global: NumpyParams | None = None) -> tuple[NumpyParams, float, int]:
        """See :class:`Backend`. ``batch_size`` must be the artifact's (the daemon picks artifacts by it)."""
        if batch_size != self.train_batch:
            raise ValueError(f"task batch size {batch_size} differs from the artifact's {self.train_batch}")
        n = int(y.shape[0])
        if n == 0:
            raise ValueError("no local training samples")
        b = self.train_batch
        total_steps = epochs * math.ceil(n / b) if epochs > 0 else local_steps
        if total_steps < 1:
            raise ValueError("need local_steps >= 1 or epochs >= 1")
        plan = train.batch_plan(n, b, total_steps, np.random.default_rng(seed))
        weights = {name: np.asarray(params[name], np.float32) for name in self.names}
        # FedProx's anchor: the task's starting weights themselves (no copy: steps never write into them).
        anchor = weights if w_global is None else {name: np.asarray(w_global[name], np.float32)
                                                   for name in self.names}
        fixed = {name: np.asarray(frozen[name], np.float32) for name in self.frozen_names}
        lr_in, wd_in = np.array(lr, np.float32), np.array(weight_decay, np.float32)
        xb = np.zeros((b, *x.shape[1:]), np.float32)
        yb = np.zeros((b,), np.int32)
        mb = np.zeros((b,), np.float32)
        loss_sum = 0.0
        for idx in plan:
            xb[:] = 0.0
            yb[:] = 0
            mb[:] = 0.0
            xb[:len(idx)] = x[idx]
            yb[:len(idx)] = y[idx]
            mb[:len(idx)] = 1.0
            out = self.run(steps.TRAIN, {**fixed, **weights, "x": xb, "y": yb, "mask": mb, "lr": lr_in, "wd": wd_in})
            # The graph's step is plain SGD at ``weights``: the proximal term's gradient is added after it.
            weights = train.proximal_step({name: out[steps.NEW_PREFIX + name] for name in self.names}, weights,
                                          anchor, lr, proxy_mu)
            loss_sum += float(out[steps.LOSS_OUTPUT])
        samples_used = n if epochs > 0 else min(n, total_steps * b)
        return weights, loss_sum / len(plan), samples_used

    def evaluate(self, frozen: NumpyParams, params: NumpyParams, x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> TestCounts:
        """See :class:`Backend`; batches have the artifact's test batch size whatever ``batch_size`` says."""
        n = int(y.shape[0])
        if n == 0:
            return TestCounts(0, 0, 0, 0.0)
        b = self.test_batch
        weights = {**{k: np.asarray(frozen[k], np.float32) for k in self.frozen_names},
                   **{k: np.asarray(params[k], np.float32) for k in self.names}}
        top1 = top5 = 0.0
        loss_sum = 0.0
        for start in range(0, n, b):
            m = min(b, n - start)
            xb = np.zeros((b, *x.shape[1:]), np.float32)
            yb = np.zeros((b,), np.int32)
            mb = np.zeros((b,), np.float32)
            xb[:m] = x[start:start + m]
            yb[:m] = y[start:start + m]
            mb[:m] = 1.0
            out = self.run(steps.TEST, {**weights, "x": xb, "y": yb, "mask": mb})
            loss_sum += float(out["loss_sum"])
            top1 += float(out["correct_top1"])
            top5 += float(out["correct_top5"])
        return TestCounts(n, round(top1), round(top5), loss_sum)
