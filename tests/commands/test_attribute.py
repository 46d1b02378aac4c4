"""diffattr.commands.attribute: featurize, score, report and methods from the command line
(methods and their options, λ rules, screens, reports without scores)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffattr.attribution.methods import METHODS
from diffattr.cli import main


def test_report_without_scores_renders(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, "--train-count", "10", "--val-count", "4",
                 "--steps", "2", "--batch-size", "4", "--quiet"]) == 0  # fmt: skip
    assert main(["generate", run, "--num", "2", "--steps", "2", "--quiet"]) == 0
    assert main(["report", run, "--quiet"]) == 0
    assert "No attribution scores yet" in (tmp_path / "run" / "report.html").read_text()


def test_score_baselines_from_cli(tmp_path):
    run = str(tmp_path / "run")
    common = ["--quiet", "--threads", "1"]
    assert main(["train", "--out", run, "--train-count", "12", "--val-count", "4",
                 "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2",
                 *common]) == 0  # fmt: skip
    assert main(["generate", run, "--num", "2", "--steps", "3", *common]) == 0
    methods = "relative-if,renormalized-if,embedding-cos[steps=20],tracin,gas,journey-trak"
    assert main(["score", run, "--method", methods, "--timesteps", "1", *common]) == 0
    for label in ("relative-if", "renormalized-if", "embedding-cos[steps=20]", "tracin", "gas",
                  "journey-trak"):  # fmt: skip
        s = np.load(tmp_path / "run" / "scores" / f"{label}-samples" / "scores.npy")
        assert s.shape == (2, 12) and np.isfinite(s).all(), label
    meta = json.loads((tmp_path / "run" / "scores" / "tracin-samples" / "meta.json").read_text())
    assert meta["method"] == "tracin"


def test_score_lambda_options(tmp_path, capsys):
    """Without a λ option a kernel method uses its default rule (recorded with the scores);
    --effective-dim / --relative-lambda / --lambda override it; two at once or a fraction
    outside (0, 1) is an error naming the option."""
    run = str(tmp_path / "run")
    common = ["--quiet", "--threads", "1"]
    assert main(["train", "--out", run, "--train-count", "12", "--val-count", "4",
                 "--steps", "2", "--batch-size", "4", *common]) == 0  # fmt: skip
    assert main(["generate", run, "--num", "2", "--steps", "2", *common]) == 0

    def meta(*extra):
        assert main(["score", run, "--method", "trak", "--timesteps", "1", *extra, *common]) == 0
        return json.loads((tmp_path / "run" / "scores" / "trak-samples" / "meta.json").read_text())

    default = meta()
    assert default["lambda_rule"] == "effective-dim:200"
    looser = meta("--effective-dim", "0.2")
    assert looser["lambda_rule"] == "effective-dim:0.2" and looser["lambda"] > default["lambda"]
    assert meta("--relative-lambda", "0.5")["lambda_rule"] == "relative:0.5"
    assert meta("--lambda", "3")["lambda"] == 3.0
    capsys.readouterr()
    assert main(["score", run, "--effective-dim", "1.5", *common]) == 2
    assert "--effective-dim" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["score", run, "--lambda", "1", "--relative-lambda", "0.1", *common])
    assert info.value.code == 2


def test_score_with_a_screen_from_cli(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["--quiet", "--threads", "1"]
    assert main(["train", "--out", run, "--train-count", "20", "--val-count", "6",
                 "--steps", "3", "--batch-size", "8", *common]) == 0  # fmt: skip
    assert main(["generate", run, "--num", "2", "--steps", "4", *common]) == 0
    assert main(["score", run, "--method", "das", "--timesteps", "2", "--k", "8",
                 "--screen", "pixel-cos:6", *common]) == 0  # fmt: skip
    out = tmp_path / "run" / "scores" / "das-samples"
    scores = np.load(out / "scores.npy")
    assert (np.isfinite(scores).sum(axis=1) == 6).all()
    top = json.loads((out / "topk.json").read_text())
    assert [len(t["proponents"]) for t in top] == [6, 6]
    assert json.loads((out / "meta.json").read_text())["screen"]["size"] == 6
    assert main(["report", run, *common]) == 0
    assert (
        "screened: each target scored on its 6 most similar"
        in (tmp_path / "run" / "report.html").read_text()
    )
    assert main(["score", run, "--screen", "pixel-cos", *common]) == 2
    assert "--screen 'pixel-cos' is not SIMILARITY:M" in capsys.readouterr().err


def test_methods_command_lists_options(capsys):
    assert main(["methods", "das", "random"]) == 0
    out = capsys.readouterr().out
    assert "residual" in out and "error|signed|raw|none" in out and "default error" in out
    assert "default --noise-seed (0)" in out  # random's seed follows the command's noise seed
    assert main(["methods", "--json"]) == 0
    listed = {m["method"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
    assert set(listed) == set(METHODS)
    assert listed["abu"]["needs"] == ["training-loss"]
    assert main(["methods", "dass"]) == 2
    assert "unknown method 'dass'" in capsys.readouterr().err
