"""The tensor wire format: safetensors, parsed by our own validating decoder.

A safetensors file is an 8-byte little-endian u64 header length ``N``, ``N`` bytes of a JSON object
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {str: str}}``, then the data
section; offsets are relative to the start of the data section.

Upload bodies come from phones, so nothing in the header is trusted: every field is checked against the
model's tensor specs before a single tensor byte is read, and every failure is an :class:`InvalidTensor`
with a one-line message that names the offending tensor. Decoding copies each tensor exactly once, into a
64-byte aligned float32 vector (see :mod:`fedscaled.core.aligned`) in spec order, checking finiteness
block by block while the block is still in cache.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fedscaled.core.aligned import ALIGNMENT, aligned_empty, is_aligned
from fedscaled.core.models import TensorSpec
from fedscaled.errors import InvalidTensor

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
AnyArray = np.ndarray[Any, np.dtype[Any]]
Buffer = bytes | bytearray | memoryview

MAX_HEADER_BYTES = 1 << 20
METADATA_KEY = "__metadata__"
_HEADER_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
# Elements per copy-and-check block: 256 KiB of float32 stays in L2 between the copy and the finiteness
# check, which measured ~25% faster at 5M params than a copy pass followed by a check pass.
_BLOCK = 1 << 16
_LIST_LIMIT = 5
_NAME_LIMIT = 80


class Decoded(NamedTuple):
    """A decoded upload: the flat float32 parameters in spec order and the header's metadata."""

    flat: FloatArray
    metadata: dict[str, str]


def num_params(specs: Sequence[TensorSpec]) -> int:
    """Total number of float32 elements described by ``specs``."""
    return sum(math.prod(shape) for _, shape in specs)


def _show(name: str) -> str:
    # Names come from untrusted headers: repr() keeps the message on one line, truncation keeps it short.
    if len(name) > _NAME_LIMIT:
        name = name[:_NAME_LIMIT] + "..."
    return repr(name)


