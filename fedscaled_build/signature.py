"""A named, pure JAX function with example arguments: the unit every on-device exporter consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class Signature:
    """One entry point of an exported on-device program.

    ``fn`` is a pure JAX function of positional array arguments that returns a tuple of arrays.
    ``args`` gives one example shape/dtype per positional argument; ``input_names`` names them and
    ``output_names`` names the returned arrays, in order.
    """

    name: str  # e.g. "train", "test", "infer"
    fn: Callable[..., tuple[jax.Array, ...]]
    args: tuple[jax.ShapeDtypeStruct, ...]
    input_names: tuple[str, ...]  # e.g. ("dense_0/kernel", "dense_0/bias", "x", "y", "mask", "lr", "wd")
    output_names: tuple[str, ...]  # e.g. ("dense_0/kernel", "dense_0/bias", "loss")
