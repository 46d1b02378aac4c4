"""EK-FAC influence through kronfluence: the pipeline against explicit gradient products."""

import sys

import numpy as np
import pytest

from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
from diffattr.attribution.features.measure import make_measure
from diffattr.attribution.methods import ScoreInputs, get_method, influence
from diffattr.attribution.methods.influence import (
    ekfac_scores,
    query_batch_size,
    tracked_parameter_names,
)
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError

SPEC = TimestepSpec(2)


@pytest.fixture
def data(tiny_model, digits):
    return tiny_model, digits.subset(np.arange(10)), digits.images[100:102]


def raw_grads(model, measure, images, ids, normalize=False):
    """Timestep-averaged gradients over kronfluence's Linear/Conv2d parameters (unnormalised
    unless ``normalize``)."""
    gc = GradientComputer(
        model,
        make_measure(measure),
        NoiseSchedule(),
        SPEC,
        normalize=normalize,
        param_names=tracked_parameter_names(model),
    )
    return gc.compute(images, ids)[0].double().numpy()


def test_identity_strategy_is_the_gradient_product(data, tmp_path):
    pytest.importorskip("kronfluence")
    model, train, targets = data
    ids, tids = train.ids.numpy(), np.arange(2)
    g_train = raw_grads(model, "loss", train.images, ids)
    for query, measure in (("loss", "loss"), ("das", "das")):
        got = ekfac_scores(
            model, train.images, ids, targets, tids, tmp_path, timesteps=SPEC,
            strategy="identity", query=query,
        )  # fmt: skip
        want = raw_grads(model, measure, targets, tids) @ g_train.T
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(
    "train_measure, normalize", [("das", False), ("loss", True), ("das", True)]
)
def test_train_measure_and_normalisation_options(data, tmp_path, train_measure, normalize):
    """``train=das`` pairs DAS's training gradients and ``normalize=true`` averages per-timestep
    normalised gradients on both sides: with the identity strategy, those gradients' product."""
    pytest.importorskip("kronfluence")
    model, train, targets = data
    ids, tids = train.ids.numpy(), np.arange(2)
    got = ekfac_scores(
        model, train.images, ids, targets, tids, tmp_path, timesteps=SPEC, strategy="identity",
        query="das", train=train_measure, normalize=normalize,
    )  # fmt: skip
    want = (
        raw_grads(model, "das", targets, tids, normalize)
        @ raw_grads(model, train_measure, train.images, ids, normalize).T
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    with pytest.raises(ConfigError, match="pairing=samples"):
        ekfac_scores(
            model, train.images, ids, targets, tids, tmp_path, timesteps=SPEC,
            train=train_measure, normalize=normalize, pairing="items",
        )  # fmt: skip


@pytest.mark.parametrize(
    "strategy, query, damping",
    [("ekfac", "loss", None), ("ekfac", "das", 1e-3), ("kfac", "dtrak", None),
     ("diagonal", "loss", None), ("identity", "das", None)],
)  # fmt: skip
def test_sample_pairing_equals_kronfluence_item_pairing(data, tmp_path, strategy, query, damping):
    """Averaged gradients preconditioned by the fitted factors give kronfluence's own pairwise
    scores of every (sample, timestep) item pair, averaged in K × K blocks."""
    pytest.importorskip("kronfluence")
    model, train, targets = data
    ids, tids = train.ids.numpy(), np.arange(2)
    kw = dict(timesteps=SPEC, strategy=strategy, query=query, damping=damping, batch_size=4)
    items = ekfac_scores(model, train.images, ids, targets, tids, tmp_path, pairing="items", **kw)
    samples = ekfac_scores(model, train.images, ids, targets, tids, tmp_path, **kw)
    assert samples.shape == items.shape == (2, 10)
    np.testing.assert_allclose(samples, items, rtol=1e-3, atol=1e-4 * np.abs(items).max())
    # cached next to kronfluence's results
    assert len(list((tmp_path / "kronfluence").glob("*/scores_*-samples.npy"))) == 1
    again = ekfac_scores(model, train.images, ids, targets, tids, tmp_path, **kw)
    assert np.array_equal(again, samples)


def test_query_batches_do_not_change_scores(data, tmp_path, monkeypatch):
    pytest.importorskip("kronfluence")
    assert query_batch_size(1000, 10, budget=4000 * 3) == 3
    assert query_batch_size(1000, 2, budget=4000 * 3) == 2
    assert query_batch_size(10**9, 5) == 1
    model, train, targets = data
    ids, tids = train.ids.numpy(), np.arange(2)
    whole = ekfac_scores(model, train.images, ids, targets, tids, tmp_path / "a", timesteps=SPEC)
    monkeypatch.setattr(influence, "QUERY_BATCH_BYTES", 1)  # one query item per batch
    single = ekfac_scores(model, train.images, ids, targets, tids, tmp_path / "b", timesteps=SPEC)
    np.testing.assert_allclose(single, whole, rtol=1e-4, atol=1e-6 * np.abs(whole).max())


def test_ekfac_runs_and_large_damping_recovers_the_product(data, tmp_path):
    pytest.importorskip("kronfluence")
    model, train, targets = data
    ids, tids = train.ids.numpy(), np.arange(2)
    damping = 1e6
    ekfac = ekfac_scores(
        model, train.images, ids, targets, tids, tmp_path, timesteps=SPEC, damping=damping
    )
    ident = ekfac_scores(
        model, train.images, ids, targets, tids, tmp_path, timesteps=SPEC, strategy="identity"
    )
    np.testing.assert_allclose(ekfac * damping, ident, rtol=1e-2, atol=1e-3 * np.abs(ident).max())
    # the registered method reads its ScoreInputs; kronfluence's results are cached on disk
    inputs = ScoreInputs.of(
        model=model,
        train_images=train.images,
        train_ids=ids,
        target_images=targets,
        target_ids=tids,
        store_dir=tmp_path,
        settings=FeatureSettings(timesteps=2),
    )
    method = get_method("ekfac", damping=damping)  # the same factors and scores: cached
    s = method.score(inputs)
    np.testing.assert_array_equal(s, ekfac)
    assert method.score_meta["influence"] == "kronfluence ekfac"
    assert (tmp_path / "kronfluence").is_dir()


def test_missing_kronfluence_is_a_clear_error(data, tmp_path, monkeypatch):
    model, train, targets = data
    monkeypatch.setitem(sys.modules, "kronfluence", None)
    with pytest.raises(ConfigError, match="kronfluence") as info:
        ekfac_scores(model, train.images, train.ids.numpy(), targets, np.arange(2), tmp_path)
    assert "pip install" in info.value.hint
