"""Statistics for LDS: column-wise Spearman correlation and bootstrap intervals."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def finite_mean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[:, j] with b[:, j] for every column j (ties get mean ranks).

    A constant column gives NaN.
    """
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra = ra - ra.mean(axis=0)
    rb = rb - rb.mean(axis=0)
    denom = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=0) / denom


def bootstrap_mean_ci(
    values: np.ndarray, num: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(num, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_lds_ci(
    predicted: np.ndarray,
    measured: np.ndarray,
    num: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of mean LDS resampling both subsets (rows) and targets (columns).

    ``predicted`` and ``measured`` are (M subsets, T targets); LDS per target is the Spearman
    correlation over subsets, so resampling subsets captures the draw of subsets too.
    """
    rng = np.random.default_rng(seed)
    m, t = predicted.shape
    means = np.empty(num)
    for b in range(num):
        rows = rng.integers(0, m, size=m)
        cols = rng.integers(0, t, size=t)
        # a resample may hold only constant columns: NaN, not a warning
        means[b] = finite_mean(spearman_columns(predicted[rows][:, cols], measured[rows][:, cols]))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
