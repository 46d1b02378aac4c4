"""diffattr.evaluation.stats: the LDS's Spearman correlation and its intervals."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from diffattr.evaluation.stats import (
    bootstrap_lds_ci,
    bootstrap_mean_ci,
    finite_mean,
    spearman_columns,
)


def test_spearman_columns_equals_scipy_per_column_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(30, 4)).astype(float)  # ties
    b = a + rng.standard_normal((30, 4))
    got = spearman_columns(a, b)
    want = [spearmanr(a[:, j], b[:, j]).statistic for j in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_constant_column_gives_nan_and_finite_mean_skips_it():
    a = np.column_stack([np.arange(5.0), np.ones(5)])
    r = spearman_columns(a, a)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1])
    assert finite_mean(r) == pytest.approx(1.0)
    assert np.isnan(finite_mean(np.array([np.nan])))


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.5, 1, 20), rng.normal(0.5, 1, 2000)
    lo_s, hi_s = bootstrap_mean_ci(small)
    lo_l, hi_l = bootstrap_mean_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert bootstrap_mean_ci(np.array([np.nan])) == (pytest.approx(np.nan, nan_ok=True),) * 2


def test_lds_interval_contains_the_lds_of_a_real_signal():
    rng = np.random.default_rng(2)
    measured = rng.standard_normal((40, 10))
    predicted = measured + 0.5 * rng.standard_normal((40, 10))
    lds = finite_mean(spearman_columns(predicted, measured))
    lo, hi = bootstrap_lds_ci(predicted, measured, num=200)
    assert 0 < lo < lds < hi < 1
