"""Export a :class:`Signature` to ONNX (jax2onnx) and to MNN (MNN's compiled ONNX frontend).

Build-time only: needs ``jax2onnx`` (0.17.1), ``onnx`` and ``MNN`` (3.6.1) in the build environment.

Naming: graph inputs carry ``sig.input_names`` exactly and graph outputs carry ``sig.output_names`` exactly,
'/' included -- except that an ONNX graph is in SSA form and cannot define a value twice, so an output whose
name equals an input name (a train step's new weights) is exported as ``"new:" + name``
(:data:`NEW_PREFIX`). :func:`graph_output_names` gives the names the files really use; feed those to
``fedscaled.device.mnn_runner.MNNProgram``.

Never import ``MNN.tools.mnnconvert`` or run the ``mnnconvert`` console script: that wrapper pip-installs a
telemetry SDK and uploads machine ids. The compiled converter (``_tools.mnnconvert``) is called directly.
"""

from __future__ import annotations

import os
import tempfile

import onnx

from fedscaled_build.signature import Signature

__all__ = ["NEW_PREFIX", "OPSET", "export_mnn", "export_onnx", "graph_output_names"]

OPSET = 17
NEW_PREFIX = "new:"


def graph_output_names(sig: Signature) -> tuple[str, ...]:
    """The output names the exported graph uses: ``sig.output_names``, with ``NEW_PREFIX`` on input clashes."""
    inputs = set(sig.input_names)
    names = tuple(NEW_PREFIX + n if n in inputs else n for n in sig.output_names)
    if len(set(names)) != len(names) or inputs & set(names):
        raise ValueError(f"{sig.name}: output names {names} are not unique against inputs {sig.input_names}")
    return names


def _check(sig: Signature) -> None:
    if len(sig.args) != len(sig.input_names):
        raise ValueError(f"{sig.name}: {len(sig.args)} args but {len(sig.input_names)} input names")
    if len(set(sig.input_names)) != len(sig.input_names):
        raise ValueError(f"{sig.name}: duplicate input names {sig.input_names}")
    if len(set(sig.output_names)) != len(sig.output_names):
        raise ValueError(f"{sig.name}: duplicate output names {sig.output_names}")


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph (Loop/If/Scan bodies) inside it."""
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    out += _graphs(g)
    return out


def _value_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in _graphs(graph):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    return names


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for g in _graphs(graph):
        for v in (*g.input, *g.output, *g.value_info):
            if v.name == old:
                v.name = new
        for t in g.initializer:
            if t.name == old:
                t.name = new
        for node in g.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]


def _name_outputs(graph: onnx.GraphProto, wanted: tuple[str, ...]) -> None:
    """Give graph output i the name ``wanted[i]``: rename the producing value, or add an Identity node when the
    value is a graph input, an initializer or another output too (jax2onnx cannot name those itself)."""
    if len(graph.output) != len(wanted):
        raise RuntimeError(f"graph has {len(graph.output)} outputs, signature names {len(wanted)}")
    names = _value_names(graph)
    fresh = 0
    for i, want in enumerate(wanted):
        outs = [o.name for o in graph.output]
        if want not in names or (outs[i] == want and outs.count(want) == 1):
            continue
        # ``want`` names some other value (internal, or another output): move that value out of the way.
        while f"_fedscaled_{fresh}" in names:
            fresh += 1
        _rename_value(graph, want, f"_fedscaled_{fresh}")
        names.add(f"_fedscaled_{fresh}")
    fixed = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for i, want in enumerate(wanted):
        outs = [o.name for o in graph.output]
        cur = outs[i]
        if cur == want:
            continue
        if cur in fixed or outs.count(cur) > 1:
            graph.node.append(onnx.helper.make_node("Identity", [cur], [want], name=f"fedscaled_output_{i}"))
            graph.output[i].name = want
        else:
            _rename_value(graph, cur, want)


def export_onnx(sig: Signature) -> bytes:
    """Serialized ONNX (opset 17) of ``sig.fn``; graph inputs/outputs named as documented in the module."""
    import jax2onnx

    _check(sig)
    out_names = graph_output_names(sig)
    # Outputs are named afterwards: jax2onnx's output_names refuses an output that is an input passed through.
    model = jax2onnx.to_onnx(
        sig.fn, list(sig.args), model_name=sig.name, opset=OPSET, input_names=list(sig.input_names)
    )
    if not isinstance(model, onnx.ModelProto):  # pragma: no cover - return_mode="proto" is the default
        raise TypeError(f"jax2onnx returned {type(model).__name__}, expected ModelProto")
    _name_outputs(model.graph, out_names)
    got_in = tuple(i.name for i in model.graph.input)
    got_out = tuple(o.name for o in model.graph.output)
    if got_in != tuple(sig.input_names) or got_out != out_names:
        raise RuntimeError(f"{sig.name}: graph is named {got_in} -> {got_out}, wanted {sig.input_names} -> {out_names}")
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _convert(onnx_path: str, mnn_path: str, fp16: bool) -> bool:
    import _tools  # MNN's compiled converter; NOT MNN.tools.mnnconvert (telemetry)

    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", mnn_path, "--bizCode", "fedscaled"]
    if fp16:
        argv.append("--fp16")
    return bool(_tools.mnnconvert(argv))


def export_mnn(sig: Signature, fp16: bool = False) -> bytes:
    """Serialized .mnn of ``sig`` (ONNX -> MNN in a temporary directory); ``fp16`` stores constants as fp16."""
    onnx_bytes = export_onnx(sig)
    with tempfile.TemporaryDirectory(prefix="fedscaled-mnn-") as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        mnn_path = os.path.join(tmp, "model.mnn")
        with open(onnx_path, "wb") as f:
            f.write(onnx_bytes)
        ok = _convert(onnx_path, mnn_path, fp16)  # prints its progress on the process's stdout
        if not ok or not os.path.exists(mnn_path) or os.path.getsize(mnn_path) == 0:
            raise RuntimeError(f"{sig.name}: MNN conversion of {onnx_path} failed")
        with open(mnn_path, "rb") as f:
            return f.read()
