"""Relative / renormalised influence against explicit primal solves; gradient dot/cos paths."""

import numpy as np
import pytest

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
from diffattr.attribution.features.measure import make_measure
from diffattr.attribution.kernel import Kernel, row_norms
from diffattr.attribution.kernel.ridge import Ridge
from diffattr.attribution.methods import METHODS, ScoreInputs, get_method
from diffattr.attribution.methods.relative_if import inverse_norms
from diffattr.diffusion.schedule import NoiseSchedule


def rng_features(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def direct(phi, tgt, lam):
    phi, tgt = phi.astype(np.float64), tgt.astype(np.float64)
    G = phi.T @ phi + lam * np.eye(phi.shape[1])
    sol = np.linalg.solve(G, phi.T)  # columns G⁻¹φᵢ
    k = tgt @ sol
    return k, k / np.linalg.norm(sol, axis=0), k / np.linalg.norm(phi, axis=1)


def test_registered():
    for name in ("relative-if", "renormalized-if", "grad-dot", "grad-cos"):
        assert METHODS[name].measure == "loss"
    assert get_method("relative-if").uses_kernel and get_method("renormalized-if").uses_kernel


@pytest.mark.parametrize("n,k,form", [(30, 8, "primal"), (8, 30, "dual"), (12, 20, "primal")])
def test_relative_and_renormalized_equal_direct_solve(n, k, form):
    phi, tgt = rng_features(n, k), rng_features(3, k, 1)
    lam = 0.4
    _, rel, ren = direct(phi, tgt, lam)
    inputs = ScoreInputs.of(
        train_features=phi, target_features=tgt, kernel=Kernel.fit(phi, lam=lam, form=form, block=5)
    )
    np.testing.assert_allclose(get_method("relative-if").score(inputs), rel, rtol=1e-7)
    np.testing.assert_allclose(get_method("renormalized-if").score(inputs), ren, rtol=1e-7)


def test_inverse_norms_all_paths_agree():
    phi = rng_features(10, 25, 3)
    lam = 0.05  # small λ: the dual diagonal must not cancel
    sol = np.linalg.solve(phi.T.astype(np.float64) @ phi + lam * np.eye(25), phi.T)
    want = np.linalg.norm(sol, axis=0)
    gram = phi.astype(np.float64) @ phi.T
    np.testing.assert_allclose(inverse_norms(Kernel.fit(phi, lam=lam, form="dual")), want, 1e-8)
    np.testing.assert_allclose(inverse_norms(Kernel.fit(phi, lam=lam, form="primal")), want, 1e-8)
    from_gram = Kernel.from_gram(gram, lam)
    np.testing.assert_allclose(inverse_norms(from_gram, gram), want, rtol=1e-8)
    np.testing.assert_allclose(inverse_norms(from_gram), want, rtol=1e-6)  # rebuilt from factor
    np.testing.assert_allclose(row_norms(phi, block=3), np.linalg.norm(phi, axis=1), 1e-6)


def test_precomputed_gram_path_matches_features_path():
    """The LDS kernel cache gives φ(x)ᵀΦᵀ, ‖φᵢ‖², ‖φ(x)‖² and ΦΦᵀ instead of features."""
    phi, tgt = rng_features(9, 40, 4), rng_features(4, 40, 5)
    lam = 0.3
    _, rel, ren = direct(phi, tgt, lam)
    p64, t64 = phi.astype(np.float64), tgt.astype(np.float64)
    gram = p64 @ p64.T
    inputs = ScoreInputs.of(
        kernel=Kernel.from_gram(gram, lam),
        target_inner=t64 @ p64.T,
        train_sqnorm=np.diag(gram).copy(),
        target_sqnorm=(t64**2).sum(1),
        train_gram=gram,
    )
    np.testing.assert_allclose(get_method("relative-if").score(inputs), rel, rtol=1e-7)
    np.testing.assert_allclose(get_method("renormalized-if").score(inputs), ren, rtol=1e-7)
    # gradient dot / cosine: the precomputed path equals the features path
    feats = ScoreInputs.of(train_features=phi, target_features=tgt)
    for name in ("grad-dot", "grad-cos"):
        np.testing.assert_allclose(
            get_method(name).score(inputs), get_method(name).score(feats), rtol=1e-6
        )
    cos = t64 @ p64.T / np.outer(np.linalg.norm(t64, axis=1), np.linalg.norm(p64, axis=1))
    np.testing.assert_allclose(get_method("grad-cos").score(inputs), cos, rtol=1e-10)


def test_attributor_end_to_end(tiny_model, digits, tmp_path):
    train, targets = digits.subset(np.arange(12)), digits.images[100:102]
    settings = FeatureSettings(timesteps=1, params="^conv_out")
    scores = {
        m: Attributor(
            tiny_model,
            train,
            tmp_path,
            method=m,
            settings=settings,
            progress=False,
            lam=Ridge("relative", 0.1),
        ).score(targets)
        for m in ("relative-if", "renormalized-if")
    }
    names = ["conv_out.weight", "conv_out.bias"]
    gc = GradientComputer(
        tiny_model, make_measure("loss"), NoiseSchedule(), TimestepSpec(1), param_names=names
    )
    phi = gc.compute(train.images, train.ids.numpy())[0].double().numpy()
    tphi = gc.compute(targets, np.arange(2))[0].double().numpy()
    lam = 0.1 * (phi**2).sum() / min(phi.shape)
    _, rel, ren = direct(phi, tphi, lam)
    np.testing.assert_allclose(scores["relative-if"].values, rel, rtol=1e-4)
    np.testing.assert_allclose(scores["renormalized-if"].values, ren, rtol=1e-4)
    assert scores["relative-if"].meta["kernel_form"] == "dual"
