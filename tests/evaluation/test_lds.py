import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffattr.cli import main
from diffattr.evaluation.lds import GroundTruth, cross_fit, evaluate_benchmark, lds_per_target
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
    from diffattr.attribution.featurize import FeatureSettings
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
    from diffattr.attribution.method_spec import method_label, parse_method_list
    from diffattr.errors import ConfigError

    got = parse_method_list("das,das[residual=none;leverage=true],random[seed=3]")
    assert got == [("das", {}), ("das", {"residual": "none", "leverage": True}),
                   ("random", {"seed": 3})]  # fmt: skip
    assert method_label(*got[1]) == "das[leverage=True;residual=none]"
    with pytest.raises(ConfigError):
        parse_method_list("das[residual]")
