"""Write fixtures that pin the Android plain-Java trainer to the JAX step (and safetensors to the Python codec).

Usage: python export_step_fixture.py OUT_DIR

For ``linear`` and ``mlp`` it writes ``step_<model>.safetensors`` with the model's weights, a batch
(``x``, ``y`` as float32 class indices, ``mask`` with padding rows), ``lr`` and ``wd`` scalars, the
outputs of one JAX train step (``programs(model)["train"].fn`` under ``jax.jit``: ``new:<name>`` and
``loss``) and of the test program on the same batch (``loss_sum``, ``correct_top1``, ``correct_top5``).
The metadata names the model, its input shape and class count. It also writes ``codec.safetensors``
(odd shapes and metadata, written by ``safetensors.numpy.save``) for the codec round trip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from fedscaled.core import steps
from fedscaled.core.models import build

CASES = (
    # model, input shape, classes, batch, real rows, lr, wd, seed
    ("linear", (4, 4, 1), 5, 8, 6, 0.5, 0.01, 1),
    ("mlp", (8, 8, 1), 10, 16, 11, 0.3, 0.001, 2),
)


def write_case(out: Path, model_name: str, shape: tuple[int, ...], classes: int, batch: int, real: int,
               lr: float, wd: float, seed: int) -> None:
    """One step fixture."""
    model = build(model_name, shape, classes, 1.0)
    params = model.init(seed)
    rng = np.random.default_rng(seed + 100)
    # Perturb the zero biases so that their gradient path is exercised from non-zero values.
    params = {k: (v + rng.normal(0.0, 0.1, v.shape)).astype(np.float32) for k, v in params.items()}
    x = rng.uniform(0.0, 1.0, size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=batch).astype(np.int32)
    mask = np.zeros(batch, np.float32)
    mask[:real] = 1.0
    x[real:] = 0.0
    y[real:] = 0
    names = [n for n, _ in model.specs]
    programs = steps.programs(model)
    train = jax.jit(programs[steps.TRAIN].fn)
    test = jax.jit(programs[steps.TEST].fn)
    outs = train(*(params[n] for n in names), x, y, mask, np.float32(lr), np.float32(wd))
    loss_sum, top1, top5 = test(*(params[n] for n in names), x, y, mask)
    tensors: dict[str, np.ndarray] = {n: params[n] for n in names}
    tensors.update({"x": x, "y": y.astype(np.float32), "mask": mask,
                    "lr": np.array(lr, np.float32), "wd": np.array(wd, np.float32)})
    for name, value in zip(programs[steps.TRAIN].output_names, outs, strict=True):
        tensors[name] = np.asarray(value, np.float32)
    tensors.update({"loss_sum": np.asarray(loss_sum, np.float32), "correct_top1": np.asarray(top1, np.float32),
                    "correct_top5": np.asarray(top5, np.float32)})
    meta = {"model": model_name, "input_shape": " ".join(map(str, shape)), "num_classes": str(classes),
            "tensors": ",".join(names)}
    save_file(tensors, str(out / f"step_{model_name}.safetensors"), metadata=meta)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        write_case(out, *case)
    codec = {"scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 3), np.float32),
             "cube": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7.0,
             "a/b.c": np.array([1e-30, -0.0, 3.4e38, -1.5], np.float32)}
    save_file(codec, str(out / "codec.safetensors"), metadata={"samples": "12", "note": "ünïcode \"quoted\""})
    print(f"wrote step fixtures for {', '.join(c[0] for c in CASES)} and codec.safetensors to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
