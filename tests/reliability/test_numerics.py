"""Numerical robustness: a singular kernel is a clear error with a λ that works; Gram sums are
float64 over float32 features; scores do not depend on the featurize batch size."""

from __future__ import annotations

import re

import numpy as np
import pytest
from reliability_helpers import QUIET, assert_clean_error, copy_run, run_main

from diffattr.attribution.kernel import Kernel
from diffattr.attribution.kernel.ridge import Ridge
from diffattr.errors import NumericalError


def duplicated_features() -> np.ndarray:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((6, 40)).astype(np.float32)
    return np.concatenate([f, f[:3]])  # 9 rows of rank 6: ΦΦᵀ is singular


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_singular_kernel_error_suggests_a_lambda_that_works(form):
    phi = duplicated_features()
    if form == "primal":
        phi = np.ascontiguousarray(phi[:, :5].T)  # 5 rows of 9 columns: ΦᵀΦ (9×9) singular
    with pytest.raises(NumericalError, match="not positive definite") as info:
        Kernel.fit(phi, lam=1e-300, form=form)
    hint = info.value.hint
    suggested = float(re.search(r"--lambda ([0-9.e+-]+)", hint).group(1))
    relative = float(re.search(r"--relative-lambda ([0-9.e+-]+)", hint).group(1))
    assert Kernel.fit(phi, lam=suggested, form=form).lam == suggested
    fitted = Kernel.fit(phi, Ridge("relative", relative), form=form)
    assert fitted.lam == pytest.approx(suggested, rel=1e-2)


def test_singular_kernel_from_the_cli(tiny_run, tmp_path, monkeypatch):
    """The CLI shows the singular-kernel error and its λ hint as two lines, no traceback.

    (Real training features are full rank, so the fit sees rank-deficient features here.)
    """
    from diffattr.attribution.attributor import Attributor

    def singular_kernel(self):
        return Kernel.fit(duplicated_features(), self.lam)

    monkeypatch.setattr(Attributor, "kernel", singular_kernel)
    run = copy_run(tiny_run, tmp_path / "run", parts=("run.json", "train.json", "model", "samples"))
    code, _, err = run_main(
        "score", run, "--method", "trak", "--timesteps", "2", "--lambda", "1e-300", *QUIET
    )
    assert_clean_error(code, err, "λ=1e-300", "not positive definite")
    assert err.splitlines()[1].startswith("hint: increase λ, e.g. --lambda")
    assert not (run / "scores").exists()


def test_gram_accumulates_in_float64():
    """Large, badly scaled float32 features: kernel products match a float64 reference."""
    rng = np.random.default_rng(1)
    n, k = 20000, 6
    phi = (rng.standard_normal((n, k)) * rng.uniform(1, 1e3, size=(n, 1))).astype(np.float32)
    phi[:, 0] += 1e3  # a large common offset: float32 sums would lose ~4 digits here
    targets = rng.standard_normal((3, k)).astype(np.float32)
    kern = Kernel.fit(phi, lam=1.0, block=1024)
    f64 = phi.astype(np.float64)
    gram = f64.T @ f64 + np.eye(k)
    ref = (f64 @ np.linalg.solve(gram, targets.astype(np.float64).T)).T
    got = kern.cross(targets)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - ref)) <= 1e-9 * np.max(np.abs(ref))
    lev = kern.leverage()
    ref_lev = np.einsum("ij,ji->i", f64, np.linalg.solve(gram, f64.T))
    assert np.max(np.abs(lev - ref_lev)) <= 1e-9 * np.max(np.abs(ref_lev))


@pytest.mark.parametrize("method", ["das", "dtrak"])
def test_scores_do_not_depend_on_batch_size(tiny_run, tmp_path, method):
    scores = []
    for bs in (1, 8):
        run = copy_run(
            tiny_run, tmp_path / f"b{bs}", parts=("run.json", "train.json", "model", "samples")
        )
        code, _, err = run_main(
            "score", run, "--method", method, "--timesteps", "4", "--batch-size", bs, *QUIET
        )
        assert code == 0, err
        scores.append(np.load(run / "scores" / f"{method}-samples" / "scores.npy"))
    a, b = (s.astype(np.float64) for s in scores)
    assert a.shape == (3, 24)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
