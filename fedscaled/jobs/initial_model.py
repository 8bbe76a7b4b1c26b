"""A new job's model version 0 and its frozen tensors: the zoo's initialisation or ``pretrained`` weights.

``pretrained`` names a safetensors file on the daemon's machine or ``job:NAME``, the latest model of a
job in this store (with that job's frozen tensors, if it had any). A tensor is taken from it when its
name is there with the same shape; a trainable tensor that is absent or shaped differently (a new
head for another class count) starts from the zoo's initialisation, and the job log says which. A
model's frozen tensors must all come from ``pretrained``: there is no network to fetch them from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from fedscaled.core import codec
from fedscaled.core.config import JobConfig
from fedscaled.core.models import ModelDef, TensorSpec, build
from fedscaled.errors import InvalidConfig
from fedscaled.store import layout
from fedscaled.store.lmdb_store import Store

JOB_PREFIX = "job:"
# Largest pretrained file read at submit; far above any zoo model (MobileNetV3-Small at width 2 is ~15 MB).
MAX_PRETRAINED_BYTES = 512 << 20
# The name of a job's frozen tensors in the models database (layout.frozen_key builds the key).
FROZEN_KEY = layout.FROZEN
# Default of the daemon option max_model_params: 50 M float32 parameters (200 MB a version) is far above
# any phone model and keeps one job from taking the daemon's memory and disk.
DEFAULT_MAX_MODEL_PARAMS = 50_000_000


@dataclass(frozen=True)
class InitialModel:
    """Version 0 of a job's model and its frozen tensors (safetensors bytes), with notes for the job log."""

    model_bytes: bytes
    frozen_bytes: bytes | None
    notes: tuple[str, ...]


def model_of(config: JobConfig) -> ModelDef:
    """The zoo model a job trains."""
    return build(config["model"], config["input_shape"], config["num_classes"], config["width_multiplier"])


def _fail(message: str) -> InvalidConfig:
    return InvalidConfig(message, key="pretrained")


def _decode(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # the library raises its own error types for every malformed file
        raise _fail(f"pretrained {where} is not a safetensors file ({exc})") from None
    return {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items() if t.dtype in (np.float32,)}


def _read_source(reference: str, store: Store) -> dict[str, np.ndarray]:
    if reference.startswith(JOB_PREFIX):
        source = reference[len(JOB_PREFIX):]
        record = store.get_json(layout.JOBS_DB, layout.job_key(source))
        if record is None:
            raise _fail(f"pretrained names job {source!r}, which does not exist")
        data = store.get(layout.MODELS_DB, layout.model_key(source, int(record["model_version"])))
        if data is None:
            raise _fail(f"job {source!r} has no stored model version {record['model_version']}")
        tensors = _decode(data, f"model of job {source}")
        frozen = store.get(layout.MODELS_DB, layout.frozen_key(source))
        if frozen is not None:
            tensors.update(_decode(frozen, f"frozen tensors of job {source}"))
        return tensors
    path = Path(reference).expanduser()
    try:
        size = path.stat().st_size
        if size > MAX_PRETRAINED_BYTES:
            raise _fail(f"pretrained file {reference} is {size} bytes, more than {MAX_PRETRAINED_BYTES}")
        return _decode(path.read_bytes(), f"file {reference}")
    except OSError as exc:
        raise _fail(f"cannot read pretrained file {reference}: {exc.strerror}") from None


def _pick(source: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...], fallback: Mapping[str, np.ndarray],
          frozen: bool, notes: list[str]) -> dict[str, np.ndarray]:
    chosen: dict[str, np.ndarray] = {}
    fresh: list[str] = []
    for name, shape in specs:
        tensor = source.get(name)
        if tensor is not None and tuple(tensor.shape) == tuple(shape):
            if not np.all(np.isfinite(tensor)):
                raise _fail(f"pretrained tensor {name} holds NaN or Inf")
            chosen[name] = tensor
            continue
        if frozen:
            got = "is missing" if tensor is None else f"has shape {list(tensor.shape)}, not {list(shape)}"
            raise _fail(f"pretrained tensor {name} (frozen) {got}")
        chosen[name] = fallback[name]
        fresh.append(name)
    if fresh and source:
        notes.append(f"{len(fresh)} trainable tensors not in pretrained start from the zoo's initialisation: "
                     + ", ".join(fresh[:8]) + (" …" if len(fresh) > 8 else ""))
    return chosen


def initial_model(config: JobConfig, store: Store, max_params: int = DEFAULT_MAX_MODEL_PARAMS) -> InitialModel:
    """The job's version-0 model and frozen tensors. Raises InvalidConfig (key model or pretrained).

    The model's size is checked against ``max_params`` from its tensor shapes alone, before any weight
    is allocated.
    """
    try:
        model = model_of(config)
    except ValueError as exc:  # e.g. cnn with an input too small to pool twice
        raise InvalidConfig(f"model {config['model']}: {exc}", key="model") from None
    size = model.num_params + model.num_frozen_params
    if size > max_params:
        raise InvalidConfig(f"model {model.name} for input {list(model.input_shape)} and {model.num_classes} classes "
                            f"has {size:,} parameters, above this daemon's max_model_params ({max_params:,})",
                            key="model")
    seed = int(config["sample_seed"])
    reference = str(config["pretrained"]).strip()
    if model.frozen_specs and not reference:
        raise _fail(f"model {model.name} trains only its head: set pretrained to a safetensors file or job:NAME "
                    f"holding its feature extractor ({len(model.frozen_specs)} tensors, e.g. "
                    f"{model.frozen_specs[0][0]})")
    source = _read_source(reference, store) if reference else {}
    notes: list[str] = []
    if reference:
        notes.append(f"Initial weights from pretrained {reference}")
    trainable = _pick(source, model.specs, model.init(seed), False, notes)
    model_bytes = codec.encode_model(codec.flatten(trainable, model.specs), model.specs)
    frozen_bytes = None
    if model.frozen_specs:
        frozen = _pick(source, model.frozen_specs, {}, True, notes)
        frozen_bytes = codec.encode_model(codec.flatten(frozen, model.frozen_specs), model.frozen_specs)
    return InitialModel(model_bytes, frozen_bytes, tuple(notes))
