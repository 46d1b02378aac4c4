"""Per-target confidence (kurtosis of the scores), its calibration, and the near-copy check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import kurtosis

from diffattr.attribution.scores import Scores
from diffattr.attribution.scores.confidence import (
    BINS,
    CALIBRATION_PATH,
    NOT_LIKE,
    bin_lds,
    calibration_data,
    confidence,
    confidence_bins,
    heldout_percentile,
    like_calibration,
    load_calibration,
    method_calibration,
    near_copies,
    nearest_l2,
)
from diffattr.errors import DiffattrError


def _spiky(rng: np.random.Generator, n: int = 200) -> np.ndarray:
    """Gaussian scores with three training images far out: a concentrated attribution."""
    row = rng.normal(size=n)
    row[[3, 50, 120]] = [15.0, 12.0, 10.0]
    return row


def test_confidence_is_excess_kurtosis_and_deterministic():
    rng = np.random.default_rng(0)
    s = rng.standard_t(df=5, size=(6, 300))
    a, b = confidence(s), confidence(s.copy())
    assert np.array_equal(a, b)  # the same inputs give bit-identical values
    np.testing.assert_allclose(a, kurtosis(s, axis=1, fisher=True, bias=True), rtol=1e-10)
    assert confidence(s[2]).shape == () and confidence(s[2]) == pytest.approx(a[2])
    # float32 rows (as Scores stores them) give the same κ to float32 precision
    np.testing.assert_allclose(confidence(s.astype(np.float32)), a, rtol=1e-4)


def test_concentrated_scores_have_higher_confidence_than_flat_ones():
    rng = np.random.default_rng(1)
    spiky, flat = _spiky(rng), rng.uniform(-1, 1, size=200)
    k = confidence(np.stack([spiky, flat]))
    assert k[0] > 10 and k[1] < 0  # uniform: excess kurtosis −1.2


def test_confidence_ignores_unscored_and_is_nan_without_spread():
    rng = np.random.default_rng(2)
    row = rng.normal(size=50)
    with_nan = np.concatenate([row, [np.nan] * 7])
    assert confidence(with_nan) == pytest.approx(float(kurtosis(row)), rel=1e-10)
    out = confidence(np.stack([np.ones(50), np.r_[1.0, 2.0, np.full(48, np.nan)]]))
    assert np.isnan(out).all()


def test_bins_follow_the_cut_points():
    bins = confidence_bins(np.array([-1.0, 2.0, 2.5, 9.0, np.nan]), [2.0, 5.0])
    assert bins == ["low", "medium", "medium", "high", None]


def test_committed_calibration_is_consistent():
    calib = load_calibration()
    assert CALIBRATION_PATH.is_file() and calib["bins"] == list(BINS)
    assert calib["generated_by"] == "benchmarks/confidence.py"
    for method, entry in calib["methods"].items():
        lo, hi = entry["cuts"]
        assert lo < hi, method
        for bench, kinds in entry["lds"].items():
            counts = {kind: sum(r["count"] for r in rows) for kind, rows in kinds.items()}
            assert set(counts) == {"val", "gen"} and all(c > 0 for c in counts.values())
            for rows in kinds.values():
                assert [r["bin"] for r in rows] == list(BINS)
                for r in rows:
                    assert r["count"] == 0 or r["ci"][0] <= r["mean"] <= r["ci"][1], bench
    das = method_calibration("das")
    assert das is not None
    rows = bin_lds(das, "high", "gen")
    assert [r["benchmark"] for r in rows] == list(das["lds"]) and len(rows) >= 2
    assert method_calibration("no-such-method") is None


def test_bin_lds_rows_per_benchmark():
    entry = {
        "lds": {
            "a": {"gen": [{"bin": "high", "count": 3, "mean": 0.5, "ci": [0.4, 0.6]}]},
            "b": {"gen": [{"bin": "low", "count": 2, "mean": 0.1, "ci": [0.0, 0.2]}]},
        }
    }
    assert bin_lds(entry, "high", "gen") == [
        {"benchmark": "a", "count": 3, "mean": 0.5, "ci": [0.4, 0.6]}
    ]
    assert bin_lds(entry, "high", "val") == []


# ---------------------------------------------------------------------------- near copies


@pytest.fixture
def split(digits):
    """24 training digits, 100 held-out ones, and targets: a planted copy and an ordinary
    held-out digit (not among the 100)."""
    train = digits.images[:24]
    heldout = digits.images[24:124]
    targets = torch.stack([train[5].clone(), digits.images[300]])
    return targets, train, heldout


def test_planted_copy_is_flagged_and_an_ordinary_image_is_not(split):
    targets, train, heldout = split
    nc = near_copies(targets, train, heldout, quantile=0.05)
    assert nc.flagged.tolist() == [True, False]
    assert nc.nearest[0] == 5 and nc.pixel_distance[0] == 0.0
    _, held = nearest_l2(heldout.reshape(100, -1).double().numpy(), train.reshape(24, -1).numpy())
    assert nc.pixel_threshold == pytest.approx(float(np.quantile(held, 0.05)))
    assert nc.pixel_distance[1] > nc.pixel_threshold
    again = near_copies(targets, train, heldout, quantile=0.05)
    assert np.array_equal(again.pixel_distance, nc.pixel_distance)
    assert np.array_equal(again.nearest, nc.nearest)


def test_near_copy_with_an_encoder_needs_both_distances(split):
    targets, train, heldout = split
    proj = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 16))).float()

    def encoder(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ proj

    nc = near_copies(targets, train, heldout, quantile=0.05, encoder=encoder)
    assert nc.flagged.tolist() == [True, False]
    assert nc.embedding_distance[0] == pytest.approx(0.0, abs=1e-6)
    assert nc.embedding_threshold is not None and nc.embedding_threshold > 0
    # a loose pixel quantile alone would flag the ordinary image; the embedding check still
    # decides with both: flagged only when both distances are within their thresholds
    loose = near_copies(targets, train, heldout, quantile=0.99, encoder=encoder)
    assert loose.flagged[0]
    assert loose.flagged[1] == bool(
        loose.pixel_distance[1] <= loose.pixel_threshold
        and loose.embedding_distance[1] <= loose.embedding_threshold
    )


def test_near_copy_rejects_a_bad_quantile(split):
    with pytest.raises(ValueError, match="quantile"):
        near_copies(*split, quantile=1.0)


# ---------------------------------------------------------------------------- Scores


#: What the Attributor records of 8×8 grayscale training data like the digits8 benchmark's.
LIKE_DIGITS8 = {"shape": [1, 8, 8], "count": 400}


def _scores(method: str = "das", meta: dict | None = None) -> Scores:
    """Two targets over 400 training images (ids 1000…1399): concentrated, then flat."""
    rng = np.random.default_rng(3)
    values = np.stack([_spiky(rng, 400), rng.uniform(-1, 1, size=400)])
    meta = {"train_data": LIKE_DIGITS8} if meta is None else meta
    return Scores(values, np.arange(1000, 1400), np.array([7, 8]), method, meta)


def test_scores_carry_confidence_bins_and_save_them(tmp_path, split):
    s = _scores()
    np.testing.assert_allclose(s.confidence(), confidence(s.values))
    assert s.confidence_bins() == ["high", "low"]  # das is calibrated and validated
    assert Scores(s.values, s.train_ids, s.target_ids, "no-such").confidence_bins() == [None] * 2
    screened = _scores(meta={"screen": {"size": 5}, "train_data": LIKE_DIGITS8})
    assert screened.confidence_bins() == [None, None]

    targets, train, heldout = split
    ids = np.arange(1000, 1024)  # the scores' training ids of these 24 images
    with pytest.raises(DiffattrError, match="2 targets"):
        s.set_near_copies(near_copies(targets[:1], train, heldout, train_ids=ids))
    with pytest.raises(DiffattrError, match="do not score"):  # positions are not these ids
        s.set_near_copies(near_copies(targets, train, heldout))
    s.set_near_copies(near_copies(targets, train, heldout, train_ids=ids))
    out = s.save(tmp_path / "das-samples", k=3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "das"
    assert meta["confidence"]["bins"] == ["high", "low"]
    np.testing.assert_allclose(meta["confidence"]["values"], s.confidence(), rtol=1e-12)
    assert meta["near_copy"]["flagged"] == [True, False]
    assert meta["near_copy"]["nearest_train_id"][0] == 1005  # training id, not position
    assert meta["confidence"]["bin_status"] == "calibrated on digits8"
    rows = json.loads((out / "topk.json").read_text())
    assert [r["confidence_bin"] for r in rows] == ["high", "low"]
    assert [r["near_copy"] for r in rows] == [True, False]
    assert len(rows[0]["opponents"]) == 3

    back = Scores.load(out)
    assert back.near_copy_flags().tolist() == [True, False]
    assert back.meta["confidence"]["bins"] == ["high", "low"]
    np.testing.assert_allclose(back.confidence(), s.confidence(), rtol=1e-6)


def test_scores_written_before_confidence_still_load(tmp_path):
    s = _scores()
    out = s.save(tmp_path / "old")
    meta = json.loads((out / "meta.json").read_text())
    del meta["confidence"]
    (out / "meta.json").write_text(json.dumps(meta))
    back = Scores.load(out)
    assert back.near_copy_flags() is None
    assert back.confidence_bins() == ["high", "low"]


# ---------------------------------------------------------------------------- on the user's data


def test_heldout_percentile_counts_the_reference_below_with_ties_half():
    ref = np.array([1.0, 2.0, 3.0, 4.0, np.nan])  # NaN reference values are left out
    pct = heldout_percentile(np.array([0.0, 2.0, 3.5, 9.0, np.nan]), ref)
    np.testing.assert_allclose(pct[:4], [0.0, 37.5, 75.0, 100.0])
    assert np.isnan(pct[4])
    assert np.isnan(heldout_percentile(np.array([1.0]), np.array([np.nan]))).all()


def test_data_like_the_calibration_benchmarks():
    data = calibration_data()
    assert {b: (d["channels"], d["size"], d["num_train"]) for b, d in data.items()} == {
        "digits8": (1, [8, 8], 500),
        "mnist8": (1, [8, 8], 1000),
    }
    assert like_calibration([1, 8, 8], 500) == "digits8"
    assert like_calibration((1, 8, 8), 250) == "digits8"  # a factor 2 below
    assert like_calibration((1, 8, 8), 2000) == "mnist8"  # a factor 2 above mnist8's
    assert like_calibration((1, 8, 8), 249) is None
    assert like_calibration((1, 8, 8), 2001) is None
    assert like_calibration((3, 8, 8), 500) is None  # colour
    assert like_calibration((1, 16, 16), 500) is None  # another size
    assert like_calibration(None, None) is None


def test_bins_only_for_data_like_the_calibration():
    colour = _scores(meta={"train_data": {"shape": [3, 16, 16], "count": 480}})
    assert colour.confidence_bins() == [None, None]
    assert colour.calibration() == (None, NOT_LIKE)
    unknown = _scores(meta={})  # scores that do not say what they were computed on
    assert unknown.confidence_bins() == [None, None] and unknown.calibration()[1] == NOT_LIKE
    assert _scores().calibration()[1] == "calibrated on digits8"
    assert _scores("trak").calibration() == (None, "not validated for trak")
    conf = colour.confidence_meta()
    assert conf["bins"] == [None, None] and conf["bin_status"] == NOT_LIKE
    assert "digits8" in conf["calibrated_on"] and "mnist8" in conf["calibrated_on"]


def test_confidence_relative_to_heldout_images_is_saved(tmp_path):
    s = _scores(meta={"train_data": {"shape": [3, 16, 16], "count": 400}})
    assert s.confidence_percentiles() is None
    kappa = s.confidence()
    reference = np.array([kappa[1] - 1, kappa[1] + 1, kappa[0] + 1, np.nan])
    s.set_confidence_reference(reference, np.array([3, 4, 5, 6]))
    np.testing.assert_allclose(s.confidence_percentiles(), [200 / 3, 100 / 3])
    out = s.save(tmp_path / "s", k=2)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["confidence"]["heldout_percentile"] == pytest.approx([200 / 3, 100 / 3])
    assert meta["confidence"]["heldout_count"] == 4
    assert meta["confidence_reference"]["ids"] == [3, 4, 5, 6]
    rows = json.loads((out / "topk.json").read_text())
    assert [r["confidence_percentile"] for r in rows] == pytest.approx([200 / 3, 100 / 3])
    assert [r["confidence_bin"] for r in rows] == [None, None]
    np.testing.assert_allclose(Scores.load(out).confidence_percentiles(), [200 / 3, 100 / 3])


def test_near_copies_name_training_images_by_id(digits):
    """Given the training set, the nearest images are its ids (what meta.json records), not
    positions; bare images without ids are named by position."""
    positions = np.arange(40, 100, 2)  # ids 40, 42, …: position p has id 40 + 2p
    train = digits.subset(positions)
    targets = torch.stack([train.images[3], train.images[10]])
    nc = near_copies(targets, train, digits.subset(np.arange(200, 300)))
    assert nc.nearest.tolist() == [46, 60]
    assert near_copies(targets, train.images, digits.images[200:300]).nearest.tolist() == [3, 10]
    s = Scores(np.zeros((2, len(train))), train.ids.numpy(), np.array([0, 1]), "das")
    s.set_near_copies(nc)
    assert s.meta["near_copy"]["nearest_train_id"] == [46, 60]
