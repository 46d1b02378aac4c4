from dataclasses import replace

import numpy as np
import pytest
import scipy.optimize
import torch

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
from diffattr.attribution.features.measure import make_measure
from diffattr.attribution.scores import Scores
from diffattr.diffusion.schedule import NoiseSchedule


@pytest.fixture
def setup(tiny_model, digits, tmp_path):
    train = digits.subset(np.arange(16))
    targets = digits.images[100:103]
    return tiny_model, train, targets, tmp_path


def test_das_from_store_equals_direct_computation(setup):
    model, train, targets, tmp = setup
    # Only conv_out (289 parameters): the primal solve below stays small and independent of
    # the store's dual (N < p) path.
    settings = FeatureSettings(timesteps=2, params="^conv_out")
    att = Attributor(model, train, tmp / "f", method="das", settings=settings, progress=False)
    assert att.settings.projector == "identity"  # small: exact, unprojected
    scores = att.score(targets)
    assert scores.meta["kernel_form"] == "dual"

    names = ["conv_out.weight", "conv_out.bias"]
    gc = GradientComputer(
        model, make_measure("das"), NoiseSchedule(), TimestepSpec(2), param_names=names
    )
    phi, err, _ = gc.compute(train.images, train.ids.numpy())
    tphi, _, _ = gc.compute(targets, np.arange(3))
    phi, tphi, err = phi.double().numpy(), tphi.double().numpy(), err.double().numpy()
    # the default λ: the ridge keeps 200 effective dimensions, at most half of min(N, k) (8 of
    # 16 here): Σ σ/(σ+λ) = min(200, min(N, k) / 2)
    sigma = np.linalg.eigvalsh(phi.T @ phi)
    target = min(200, min(phi.shape) / 2)
    lam = scipy.optimize.brentq(lambda x: np.sum(sigma / (sigma + x)) - target, 1e-12, 1e6)
    assert scores.meta["lambda"] == pytest.approx(lam, rel=1e-6)
    assert scores.meta["lambda_rule"] == "effective-dim:200"
    G = phi.T @ phi + lam * np.eye(phi.shape[1])
    direct = tphi @ np.linalg.solve(G, phi.T) * (err / err.mean())
    np.testing.assert_allclose(scores.values, direct, rtol=1e-4, atol=1e-6 * np.abs(direct).max())
    assert scores.values.shape == (3, 16)


def test_scores_top_k_and_round_trip(setup):
    model, train, targets, tmp = setup
    att = Attributor(
        model, train, tmp / "f", method="dtrak", settings=FeatureSettings(timesteps=1),
        progress=False,
    )  # fmt: skip
    s = att.score(targets)
    ids, vals = s.top_k(4)
    assert ids.shape == (3, 4) and np.all(np.diff(vals, axis=1) <= 0)
    assert set(ids.ravel()) <= set(train.ids.tolist())
    opp_ids, opp = s.top_k(2, opponents=True)
    assert np.all(opp[:, 0] <= vals[:, -1])
    s.save(tmp / "out", k=4)
    back = Scores.load(tmp / "out")
    assert np.array_equal(back.values, s.values) and back.method == "dtrak"
    assert (tmp / "out" / "topk.csv").read_text().count("\n") == 1 + 3 * 8


def test_projected_features_are_reused_and_settings_keyed(setup):
    model, train, targets, tmp = setup
    settings = FeatureSettings(timesteps=1, projector="countsketch", proj_dim=256)
    a = Attributor(model, train, tmp / "f", settings=settings, progress=False)
    s1 = a.score(targets)
    b = Attributor(model, train, tmp / "f", settings=settings, progress=False)
    s2 = b.score(targets)
    assert np.array_equal(s1.values, s2.values)
    c = Attributor(
        model, train, tmp / "f", settings=FeatureSettings(timesteps=1, projector="countsketch",
        proj_dim=256, proj_seed=1), progress=False,
    )  # fmt: skip
    c.featurize()
    assert len(list((tmp / "f").glob("train-das-*"))) == 2


