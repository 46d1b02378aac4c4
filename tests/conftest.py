"""Shared fixtures: tiny synthetic data and models that train in seconds on a CPU."""

from __future__ import annotations

import os
import shutil
import subprocess

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


CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """A Chrome/Chromium binary that runs (``DIFFATTR_CHROMIUM``, else the usual names), or
    skip with the reason (Debian: ``apt-get install chromium``)."""
    wanted = os.environ.get("DIFFATTR_CHROMIUM")
    found = next(
        (
            p
            for n in ([wanted] if wanted else []) + list(CHROMIUM_CANDIDATES)
            if (p := shutil.which(n))
        ),
        None,
    )
    if found is None:
        pytest.skip(
            "chromium not installed: `apt-get install chromium` (Debian) or set "
            "DIFFATTR_CHROMIUM to a Chrome/Chromium binary"
        )
    try:
        version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium not installed: {found} does not run ({exc})")
    if version.returncode != 0:
        pytest.skip(f"chromium not installed: {found} --version failed: {version.stderr[-300:]}")
    return found


@pytest.fixture(scope="session")
def make_tiny_run():
    """``make(path, samples=2)``: a digits run at ``path`` (24 training and 8 held-out images,
    4 steps) with ``samples`` generated images (4 sampling steps); returns its RunDir."""
    from diffattr.cli import main
    from diffattr.run import RunDir

    def make(path, samples: int = 2):
        train = ["--train-count", "24", "--val-count", "8", "--batch-size", "8", "--steps", "4"]
        assert main(["train", "--data", "digits", *train, "--out", str(path), "--quiet"]) == 0
        if samples:
            argv = ["generate", str(path), "--num", str(samples), "--steps", "4", "--quiet"]
            assert main(argv) == 0
        return RunDir(path)

    return make
