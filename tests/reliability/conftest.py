"""Fixtures of the reliability tests: a tiny trained run (helpers: reliability_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_helpers import QUIET, TRAIN_ARGS

from diffattr.cli import main


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run trained for 4 steps on 24 digits, with 3 generated samples."""
    run = tmp_path_factory.mktemp("reliability") / "run"
    assert main(["train", "--out", str(run), *TRAIN_ARGS, "--steps", "4", *QUIET]) == 0
    assert main(["generate", str(run), "--num", "3", "--steps", "3", *QUIET]) == 0
    return run
