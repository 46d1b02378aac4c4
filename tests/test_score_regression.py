"""Scores do not change when the code is restructured: a small run scored by many methods
through the command line equals the scores committed in ``tests/data/score_regression.npz``
(written by ``tests/data/score_regression.py`` before the model-family redesign)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def _fixture_module():
    spec = importlib.util.spec_from_file_location("score_regression", DATA / "score_regression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_scores_equal_the_committed_ones(tmp_path):
    want = np.load(DATA / "score_regression.npz")
    got = _fixture_module().scores_of_a_small_run(tmp_path)
    assert sorted(got) == sorted(want.files)
    for name in want.files:
        a, b = got[name], want[name]
        assert a.shape == b.shape, name
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        scale = np.nanmax(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale, equal_nan=True, err_msg=name)
