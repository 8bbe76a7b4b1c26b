"""Build on-device artifacts: ``python -m fedscaled_build [JOBFILE …] [--prebuilt] --out DIR``.

For each job file (FedScale format) or, with ``--prebuilt``, each entry of catalog.PREBUILT, lowers
the model's train, test and infer programs (fedscaled/core/steps.py) to a .tflite (litert-converter)
and to .mnn files (jax2onnx → MNN's ONNX frontend), runs each with LiteRT and MNN against JAX on a
random batch, and writes DIR/<slug>/<backend>/{manifest.json, files} only when they agree.

Runs in the build environment (scripts/build-artifacts.sh), never inside the daemon.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from fedscaled.core import artifact_spec as spec
from fedscaled.core import steps
from fedscaled.core.config import parse_job_text
from fedscaled.core.models import ModelDef
from fedscaled_build.catalog import PREBUILT
from fedscaled_build.signature import Signature

# A converted program must reproduce JAX to within float32 rounding noise: a wrong gradient differs
# by the size of the update (1e-3 … 1e-1), rounding by 1e-7 … 1e-6 relative.
AGREEMENT_ATOL = 1e-5


def _signatures(model: ModelDef, key: spec.ArtifactKey) -> list[Signature]:
    return [Signature(p.name, p.fn, steps.input_shapes(model, p.name, key.batch(p.name)), p.input_names,
                      p.output_names) for p in steps.programs(model).values()]


def sample_inputs(model: ModelDef, key: spec.ArtifactKey, program: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights and a random batch (last row masked out) for one program."""
    rng = np.random.default_rng(seed)
    b = key.batch(program)
    inputs: dict[str, np.ndarray] = {**model.init_frozen(seed), **model.init(seed)}
    inputs["x"] = rng.standard_normal((b, *model.input_shape)).astype(np.float32)
    inputs["y"] = rng.integers(0, model.num_classes, b).astype(np.int32)
    mask = np.ones(b, np.float32)
    mask[-1] = 0.0
    inputs["mask"] = mask
    inputs["lr"] = np.array(0.1, np.float32)
    inputs["wd"] = np.array(1e-4, np.float32)
    return inputs


def _max_diff(sig: Signature, inputs: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    import jax

    ref = jax.jit(sig.fn)(*(inputs[n] for n in sig.input_names))
    return max(float(np.max(np.abs(np.asarray(r) - got[n]))) for n, r in zip(sig.output_names, ref, strict=True))


def build_tflite(model: ModelDef, key: spec.ArtifactKey) -> tuple[dict[str, bytes], dict[str, str]]:
    """The .tflite of a key, checked against JAX."""
    from fedscaled.device.litert_runner import LiteRTProgram
    from fedscaled_build.tflite import export_tflite, non_builtin_ops

    sigs = _signatures(model, key)
    data = export_tflite(sigs)
    bad = non_builtin_ops(data)
    if bad:
        raise RuntimeError(f"{key.slug()}: non-builtin ops {bad}")
    program = LiteRTProgram(data)
    for sig in sigs:
        inputs = sample_inputs(model, key, sig.name)
        diff = _max_diff(sig, inputs, program.run(sig.name, {n: inputs[n] for n in sig.input_names}))
        if diff > AGREEMENT_ATOL:
            raise RuntimeError(f"{key.slug()}: tflite {sig.name} differs from JAX by {diff:g}")
    return {"model.tflite": data}, {s.name: "model.tflite" for s in sigs}


def build_mnn(model: ModelDef, key: spec.ArtifactKey) -> tuple[dict[str, bytes], dict[str, str]]:
    """One .mnn per program, checked against JAX."""
    from fedscaled.device.mnn_runner import MNNProgram
    from fedscaled_build.mnn import export_mnn

    files: dict[str, bytes] = {}
    for sig in _signatures(model, key):
        data = export_mnn(sig)
        program = MNNProgram(data, sig.input_names, sig.output_names)
        inputs = sample_inputs(model, key, sig.name)
        diff = _max_diff(sig, inputs, program.run({n: inputs[n] for n in sig.input_names}))
        if diff > AGREEMENT_ATOL:
            raise RuntimeError(f"{key.slug()}: mnn {sig.name} differs from JAX by {diff:g}")
        files[f"{sig.name}.mnn"] = data
    return files, {name: f"{name}.mnn" for name in (steps.TRAIN, steps.TEST, steps.INFER)}


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    return {n: metadata.version(n) for n in names}


BUILDERS = {
    "tflite": (build_tflite, ("jax", "litert-converter", "ai-edge-litert")),
    "mnn": (build_mnn, ("jax", "jax2onnx", "onnx", "MNN")),
}


def build_key(key: spec.ArtifactKey, out: Path, backends: tuple[str, ...], force: bool) -> None:
    """Build, verify and write one key's artifacts."""
    model = key.model_def()
    for backend in backends:
        target = out / key.slug() / backend
        if (target / spec.MANIFEST).exists() and not force:
            print(f"{key.slug()} {backend}: present (use --force to rebuild)", flush=True)
            continue
        started = time.monotonic()
        builder, packages = BUILDERS[backend]
        files, program_files = builder(model, key)
        manifest = spec.make_manifest(key, backend, files, program_files, _versions(packages))
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)
        (target / spec.MANIFEST).write_bytes(spec.manifest_bytes(manifest))
        size = sum(len(d) for d in files.values())
        print(f"{key.slug()} {backend}: {size} bytes in {time.monotonic() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m fedscaled_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("jobfiles", nargs="*", type=Path, help="FedScale-format job files to build artifacts for")
    parser.add_argument("--prebuilt", action="store_true", help="build every entry of fedscaled_build/catalog.py")
    parser.add_argument("--out", type=Path, required=True, help="output folder (the daemon's artifact dir, or "
                        "fedscaled/artifacts/prebuilt for the package)")
    parser.add_argument("--backend", action="append", choices=spec.BACKENDS, help="only this backend (repeatable)")
    parser.add_argument("--force", action="store_true", help="rebuild artifacts that are present")
    parser.add_argument("--only", help="with --prebuilt: only keys whose slug contains this text")
    args = parser.parse_args(argv)
    keys = [spec.key_of(parse_job_text(path.read_text())) for path in args.jobfiles]
    if args.prebuilt:
        keys += [k for k in PREBUILT if not args.only or args.only in k.slug()]
    if not keys:
        parser.error("name job files or --prebuilt")
    backends = tuple(args.backend or spec.BACKENDS)
    for key in sorted(set(keys)):
        build_key(key, args.out, backends, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
