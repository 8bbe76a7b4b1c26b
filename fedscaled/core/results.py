"""Validation of what devices report with a result: upload metadata and test counts.

Everything here comes from untrusted phones: numbers must parse, be finite and in range, and counts
must be consistent; anything else is an :class:`~fedscaled.errors.InvalidMetadata` naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from fedscaled.errors import InvalidMetadata

# Counts above this are not phone-sized and would lose precision as floats: refused before arithmetic.
MAX_COUNT = 2**53


def _finite(meta: dict[str, str], name: str, required: bool, minimum: float | None = None) -> float | None:
    raw = meta.get(name)
    if raw is None:
        if required:
            raise InvalidMetadata(f"upload metadata lacks {name!r}", field=name)
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidMetadata(f"upload metadata {name!r} must be a number, got {raw[:40]!r}", field=name) from None
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise InvalidMetadata(f"upload metadata {name!r} must be finite and >= {minimum}, got {raw[:40]!r}",
                              field=name)
    return value


def update_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """Validate a training upload's safetensors ``__metadata__``: samples, loss, utility?, duration?"""
    raw = meta.get("samples")
    if raw is None:
        raise InvalidMetadata("upload metadata lacks 'samples'", field="samples")
    try:
        if len(raw) > 20:
            raise ValueError("too long")
        samples = int(raw)
    except ValueError:
        raise InvalidMetadata(f"upload metadata 'samples' must be an integer, got {raw[:40]!r}",
                              field="samples") from None
    if not 1 <= samples <= MAX_COUNT:
        raise InvalidMetadata(f"upload metadata 'samples' must be in [1, 2^53], got {samples}", field="samples")
    out: dict[str, Any] = {"samples": samples, "loss": _finite(meta, "loss", True)}
    for name in ("utility", "duration"):
        value = _finite(meta, name, False, 0.0)
        if value is not None:
            out[name] = value
    return out


def test_result(body: Any) -> dict[str, Any]:
    """Validate a test task's result: counts and sums (samples, correct_top1/5, loss_sum, duration?)."""
    if not isinstance(body, dict):
        raise InvalidMetadata("test results must be a JSON object")
    out: dict[str, Any] = {}
    for name in ("samples", "correct_top1", "correct_top5"):
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
            shown = value if not isinstance(value, int) or abs(value) < 10**20 else "an integer of over 20 digits"
            raise InvalidMetadata(f"test result {name!r} must be an integer in [0, 2^53], got {shown!r}", field=name)
        out[name] = value
    if out["samples"] < 1:
        raise InvalidMetadata("test result 'samples' must be >= 1", field="samples")
    if out["correct_top1"] > out["samples"] or out["correct_top5"] > out["samples"]:
        raise InvalidMetadata("test result counts exceed 'samples'", field="correct_top1")
    if out["correct_top5"] < out["correct_top1"]:
        raise InvalidMetadata("test result 'correct_top5' is below 'correct_top1'", field="correct_top5")
    for name, required in (("loss_sum", True), ("duration", False)):
        value = body.get(name)
        if value is None and not required:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT:
            raise InvalidMetadata(f"test result {name!r} must be at most 2^53", field=name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise InvalidMetadata(f"test result {name!r} must be a finite number >= 0, got {value!r}", field=name)
        out[name] = float(value)
    return out
