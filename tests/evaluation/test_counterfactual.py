import json

import numpy as np
import pytest
import torch

from diffattr.attribution.methods.embedding import EncoderSettings
from diffattr.cli import build_parser, main
from diffattr.data import load_builtin
from diffattr.diffusion.presets import load_unet, model_fingerprint
from diffattr.diffusion.sampling import sample, save_samples
from diffattr.diffusion.training import TrainConfig, train
from diffattr.errors import ConfigError
from diffattr.evaluation import counterfactual as cf
from diffattr.parallel import InProcessExecutor
from diffattr.run import DataSpec, RunDir


def run_command(argv: list[str]) -> dict:
    """``diffattr counterfactual ARGV``: its handler's summary (the CLI prints it)."""
    args = build_parser().parse_args(["counterfactual", *argv])
    return args.handler(args)


def test_k_removals_and_sign_test():
    assert cf.resolve_k(10, 500) == 10 and cf.resolve_k(0.02, 500) == 10
    assert cf.resolve_k(0, 500) == 0 and cf.resolve_k(0.0001, 500) == 1
    for bad in (2.5, 500, -1):
        with pytest.raises(ConfigError):
            cf.resolve_k(bad, 500)
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, np.nan, 1.0, 2.0]])
    assert cf.top_proponents(scores, 2).tolist() == [[1, 3], [0, 3]]
    assert cf.top_proponents(scores, 0).shape == (2, 0)
    r = cf.random_removals(50, 5, [0, 1], seed=0)
    assert np.array_equal(r, cf.random_removals(50, 5, [0, 1], seed=0))
    assert not np.array_equal(r[0], r[1]) and len(set(r[0])) == 5
    # 9 of 10 targets changed more by a than b: p = 22/1024 (two-sided).
    a, b = np.arange(10.0), np.arange(10.0) - 1
    a[0] = -5
    t = cf.sign_test(a, b)
    assert (t["wins"], t["losses"], t["ties"]) == (9, 1, 0)
    assert t["p"] == pytest.approx(22 / 1024)
    assert cf.sign_test(a, b, direction=-1)["wins"] == 1  # for cosines smaller = bigger change


def test_summary_rows_and_table():
    rng = np.random.default_rng(0)
    values = {
        m: {"pixel_l2": rng.random(6) + shift, "embedding_cos": 1 - rng.random(6) * 0.1}
        for m, shift in (("random", 0.0), ("dtrak", 0.5), ("das", 1.0))
    }
    rows = cf.summarize_removals(values, bootstrap=100)
    by = {r["method"]: r for r in rows}
    assert set(by["das"]["paired"]) == {"random", "dtrak"}
    assert "paired" not in by["random"]
    assert by["das"]["paired"]["random"]["pixel_l2"]["wins"] == 6
    lo, hi = by["das"]["pixel_l2_ci"]
    assert lo <= by["das"]["pixel_l2_mean"] <= hi
    table = cf.removals_table(rows)
    assert "| das vs random | pixel l2 | 6 / 0 / 0 |" in table
    assert table.count("das vs dtrak") + table.count("dtrak vs das") == 2  # once per metric


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """16 digits, 20 training steps, 3 targets with 5 DDIM steps; one torch thread."""
    old = torch.get_num_threads()
    run = tmp_path_factory.mktemp("cf") / "run"
    argv = ["train", "--out", str(run), "--train-count", "16", "--val-count", "3",
            "--steps", "20", "--batch-size", "8", "--quiet", "--threads", "1"]  # fmt: skip
    try:
        assert main(argv) == 0
        assert main(["generate", str(run), "--num", "3", "--steps", "5", "--quiet"]) == 0
    finally:
        torch.set_num_threads(old)
    return run


