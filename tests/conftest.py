"""Shared fixtures: tiny synthetic data and models that train in seconds on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data import ImageDataset, load_builtin
from diffattr.diffusion.presets import build_unet


@pytest.fixture(autouse=True, scope="session")
def _commands_single_thread():
    """CLI commands run in tests use one thread too (not the idle cores at their start), so a
    model trained by one command and retrained by another match bit for bit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFATTR_THREADS", "1")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests pin torch to one thread: deterministic and fast for tiny tensors."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    return load_builtin("digits")


@pytest.fixture
def small_set(digits) -> ImageDataset:
    """24 digit images with their original ids."""
    return digits.subset(np.arange(24))


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", 8, 1).eval()
