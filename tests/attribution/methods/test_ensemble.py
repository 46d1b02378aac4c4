"""Ensembles: the mean of the members' scores, from Scores, arrays, attributors or the method."""

import numpy as np
import pytest
import torch

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.methods.ensemble import ensemble_scores
from diffattr.attribution.scores import Scores
from diffattr.diffusion.presets import build_unet
from diffattr.errors import ConfigError

SETTINGS = FeatureSettings(timesteps=1, params="^conv_out")


def test_mean_of_scores_and_arrays():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    ids, tids = np.arange(10, 15), np.array([3, 4])
    s = ensemble_scores([Scores(a, ids, tids, "trak"), Scores(b, ids, tids, "trak")])
    np.testing.assert_allclose(s.values, (a + b) / 2, rtol=1e-6)
    assert s.method == "ensemble-trak" and s.meta["ensemble"] == 2
    assert np.array_equal(s.train_ids, ids) and np.array_equal(s.target_ids, tids)
    arr = ensemble_scores([a, b, a], train_ids=ids)
    np.testing.assert_allclose(arr.values, (2 * a + b) / 3, rtol=1e-6)
    with pytest.raises(ConfigError, match="other training or target"):
        ensemble_scores([Scores(a, ids, tids, "trak"), Scores(b, ids + 1, tids, "trak")])
    with pytest.raises(ConfigError):
        ensemble_scores([])


def test_attributors_and_registered_method(digits, tmp_path):
    train, targets = digits.subset(np.arange(12)), digits.images[100:102]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_unet("tiny", 8, 1).eval())
    parts = [
        Attributor(m, train, tmp_path / f"m{i}", method="trak", settings=SETTINGS, progress=False)
        for i, m in enumerate(models)
    ]
    singles = [p.score(targets).values.astype(np.float64) for p in parts]
    s = ensemble_scores(parts, targets)
    np.testing.assert_allclose(s.values, np.mean(singles, axis=0), rtol=1e-5)

    att = Attributor(
        models[0], train, tmp_path / "e", method="ensemble", settings=SETTINGS, progress=False,
        models=[models[1]], base="trak",
    )  # fmt: skip
    e = att.score(targets)
    np.testing.assert_allclose(e.values, np.mean(singles, axis=0), rtol=1e-5)
    assert e.meta["ensemble_of"] == "trak" and len(e.meta["members"]) == 2
    assert list((tmp_path / "e" / "ensemble").iterdir())  # the second member's own stores
    e.save(tmp_path / "out")
