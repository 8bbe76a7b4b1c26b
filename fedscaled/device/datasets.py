"""Local data for simulated devices: scikit-learn's digits (ships in the package) or generated data.

Nothing here downloads anything. Training data is split across devices with a Dirichlet label
distribution (the usual non-IID federated benchmark); the held-out test split is split IID across the
same devices, so the sample-weighted mean of every device's test counts is exactly the accuracy on the
held-out set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DIGITS_SHAPE = (8, 8, 1)
DIGITS_CLASSES = 10


@dataclass(frozen=True)
class DeviceData:
    """One device's local data: training arrays and its shard of the held-out test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of local training samples (what the device reports as ``num_samples``)."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of local test samples."""
        return int(self.y_test.shape[0])


@dataclass(frozen=True)
class Split:
    """A train/test split of one data set."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 1,797 handwritten digits as ``(n, 8, 8, 1)`` float32 in [0, 1] and int32 labels.

    The split is stratified-free but seeded: a random ``test_fraction`` of the samples is held out.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    # Imported lazily: scikit-learn is an optional ("device") dependency and slow to import.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16 in this data set.
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape((-1, *DIGITS_SHAPE))
    y = np.asarray(bunch.target, dtype=np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def synthetic(
    num_samples: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    *,
    noise: float = 0.15,
    prototype_seed: int = 1234,
) -> tuple[np.ndarray, np.ndarray]:
    """Generated, separable data of any input shape: ``(x float32 in [0, 1], y int32)``.

    Each class has a fixed random prototype image (drawn from ``prototype_seed``, so calls with
    different ``seed`` values share the same classes: train and test sets can be generated apart);
    a sample is its class prototype plus Gaussian noise, clipped to [0, 1].
    """
    if num_classes < 1 or num_samples < 0:
        raise ValueError("num_classes must be >= 1 and num_samples >= 0")
    shape = tuple(int(d) for d in input_shape)
    prototypes = np.random.default_rng(prototype_seed).uniform(0.0, 1.0, size=(num_classes, *shape))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
    x = prototypes[y] + rng.normal(0.0, noise, size=(num_samples, *shape))
    return np.clip(x, 0.0, 1.0).astype(np.float32), y


def synthetic_split(
    num_train: int, num_test: int, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> Split:
    """A train/test :class:`Split` of :func:`synthetic` data (same prototypes, different noise)."""
    x_train, y_train = synthetic(num_train, input_shape, num_classes, seed)
    x_test, y_test = synthetic(num_test, input_shape, num_classes, seed + 1_000_003)
    return Split(x_train, y_train, x_test, y_test)


def dirichlet_shards(
    y: np.ndarray, num_devices: int, alpha: float, seed: int, min_samples: int = 2
) -> list[np.ndarray]:
    """Split sample indices across devices with a Dirichlet(``alpha``) label distribution.

    For every class, the class's samples are divided among the devices in proportions drawn from
    Dirichlet(alpha): small alpha gives each device few classes (strong skew), large alpha tends to
    IID. Every index lands on exactly one device. Afterwards every device is topped up to
    ``min_samples`` by moving samples from the largest shards (a device with no data cannot train),
    which needs ``len(y) >= num_devices * min_samples``.
    """
    n = int(y.shape[0])
    if num_devices < 1:
        raise ValueError("num_devices must be >= 1")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if n < num_devices * min_samples:
        raise ValueError(f"{n} samples cannot give {num_devices} devices {min_samples} samples each")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(num_devices)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        proportions = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
        for device, part in enumerate(np.split(idx, cuts)):
            shards[device].extend(int(i) for i in part)
    # Top up starved devices from the currently largest shard; taking a random element keeps the
    # donor's label mix roughly unchanged.
    for device in range(num_devices):
        while len(shards[device]) < min_samples:
            donor = max(range(num_devices), key=lambda d: len(shards[d]))
            taken = shards[donor].pop(int(rng.integers(len(shards[donor]))))
            shards[device].append(taken)
    return [np.asarray(sorted(s), dtype=np.int64) for s in shards]


def iid_shards(n: int, num_devices: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` IID into ``num_devices`` shards of near-equal size.

    When there are fewer samples than devices, samples are reused round-robin so that every device
    has at least one (then the weighted mean of device results is no longer exactly the set's).
    """
    order = np.random.default_rng(seed).permutation(n)
    if n >= num_devices:
        return [np.sort(part) for part in np.array_split(order, num_devices)]
    return [np.asarray([order[d % n]], dtype=np.int64) for d in range(num_devices)]


def label_skew(y: np.ndarray, shards: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each shard's label histogram and the global one.

    0 for perfectly IID shards, approaching 1 when every device holds a single rare class.
    """
    global_hist = np.bincount(y, minlength=num_classes) / max(1, len(y))
    distances = []
    for shard in shards:
        if len(shard) == 0:
            continue
        hist = np.bincount(y[shard], minlength=num_classes) / len(shard)
        distances.append(0.5 * float(np.abs(hist - global_hist).sum()))
    return float(np.mean(distances)) if distances else 0.0


def make_device_data(split: Split, num_devices: int, alpha: float, seed: int,
                     min_samples: int = 2) -> list[DeviceData]:
    """Per-device data: Dirichlet(``alpha``) shards of the training set, IID shards of the test set."""
    train_shards = dirichlet_shards(split.y_train, num_devices, alpha, seed, min_samples=min_samples)
    test_shards = iid_shards(int(split.y_test.shape[0]), num_devices, seed + 1)
    return [
        DeviceData(split.x_train[tr], split.y_train[tr], split.x_test[te], split.y_test[te])
        for tr, te in zip(train_shards, test_shards, strict=True)
    ]


def device_datasets(
    dataset: str,
    num_devices: int,
    alpha: float,
    seed: int,
    *,
    input_shape: tuple[int, ...] = DIGITS_SHAPE,
    num_classes: int = DIGITS_CLASSES,
    samples_per_device: int = 50,
) -> list[DeviceData]:
    """Data for ``num_devices`` devices from ``dataset`` (``digits`` or ``synthetic``).

    ``digits`` needs a model whose input holds 64 values (``8 8 1`` or ``64``) and 10 classes; its
    arrays are reshaped to ``input_shape``. ``synthetic`` generates ``samples_per_device`` training
    samples per device (and a quarter as many test samples) for any shape.
    """
    if dataset == "digits":
        if math.prod(input_shape) != math.prod(DIGITS_SHAPE) or num_classes != DIGITS_CLASSES:
            raise ValueError(
                f"digits data is 8x8x1 with 10 classes; the model wants {input_shape} with {num_classes}")
        split = load_digits_split(seed=seed)
        shape = tuple(input_shape)
        split = Split(split.x_train.reshape((-1, *shape)), split.y_train,
                      split.x_test.reshape((-1, *shape)), split.y_test)
    elif dataset == "synthetic":
        n_train = num_devices * samples_per_device
        split = synthetic_split(n_train, max(num_devices, n_train // 4), input_shape, num_classes, seed)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; use digits or synthetic")
    min_samples = min(2, len(split.y_train) // num_devices) or 1
    return make_device_data(split, num_devices, alpha, seed, min_samples=min_samples)
