"""families.bound: a run opened by its family — the model and data loaded once, a method's
options resolved in one place (the same defaults for every command), targets loaded once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.inputs import ScoreInputs
from diffattr.attribution.methods import method_context, resolve_method
from diffattr.errors import ConfigError
from diffattr.families import open_run
from diffattr.families.pixel import PixelFamily
from diffattr.families.weights import Weights


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_run):
    return make_tiny_run(tmp_path_factory.mktemp("bound") / "run")


def test_model_data_and_targets_load_once(run):
    bound = open_run(run.path)
    a = bound.attributor("das", settings=FeatureSettings(timesteps=2), progress=False)
    b = bound.attributor("trak", settings=FeatureSettings(timesteps=2), progress=False)
    assert a.model is b.model is bound.model and a.train is b.train is bound.train_set
    first = bound.targets("samples")
    assert bound.targets("samples")[1] is first[1]
    assert first[1].shape[0] == 2 and list(first[2]) == [0, 1]


def test_options_resolve_from_the_run_and_the_noise_seed(run):
    bound = open_run(run)
    settings = FeatureSettings(noise_seed=7)
    assert bound.method("random", settings=settings).options["seed"] == 7
    assert bound.method("random", {"seed": 3}, settings).options["seed"] == 3  # given wins
    assert bound.method("tracin").options["checkpoints"] == str(run.path)
    # the same rule as a run-less caller (lds eval without --run)
    assert resolve_method("random", {}, method_context(settings)).options == {"seed": 7}
    with pytest.raises(ConfigError, match="has no option 'sead'"):
        bound.method("random", {"sead": 1})


def test_a_method_the_family_cannot_serve_is_refused_before_loading(run):
    bound = open_run(run)
    bound.family = PixelFamily("narrow", type("Bare", (Weights,), {"provides": frozenset()})())
    with pytest.raises(ConfigError, match="journey-trak is not available .*needs trajectories"):
        bound.attributor("journey-trak")
    assert "model" not in vars(bound)  # nothing loaded by a refusal


def test_score_inputs_are_immutable():
    inputs = ScoreInputs.of(num_train=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.lam = 1.0  # type: ignore[misc]
    assert dataclasses.replace(inputs, lam=1.0).lam == 1.0 and inputs.lam is None
    assert np.isfinite(ScoreInputs.of().context.batch_size)
    # features apart from the model context; flat names are routed to their part
    routed = ScoreInputs.of(train_features=np.ones((2, 3)), device="cpu", num_train=2)
    assert routed.features.train.shape == (2, 3) and routed.context.device == "cpu"
    assert routed.updated(feature_dim=3, progress=True).features.dim == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        routed.features.train = None  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field 'nonsense'"):
        ScoreInputs.of(nonsense=1)


def test_the_service_scores_as_an_attributor_does(run):
    bound = open_run(run)
    settings = FeatureSettings(timesteps=2)
    got = bound.score("das", None, "samples", settings, heldout=False, progress=False)
    _, targets, ids = bound.targets("samples")
    att = bound.attributor("das", None, settings, progress=False)
    np.testing.assert_array_equal(got.values, att.score(targets, ids).values)
    features, options = bound.describe("das", {"leverage": True}, settings, progress=False)
    assert features["measure"] == "das" and features["timesteps"] == 2
    assert options == {"leverage": True}
    assert bound.describe("pixel-cos", None, settings)[0] is None  # no stored features
    with_ref = bound.score("das", None, "samples", settings, progress=False)
    assert with_ref.confidence_percentiles() is not None  # κ against held-out images
    store = bound.featurize("das", None, settings, progress=False)
    assert store.is_complete() and store.num_rows == len(bound.train_set)
    tstore = bound.featurize_targets("das", None, settings, "samples", progress=False)
    assert tstore.num_rows == 2
    assert bound.featurize("pixel-cos") is None
