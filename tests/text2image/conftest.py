"""Tiny text-to-image fixtures: a random pipeline built from config, captioned shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data import ImageDataset
from diffattr.text2image.pipeline import load_components, write_tiny_pipeline

COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "white": (1, 1, 1)}


def shapes(n: int = 12, seed: int = 0) -> ImageDataset:
    """16×16 RGB images: a coloured 8×8 square at a random place; caption names the colour."""
    rng = np.random.default_rng(seed)
    images = -np.ones((n, 3, 16, 16), np.float32)
    captions = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        y, x = rng.integers(0, 8, 2)
        images[i, :, y : y + 8, x : x + 8] = np.asarray(COLOURS[name], np.float32)[:, None, None]
        captions.append(f"a {name} square")
    return ImageDataset(torch.from_numpy(images), torch.arange(n), captions=captions, name="shapes")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("t2i") / "base", seed=0, sample_size=8)


@pytest.fixture(scope="session")
def components(tiny_pipeline):
    return load_components(tiny_pipeline)


@pytest.fixture(scope="session")
def captioned() -> ImageDataset:
    return shapes()


@pytest.fixture(scope="session")
def make_shapes():
    return shapes