def test_k0_regenerates_the_original_bit_for_bit(tiny_run, tmp_path):
    out = tmp_path / "k0"
    run_command([str(tiny_run), "--out", str(out), "--method", "pixel-cos", "--k", "0",
                 "--num-targets", "3", "--reference", "original", "--executor", "inprocess",
                 "--bootstrap", "50", "--quiet"])  # fmt: skip
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["random", "pixel-cos", "none"]
    for r in rows:
        assert r["pixel_l2"] == [0.0, 0.0, 0.0] and r["k"] == 0
    z = np.load(out / "images.npz")
    assert np.array_equal(z["pixel-cos"], z["original_alone"])  # retrained = the run's model
    assert np.abs(z["original_alone"] - z["original"]).max() < 1e-4  # batch of 3 vs alone
    assert len(list((out / "retrain").iterdir())) == 1  # every removal set was empty


def test_end_to_end_command_resumes_without_retraining(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "cf"
    argv = [str(tiny_run), "--out", str(out), "--method", "das,pixel-cos", "--k", "2",
            "--num-targets", "2", "--first-target", "1", "--timesteps", "2",
            "--executor", "inprocess", "--bootstrap", "50", "--quiet"]  # fmt: skip
    summary = run_command(argv)
    assert summary["retrainings"] == 1 + 3 * 2  # k = 0 control + (random, das, pixel-cos) × 2
    rows = json.loads((out / "results.json").read_text())
    by = {r["method"]: r for r in rows}
    assert list(by) == ["random", "das", "pixel-cos", "none"]
    assert by["das"]["targets"] == [1, 2] and len(by["das"]["removed_ids"][0]) == 2
    assert by["das"]["scores_source"] == "computed"
    assert set(by["das"]["paired"]) == {"random", "pixel-cos"}
    assert all(len(r["embedding_cos"]) == 2 for r in rows)
    assert by["none"]["pixel_l2"] == [0.0, 0.0]  # one thread throughout: exact
    assert by["random"]["pixel_l2"][0] > 0
    from PIL import Image

    with Image.open(out / "counterfactual.png") as im:  # 2 rows × 4 columns of 8×8 at ×8
        # plus a 14-pixel header naming the columns and a margin naming the rows ("#0", "#1")
        assert im.size == (4 * 8 * 9 + 8 + 6 * 2 + 6, 2 * 8 * 9 + 8 + 14)
        header = np.asarray(im.convert("L"))[:14]
        assert (header < 128).sum() > 20  # text drawn above the columns
    assert "das vs random" in (out / "results.md").read_text()
    from diffattr.plots import plot_counterfactual

    assert plot_counterfactual(rows) is not None  # the rows are report-ready

    def no_training(*a, **k):
        raise AssertionError("finished retrainings must not run again")

    monkeypatch.setattr("diffattr.diffusion.training.train", no_training)
    run_command(argv)
    assert json.loads((out / "results.json").read_text())[1]["pixel_l2"] == by["das"]["pixel_l2"]
    assert (out / "scores" / "das" / "scores.npy").is_file()


def test_removing_planted_duplicates_changes_the_target_more_than_random(tmp_path):
    """Six copies of one '0' among 18 other digits (one copy goes to validation): the model
    learns the copies; for the generated image nearest to them, removing the copies moves
    it much further than removing as many random training images (two random draws)."""
    digits = load_builtin("digits")
    labels = digits.labels.numpy()
    zeros, others = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)[:18]
    images = torch.cat([digits.images[[zeros[0]] * 6], digits.images[others]])
    images = torch.cat([images, digits.images[[zeros[1]]]])
    np.savez(tmp_path / "planted.npz", images=images.numpy(), ids=np.arange(len(images)),
             pixel_range=np.array([-1.0, 1.0], dtype=np.float32))  # fmt: skip
    run = RunDir(tmp_path / "run")
    spec = DataSpec(data=str(tmp_path / "planted.npz"), val_count=1)
    config = TrainConfig(steps=120, batch_size=16, ema_decay=0.99, warmup_steps=20,
                         checkpoint_every=10**6)  # fmt: skip
    run.start(spec, config)
    train_set, _ = spec.load()
    model = load_unet(train(train_set, config, run.path, progress=False))
    samples = sample(model, np.arange(8), config.schedule, num_steps=10, progress=False)
    save_samples(samples, run.samples_dir, model_fingerprint(model))
    target = int((samples.images - digits.images[zeros[0]]).flatten(1).norm(dim=1).argmin())
    planted = np.flatnonzero(train_set.ids.numpy() < 6)
    assert len(planted) >= 5
    removals = {"planted": planted[None]}
    for seed in (0, 1):
        removals[f"random{seed}"] = cf.random_removals(len(train_set), len(planted), [target], seed)
    rows, images = cf.evaluate_removals(
        run, tmp_path / "cf", removals, [target], InProcessExecutor(progress=False),
        reference="original", encoder_settings=EncoderSettings(steps=50), bootstrap=10,
        progress=False, control=False,
    )  # fmt: skip
    by = {r["method"]: r for r in rows}
    random_l2 = max(by[f"random{s}"]["pixel_l2"][0] for s in (0, 1))
    random_cos = min(by[f"random{s}"]["embedding_cos"][0] for s in (0, 1))
    assert by["planted"]["pixel_l2"][0] > 1.3 * random_l2
    assert by["planted"]["embedding_cos"][0] < random_cos
    assert set(images) >= {"original_alone", "reference", "planted"} and "control" not in images


