import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffattr.cli import main
from diffattr.errors import DiffattrError
from diffattr.evaluation.ground_truth import GroundTruth, lds_per_target
from diffattr.evaluation.lds import cross_fit, evaluate_benchmark
from diffattr.evaluation.stats import bootstrap_mean_ci, spearman_columns


def synthetic(num_subsets=64, n=50, t=20, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    subsets = np.sort(np.stack([rng.permutation(n)[: n // 2] for _ in range(num_subsets)]), 1)
    tau = rng.standard_normal((t, n))
    membership = np.zeros((num_subsets, n))
    np.put_along_axis(membership, subsets, 1.0, axis=1)
    # Linear datamodel: a sample with positive τ lowers the target's loss when present.
    F = -(membership @ tau.T) + noise * rng.standard_normal((num_subsets, t))
    gt = GroundTruth(subsets, F[None], np.zeros(t, int), torch.zeros(t, 1, 2, 2), np.arange(t))
    return gt, tau


def test_true_scores_reach_one_random_zero_reversed_minus_one():
    gt, tau = synthetic()
    assert np.mean(lds_per_target(gt, tau)) > 0.97
    assert np.mean(lds_per_target(gt, -tau)) < -0.97
    rand = np.random.default_rng(1).standard_normal(tau.shape)
    assert abs(np.mean(lds_per_target(gt, rand))) < 0.1


def test_spearman_columns_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    b[:, 0] = a[:, 0] ** 3
    got = spearman_columns(a, b)
    for j in range(4):
        assert got[j] == pytest.approx(spearmanr(a[:, j], b[:, j]).statistic)
    lo, hi = bootstrap_mean_ci(np.array([0.1, 0.2, 0.3, 0.4]))
    assert lo < 0.25 < hi


def test_cross_fit_never_uses_the_reported_half():
    # λ index 1 is best on every target, except that index 0 looks perfect on one target:
    lds = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    values, chosen = cross_fit(lds, np.ones(6, bool))
    assert chosen == [1, 1] and np.allclose(values, 0.5)
    spike = lds.copy()
    spike[0, 2] = 10.0  # only a reported target favours λ 0
    values, chosen = cross_fit(spike, np.ones(6, bool))
    reported_with_zero = [c for c in chosen if c == 0]
    # λ 0 can only be chosen on the half containing target 2; it then scores the other half.
    assert len(reported_with_zero) <= 1
    assert values.max() <= 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lds") / "run"
    argv = ["train", "--out", str(run), "--train-count", "16", "--val-count", "3",
            "--steps", "3", "--batch-size", "8", "--quiet", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    return run


def build_argv(run, out):
    return ["lds", "build", str(run), "--out", str(out), "--subsets", "4", "--seeds", "0",
            "--measure-timesteps", "4", "--num-val", "3", "--num-gen", "2",
            "--executor", "inprocess", "--quiet", "--threads", "1"]  # fmt: skip


def test_tiny_lds_end_to_end(tiny_run, tmp_path):
    bench = tmp_path / "bench"
    assert main(build_argv(tiny_run, bench)) == 0
    gt = GroundTruth.load(bench)
    assert gt.F.shape == (1, 4, 5) and np.isfinite(gt.F).all()
    assert list(gt.kinds) == [0, 0, 0, 1, 1]
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.run import RunDir

    rows = evaluate_benchmark(
        bench, RunDir(tiny_run), [("das", {}), ("pixel-cos", {}), ("random", {})], [1],
        lambdas=[0.1, 1.0], base_settings=FeatureSettings(), progress=False, bootstrap=20,
    )  # fmt: skip
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["das", "pixel-cos", "random"]
    assert -1 <= rows[0]["val"]["lds"] <= 1 and "gen" in rows[0]
    # The kernel cache makes a second evaluation independent of the run directory.
    rows2 = evaluate_benchmark(
        bench, None, [("das", {})], [1], lambdas=[0.1, 1.0], progress=False, bootstrap=20
    )
    assert rows2[0]["val"]["lds"] == rows[0]["val"]["lds"]
    # ... and the command line reads the same committed files.
    argv = ["lds", "eval", str(bench), "--method", "das", "--timesteps", "1", "--lambdas",
            "0.1,1.0", "--bootstrap", "20", "--quiet", "--json"]  # fmt: skip
    assert main(argv) == 0
    assert "| das | 1 |" in (bench / "results.md").read_text()
    # The default λ rule's LDS is reported next to the cross-fit: it is the LDS of the scores
    # that the default Attributor gives, and a λ-free method's default is its one LDS.
    from diffattr.evaluation.kernel_cache import kernel_cache as load_cache
    from diffattr.evaluation.lds import method_scores

    cache = load_cache(None, bench, gt, FeatureSettings(timesteps=1))
    train_images = RunDir(tiny_run).data_spec().load()[0].images
    (default,) = method_scores("das", cache, [None], train_images, gt.images)
    per_target = lds_per_target(gt, default)
    assert rows2[0]["val"]["default_lds"] == pytest.approx(np.nanmean(per_target[:3]))
    assert rows2[0]["val"]["default_lambda"] == "effective-dim:200"
    assert rows[1]["val"]["default_lds"] == rows[1]["val"]["lds"]  # pixel-cos: no λ
    # A combination is scored from its members' default-λ scores (from the cache: no run).
    from diffattr.attribution.methods.combination import combine_scores

    (pixel,) = method_scores("pixel-cos", None, [None], train_images, gt.images)
    row = evaluate_benchmark(
        bench, None, [("combine", {"methods": "das+pixel-cos"})], [1], progress=False,
        bootstrap=20,
    )[0]  # fmt: skip
    want = lds_per_target(gt, combine_scores([default, pixel]))
    assert row["method"] == "combine[methods=das+pixel-cos]"
    assert row["val"]["lds"] == pytest.approx(np.nanmean(want[:3]))
    # A screen keeps each target's candidates' scores, 0 elsewhere; one row per screen, and a
    # screen of every training image changes nothing.
    from diffattr.attribution.screening import Screen, candidate_rows

    everything, two = Screen("pixel-cos", len(train_images), "all"), Screen("pixel-cos", 2, "all")
    full, masked = evaluate_benchmark(
        bench, None, [("das", {})], [1], progress=False, bootstrap=20, screens=[everything, two]
    )[:2]
    assert full["val"]["default_lds"] == rows2[0]["val"]["default_lds"]
    assert masked["method"] == "das screen=pixel-cos:2" and masked["screen"]["size"] == 2
    keep = np.zeros_like(default, dtype=bool)
    np.put_along_axis(keep, candidate_rows(pixel, 2), True, axis=1)
    want = lds_per_target(gt, np.where(keep, default, 0.0))
    assert masked["val"]["default_lds"] == pytest.approx(np.nanmean(want[:3]))
    with pytest.raises(DiffattrError, match="--screen-kernel all"):
        evaluate_benchmark(bench, None, [("das", {})], [1], progress=False,
                           screens=[Screen("pixel-cos", 2, "union")])  # fmt: skip
    # `--screen none,…`: the unscreened row too, first, as without a screen.
    from diffattr.commands.evaluate import lds_screens

    parsed = lds_screens(argparse.Namespace(screen="none,pixel-cos:2"))
    assert parsed[0] is None and parsed[1] == two
    plain, screened = evaluate_benchmark(
        bench, None, [("das", {})], [1], progress=False, bootstrap=20, screens=parsed
    )[:2]
    assert plain["method"] == "das" and "screen" not in plain
    assert plain["val"]["default_lds"] == rows2[0]["val"]["default_lds"]
    assert screened["val"]["default_lds"] == masked["val"]["default_lds"]


def test_summary_flags_a_lambda_at_the_grid_edge():
    """A λ chosen at either end of the grid where LDS still rises towards it is flagged; an
    interior one is not, nor an end on a plateau (λ too small to change the kernel)."""
    from diffattr.evaluation.lds import format_table, summarize

    rng = np.random.default_rng(0)
    M, N, T = 12, 10, 8
    subsets = np.stack([rng.choice(N, N // 2, replace=False) for _ in range(M)])
    truth = rng.standard_normal((T, N))
    membership = np.zeros((M, N))
    np.put_along_axis(membership, subsets, 1.0, axis=1)
    F = -(membership @ truth.T)[None]  # (1 seed, M, T): -F = Σ truth over the subset
    gt = GroundTruth(subsets, F, np.zeros(T, int), torch.zeros(T, 1, 2, 2), np.arange(T))
    noisy = [truth + s * rng.standard_normal((T, N)) for s in (3.0, 0.0, 3.0)]
    assert not summarize(gt, noisy, [1, 2, 3], bootstrap=10)["val"]["lambda_at_edge"]
    summary = summarize(gt, noisy[1:], [2, 3], bootstrap=10)
    assert summary["val"]["lambda_at_edge"]
    row = {"method": "x", "timesteps": 1, **summary}
    assert "†" in format_table([row]) and "widen" in format_table([row])
    plateau = [noisy[1], noisy[1], noisy[0]]  # the best score twice at the low end
    assert not summarize(gt, plateau, [1, 2, 3], bootstrap=10)["val"]["lambda_at_edge"]


def test_killed_build_resumes_without_retraining(tiny_run, tmp_path):
    clean = tmp_path / "clean"
    assert main(build_argv(tiny_run, clean)) == 0

    bench = tmp_path / "bench"
    cmd = [sys.executable, "-m", "diffattr.cli", *build_argv(tiny_run, bench)]
    proc = subprocess.Popen(cmd, env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline and not list(bench.glob("models/*/F.npy")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in bench.glob("models/*/F.npy")}
    assert 1 <= len(finished) < 4
    assert subprocess.run(cmd).returncode == 0
    for p, mtime in finished.items():
        assert p.stat().st_mtime_ns == mtime  # not retrained
    a = np.load(bench / "ground_truth.npz")["F_t"]
    b = np.load(clean / "ground_truth.npz")["F_t"]
    assert np.array_equal(a, b)


def test_method_list_parsing():
    from diffattr.attribution.methods.spec import method_label, parse_method_list
    from diffattr.errors import ConfigError

    got = parse_method_list("das,das[residual=none;leverage=true],random[seed=3]")
    assert got == [("das", {}), ("das", {"residual": "none", "leverage": True}),
                   ("random", {"seed": 3})]  # fmt: skip
    assert method_label(*got[1]) == "das[leverage=True;residual=none]"
    with pytest.raises(ConfigError):
        parse_method_list("das[residual]")


def test_noise_ceiling_bounds_the_seed_average():
    """Spearman–Brown: F measured with S seeds has reliability S·r/(1 + (S−1)·r); the ceiling
    is its square root, above the single-seed agreement r, and a prediction that knows the
    true F reaches at most about it."""
    from diffattr.evaluation.ground_truth import GroundTruth, noise_ceiling, seed_agreement
    from diffattr.evaluation.stats import spearman_columns

    rng = np.random.default_rng(0)
    M, T, S = 400, 30, 2
    truth = rng.normal(size=(M, T))
    F = np.stack([truth + rng.normal(size=(M, T)) for _ in range(S)])  # r ≈ 0.5
    gt = GroundTruth(np.zeros((M, 1), dtype=np.int64), F, np.zeros(T), None, np.arange(T))
    r = seed_agreement(gt)
    ceiling = noise_ceiling(gt)
    assert np.allclose(ceiling, np.sqrt(2 * r / (1 + r)))
    assert (ceiling > r).all()
    perfect = spearman_columns(truth, F.mean(axis=0))  # the best any method can do
    assert abs(perfect.mean() - ceiling.mean()) < 0.03
    assert perfect.mean() > r.mean() + 0.1  # the old "ceiling" r was beaten by the truth
