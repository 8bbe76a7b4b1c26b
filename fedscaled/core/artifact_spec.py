"""On-device artifacts: what identifies one, and the manifest that describes it to a device.

An artifact is the trainable program of one model for one backend (``tflite``: one .tflite with the
signatures train, test and infer; ``mnn``: one .mnn per program). Its graph has fixed shapes, so it
is identified by everything that fixes them: the model, input shape, class count, width multiplier
and the train and test batch sizes (:class:`ArtifactKey`). Weights are inputs and outputs of the
programs, so one artifact serves every round of every job with that key.

The manifest (JSON, beside the files) is the contract with a device: files and their SHA-256, each
program's file, signature, batch size and its inputs and outputs in order with shapes and dtypes,
the tensor names and shapes (equal to the safetensors files on the wire), the data layout and the
optimizer step the train program implements. Pure logic: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from fedscaled.core import steps
from fedscaled.core.models import ModelDef, build

FORMAT = "fedscaled-artifact/1"
BACKENDS = ("tflite", "mnn")
# Backends a device may announce that need no artifact, because they build the model from its
# description themselves: "jax" (the Python reference runtime, every zoo model) and "java" (the Android
# SDK's plain-Java trainer, the dense models only; sdk/android).
NATIVE_BACKENDS = ("jax", "java")
JAVA_MODELS = ("linear", "mlp")


def native_backends(model: str) -> tuple[str, ...]:
    """The artifact-free backends that can train ``model``."""
    return ("jax", "java") if model in JAVA_MODELS else ("jax",)
MANIFEST = "manifest.json"
FILE_NAME_RE = re.compile(r"[a-z0-9_]{1,32}\.(tflite|mnn)")
LAYOUT = {
    "x": "float32 (batch, *input_shape); images NHWC (height, width, channels), the values the device's own "
         "preprocessing produces",
    "y": "int32 (batch,) class index in [0, num_classes)",
    "mask": "float32 (batch,): 1 for a real sample, 0 for padding (a short last batch is padded to the batch size)",
    "lr": "float32 scalar learning rate",
    "wd": "float32 scalar L2 weight decay",
    "weights": "float32, named and shaped as the model's tensors; frozen tensors first, then trainable ones, in "
               "the manifest's order",
    "outputs": f"train returns '{steps.NEW_PREFIX}NAME' for each trainable tensor, then 'loss' (the masked mean); "
               "test returns loss_sum, correct_top1, correct_top5 (float32 sums over the masked rows); "
               "infer returns logits",
}


@dataclass(frozen=True, order=True)
class ArtifactKey:
    """Everything that fixes an artifact's graph."""

    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    width_multiplier: float
    train_batch: int
    test_batch: int

    def slug(self) -> str:
        """A directory name: ``mlp-8x8x1-c10-w1-b16-t32``."""
        shape = "x".join(str(d) for d in self.input_shape)
        return (f"{self.model}-{shape}-c{self.num_classes}-w{self.width_multiplier:g}-b{self.train_batch}"
                f"-t{self.test_batch}")

    def model_def(self) -> ModelDef:
        """The zoo model this key builds."""
        return build(self.model, self.input_shape, self.num_classes, self.width_multiplier)

    def batch(self, program: str) -> int:
        """The fixed batch size of a program (train: the job's batch_size; test and infer: test_bsz)."""
        return self.train_batch if program == steps.TRAIN else self.test_batch


def key_of(values: Any) -> ArtifactKey:
    """The artifact key of a job config (anything indexable by job key)."""
    return ArtifactKey(str(values["model"]), tuple(int(d) for d in values["input_shape"]), int(values["num_classes"]),
                       float(values["width_multiplier"]), int(values["batch_size"]), int(values["test_bsz"]))


def _tensor_list(specs: tuple[tuple[str, tuple[int, ...]], ...]) -> list[dict[str, Any]]:
    return [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in specs]


def program_io(key: ArtifactKey, program: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The inputs and outputs of a program, in order, with shapes and dtypes."""
    model = key.model_def()
    prog = steps.programs(model)[program]
    shapes = steps.input_shapes(model, program, key.batch(program))
    inputs = [{"name": n, "shape": list(s.shape), "dtype": str(s.dtype)} for n, s in zip(prog.input_names, shapes,
                                                                                        strict=True)]
    trainable = dict(model.specs)
    outputs: list[dict[str, Any]] = []
    for name in prog.output_names:
        if name.startswith(steps.NEW_PREFIX):
            shape = list(trainable[name[len(steps.NEW_PREFIX):]])
        elif name == steps.LOGITS_OUTPUT:
            shape = [key.batch(program), model.num_classes]
        else:
            shape = []
        outputs.append({"name": name, "shape": shape, "dtype": "float32"})
    return inputs, outputs


def make_manifest(key: ArtifactKey, backend: str, files: dict[str, bytes], program_files: dict[str, str],
                  built_with: dict[str, str]) -> dict[str, Any]:
    """The manifest of an artifact whose ``files`` (name → bytes) hold the programs as ``program_files`` says."""
    model = key.model_def()
    programs: dict[str, Any] = {}
    for program in (steps.TRAIN, steps.TEST, steps.INFER):
        inputs, outputs = program_io(key, program)
        programs[program] = {"file": program_files[program], "signature": program if backend == "tflite" else None,
                             "batch_size": key.batch(program), "inputs": inputs, "outputs": outputs}
    return {
        "format": FORMAT,
        "backend": backend,
        "model": key.model,
        "input_shape": list(key.input_shape),
        "num_classes": key.num_classes,
        "width_multiplier": key.width_multiplier,
        "files": [{"name": n, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for n, data in sorted(files.items())],
        "programs": programs,
        "tensors": _tensor_list(model.specs),
        "frozen_tensors": _tensor_list(model.frozen_specs),
        "layout": LAYOUT,
        "optimizer": steps.OPTIMIZER,
        "built_with": built_with,
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical serialisation (sorted keys): its SHA-256 is the artifact's identity."""
    return json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n"


def check_manifest(manifest: Any, key: ArtifactKey, backend: str) -> list[str]:
    """Problems that make a manifest unusable for ``key`` and ``backend`` (empty when it fits)."""
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("backend") != backend:
        problems.append(f"backend {manifest.get('backend')!r}, expected {backend!r}")
    for program in (steps.TRAIN, steps.TEST, steps.INFER):
        try:
            expected_in, expected_out = program_io(key, program)
            entry = manifest["programs"][program]
            if entry["inputs"] != expected_in or entry["outputs"] != expected_out:
                problems.append(f"program {program}: inputs or outputs differ from the model's")
        except (KeyError, TypeError):
            problems.append(f"program {program} missing or malformed")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and FILE_NAME_RE.fullmatch(str(f.get("name")))
                                             for f in files):
        problems.append("files missing or with bad names")
    return problems
