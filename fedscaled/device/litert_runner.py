"""Run a trainable ``.tflite`` (several named signatures, e.g. ``train``, ``test``, ``infer``) with LiteRT.

The reference device runtime's counterpart of the Android app's ``interpreter.getSignatureRunner(name)``:
inputs and outputs are addressed by their exact signature names (``"dense_0/kernel"``, ``"x"``, ``"lr"``),
shapes are fixed by the file (batch size included), and every output is returned as a fresh numpy copy.

Thread safety: one ``LiteRTProgram`` is NOT thread-safe. All signatures share one interpreter, and its
tensors are written and read in place, so calls (``run``) must not overlap; give each thread its own
instance or serialize calls with a lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as _schema
from ai_edge_litert.interpreter import Interpreter

__all__ = ["LiteRTProgram"]


def _declared_names(model: bytes) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Signature key -> (input names, output names) in the order of the exported function's arguments/results.

    Both the interpreter's signature list and the file's SignatureDef are sorted by name; the order of the
    signature's subgraph inputs/outputs is the exporter's order, so names are ordered by their tensor's place there.
    """
    buf = bytearray(model)
    root = _schema.Model.GetRootAs(buf, 0)
    result: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for i in range(root.SignatureDefsLength()):
        sd = root.SignatureDefs(i)
        sg = root.Subgraphs(sd.SubgraphIndex())
        in_pos = {int(t): k for k, t in enumerate(sg.InputsAsNumpy())} if sg.InputsLength() else {}
        out_pos = {int(t): k for k, t in enumerate(sg.OutputsAsNumpy())} if sg.OutputsLength() else {}
        ins = [(sd.Inputs(j).Name().decode("utf-8"), sd.Inputs(j).TensorIndex()) for j in range(sd.InputsLength())]
        outs = [(sd.Outputs(j).Name().decode("utf-8"), sd.Outputs(j).TensorIndex()) for j in range(sd.OutputsLength())]
        ins.sort(key=lambda nt: in_pos.get(nt[1], len(in_pos)))
        outs.sort(key=lambda nt: out_pos.get(nt[1], len(out_pos)))
        result[sd.SignatureKey().decode("utf-8")] = (tuple(n for n, _ in ins), tuple(n for n, _ in outs))
    return result


class _Spec:
    __slots__ = ("dtypes", "inputs", "outputs", "runner", "shapes")

    def __init__(self, runner: Any, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        self.runner = runner
        self.inputs = inputs
        self.outputs = outputs
        details = runner.get_input_details()
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(int(d) for d in details[n]["shape"]) for n in inputs}
        self.dtypes: dict[str, np.dtype[Any]] = {n: np.dtype(details[n]["dtype"]) for n in inputs}


class LiteRTProgram:
    """A loaded .tflite with named signatures.

    One interpreter is built at construction and one signature runner per signature is kept for the
    instance's lifetime. Not thread-safe: see the module docstring.
    """

    def __init__(self, model: bytes, num_threads: int = 1) -> None:
        if num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        self._model = bytes(model)  # the interpreter reads the buffer it is given for its whole lifetime
        self._interpreter = Interpreter(model_content=self._model, num_threads=num_threads)
        listed: dict[str, dict[str, list[str]]] = self._interpreter.get_signature_list()
        declared = _declared_names(self._model)
        if not listed:
            raise ValueError("the .tflite has no signatures")
        self._specs: dict[str, _Spec] = {}
        for key, io in listed.items():
            ins, outs = declared.get(key, (tuple(io["inputs"]), tuple(io["outputs"])))
            if set(ins) != set(io["inputs"]) or set(outs) != set(io["outputs"]):
                ins, outs = tuple(io["inputs"]), tuple(io["outputs"])
            self._specs[key] = _Spec(self._interpreter.get_signature_runner(key), ins, outs)

    def signatures(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Signature name -> (input names, output names), in the exported function's argument/result order."""
        return {k: (s.inputs, s.outputs) for k, s in self._specs.items()}

    def input_spec(self, signature: str) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
        """Input name -> (fixed shape, dtype) for one signature."""
        s = self._spec(signature)
        return {n: (s.shapes[n], s.dtypes[n]) for n in s.inputs}

    def run(self, signature: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one signature; every input must be given by name with the file's exact shape.

        Inputs are cast to the file's dtype when numpy's ``same_kind`` casting allows (e.g. a Python float
        for ``lr``, int64 labels); anything else raises ``TypeError``. Outputs are copies, never views into
        the interpreter's memory, so they stay valid across later calls.
        """
        s = self._spec(signature)
        missing = [n for n in s.inputs if n not in inputs]
        extra = [n for n in inputs if n not in s.shapes]
        if missing or extra:
            raise KeyError(f"signature {signature!r}: missing inputs {missing}, unknown inputs {extra}")
        feed: dict[str, np.ndarray] = {}
        for name in s.inputs:
            value = np.asarray(inputs[name])
            want = s.dtypes[name]
            if value.dtype != want:
                if not np.can_cast(value.dtype, want, casting="same_kind"):
                    raise TypeError(f"{signature}/{name!r}: dtype {value.dtype} cannot be fed as {want}")
                value = value.astype(want)
            if value.shape != s.shapes[name]:
                raise ValueError(f"{signature}/{name!r}: shape {value.shape}, the file expects {s.shapes[name]}")
            feed[name] = np.ascontiguousarray(value)
        raw: dict[str, np.ndarray] = s.runner(**feed)
        return {name: np.array(raw[name], copy=True) for name in s.outputs}

    def _spec(self, signature: str) -> _Spec:
        try:
            return self._specs[signature]
        except KeyError:
            raise KeyError(f"no signature {signature!r}; the file has {sorted(self._specs)}") from None
