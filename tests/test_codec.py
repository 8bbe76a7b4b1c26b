"""The safetensors codec: round trips, interop with the safetensors package, and every rejection."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save

from fedscaled.core.aligned import aligned_empty, aligned_zeros, as_aligned, is_aligned
from fedscaled.core.codec import (
    MAX_HEADER_BYTES,
    decode_update,
    encode_model,
    flatten,
    num_params,
    unflatten,
)
from fedscaled.core.models import TensorSpec, build
from fedscaled.errors import InvalidTensor

SPECS: tuple[TensorSpec, ...] = (
    ("dense_0/kernel", (4, 3)),
    ("dense_0/bias", (3,)),
    ("dense_1/kernel", (3, 2)),
    ("dense_1/bias", (2,)),
)
P = num_params(SPECS)
Header = dict[str, Any]


def _flat(seed: int = 0, n: int = P) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _raw(header: Header, data: bytes, pad: bool = True) -> bytes:
    """A safetensors-like body from a header dict and data bytes, with no validation at all."""
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _parts(flat: np.ndarray[Any, np.dtype[Any]] | None = None) -> tuple[Header, bytes]:
    """Header and data of a valid body, to be tampered with."""
    body = encode_model(_flat() if flat is None else flat, SPECS)
    (n,) = struct.unpack_from("<Q", body)
    header: Header = json.loads(body[8 : 8 + n])
    return header, body[8 + n :]


def _reject(body: bytes | bytearray | memoryview, *words: str) -> InvalidTensor:
    with pytest.raises(InvalidTensor) as info:
        decode_update(body, SPECS)
    err = info.value
    assert "\n" not in err.message
    for word in words:
        assert word in err.message, (word, err.message)
    assert err.code == "invalid_tensor" and err.status == 422
    return err


# --- aligned buffers -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 12345])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_aligned_empty(n: int, dtype: type[np.generic]) -> None:
    a = aligned_empty(n, dtype)
    assert a.shape == (n,) and a.dtype == dtype and is_aligned(a) and a.flags.c_contiguous
    assert is_aligned(aligned_zeros(n, dtype)) and not aligned_zeros(n, dtype).any()


def test_as_aligned_copies_only_when_needed() -> None:
    a = aligned_empty(100)
    assert as_aligned(a) is a
    b = np.frombuffer(b"\0" * 404, dtype=np.float32, count=100, offset=4)
    assert not is_aligned(b)
    c = as_aligned(b)
    assert is_aligned(c) and np.array_equal(b, c)


# --- round trips and interop -----------------------------------------------------------------------


def test_round_trip_with_metadata() -> None:
    flat = _flat()
    meta = {"samples": "12", "loss": "0.5"}
    dec = decode_update(encode_model(flat, SPECS, meta), SPECS)
    assert np.array_equal(dec.flat, flat)
    assert dec.metadata == meta
    assert dec.flat.dtype == np.float32 and is_aligned(dec.flat)


def test_round_trip_without_metadata_and_from_other_buffers() -> None:
    flat = _flat(1)
    body = encode_model(flat, SPECS)
    for form in (body, bytearray(body), memoryview(body)):
        dec = decode_update(form, SPECS)
        assert np.array_equal(dec.flat, flat) and dec.metadata == {}
    # A memoryview that is not of bytes (e.g. over a numpy buffer) is read as bytes.
    words = np.frombuffer(body + b"\0" * (-len(body) % 4), dtype=np.uint32)[: len(body) // 4]
    if len(body) % 4 == 0:
        assert np.array_equal(decode_update(words.data, SPECS).flat, flat)


def test_decode_into_out() -> None:
    flat = _flat(2)
    out = aligned_zeros(P)
    dec = decode_update(encode_model(flat, SPECS), SPECS, out=out)
    assert dec.flat is out and np.array_equal(out, flat)


@pytest.mark.parametrize("bad", ["wrong_len", "wrong_dtype", "unaligned"])
def test_decode_rejects_bad_out(bad: str) -> None:
    out: np.ndarray[Any, np.dtype[Any]]
    if bad == "wrong_len":
        out = aligned_empty(P + 1)
    elif bad == "wrong_dtype":
        out = aligned_empty(P, np.float64)
    else:
        out = aligned_empty(P + 1)[1:]
    with pytest.raises(ValueError):
        decode_update(encode_model(_flat(), SPECS), SPECS, out=out)


def test_encode_is_readable_by_safetensors() -> None:
    flat = _flat(3)
    loaded = load(encode_model(flat, SPECS, {"samples": "3"}))
    expected = unflatten(flat, SPECS)
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == np.float32 and np.array_equal(loaded[name], value)


def test_safetensors_files_decode_in_spec_order() -> None:
    # safetensors sorts tensors by name in its file; decode must still place them in spec order.
    params = unflatten(_flat(4), SPECS)
    body = save(dict(params), metadata={"samples": "7", "loss": "1.25"})
    dec = decode_update(body, SPECS)
    assert np.array_equal(dec.flat, flatten(params, SPECS))
    assert dec.metadata == {"samples": "7", "loss": "1.25"}


def test_zoo_model_round_trip_with_safetensors() -> None:
    model = build("cnn", (8, 8, 1), 10)
    params = model.init(0)
    flat = flatten(params, model.specs)
    assert flat.shape == (model.num_params,) and is_aligned(flat)
    assert np.array_equal(decode_update(save(params), model.specs).flat, flat)
    loaded = load(encode_model(flat, model.specs))
    assert all(np.array_equal(loaded[n], params[n]) for n, _ in model.specs)


def test_empty_tensor_round_trips() -> None:
    specs: tuple[TensorSpec, ...] = (("a", (0,)), ("b", (2, 2)), ("c", ()))
    flat = _flat(5, 5)
    assert np.array_equal(decode_update(encode_model(flat, specs), specs).flat, flat)
    assert np.array_equal(decode_update(save(unflatten(flat, specs)), specs).flat, flat)


def test_large_tensor_crosses_copy_blocks() -> None:
    specs: tuple[TensorSpec, ...] = (("big", (200_001,)), ("small", (3,)))
    flat = _flat(6, 200_004)
    assert np.array_equal(decode_update(encode_model(flat, specs), specs).flat, flat)
    flat[150_000] = np.inf
    with pytest.raises(InvalidTensor, match="'big'"):
        decode_update(encode_model(flat, specs), specs)


shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5)


@settings(max_examples=50, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**16))
def test_round_trip_property(shapes: list[list[int]], seed: int) -> None:
    specs = tuple((f"t{i}/w", tuple(s)) for i, s in enumerate(shapes))
    flat = _flat(seed, num_params(specs))
    dec = decode_update(encode_model(flat, specs), specs)
    assert np.array_equal(dec.flat, flat) and is_aligned(dec.flat)
    assert np.array_equal(decode_update(save(unflatten(flat, specs)), specs).flat, flat)
    views = unflatten(dec.flat, specs)
    assert list(views) == [n for n, _ in specs]
    assert all(v.shape == s and (v.size == 0 or np.shares_memory(v, dec.flat)) for (_, s), v in
               zip(specs, views.values(), strict=True))


def test_flatten_rejects_mismatches() -> None:
    params = unflatten(_flat(), SPECS)
    with pytest.raises(ValueError, match="dense_1/bias"):
        flatten({k: v for k, v in params.items() if k != "dense_1/bias"}, SPECS)
    with pytest.raises(ValueError, match="extra"):
        flatten({**params, "extra": np.zeros(1, np.float32)}, SPECS)
    with pytest.raises(ValueError, match="dense_0/bias"):
        flatten({**params, "dense_0/bias": np.zeros(4, np.float32)}, SPECS)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_model(_flat(n=P - 1), SPECS)
    with pytest.raises(ValueError):
        encode_model(_flat(), SPECS, {"samples": 3})  # type: ignore[dict-item]


# --- rejections ------------------------------------------------------------------------------------


def test_reject_short_body() -> None:
    _reject(b"\x01\x00\x00", "shorter than the 8-byte")
    _reject(b"", "0 bytes")


def test_reject_header_length() -> None:
    _reject(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds the limit")
    _reject(struct.pack("<Q", 2**64 - 1), "exceeds the limit")
    _reject(struct.pack("<Q", 100) + b"{}", "past the end")


@pytest.mark.parametrize(
    ("text", "word"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'"x"', "not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    ],
)
def test_reject_bad_header_json(text: bytes, word: str) -> None:
    _reject(struct.pack("<Q", len(text)) + text, word)


def test_reject_missing_tensors() -> None:
    header, data = _parts()
    del header["dense_1/bias"], header["dense_0/kernel"]
    err = _reject(_raw(header, data), "missing tensors", "'dense_0/kernel'", "'dense_1/bias'")
    assert err.details["missing"] == ["dense_0/kernel", "dense_1/bias"]


def test_reject_unexpected_tensor() -> None:
    header, data = _parts()
    header["evil\nname"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    _reject(_raw(header, data), "unexpected tensor", "'evil\\nname'")


@pytest.mark.parametrize("dtype", ["F16", "F64", "I32", "BF16", 7, None])
def test_reject_dtype(dtype: object) -> None:
    header, data = _parts()
    header["dense_0/bias"]["dtype"] = dtype
    _reject(_raw(header, data), "'dense_0/bias'", "dtype", "expected 'F32'")


def test_reject_real_f64_file() -> None:
    params = {n: v.astype(np.float64) for n, v in unflatten(_flat(), SPECS).items()}
    _reject(save(params), "dtype 'F64'")


def test_reject_shape_mismatch() -> None:
    header, data = _parts()
    header["dense_0/kernel"]["shape"] = [3, 4]
    _reject(_raw(header, data), "'dense_0/kernel'", "shape [3, 4]", "expected [4, 3]")
    header["dense_0/kernel"]["shape"] = [4, -3]
    _reject(_raw(header, data), "'dense_0/kernel'", "malformed shape")
    header["dense_0/kernel"]["shape"] = "4x3"
    _reject(_raw(header, data), "'dense_0/kernel'", "malformed shape")


def test_reject_malformed_entry() -> None:
    header, data = _parts()
    header["dense_0/bias"] = [1, 2, 3]
    _reject(_raw(header, data), "'dense_0/bias'", "not a JSON object")
    header, data = _parts()
    del header["dense_0/bias"]["data_offsets"]
    _reject(_raw(header, data), "'dense_0/bias'", "lacks")
    header, data = _parts()
    header["dense_0/bias"]["extra"] = 1
    _reject(_raw(header, data), "'dense_0/bias'", "unknown fields")


def _tamper_offsets(name: str, offsets: object) -> bytes:
    header, data = _parts()
    header[name]["data_offsets"] = offsets
    return _raw(header, data)


@pytest.mark.parametrize(
    ("offsets", "word"),
    [
        ([0], "two integers"),
        ([0, 1, 2], "two integers"),
        ([0.0, 12.0], "two integers"),
        ([True, 12], "two integers"),
        ("0-12", "two integers"),
        ([-4, 8], "negative"),
        ([40, 28], "before begin"),
        ([0, 8], "span 8 bytes, expected 12"),
        ([10**30, 10**30 + 12], "beyond"),
        ([1000, 1012], "beyond"),
    ],
)
def test_reject_bad_offsets(offsets: object, word: str) -> None:
    _reject(_tamper_offsets("dense_0/bias", offsets), "'dense_0/bias'", word)


def test_reject_overlap() -> None:
    # dense_0/bias (12 bytes) made to start inside dense_0/kernel (bytes 0..48).
    err = _reject(_tamper_offsets("dense_0/bias", [40, 52]), "overlap")
    assert "dense_0/bias" in err.message and "dense_0/kernel" in err.message


def test_reject_truncated_and_trailing() -> None:
    body = encode_model(_flat(), SPECS)
    _reject(body[:-1], "beyond")  # the last tensor's end now lies past the data
    _reject(body + b"\0\0\0\0", "trailing bytes")
    header, data = _parts()
    # Offsets all valid and in range, but a gap in the middle: the data section is longer than needed.
    header["dense_1/bias"]["data_offsets"] = [P * 4, P * 4 + 8]
    header["dense_1/kernel"]["data_offsets"] = [P * 4 - 32, P * 4 - 8]
    _reject(_raw(header, data + b"\0" * 8), "trailing bytes")


@pytest.mark.parametrize("meta", [[], "x", {"samples": 3}, {"samples": None}, {"a": {"b": "c"}}])
def test_reject_bad_metadata(meta: object) -> None:
    header, data = _parts()
    header["__metadata__"] = meta
    _reject(_raw(header, data), "__metadata__")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("index", [0, 12, P - 1])
def test_reject_non_finite(value: float, index: int) -> None:
    flat = _flat()
    flat[index] = value
    owner = unflatten(np.arange(P), SPECS)
    name = next(n for n, v in owner.items() if index in v)
    _reject(encode_model(flat, SPECS), f"'{name}'", "NaN or Inf")


def test_rejections_via_mutation_never_crash() -> None:
    # Random byte flips and truncations either decode or raise InvalidTensor — nothing else.
    body = encode_model(_flat(), SPECS, {"samples": "5"})
    rng = np.random.default_rng(0)
    for _ in range(300):
        i = int(rng.integers(0, len(body)))
        flipped = body[:i] + bytes([int(rng.integers(0, 256))]) + body[i + 1 :]
        mutated = body[:i] if rng.integers(0, 2) else flipped
        try:
            dec = decode_update(mutated, SPECS)
        except InvalidTensor:
            continue
        assert dec.flat.shape == (P,) and bool(np.isfinite(dec.flat).all())


def test_num_params() -> None:
    assert num_params(SPECS) == P == sum(math.prod(s) for _, s in SPECS) == 23


def test_zero_copy_decode_uses_the_aligned_body_in_place() -> None:
    from safetensors.numpy import save

    from fedscaled.core.aligned import aligned_at
    from fedscaled.core.codec import data_offset, wire_order
    from fedscaled.core.models import build

    model = build("mlp", (8, 8, 1), 10)
    specs = wire_order(model.specs)
    params = model.init(3)
    body = save(params, metadata={"samples": "5"})
    start = data_offset(body)
    assert start is not None
    placed = aligned_at(len(body), start)
    placed[:] = np.frombuffer(body, dtype=np.uint8)
    decoded = decode_update(placed.data, specs)
    assert np.shares_memory(decoded.flat, placed)  # no copy
    assert decoded.flat.ctypes.data % 64 == 0
    expected = np.concatenate([params[name].reshape(-1) for name, _ in specs])
    np.testing.assert_array_equal(decoded.flat, expected)
    # The same bytes at an unaligned address, or in another order, are copied (and still right).
    shifted = aligned_at(len(body) + 1, start)[1:]  # its data section one byte past alignment
    shifted[:] = np.frombuffer(body, dtype=np.uint8)
    copied = decode_update(shifted.data, specs)
    assert not np.shares_memory(copied.flat, shifted)
    np.testing.assert_array_equal(copied.flat, expected)
    in_model_order = decode_update(placed.data, model.specs)
    assert not np.shares_memory(in_model_order.flat, placed)
    # NaN is caught on the zero-copy path too, naming the tensor.
    poisoned = dict(params)
    poisoned["dense_1/bias"] = poisoned["dense_1/bias"].copy()
    poisoned["dense_1/bias"][3] = np.nan
    bad = save(poisoned)
    bad_start = data_offset(bad)
    assert bad_start is not None
    placed_bad = aligned_at(len(bad), bad_start)
    placed_bad[:] = np.frombuffer(bad, dtype=np.uint8)
    with pytest.raises(InvalidTensor, match="'dense_1/bias' contains NaN or Inf"):
        decode_update(placed_bad.data, specs)
