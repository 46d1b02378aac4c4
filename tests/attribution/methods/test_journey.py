"""Journey-TRAK: features along the recorded trajectory, the bit-identical check, its errors."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
from diffattr.attribution.features.measure import make_measure
from diffattr.attribution.kernel import Kernel
from diffattr.attribution.kernel.ridge import Ridge
from diffattr.attribution.methods import ScoreInputs, get_method
from diffattr.attribution.methods.journey import JOURNEY_KEY, journey_features, regenerate
from diffattr.diffusion.sampling import sample
from diffattr.diffusion.schedule import NoiseSchedule, keyed_noise
from diffattr.errors import DataError, DiffattrError

NAMES = ["conv_out.weight", "conv_out.bias"]
SETTINGS = FeatureSettings(measure="loss", timesteps=1, params="^conv_out", projector="identity")


@pytest.fixture
def setup(tiny_model, digits):
    samples = sample(tiny_model, [5, 6], num_steps=2, progress=False)
    return tiny_model, digits.subset(np.arange(12)), samples


def explicit_features(model, samples):
    """Mean over recorded steps of normalised ∇‖ε_θ(√ᾱ x̂₀ + √(1−ᾱ) ε, t) − ε‖²/d, with x̂₀ the
    step's clipped x₀-prediction and ε keyed by (JOURNEY_KEY, 0, seed, t)."""
    regen = sample(model, samples.seeds, num_steps=2, record_trajectory=True, progress=False)
    gc = GradientComputer(
        model, make_measure("loss"), NoiseSchedule(), TimestepSpec(1), param_names=NAMES
    )
    ab_all = NoiseSchedule().alphas_cumprod()
    out = np.zeros((len(samples), gc.dim))
    for i, seed in enumerate(samples.seeds):
        for s, t in enumerate(regen.timesteps):
            xt, ab, tt = regen.trajectory[s, i : i + 1], ab_all[int(t)], torch.tensor([int(t)])
            with torch.no_grad():
                x0 = ((xt - (1 - ab).sqrt() * model(xt, tt).sample) / ab.sqrt()).clamp(-1, 1)
            eps = keyed_noise(JOURNEY_KEY, 0, int(seed), int(t), (1, 8, 8))[None]
            x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            g = gc.flat_grads(x, tt, eps, ab[None])[0][0].double().numpy()
            out[i] += g / np.linalg.norm(g) / len(regen.timesteps)
    return out


def test_features_and_scores_equal_explicit(setup, tmp_path):
    model, train, samples = setup
    want_feats = explicit_features(model, samples)
    feats = journey_features(model, samples, SETTINGS, store_dir=tmp_path)
    np.testing.assert_allclose(feats, want_feats, rtol=1e-4, atol=1e-7)
    assert len(list(tmp_path.glob("journey-loss-*"))) == 1
    again = journey_features(model, samples, SETTINGS, store_dir=tmp_path)  # from the store
    assert np.array_equal(feats, again)

    gc = GradientComputer(
        model, make_measure("loss"), NoiseSchedule(), TimestepSpec(1), param_names=NAMES
    )
    phi = gc.compute(train.images, train.ids.numpy())[0].numpy()
    lam = 0.5
    inputs = ScoreInputs.of(
        train_features=phi,
        kernel=Kernel.fit(phi, lam=lam),
        targets=samples,
        model=model,
        settings=SETTINGS,
        store_dir=tmp_path,
    )
    p64 = phi.astype(np.float64)
    want = want_feats @ np.linalg.solve(p64.T @ p64 + lam * np.eye(p64.shape[1]), p64.T)
    got = get_method("journey-trak").score(inputs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_through_attributor(setup, tmp_path):
    model, train, samples = setup
    settings = replace(SETTINGS, measure="das")  # the method sets its own measure (loss)
    att = Attributor(
        model, train, tmp_path, method="journey-trak", settings=settings, progress=False
    )
    feats = explicit_features(model, samples)
    scores = att.score(samples)
    kernel = att.kernel()
    want = kernel.cross(feats)
    np.testing.assert_allclose(scores.values, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert scores.meta["journey_steps"] == [0, 1]


def test_bit_identical_check_and_errors(setup, tmp_path):
    model, train, samples = setup
    assert torch.equal(regenerate(model, samples).images, samples.images)
    # the Attributor switches attention to the classic processor: still reproduces
    GradientComputer(model, make_measure("loss"), NoiseSchedule(), TimestepSpec(1))
    assert torch.equal(regenerate(model, samples).images, samples.images)

    bad = replace(samples, images=samples.images.clone())
    bad.images[0, 0, 0, 0] += 1e-6
    with pytest.raises(DiffattrError, match="bit for bit"):
        journey_features(model, bad, SETTINGS)
    other = replace(samples, num_steps=3)
    with pytest.raises(DiffattrError, match="bit for bit"):
        regenerate(model, other)

    inputs = ScoreInputs.of(
        train_features=np.ones((12, 5), np.float32),
        targets=samples.images,
        model=model,
        settings=SETTINGS,
    )
    with pytest.raises(DataError, match="no recorded seeds"):
        get_method("journey-trak").score(inputs)
    with pytest.raises(DataError, match="no recorded seeds"):
        get_method("journey-trak").score(replace(inputs, targets=train))
    with pytest.raises(DataError, match="no recorded seed"):
        get_method("journey-trak").score(
            replace(inputs, targets=replace(samples, seeds=np.array([5, -1])))
        )


def test_score_grid_journey_on_generated_trak_on_real(setup, tmp_path):
    """LDS form (TRAK's kernel as a Gram): generated targets get trajectory features, real ones
    TRAK's, per λ."""
    from diffattr.attribution.kernel import dual_gram, inner_products

    model, train, samples = setup
    images = torch.cat([samples.images, train.images[5:6]])
    ids, seeds = np.array([100, 101, 7]), np.array([5, 6, -1])
    lambdas = [Ridge("relative", 0.1), Ridge("relative", 1.0), None]  # None: the default rule
    journey = Attributor(
        model, train, tmp_path, method="journey-trak", settings=SETTINGS, progress=False,
        num_steps=2,
    )  # fmt: skip
    trak = Attributor(model, train, tmp_path, method="trak", settings=SETTINGS, progress=False)
    phi = journey.featurize().features
    inputs = journey.inputs(images, images, ids).updated(
        train_features=phi,
        target_seeds=seeds,
        train_gram=dual_gram(phi),
        feature_dim=phi.shape[1],
        target_inner=inner_products(trak.featurize_targets(images, ids).features, phi),
    )
    got = journey.method.score_grid(inputs, lambdas)
    feats = explicit_features(model, samples)
    for c, scores in zip(lambdas, got, strict=True):
        att = Attributor(
            model, train, tmp_path, method="trak", settings=SETTINGS, lam=c,
            progress=False,
        )  # fmt: skip
        want_gen = att.kernel().cross(feats)
        np.testing.assert_allclose(scores[:2], want_gen, rtol=1e-4, atol=1e-6)
        want_real = att.score(images[2:], ids[2:]).values
        np.testing.assert_allclose(scores[2:], want_real, rtol=1e-4, atol=1e-6)
