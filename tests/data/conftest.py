"""Shared by the data tests: a tiny dataset with ids, labels and captions."""

from __future__ import annotations

import pytest
import torch

from diffattr.data import ImageDataset


def tiny_dataset(n: int = 6, c: int = 1, hw: int = 4, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, c, hw, hw, generator=g) * 2 - 1
    return ImageDataset(
        images=images,
        ids=torch.arange(100, 100 + n),
        labels=torch.arange(n) % 3,
        captions=[f"cap {i}" for i in range(n)],
        name="tiny",
    )


@pytest.fixture
def make_tiny():
    """``make_tiny(n, c, hw, seed)``: N random images of C×hw×hw, ids 100…, labels, captions."""
    return tiny_dataset
