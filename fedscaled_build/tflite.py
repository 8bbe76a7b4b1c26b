"""Export pure JAX functions to one trainable ``.tflite`` with several named signatures (build time only).

Route: ``jax.jit(fn).lower(*args).as_text()`` (StableHLO) → ``litert_converter``'s MLIR bindings
(``converter_api_ext``: ``prepare_mlir_context``, ``set_signature``, ``merge_modules``,
``run_convert_to_tfl_passes``, ``export_flatbuffer_to_bytes``; undocumented, read from the installed
0.5.0 package) → TFLite flatbuffer bytes. No TensorFlow is involved.

Each signature becomes one subgraph; the Android app reaches it with
``interpreter.getSignatureRunner(name)`` and feeds/reads tensors by the exact names given, ``/`` included
(``"dense_0/kernel"`` is a valid signature key). Batch size and every other shape are fixed by ``args``.

This module needs the separate build environment (``litert-converter`` pins old typing-extensions); the
daemon never imports it. Always compare the converted program with JAX (``LiteRTProgram`` runs it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax

from fedscaled_build.signature import Signature

__all__ = ["Signature", "export_tflite", "non_builtin_ops"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check(signatures: Sequence[Signature]) -> None:
    if not signatures:
        raise ValueError("export_tflite needs at least one signature")
    names = [s.name for s in signatures]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate signature names: {names}")
    for s in signatures:
        if not _IDENT.fullmatch(s.name):
            # The name also becomes an MLIR symbol (the subgraph's function name).
            raise ValueError(f"signature name {s.name!r} must be an identifier")
        if len(s.input_names) != len(s.args):
            raise ValueError(f"{s.name}: {len(s.input_names)} input names for {len(s.args)} args")
        for kind, seq in (("input", s.input_names), ("output", s.output_names)):
            if len(set(seq)) != len(seq):
                raise ValueError(f"{s.name}: duplicate {kind} names {list(seq)}")
            if any(not n for n in seq):
                raise ValueError(f"{s.name}: empty {kind} name")


def _stablehlo_text(sig: Signature) -> str:
    lowered = jax.jit(sig.fn).lower(*sig.args)
    out_info = jax.tree_util.tree_leaves(lowered.out_info)
    if len(out_info) != len(sig.output_names):
        raise ValueError(f"{sig.name}: fn returns {len(out_info)} arrays, {len(sig.output_names)} output names given")
    text: str = lowered.as_text()
    # JAX names the entry function @main in every module; merge_modules fails on public symbol collisions,
    # so give each entry function its signature's name. (Private helpers JAX emits, e.g. for custom_vjp,
    # are renamed by merge_modules on collision.)
    renamed, n = re.subn(r"func\.func public @main\(", f"func.func public @{sig.name}(", text, count=1)
    if n != 1:
        raise RuntimeError(f"{sig.name}: no public @main in the lowered StableHLO module")
    renamed = re.sub(r"(func\.call|call) @main\(", rf"\1 @{sig.name}(", renamed)
    return renamed


def export_tflite(signatures: Sequence[Signature]) -> bytes:
    """One .tflite flatbuffer holding every signature, built-in ops only.

    Raises ``RuntimeError`` when the converted file contains custom or Flex operators (stock Android
    LiteRT without the Flex delegate could not run it).
    """
    _check(signatures)
    texts = [_stablehlo_text(s) for s in signatures]

    # Imported here so that importing this module (e.g. for Signature) does not load the MLIR libraries.
    from litert_converter.mlir import ir, passmanager  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from litert_converter.mlir._mlir_libs import converter_api_ext  # type: ignore[import-untyped, import-not-found, unused-ignore]

    ctx = ir.Context()
    converter_api_ext.prepare_mlir_context(ctx)
    with ctx, ir.Location.unknown():
        modules = []
        for sig, text in zip(signatures, texts, strict=True):
            module = ir.Module.parse(text)
            entry = None
            for op in module.body.operations:
                if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == sig.name:
                    entry = op
                    break
            if entry is None:
                raise RuntimeError(f"{sig.name}: entry function not found after parsing")
            converter_api_ext.set_signature(entry, sig.name, list(sig.input_names), list(sig.output_names))
            modules.append(module)
        merged = modules[0] if len(modules) == 1 else converter_api_ext.merge_modules(modules)
        config = converter_api_ext.ConvertToTFLConfig()
        converter_api_ext.run_convert_to_tfl_passes(merged, passmanager.PassManager(), config)
        data: bytes = converter_api_ext.export_flatbuffer_to_bytes(merged.operation)

    bad = non_builtin_ops(data)
    if bad:
        raise RuntimeError(f"converted .tflite needs non-built-in operators: {bad}")
    return data


def non_builtin_ops(tflite_bytes: bytes) -> list[str]:
    """Names of operators that are not TFLite built-ins (custom ops, Flex ops); [] when clean.

    Reads the flatbuffer with the schema bundled in ``ai_edge_litert``; no interpreter. Only operators
    some subgraph actually uses count. Custom and Flex ops are reported by their custom code (Flex ops
    start with ``"Flex"``); ``DELEGATE`` nodes and codes unknown to this schema by their enum name or number.
    """
    from ai_edge_litert import schema_py_generated as schema  # type: ignore[import-untyped, import-not-found, unused-ignore]

    buf = bytearray(tflite_bytes)
    if len(buf) < 8 or bytes(buf[4:8]) != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (file identifier TFL3 missing)")
    model = schema.Model.GetRootAs(buf, 0)
    known = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}
    custom = schema.BuiltinOperator.CUSTOM
    delegate = schema.BuiltinOperator.DELEGATE
    placeholder = schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES

    used: set[int] = set()
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)
        for oi in range(sg.OperatorsLength()):
            used.add(sg.Operators(oi).OpcodeIndex())

    names: list[str] = []
    for idx in sorted(used):
        if idx >= model.OperatorCodesLength():
            names.append(f"<opcode index {idx} out of range>")
            continue
        oc = model.OperatorCodes(idx)
        dep = oc.DeprecatedBuiltinCode()
        code = oc.BuiltinCode() if dep == placeholder else max(dep, oc.BuiltinCode())
        if code == custom:
            raw = oc.CustomCode()
            names.append(raw.decode("utf-8", "replace") if raw else "<custom op without a name>")
        elif code == delegate:
            names.append("DELEGATE")
        elif code not in known:
            names.append(f"<unknown builtin code {code}>")
    return sorted(set(names))
