"""diffattr.data.splits: train/held-out splits and LDS subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data import (
    ImageDataset,
    sample_subsets,
    train_val_split,
)
from diffattr.errors import DataError


def test_train_val_split(digits: ImageDataset) -> None:
    tr, va = train_val_split(digits, val_count=100, seed=3)
    tr2, va2 = train_val_split(digits, val_count=100, seed=3)
    assert torch.equal(tr.ids, tr2.ids) and torch.equal(va.ids, va2.ids)
    assert len(va) == 100 and len(tr) == 1697
    assert not set(tr.ids.tolist()) & set(va.ids.tolist())
    assert set(tr.ids.tolist()) | set(va.ids.tolist()) == set(range(1797))
    pos = digits.position_of(va.ids)
    assert torch.equal(digits.images[torch.from_numpy(pos)], va.images)
    _, va_other = train_val_split(digits, val_count=100, seed=4)
    assert not torch.equal(va.ids, va_other.ids)
    # train_count caps train but leaves the validation part unchanged
    small, va3 = train_val_split(digits, val_count=100, seed=3, train_count=50)
    assert len(small) == 50 and torch.equal(va3.ids, va.ids)
    assert set(small.ids.tolist()) <= set(tr.ids.tolist())
    # fraction default
    _, vf = train_val_split(digits)
    assert len(vf) == round(0.1 * 1797)
    for kwargs in (
        {"val_count": 0},
        {"val_count": 1797},
        {"val_count": 10, "train_count": 1788},
        {"val_fraction": 0.0001},
    ):
        with pytest.raises(DataError):
            train_val_split(digits, **kwargs)


def test_sample_subsets() -> None:
    a = sample_subsets(100, 8, fraction=0.5, seed=11)
    b = sample_subsets(100, 8, fraction=0.5, seed=11)
    assert a.shape == (8, 50) and a.dtype == np.int64
    assert np.array_equal(a, b)
    for row in a:
        assert np.all(np.diff(row) > 0) and row.min() >= 0 and row.max() < 100
    assert np.array_equal(sample_subsets(100, 4, fraction=0.5, seed=11), a[:4])
    assert not np.array_equal(sample_subsets(100, 8, fraction=0.5, seed=12), a)
    assert not np.array_equal(a[0], a[1])
    assert sample_subsets(10, 2, fraction=0.25).shape == (2, 2)  # round(2.5) == 2
    for args in ((0, 3), (10, 0)):
        with pytest.raises(DataError):
            sample_subsets(*args)
    with pytest.raises(DataError):
        sample_subsets(10, 2, fraction=1.5)
    with pytest.raises(DataError):
        sample_subsets(10, 2, fraction=0.01)