def test_pixel_nearest_is_a_baseline_of_every_comparison():
    rng = np.random.default_rng(1)
    values = {
        m: {"pixel_l2": rng.random(5) + shift, "embedding_cos": 1 - rng.random(5) * 0.1}
        for m, shift in (("random", 0.0), ("das", 1.0), ("das screen=pixel-cos:10%", 1.5),
                         ("pixel-cos", 2.0))
    }  # fmt: skip
    by = {r["method"]: r for r in cf.summarize_removals(values, bootstrap=50)}
    assert list(by["das"]["paired"]) == ["random", "pixel-cos", "das screen=pixel-cos:10%"]
    assert list(by["pixel-cos"]["paired"]) == ["random", "das", "das screen=pixel-cos:10%"]
    table = cf.removals_table(list(by.values()))
    lines = [line.split(" | ")[0] for line in table.splitlines() if " vs " in line][::2]
    assert lines == ["| das vs random", "| das screen=pixel-cos:10% vs random",
                     "| pixel-cos vs random", "| das vs pixel-cos",
                     "| das screen=pixel-cos:10% vs pixel-cos",
                     "| das vs das screen=pixel-cos:10%"]  # fmt: skip


def test_screen_labels_captions_and_cache_names():
    from diffattr.attribution.screening import Screen

    screen = Screen.parse("pixel-cos:10%")
    assert cf.screened_label("das", screen) == "das screen=pixel-cos:10%"
    assert cf.scores_cache_name("das") == "das"
    assert cf.scores_cache_name("das", screen) == "das.screen-pixel-cos-10%-union"
    assert cf.scores_cache_name("das", Screen.parse("pixel-cos:10%", "all")) != (
        cf.scores_cache_name("das", screen)
    )
    recorded = {**screen.describe(), "candidates": 50, "union": 300}
    assert cf.same_screen(recorded, screen) and cf.same_screen(None, None)
    assert not cf.same_screen(recorded, None) and not cf.same_screen(None, screen)
    assert not cf.same_screen(recorded, Screen.parse("pixel-cos:5%"))
    assert cf.screenable("das") and cf.screenable("das[leverage=true]") and cf.screenable("trak")
    assert not cf.screenable("pixel-cos") and not cf.screenable("combine[methods=das+ekfac]")
    assert cf.column_caption("das screen=pixel-cos:10%", 11) == "das scr10%"
    assert cf.column_caption("combine[methods=das+ekfac]", 11) == "das+ekfac"
    assert cf.column_caption("pixel-cos", 11) == "pixel-cos"
    assert cf.column_caption("dtrak[residual=none;leverage=true]", 11) == "dtrak[none~"
    both = "combine[methods=das+ekfac]"
    rules = cf.removal_rules(["pixel-cos", "das", both], [screen], 25, 500)
    assert rules == [("pixel-cos", "pixel-cos", None), ("das", "das", None),
                     ("das screen=pixel-cos:10%", "das", screen), (both, both, None)]  # fmt: skip
    with pytest.raises(ConfigError, match=r"M = 20 of 500 .* k = 25"):
        cf.removal_rules(["das"], [Screen.parse("pixel-cos:20")], 25, 500)
    with pytest.raises(ConfigError, match="applies to none"):
        cf.removal_rules(["pixel-cos"], [screen], 25, 500)


