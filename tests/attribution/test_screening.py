"""Candidate screening (attribution.screening): per-target candidates by a cheap similarity."""

import numpy as np
import pytest

import diffattr.attribution.features.featurize as featurize_module
from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.screening import Screen, candidate_rows
from diffattr.errors import ConfigError

SETTINGS = FeatureSettings(timesteps=2, params="^conv_out")


@pytest.fixture
def setup(tiny_model, digits, tmp_path):
    return tiny_model, digits.subset(np.arange(24)), digits.images[100:104], tmp_path


def attributor(model, train, path, method="das"):
    return Attributor(model, train, path, method=method, settings=SETTINGS, progress=False)


@pytest.mark.parametrize("kernel", ["candidates", "union", "all"])
@pytest.mark.parametrize("method", ["das", "trak", "grad-cos", "pixel-cos"])
def test_screen_of_every_image_equals_unscreened_scores(setup, kernel, method):
    model, train, targets, tmp = setup
    plain = attributor(model, train, tmp / "f", method).score(targets)
    screened = attributor(model, train, tmp / "f", method).score(
        targets, screen=Screen("pixel-cos", len(train), kernel)
    )
    assert np.isfinite(screened.values).all()
    np.testing.assert_allclose(screened.values, plain.values, rtol=1e-9, atol=1e-12)
    if method in ("das", "trak"):
        assert screened.meta["lambda"] == pytest.approx(plain.meta["lambda"], rel=1e-9)


def test_screened_scores_cover_the_candidates_only(setup):
    model, train, targets, tmp = setup
    screen = Screen("pixel-cos", 5, "candidates")
    s = attributor(model, train, tmp / "f").score(targets, screen=screen)
    pixel = attributor(model, train, tmp / "f", "pixel-cos").score(targets).values
    want = candidate_rows(pixel, 5)
    for t in range(len(targets)):
        scored = np.flatnonzero(np.isfinite(s.values[t]))
        np.testing.assert_array_equal(scored, want[t])
        # the candidates are the five most similar images
        assert pixel[t, scored].min() >= np.delete(pixel[t], scored).max()
    assert s.meta["screen"] == {"similarity": "pixel-cos", "size": 5, "kernel": "candidates",
                                "candidates": 5, "union": int(np.unique(want).size)}  # fmt: skip
    ids, values = s.top_k(3)
    assert np.isfinite(values).all()
    assert all(set(ids[t]) <= set(train.ids.numpy()[want[t]]) for t in range(len(targets)))


def test_a_screened_store_is_reused_row_for_row(setup, monkeypatch):
    model, train, targets, tmp = setup
    computed = []
    original = featurize_module._Filler._compute

    def counting(self, batch):
        if "train" in self.store.path.name:
            computed.extend(int(r) for r in batch)
        return original(self, batch)

    monkeypatch.setattr(featurize_module._Filler, "_compute", counting)
    screened_att = attributor(model, train, tmp / "f")
    screened = screened_att.score(targets, screen=Screen("pixel-cos", 4))
    union = np.flatnonzero(np.isfinite(screened.values).any(axis=0))
    assert sorted(computed) == union.tolist() and union.size < len(train)
    from diffattr.attribution.features.store import FeatureStore

    before = np.array(FeatureStore.load(screened_att.train_store_path, False).features[union])
    computed.clear()
    attributor(model, train, tmp / "f").score(targets)
    assert sorted(computed) == sorted(set(range(len(train))) - set(union.tolist()))
    after = FeatureStore.load(screened_att.train_store_path).features
    np.testing.assert_array_equal(np.asarray(after[union]), before)


def test_screen_errors_name_the_option(setup):
    for text in ("pixel-cos", "pixel-cos:0", "nothing:5", ":5"):
        with pytest.raises(ConfigError, match="--screen"):
            Screen.parse(text)
    with pytest.raises(ConfigError, match="--screen-kernel"):
        Screen("pixel-cos", 5, "both")
    model, train, targets, tmp = setup
    att = Attributor(
        model, train, tmp / "f", method="tracin", settings=SETTINGS, progress=False,
        checkpoints=[model],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="cannot restrict 'tracin'"):
        att.score(targets, screen=Screen("pixel-cos", 5))


def test_candidate_rows_take_the_highest_similarities():
    sim = np.array([[0.1, 0.9, 0.5, 0.7], [1.0, 0.0, 0.2, 0.3]])
    np.testing.assert_array_equal(candidate_rows(sim, 2), [[1, 3], [0, 3]])
    np.testing.assert_array_equal(candidate_rows(sim, 10), [[0, 1, 2, 3]] * 2)


def test_the_all_kernel_keeps_the_unscreened_scores_of_the_candidates(setup):
    model, train, targets, tmp = setup
    plain = attributor(model, train, tmp / "f").score(targets).values
    s = attributor(model, train, tmp / "f").score(targets, screen=Screen("pixel-cos", 5, "all"))
    scored = np.isfinite(s.values)
    assert (scored.sum(axis=1) == 5).all()
    np.testing.assert_allclose(s.values[scored], plain[scored], rtol=1e-5, atol=1e-7)


def test_a_screen_may_be_a_share_of_the_training_set():
    assert Screen.parse("pixel-cos:5%") == Screen("pixel-cos", 0.05)
    assert Screen.parse("pixel-cos:0.05").count(500) == 25
    assert (
        Screen.parse("pixel-cos:25").count(500) == 25 and Screen("pixel-cos", 900).count(500) == 500
    )
    assert Screen("pixel-cos", 0.001).count(100) == 1
    assert str(Screen.parse("pixel-cos:5%")) == "pixel-cos:5%"
    for bad in ("pixel-cos:1.5", "pixel-cos:-3", "pixel-cos:0%"):
        with pytest.raises(ConfigError, match="--screen"):
            Screen.parse(bad)


def test_the_command_line_offers_every_screen_kernel():
    from diffattr.attribution.screening import DEFAULT_SCREEN_KERNEL, KERNEL_FORMS
    from diffattr.cli import build_parser

    score = build_parser()._subparsers._group_actions[0].choices["score"]
    action = next(a for a in score._actions if a.dest == "screen_kernel")
    assert tuple(action.choices) == KERNEL_FORMS and action.default == DEFAULT_SCREEN_KERNEL
