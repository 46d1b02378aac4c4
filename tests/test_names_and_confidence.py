"""Every answer names its images (file, caption, group) in one id space, and the confidence is
read against the run's own held-out images, with a benchmark bin only for data like the
benchmarks' (issue 27, items 2 and 3)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.cli import main

COMMON = ["--quiet", "--threads", "1"]
QUICK = ["--steps", "2", "--batch-size", "4", *COMMON]


def captioned_digits(folder: Path, count: int = 30) -> dict[str, str]:
    """``count`` digit PNGs in two subfolders with a ``captions.txt``; file → caption."""
    from diffattr.data import load_builtin, save_png

    digits = load_builtin("digits")
    captions = {}
    for i in range(count):
        rel = f"{'ab'[i % 2]}/{i:02d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        save_png(digits.images[i], folder / rel)
        captions[rel] = f"a handwritten {int(digits.labels[i])}"
    (folder / "captions.txt").write_text("".join(f"{k}\t{v}\n" for k, v in captions.items()))
    return captions


def colour_squares(folder: Path, count: int = 40, size: int = 16) -> None:
    """``count`` 16×16 RGB PNGs: seeded random colour blocks (no real data needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((size // 4, size // 4, 1), dtype=np.uint8))
        Image.fromarray(pixels, mode="RGB").save(folder / f"img{i:03d}.png")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> dict:
    """A run on 30 captioned digit files (2 training steps), 2 generated targets and a
    folder of 2 target files, scored with DAS."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("names")
    data, targets, run = root / "data", root / "targets", root / "run"
    captions = captioned_digits(data)
    targets.mkdir()
    for name, src in (("left.png", "a/00.png"), ("right.png", "b/07.png")):
        (targets / name).write_bytes((data / src).read_bytes())
    try:
        assert main(["train", "--data", str(data), "--out", str(run), "--val-count", "8",
                     *QUICK]) == 0  # fmt: skip
        assert main(["generate", str(run), "--num", "2", "--steps", "2", *COMMON]) == 0
        for spec in ("samples", str(targets)):
            assert main(["score", str(run), "--method", "das", "--timesteps", "1", "--k", "3",
                         "--targets", spec, *COMMON]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return {"run": run, "data": data, "targets": targets, "captions": captions}


def test_topk_tables_name_each_training_image_by_file_and_caption(folder_run):
    out = folder_run["run"] / "scores" / "das-samples"
    captions = folder_run["captions"]
    rows = _csv(out / "topk.csv")
    assert list(rows[0])[:5] == ["target_id", "kind", "rank", "train_id", "score"]  # as before
    assert {"train_source", "train_caption", "train_group", "target_source"} <= set(rows[0])
    files = sorted(captions)  # ids are positions in the sorted listing of the whole folder
    for r in rows:
        assert r["train_source"] == files[int(r["train_id"])]
        assert r["train_caption"] == captions[r["train_source"]]
        assert r["target_source"] == f"samples.npz:{r['target_id']}"
    top = json.loads((out / "topk.json").read_text())
    for t in top:
        assert t["source"] == f"samples.npz:{t['target_id']}"
        for p in t["proponents"] + t["opponents"]:
            assert p["train_source"] == files[p["train_id"]]
            assert p["train_caption"] == captions[p["train_source"]]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["targets"]["source"] == ["samples.npz:0", "samples.npz:1"]


def test_folder_targets_are_named_by_file(folder_run, capsys):
    run, targets = folder_run["run"], folder_run["targets"]
    out = run / "scores" / "das-targets"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["targets"]["source"] == ["left.png", "right.png"]
    assert {r["target_source"] for r in _csv(out / "topk.csv")} == {"left.png", "right.png"}
    assert [t["source"] for t in json.loads((out / "topk.json").read_text())] == [
        "left.png",
        "right.png",
    ]
    capsys.readouterr()
    assert main(["score", str(run), "--method", "pixel-cos", "--targets", str(targets),
                 "--json", *COMMON]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)["targets"]
    assert [r["source"] for r in rows] == ["left.png", "right.png"]
    html_path = run / "targets-report.html"
    assert main(["report", str(run), "--targets", str(targets), "--out", str(html_path),
                 *COMMON]) == 0  # fmt: skip
    html = html_path.read_text()
    assert "<span>left.png</span>" in html and "target 0" not in html


def test_python_near_copies_and_meta_json_agree_on_ids(folder_run):
    """The CLI's meta.json, ``near_copies`` given the training set and
    ``Attributor.score(..., heldout=...)`` name the same nearest training images, by id."""
    from diffattr.attribution.scores.confidence import near_copies
    from diffattr.diffusion.sampling import load_samples
    from diffattr.families import open_run
    from diffattr.run import RunDir

    run = RunDir(folder_run["run"])
    meta = json.loads((run.scores_dir / "das-samples" / "meta.json").read_text())["near_copy"]
    train_set, val_set = run.data_spec().load()
    samples = load_samples(run.samples_dir / "samples.npz")
    nc = near_copies(samples.images, train_set, val_set)
    assert nc.nearest.tolist() == meta["nearest_train_id"]
    assert set(nc.nearest.tolist()) <= set(train_set.ids.tolist())
    assert nc.flagged.tolist() == meta["flagged"]

    bound = open_run(run)
    att = bound.attributor("pixel-cos", progress=False)
    _, targets, ids = bound.targets("samples")
    assert att.score(targets, ids).near_copy_flags() is None  # nothing to compare with
    scores = att.score(targets, ids, heldout=val_set)
    assert scores.near_copy_flags().tolist() == meta["flagged"]
    assert scores.meta["near_copy"]["nearest_train_id"] == meta["nearest_train_id"]
    assert scores.confidence_percentiles().shape == (2,)
    assert scores.meta["confidence_reference"]["ids"] == val_set.ids.tolist()  # all 8


def test_report_ranking_names_training_files(folder_run):
    run = folder_run["run"]
    assert main(["report", str(run), *COMMON]) == 0
    html = (run / "report.html").read_text()
    files = sorted(folder_run["captions"])
    panel = html[html.index("<details class='panel'>") :]
    panel = panel[: panel.index("</details>")]
    assert "<th>file</th>" in panel and "<th>caption</th>" in panel
    named = [f for f in files if f"<td class='name'>{f}</td>" in panel]
    assert len(named) == 20  # the top-20 ranking, each row with its file
    assert 'title="#' in html  # hover text on the thumbnails


def test_colour_run_reads_confidence_against_its_heldout_images_without_a_bin(tmp_path):
    data, run = tmp_path / "squares", tmp_path / "run"
    colour_squares(data)
    assert main(["train", "--data", str(data), "--size", "16", "--preset", "tiny",
                 "--out", str(run), *QUICK]) == 0  # fmt: skip
    assert main(["generate", str(run), "--num", "2", "--steps", "2", *COMMON]) == 0
    assert main(["score", str(run), "--method", "das", "--timesteps", "1", *COMMON]) == 0
    conf = json.loads((run / "scores" / "das-samples" / "meta.json").read_text())["confidence"]
    assert conf["bins"] == [None, None]
    assert conf["bin_status"] == "not calibrated for this data"
    assert conf["heldout_count"] == 8  # a fifth of 40 images held out, all scored
    assert all(0 <= p <= 100 for p in conf["heldout_percentile"])
    assert main(["report", str(run), *COMMON]) == 0
    html = (run / "report.html").read_text()
    assert "How to read this" in html and "not calibrated for this data" in html
    assert "of the run's held-out real images" in html
    assert "digits8" in html[html.index("How to read this") :]  # which benchmarks the bin uses


def test_a_digits_run_like_the_benchmark_still_gets_bins(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--train-count", "250", "--val-count", "20",
                 "--out", str(run), *QUICK]) == 0  # fmt: skip
    assert main(["generate", str(run), "--num", "2", "--steps", "2", *COMMON]) == 0
    assert main(["score", str(run), "--method", "das", "--timesteps", "1", *COMMON]) == 0
    conf = json.loads((run / "scores" / "das-samples" / "meta.json").read_text())["confidence"]
    assert all(b in ("low", "medium", "high") for b in conf["bins"])
    assert conf["bin_status"] == "calibrated on digits8"
    assert conf["heldout_count"] == 20
