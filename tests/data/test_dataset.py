"""diffattr.data.dataset: ImageDataset: validation, subsets, positions, fingerprints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffattr.data import (
    ImageDataset,
)
from diffattr.errors import DataError


def test_dataset_validation_errors() -> None:
    good = torch.zeros(3, 1, 2, 2)
    with pytest.raises(DataError, match="float32"):
        ImageDataset(good.double(), torch.arange(3))
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        ImageDataset(good + 2, torch.arange(3))
    with pytest.raises(DataError, match="unique"):
        ImageDataset(good, torch.tensor([0, 1, 1]))
    with pytest.raises(DataError, match="ids"):
        ImageDataset(good, torch.arange(4))
    with pytest.raises(DataError, match="captions"):
        ImageDataset(good, torch.arange(3), captions=["a"])
    with pytest.raises(DataError, match="N×C×H×W"):
        ImageDataset(torch.zeros(3, 2, 2), torch.arange(3))


def test_subset_and_position_of(make_tiny) -> None:
    ds = make_tiny()
    sub = ds.subset([4, 1])
    assert sub.ids.tolist() == [104, 101]
    assert sub.captions == ["cap 4", "cap 1"]
    assert torch.equal(sub.images[0], ds.images[4])
    assert ds.position_of([105, 100]).tolist() == [5, 0]
    assert sub.position_of(101).item() == 1
    with pytest.raises(DataError, match="999"):
        ds.position_of([100, 999])
    with pytest.raises(DataError, match="out of range"):
        ds.subset([6])


def test_fingerprint_stable_and_sensitive(make_tiny) -> None:
    ds = make_tiny()
    fp = ds.fingerprint()
    assert len(fp) == 64 and fp == make_tiny().fingerprint()
    changed = ds.images.clone()
    changed[2, 0, 1, 1] += 0.01
    assert ImageDataset(changed, ds.ids).fingerprint() != fp
    assert ImageDataset(ds.images, ds.ids + 1).fingerprint() != fp
    # Same digest in a fresh interpreter (no dependence on hash randomisation).
    code = (
        "import torch; from diffattr.data import ImageDataset;"
        "g = torch.Generator().manual_seed(0);"
        "x = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1;"
        "print(ImageDataset(x, torch.arange(100, 106)).fingerprint())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fp
