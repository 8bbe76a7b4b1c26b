"""Run one exported .mnn graph (a train, test or infer step) by input and output name.

Uses MNN's module API (``MNN.nn.load_module_from_file``): it takes the graph's input and output names
directly, reports each input's shape and dtype (checked here before running), and returns every output
as an expression to read. MNN can fail silently (zeros, garbage) on graphs it does not support: compare an
exported program against its JAX source before shipping it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import MNN
import numpy as np

__all__ = ["MNNProgram"]

_F: Any = MNN.expr
_NN: Any = MNN.nn


def _numpy_dtype(mnn_dtype: Any) -> np.dtype[Any]:
    if mnn_dtype == _F.float:
        return np.dtype(np.float32)
    if mnn_dtype == _F.int:
        return np.dtype(np.int32)
    raise ValueError(f"unsupported MNN input dtype {mnn_dtype}")


class MNNProgram:
    """One .mnn graph with named inputs and outputs."""

    def __init__(
        self, model: bytes, input_names: Sequence[str], output_names: Sequence[str], num_threads: int = 1
    ) -> None:
        if not model:
            raise ValueError("empty MNN model")
        if len(set(input_names)) != len(input_names) or len(set(output_names)) != len(output_names):
            raise ValueError("input and output names must be unique")
        self.input_names: tuple[str, ...] = tuple(input_names)
        self.output_names: tuple[str, ...] = tuple(output_names)
        # The module API loads from a path only; MNN reads the whole file while loading.
        fd, path = tempfile.mkstemp(suffix=".mnn", prefix="fedscaled-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model)
            self._module: Any = _NN.load_module_from_file(
                path, list(self.input_names), list(self.output_names), thread_num=int(num_threads)
            )
        finally:
            os.unlink(path)
        if self._module is None:
            raise ValueError("MNN could not load the model")
        info = self._module.get_info()
        got_in = tuple(info.get("inputNames", ()))
        got_out = tuple(info.get("outputNames", ()))
        if got_in != self.input_names or got_out != self.output_names:
            raise ValueError(
                f"model is named {got_in} -> {got_out}, expected {self.input_names} -> {self.output_names}"
            )
        self._specs: tuple[tuple[tuple[int, ...], np.dtype[Any], Any], ...] = tuple(
            (tuple(int(d) for d in v.shape), _numpy_dtype(v.dtype), v.dtype) for v in info["inputs"]
        )

    def input_spec(self, name: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
        """The shape and dtype the graph expects for input ``name``."""
        shape, dtype, _ = self._specs[self.input_names.index(name)]
        return shape, dtype

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once; returns a fresh numpy array per output name."""
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise KeyError(f"missing inputs {missing}, unknown inputs {extra}")
        args = []
        for name, (shape, dtype, mnn_dtype) in zip(self.input_names, self._specs, strict=True):
            arr = np.asarray(inputs[name])
            if arr.shape != shape:
                raise ValueError(f"input {name!r}: shape {arr.shape}, graph expects {shape}")
            if arr.dtype.kind != dtype.kind:
                raise TypeError(f"input {name!r}: dtype {arr.dtype}, graph expects {dtype}")
            arr = np.ascontiguousarray(arr, dtype=dtype)
            args.append(_F.const(arr, list(shape), _F.NCHW, mnn_dtype))
        outs = self._module.forward(args)
        if outs is None or len(outs) != len(self.output_names):
            raise RuntimeError(
                f"MNN returned {0 if outs is None else len(outs)} outputs, expected {len(self.output_names)}"
            )
        result: dict[str, np.ndarray] = {}
        for name, var in zip(self.output_names, outs, strict=True):
            if var.data_format == _F.NC4HW4:
                var = _F.convert(var, _F.NCHW)
            result[name] = np.array(var.read(), copy=True)
        return result
