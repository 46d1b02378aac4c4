"""Seeded train/validation splits and random training subsets (for the LDS)."""

from __future__ import annotations

import numpy as np

from diffattr.data.dataset import ImageDataset, _check_int
from diffattr.errors import DataError
from diffattr.seeding import derive_seed

_SPLIT_STREAM = 7001
_SUBSET_STREAM = 7002


def train_val_split(
    dataset: ImageDataset,
    val_count: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_count: int | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Split into ``(train, val)`` with a permutation keyed by ``(seed, 7001)``.

    ``val_count`` (else ``round(val_fraction * N)``) rows form the validation part; the
    rest is the train part, capped at its first ``train_count`` rows in permuted order.
    The validation part does not depend on ``train_count``. Both parts keep the original
    ids and are returned in their original row order.
    """
    n = len(dataset)
    seed = _check_int(seed, "seed")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if val_count is None:
        if not 0.0 < float(val_fraction) < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
        val_count = int(round(float(val_fraction) * n))
        source = f"val_fraction {val_fraction} of {n} images"
    else:
        val_count = _check_int(val_count, "val_count")
        source = f"val_count {val_count}"
    if val_count < 1:
        raise DataError(
            f"the validation split would be empty ({source})",
            hint="raise val_count or val_fraction",
        )
    if val_count >= n:
        raise DataError(
            f"{source} leaves no training images in dataset {dataset.name!r} ({n} images)",
            hint="use a smaller validation split",
        )
    available = n - val_count
    if train_count is not None:
        train_count = _check_int(train_count, "train_count")
        if train_count < 1:
            raise DataError(f"train_count must be at least 1, got {train_count}")
        if train_count > available:
            raise DataError(
                f"train_count {train_count} exceeds the {available} images left after "
                f"holding out {val_count} for validation in dataset {dataset.name!r}",
                hint=f"use train_count <= {available}",
            )
    else:
        train_count = available
    perm = np.random.default_rng(derive_seed(seed, _SPLIT_STREAM)).permutation(n)
    val_pos = np.sort(perm[:val_count])
    train_pos = np.sort(perm[val_count : val_count + train_count])
    train, val = dataset.subset(train_pos), dataset.subset(val_pos)
    train.name, val.name = f"{dataset.name}[train]", f"{dataset.name}[val]"
    return train, val


def sample_subsets(
    num_items: int, num_subsets: int, fraction: float = 0.5, seed: int = 0
) -> np.ndarray:
    """``num_subsets × round(fraction · num_items)`` int64 array of sorted positions.

    Subset ``j`` is drawn without replacement from a stream keyed by ``(seed, 7002, j)``,
    so drawing more subsets never changes the earlier ones.
    """
    num_items = _check_int(num_items, "num_items")
    num_subsets = _check_int(num_subsets, "num_subsets")
    seed = _check_int(seed, "seed")
    if num_items < 1:
        raise DataError(f"num_items must be at least 1, got {num_items}")
    if num_subsets < 1:
        raise DataError(f"num_subsets must be at least 1, got {num_subsets}")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if not (isinstance(fraction, int | float) and 0.0 < float(fraction) <= 1.0):
        raise DataError(f"subset fraction must be in (0, 1], got {fraction!r}")
    k = int(round(float(fraction) * num_items))
    if k < 1:
        raise DataError(
            f"subset fraction {fraction} of {num_items} items gives empty subsets",
            hint="raise the fraction",
        )
    out = np.empty((num_subsets, k), dtype=np.int64)
    for j in range(num_subsets):
        rng = np.random.default_rng(derive_seed(seed, _SUBSET_STREAM, j))
        out[j] = np.sort(rng.permutation(num_items)[:k])
    return out