def _show_names(names: Sequence[str]) -> str:
    shown = ", ".join(_show(n) for n in names[:_LIST_LIMIT])
    if len(names) > _LIST_LIMIT:
        shown += f" and {len(names) - _LIST_LIMIT} more"
    return shown


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; a header with two entries for one name is malformed.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidTensor(f"safetensors header has duplicate key {_show(key)}", name=key[:_NAME_LIMIT])
        obj[key] = value
    return obj


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_header(mv: memoryview) -> tuple[int, dict[str, Any]]:
    """Header length and parsed JSON object; checks only the framing and the JSON itself."""
    if len(mv) < 8:
        raise InvalidTensor(f"body is {len(mv)} bytes, shorter than the 8-byte safetensors header length",
                            body_bytes=len(mv))
    (n,) = struct.unpack_from("<Q", mv, 0)
    if n > MAX_HEADER_BYTES:
        raise InvalidTensor(f"safetensors header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes",
                            header_bytes=n, limit=MAX_HEADER_BYTES)
    if 8 + n > len(mv):
        raise InvalidTensor(f"safetensors header length {n} runs past the end of the {len(mv)}-byte body",
                            header_bytes=n, body_bytes=len(mv))
    try:
        text = bytes(mv[8 : 8 + n]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise InvalidTensor("safetensors header is not valid UTF-8") from None
    except RecursionError:
        raise InvalidTensor("safetensors header JSON is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and int-literal length limits
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidTensor(f"safetensors header is not valid JSON: {msg}") from None
    if not isinstance(header, dict):
        raise InvalidTensor(f"safetensors header is a JSON {type(header).__name__}, not an object")
    return n, header


def _check_metadata(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise InvalidTensor(f"safetensors {METADATA_KEY} is a JSON {type(raw).__name__}, not an object")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise InvalidTensor(f"safetensors {METADATA_KEY} value of {_show(key)} is not a string",
                                key=key[:_NAME_LIMIT])
    return dict(raw)


def _check_entry(name: str, entry: object, shape: tuple[int, ...], data_len: int) -> tuple[int, int]:
    """Validate one tensor's header entry against its spec; its (begin, end) in the data section."""
    if not isinstance(entry, dict):
        raise InvalidTensor(f"header entry of tensor {_show(name)} is not a JSON object", tensor=name)
    missing = _HEADER_FIELDS - entry.keys()
    extra = entry.keys() - _HEADER_FIELDS
    if missing or extra:
        what = f"lacks {sorted(missing)}" if missing else f"has unknown fields {_show_names(sorted(extra))}"
        raise InvalidTensor(f"header entry of tensor {_show(name)} {what}", tensor=name)
    dtype = entry["dtype"]
    if dtype != "F32":
        shown = _show(dtype) if isinstance(dtype, str) else repr(type(dtype).__name__)
        raise InvalidTensor(f"tensor {_show(name)} has dtype {shown}, expected 'F32'",
                            tensor=name, expected="F32", got=str(dtype)[:_NAME_LIMIT])
    got = entry["shape"]
    if not isinstance(got, list) or not all(_is_int(d) and d >= 0 for d in got):
        raise InvalidTensor(f"tensor {_show(name)} has a malformed shape (not a list of non-negative ints)",
                            tensor=name)
    if tuple(got) != shape:
        raise InvalidTensor(f"tensor {_show(name)} has shape {list(got)}, expected {list(shape)}",
                            tensor=name, expected=list(shape), got=list(got))
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise InvalidTensor(f"tensor {_show(name)} data_offsets is not a list of two integers", tensor=name)
    begin, end = offsets
    if begin < 0 or end < 0:
        raise InvalidTensor(f"tensor {_show(name)} has negative data_offsets [{begin}, {end}]", tensor=name)
    if end < begin:
        raise InvalidTensor(f"tensor {_show(name)} data_offsets end {end} is before begin {begin}",
                            tensor=name)
    expected = math.prod(shape) * 4
    if end - begin != expected:
        raise InvalidTensor(
            f"tensor {_show(name)} data_offsets span {end - begin} bytes, expected {expected} for shape "
            f"{list(shape)}", tensor=name, expected=expected, got=end - begin)
    if end > data_len:
        raise InvalidTensor(
            f"tensor {_show(name)} data_offsets end {end} is beyond the {data_len}-byte data section",
            tensor=name, end=end, data_bytes=data_len)
    return begin, end


def _validate(
    mv: memoryview, specs: Sequence[TensorSpec]
) -> tuple[int, dict[str, tuple[int, int]], dict[str, str]]:
    """Check the whole header against ``specs``; the data start, each tensor's offsets and the metadata."""
    n, header = _parse_header(mv)
    data_start = 8 + n
    data_len = len(mv) - data_start
    metadata = _check_metadata(header.pop(METADATA_KEY)) if METADATA_KEY in header else {}

    spec_names = [name for name, _ in specs]
    missing = [name for name in spec_names if name not in header]
    if missing:
        raise InvalidTensor(f"missing tensor{'s' if len(missing) > 1 else ''}: {_show_names(missing)}",
                            missing=missing[:_LIST_LIMIT * 4])
    spec_set = set(spec_names)
    unexpected = sorted(name for name in header if name not in spec_set)
    if unexpected:
        raise InvalidTensor(
            f"unexpected tensor{'s' if len(unexpected) > 1 else ''}: {_show_names(unexpected)}",
            unexpected=[u[:_NAME_LIMIT] for u in unexpected[:_LIST_LIMIT]])

    offsets = {name: _check_entry(name, header[name], shape, data_len) for name, shape in specs}

    # Tensors may come in any order (the safetensors library sorts them), but may not share bytes.
    by_begin = sorted(offsets.items(), key=lambda item: item[1])
    for (prev, (_, prev_end)), (name, (begin, _)) in itertools.pairwise(by_begin):
        if begin < prev_end:
            raise InvalidTensor(f"tensors {_show(prev)} and {_show(name)} overlap in the data section",
                                tensors=[prev, name])
    total = sum(end - begin for begin, end in offsets.values())
    if data_len != total:
        kind = "truncated" if data_len < total else "has trailing bytes"
        raise InvalidTensor(
            f"data section is {data_len} bytes but the tensors need {total}: the body {kind}",
            data_bytes=data_len, expected=total)
    return data_start, offsets, metadata


def decode_update(body: Buffer, specs: Sequence[TensorSpec], out: FloatArray | None = None, *,
                  check_finite: bool = True) -> Decoded:
    """Validate a safetensors ``body`` against ``specs`` and give its tensors as one flat vector.

    See :func:`_decode`; numpy's floating-point warnings are silenced because NaN and Inf are
    expected input here, reported as InvalidTensor. ``check_finite=False`` leaves the values unchecked
    for a caller that checks them itself (the daemon's FedAvg fold does, in the same pass; then
    :func:`nonfinite_error` names the culprit).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return _decode(body, specs, out, check_finite)


def nonfinite_error(flat: FloatArray, specs: Sequence[TensorSpec]) -> InvalidTensor | None:
    """The InvalidTensor naming the first tensor of ``flat`` that holds NaN or Inf, or None."""
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            _check_finite(flat, specs)
    except InvalidTensor as exc:
        return exc
    return None


def _decode(body: Buffer, specs: Sequence[TensorSpec], out: FloatArray | None, check_finite: bool) -> Decoded:
    """Validate a safetensors ``body`` against ``specs`` and copy its tensors into one flat vector.

    The result's ``flat`` is float32, 1-D, 64-byte aligned, of length ``num_params(specs)``, with the
    tensors concatenated in spec order whatever their order in the file. Each byte is copied exactly once,
    into ``out`` when given (it must be such a vector; reuse one per connection to avoid allocation; after
    an error its contents are unspecified; and since ``to_device`` aliases aligned buffers, do not decode
    into it again until a fold that reads it has finished). Raises :class:`InvalidTensor` for every
    malformed, mismatched, truncated or non-finite body.
    """
    mv = memoryview(body)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    data_start, offsets, metadata = _validate(mv, specs)

    total = num_params(specs)
    if out is None and _in_place_ok(mv, data_start, offsets, specs):
        # Zero copy: the tensors already lie in spec order at a 64-byte aligned address (the server
        # places the data section so), so the body itself is the flat vector; only check finiteness.
        view: FloatArray = np.frombuffer(mv, dtype=np.float32, count=total, offset=data_start)
        if check_finite:
            _check_finite(view, specs)
        return Decoded(view, metadata)
    if out is None:
        flat: FloatArray = aligned_empty(total, np.float32)
    else:
        if out.dtype != np.float32 or out.shape != (total,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float32 vector of {total} elements")
        if not is_aligned(out):
            raise ValueError("out must be 64-byte aligned (see fedscaled.core.aligned)")
        flat = out

    pos = 0
    for name, shape in specs:
        count = math.prod(shape)
        begin, _ = offsets[name]
        # '<f4' reads little-endian whatever the host; on a little-endian host it is a plain copy.
        src = np.frombuffer(mv, dtype="<f4", count=count, offset=data_start + begin)
        for lo in range(0, count, _BLOCK):
            hi = min(lo + _BLOCK, count)
            dst = flat[pos + lo : pos + hi]
            np.copyto(dst, src[lo:hi])
            if check_finite and not _finite(dst):
                raise InvalidTensor(f"tensor {_show(name)} contains NaN or Inf", tensor=name)
        pos += count
    return Decoded(flat, metadata)


_ZEROS = np.zeros(_BLOCK, dtype=np.float32)


def _finite(block: FloatArray) -> bool:
    """Whether a block (at most _BLOCK long) holds only finite values.

    A dot product with zeros is NaN exactly when some element is NaN or +-Inf (0 * Inf is NaN) and 0
    otherwise, however large the finite values: one SIMD pass with no temporary, measured ~1.4x faster
    than min() and max() and ~3x faster than np.isfinite(x).all(), which materialises a boolean array.
    """
    return math.isfinite(float(np.dot(block, _ZEROS[: block.shape[0]])))


def _in_place_ok(mv: memoryview, data_start: int, offsets: dict[str, tuple[int, int]],
                 specs: Sequence[TensorSpec]) -> bool:
    """Whether the body's data section already is the flat vector: little-endian host, tensors
    back to back in spec order from offset 0, data start 64-byte aligned in memory."""
    if sys.byteorder != "little":
        return False
    pos = 0
    for name, _ in specs:
        begin, end = offsets[name]
        if begin != pos:
            return False
        pos = end
    if pos == 0:
        return False
    probe = np.frombuffer(mv, dtype=np.uint8, count=1, offset=data_start)
    return bool(probe.ctypes.data % ALIGNMENT == 0)


def _check_finite(flat: FloatArray, specs: Sequence[TensorSpec]) -> None:
    """Raise InvalidTensor naming the first tensor holding NaN or Inf."""
    pos = 0
    for name, shape in specs:
        count = math.prod(shape)
        for lo in range(pos, pos + count, _BLOCK):
            block = flat[lo : min(lo + _BLOCK, pos + count)]
            if not _finite(block):
                raise InvalidTensor(f"tensor {_show(name)} contains NaN or Inf", tensor=name)
        pos += count


def wire_order(specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The specs sorted by name: the order in which the safetensors library lays tensors out.

    Using it as the daemon's flat order lets most uploads decode without a copy (see decode_update).
    """
    return tuple(sorted(specs, key=lambda spec: spec[0]))


def data_offset(prefix: bytes) -> int | None:
    """Where the data section starts, from the first 8 bytes of a safetensors body (None if short)."""
    if len(prefix) < 8:
        return None
    return 8 + int(struct.unpack("<Q", bytes(prefix[:8]))[0])


def encode_model(flat: AnyArray, specs: Sequence[TensorSpec],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file holding ``flat`` split into the tensors of ``specs``, in spec order.

    The header is padded with spaces to a multiple of 8 bytes so that the data section is aligned, as the
    safetensors library does. The result is readable by ``safetensors.numpy.load``.
    """
    total = num_params(specs)
    if flat.ndim != 1 or flat.shape[0] != total:
        raise ValueError(f"flat must be a vector of {total} elements, got shape {flat.shape}")
    header: dict[str, Any] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"metadata must map str to str, got {key!r}: {value!r}")
        header[METADATA_KEY] = dict(metadata)
    pos = 0
    for name, shape in specs:
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    data = np.ascontiguousarray(flat, dtype="<f4")
    # bytes.join copies each part once into the result: no intermediate tobytes() copy of the data.
    return b"".join([struct.pack("<Q", len(raw)), raw, data.data.cast("B")])


def flatten(params: Mapping[str, AnyArray], specs: Sequence[TensorSpec]) -> FloatArray:
    """Concatenate ``params`` in spec order into a new 64-byte aligned float32 vector.

    Raises ValueError when a tensor is missing, unexpected, or of the wrong shape.
    """
    names = {name for name, _ in specs}
    if extra := sorted(set(params) - names):
        raise ValueError(f"unexpected tensors: {_show_names(extra)}")
    flat: FloatArray = aligned_empty(num_params(specs), np.float32)
    pos = 0
    for name, shape in specs:
        if name not in params:
            raise ValueError(f"missing tensor {_show(name)}")
        value = np.asarray(params[name])
        if value.shape != shape:
            raise ValueError(f"tensor {_show(name)} has shape {list(value.shape)}, expected {list(shape)}")
        count = math.prod(shape)
        flat[pos : pos + count] = value.reshape(-1)
        pos += count
    return flat


def unflatten(flat: AnyArray, specs: Sequence[TensorSpec]) -> dict[str, AnyArray]:
    """Split ``flat`` into named tensors of the specs' shapes, in spec order; views, not copies."""
    total = num_params(specs)
    if flat.ndim != 1 or flat.shape[0] != total:
        raise ValueError(f"flat must be a vector of {total} elements, got shape {flat.shape}")
    out: dict[str, AnyArray] = {}
    pos = 0
    for name, shape in specs:
        count = math.prod(shape)
        out[name] = flat[pos : pos + count].reshape(shape)
        pos += count
    return out