def test_screened_rows_reuse_the_unscreened_results(tiny_run, tmp_path, monkeypatch):
    """A run with --screen adds `das screen=…` rows removing only each target's screen
    candidates; the unscreened rows, scores and retrainings of an earlier run are reused."""
    from diffattr.attribution.scores import Scores

    out = tmp_path / "cf"
    argv = [str(tiny_run), "--out", str(out), "--method", "das,pixel-cos", "--k", "2",
            "--num-targets", "2", "--timesteps", "2", "--picture-targets", "2",
            "--executor", "inprocess", "--bootstrap", "50", "--quiet"]  # fmt: skip
    run_command(argv)
    before = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    with pytest.raises(ConfigError, match=r"M = 1 of 16 .* k = 2"):
        run_command([*argv, "--screen", "pixel-cos:1"])
    with pytest.raises(ConfigError, match="applies to none of the methods pixel-cos"):
        only_pixel = [a.replace("das,pixel-cos", "pixel-cos") for a in argv]
        run_command([*only_pixel, "--screen", "pixel-cos:4"])

    import diffattr.diffusion.training as training

    trained: list[int] = []
    real_train = training.train

    def counted(*a, **k):
        trained.append(1)
        return real_train(*a, **k)

    monkeypatch.setattr(training, "train", counted)
    # M = 4 (25% of 16) and M = k = 2: the latter removes exactly the 2 pixel-nearest images.
    run_command([*argv, "--screen", "pixel-cos:25%,pixel-cos:2"])
    rows = json.loads((out / "results.json").read_text())
    by = {r["method"]: r for r in rows}
    wide, narrow = "das screen=pixel-cos:25%", "das screen=pixel-cos:2"
    assert list(by) == ["random", "das", wide, narrow, "pixel-cos", "none"]
    for m in ("random", "das", "pixel-cos", "none"):  # unchanged, from the cached retrainings
        assert by[m]["pixel_l2"] == before[m]["pixel_l2"]
        assert by[m]["retrain"] == before[m]["retrain"]
    assert by["das"]["scores_source"] == str(out / "scores" / "das")
    assert by[wide]["screen"] == {"similarity": "pixel-cos", "size": 0.25, "kernel": "union",
                                  "M": 4, "screened_method": "das"}  # fmt: skip
    assert by[wide]["scores_source"] == "computed"
    assert Scores.load(out / "scores" / "das.screen-pixel-cos-25%-union").meta["screen"]["size"]
    pixel = Scores.load(out / "scores" / "pixel-cos")
    for row, removed in zip([0, 1], by[wide]["removed_ids"], strict=True):
        nearest = pixel.train_ids[np.argsort(-pixel.values[row], kind="stable")]
        assert set(removed) <= set(nearest[:4].tolist())  # within the target's candidates
        assert len(removed) == 2
    assert [sorted(r) for r in by[narrow]["removed_ids"]] == [
        sorted(r) for r in by["pixel-cos"]["removed_ids"]
    ]
    assert by[narrow]["retrain"] == by["pixel-cos"]["retrain"]  # same removals: one model
    new = {key for m in (wide, narrow) for key in by[m]["retrain"]} - {
        key for r in before.values() for key in r["retrain"]
    }
    assert len(trained) == len(new)  # only the new removal sets were trained
    table = (out / "results.md").read_text()
    assert f"| {wide} vs pixel-cos |" in table and f"| {wide} vs random |" in table
    assert "das scr25% (= das screen=pixel-cos:25%)" in table  # the picture's column
    z = np.load(out / "images.npz")
    assert z[wide].shape == z["das"].shape