def test_image_methods_need_no_features(setup):
    model, train, targets, tmp = setup
    s = Attributor(model, train, tmp / "f", method="pixel-cos", progress=False).score(targets)
    exact = targets.reshape(3, -1)[:, None, :]
    assert s.values.shape == (3, 16)
    best = s.top_k(1)[0][:, 0]
    flat = train.images.reshape(16, -1)
    cos = torch.nn.functional.cosine_similarity(exact, flat[None], dim=2)
    assert np.array_equal(best, train.ids.numpy()[cos.argmax(1).numpy()])


def test_projection_reuses_unprojected_store_without_recomputing(setup, monkeypatch, tmp_path):
    model, train, targets, tmp = setup
    exact = FeatureSettings(timesteps=1, projector="identity")
    Attributor(model, train, tmp / "f", settings=exact, progress=False).score(targets)
    sketch = FeatureSettings(timesteps=1, projector="countsketch", proj_dim=128)
    fresh = Attributor(model, train, tmp_path / "fresh", settings=sketch, progress=False)
    want = fresh.score(targets).values

    def no_gradients(*args, **kwargs):
        raise AssertionError("gradients were recomputed")

    monkeypatch.setattr(GradientComputer, "compute", no_gradients)
    reused = Attributor(model, train, tmp / "f", settings=sketch, progress=False)
    np.testing.assert_allclose(reused.score(targets).values, want, rtol=1e-5, atol=1e-7)


def test_bf16_gradients_give_their_own_store_and_close_scores(setup):
    model, train, targets, tmp = setup
    base = FeatureSettings(timesteps=2, projector="countsketch", proj_dim=256)
    fp32 = Attributor(model, train, tmp / "f", settings=base, progress=False)
    low = replace(base, grad_dtype="bf16")
    bf16 = Attributor(model, train, tmp / "f", settings=low, progress=False)
    a, b = fp32.score(targets).values, bf16.score(targets).values
    assert fp32.train_store_path != bf16.train_store_path  # never mixed in one store
    assert bf16.featurize().features.dtype == np.float32
    assert not np.array_equal(a, b)
    corr = [np.corrcoef(a[i], b[i])[0, 1] for i in range(len(a))]
    assert min(corr) > 0.95, corr


@pytest.mark.parametrize("projector", ["countsketch", "identity"])
def test_large_batches_are_featurized_in_groups(setup, monkeypatch, projector):
    """Groups of a batch give the rows of one whole batch; with the identity projector every
    group's features are the reused gradient buffer itself, so each must be copied out
    before the next group overwrites it."""
    from diffattr.attribution.features import featurize as featurize_module

    model, train, _, tmp = setup
    dim = 64 if projector == "countsketch" else None
    settings = FeatureSettings(timesteps=1, projector=projector, proj_dim=dim)
    whole = Attributor(model, train, tmp / "a", settings=settings, progress=False).featurize()
    p = sum(q.numel() for q in model.parameters())
    monkeypatch.setattr(featurize_module, "GRADIENT_BLOCK_BYTES", 4 * p * 5)  # 5 samples
    grouped = Attributor(model, train, tmp / "b", settings=settings, progress=False).featurize()
    np.testing.assert_allclose(np.asarray(grouped.features), np.asarray(whole.features),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(grouped.column("error"), whole.column("error"), rtol=1e-5)


def test_method_options_named_like_constructor_arguments(tiny_model, small_set, tmp_path):
    """ekfac's ``train`` option is also the Attributor's training-set argument: the mapping
    ``options`` carries it (as the families and the LDS evaluation pass options)."""
    from diffattr.attribution.attributor import Attributor

    att = Attributor(
        tiny_model, small_set, tmp_path, method="ekfac", options={"train": "das", "query": "das"}
    )
    assert att.method.options == {"train": "das", "query": "das"} and att.train is small_set
