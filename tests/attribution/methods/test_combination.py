"""Combinations of methods: per-target standardised scores, averaged."""

import numpy as np
import pytest

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.methods import get_method
from diffattr.attribution.methods.combination import combine_scores, parse_members, standardise
from diffattr.attribution.methods.spec import parse_method_list
from diffattr.errors import ConfigError

SETTINGS = FeatureSettings(timesteps=2, params="^conv_out")


def test_standardise_and_combine():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 7)) * 5 + 2, rng.standard_normal((3, 7)) * 1e-3
    za = standardise(a)
    np.testing.assert_allclose(za.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(za.std(axis=1), 1)
    # scale and shift per target do not matter; the result is the plain mean of z-scores
    shifted = a * np.array([[3.0], [0.1], [7.0]]) + 4
    np.testing.assert_allclose(combine_scores([shifted, b]), (za + standardise(b)) / 2)
    assert np.array_equal(standardise(np.ones((2, 4))), np.zeros((2, 4)))  # constant row
    with pytest.raises(ConfigError, match="shape"):
        combine_scores([a, b[:, :3]])


def test_members_parse_with_their_own_options():
    assert parse_members("das+ekfac[normalize=true;damping=0.1]") == [
        ("das", {}),
        ("ekfac", {"normalize": True, "damping": 0.1}),
    ]
    ((name, options),) = parse_method_list("combine[methods=das+ekfac[normalize=true;query=das]]")
    assert name == "combine" and options == {"methods": "das+ekfac[normalize=true;query=das]"}
    for bad in ("das", "das+"):
        with pytest.raises(ConfigError):
            parse_members(bad)
    for bad in ("das+combine[methods=das+trak]", "das+nosuch", "das+trak[nosuch=1]"):
        with pytest.raises(ConfigError):
            get_method("combine", methods=bad).components()


def test_combine_through_attributor_equals_its_members(tiny_model, digits, tmp_path):
    train, targets = digits.subset(np.arange(12)), digits.images[100:103]

    def scores(spec):
        ((method, options),) = parse_method_list(spec)
        att = Attributor(
            tiny_model, train, tmp_path, method=method, settings=SETTINGS, progress=False,
            **options,
        )  # fmt: skip
        return att.score(targets)

    got = scores("combine[methods=das+trak]")
    want = combine_scores([scores("das").values, scores("trak").values])
    np.testing.assert_allclose(got.values, want, rtol=1e-5, atol=1e-6)  # scores are float32
    assert got.meta["combination_of"] == ["das", "trak"]
    with pytest.raises(ConfigError, match="unknown method|not a method|unknown"):
        scores("combine[methods=das+nosuch]")
