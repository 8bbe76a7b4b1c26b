"""On-device training step: ms per train step of each prebuilt artifact in LiteRT and MNN, against JAX.

For every model of the prebuilt catalog, one train step (fixed batch, the artifact's batch size) is
timed in JAX (jitted, the baseline), in LiteRT running the .tflite and in MNN running train.mnn, all
on one thread of this CPU. The three are interleaved round by round so that machine noise hits them
alike; each figure is the median over rounds, with the spread (min-max) in the notes. Artifact sizes
are reported with them (docs/mobile.md).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from bench.common import Profile, Result
from fedscaled.artifacts import PREBUILT_DIR
from fedscaled.core import artifact_spec as spec
from fedscaled.core import steps
from fedscaled.device.litert_runner import LiteRTProgram
from fedscaled.device.mnn_runner import MNNProgram
from fedscaled.jobs.artifacts import Artifact, ArtifactCatalog
from fedscaled_build.catalog import PREBUILT


def _per_step(fn: Callable[[], object], steps_per_round: int) -> float:
    began = time.perf_counter()
    for _ in range(steps_per_round):
        fn()
    return (time.perf_counter() - began) * 1000.0 / steps_per_round


def _runners(key: spec.ArtifactKey, catalog: ArtifactCatalog
             ) -> tuple[dict[str, Callable[[], object]], dict[str, Artifact]]:
    """Zero-argument callables running one train step in JAX, LiteRT and MNN, and the artifacts."""
    model = key.model_def()
    prog = steps.programs(model)[steps.TRAIN]
    rng = np.random.default_rng(0)
    b = key.train_batch
    values: dict[str, np.ndarray] = {**model.init_frozen(0), **model.init(0)}
    values.update(x=rng.standard_normal((b, *model.input_shape)).astype(np.float32),
                  y=rng.integers(0, model.num_classes, b).astype(np.int32), mask=np.ones(b, np.float32),
                  lr=np.array(0.01, np.float32), wd=np.array(0.0, np.float32))
    feed = {n: values[n] for n in prog.input_names}
    jitted = jax.jit(prog.fn)
    args = [jax.numpy.asarray(v) for v in feed.values()]
    tflite = catalog.find(key, "tflite")
    mnn = catalog.find(key, "mnn")
    assert tflite is not None and mnn is not None, key.slug()
    litert = LiteRTProgram(tflite.files["model.tflite"])
    entry = json.loads(mnn.manifest)["programs"][steps.TRAIN]
    graph = MNNProgram(mnn.files[entry["file"]], [i["name"] for i in entry["inputs"]],
                       [o["name"] for o in entry["outputs"]])
    runners: dict[str, Callable[[], object]] = {
        "jax": lambda: jax.block_until_ready(jitted(*args)),  # type: ignore[no-untyped-call]
        "tflite": lambda: litert.run(steps.TRAIN, feed),
        "mnn": lambda: graph.run(feed),
    }
    return runners, {"tflite": tflite, "mnn": mnn}


def run(profile: Profile) -> list[Result]:
    """ms per train step for each prebuilt artifact and backend, with JAX as the baseline."""
    catalog = ArtifactCatalog([PREBUILT_DIR])
    keys = [k for k in PREBUILT if profile.name != "smoke" or k.model == "mlp"]
    per_round = 3 if profile.name == "smoke" else 20
    rounds = max(3, profile.repeats * 2) if profile.name != "smoke" else 1
    results: list[Result] = []
    for key in keys:
        model = key.model_def()
        runners, artifacts = _runners(key, catalog)
        for fn in runners.values():
            fn()  # warm caches and first-run allocations
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, fn in runners.items():
                times[name].append(_per_step(fn, per_round))
        base = statistics.median(times["jax"])
        for backend, artifact in artifacts.items():
            t = times[backend]
            results.append(Result(
                f"train step {key.slug()} {backend}", statistics.median(t), "ms", "JAX jitted step", base,
                lower_is_better=True,
                params={"model": key.model, "batch": key.train_batch,
                        "params": model.num_params + model.num_frozen_params,
                        "artifact_bytes": artifact.total_bytes, "rounds": rounds, "steps_per_round": per_round},
                notes=f"median of {rounds} rounds x {per_round} steps; spread {min(t):.2f}-{max(t):.2f} ms; "
                      f"JAX {min(times['jax']):.2f}-{max(times['jax']):.2f} ms; "
                      f"{artifact.total_bytes / 1024:.0f} KiB"))
    return results
