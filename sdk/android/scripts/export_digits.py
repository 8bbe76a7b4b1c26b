"""Write the digits data set as 20 non-IID device shards in the Android SDK's dataset format.

Usage: python export_digits.py OUT_DIR [--devices 20] [--alpha 0.5] [--seed 0]

Each device gets ``device_XX_train.fsd`` (a Dirichlet(alpha) share of the training split) and
``device_XX_test.fsd`` (an IID share of the held-out split), from fedscaled.device.datasets exactly as the
Python simulator builds them. Format (InMemoryDataset.java): little-endian ``b"FSDS"``, int32 version 1,
int32 rows n, int32 features d, n*d float32 features (row-major, 8x8x1 pixels in [0, 1]), n int32 labels.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np

from fedscaled.device.datasets import device_datasets


def write_fsd(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """One dataset file: header, features, labels."""
    n = int(y.shape[0])
    flat = np.ascontiguousarray(x.reshape((n, -1)), dtype="<f4")
    header = b"FSDS" + struct.pack("<iii", 1, n, int(flat.shape[1]))
    path.write_bytes(header + flat.tobytes() + np.ascontiguousarray(y, dtype="<i4").tobytes())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shards = device_datasets("digits", args.devices, args.alpha, args.seed)
    for i, data in enumerate(shards):
        write_fsd(args.out / f"device_{i:02d}_train.fsd", data.x_train, data.y_train)
        write_fsd(args.out / f"device_{i:02d}_test.fsd", data.x_test, data.y_test)
    total_train = sum(d.num_train for d in shards)
    total_test = sum(d.num_test for d in shards)
    print(f"wrote {len(shards)} devices ({total_train} train, {total_test} test samples) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
