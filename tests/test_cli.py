"""diffattr.cli: every command's --help, one-line errors, the parser, and the whole pipeline
through main() (train, generate, score, report; a missing run named; the default split)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from diffattr.cli import build_parser, main

COMMANDS = ["demo", "train", "generate", "featurize", "score", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"diffattr {command}" in out


def test_pipeline_end_to_end(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["--quiet", "--threads", "1"]
    assert main(["train", "--out", run, "--train-count", "20", "--val-count", "6",
                 "--steps", "3", "--batch-size", "8", *common]) == 0  # fmt: skip
    assert main(["generate", run, "--num", "3", "--steps", "4", *common]) == 0
    capsys.readouterr()
    assert main(["score", run, "--method", "das,dtrak,pixel-cos,random", "--timesteps", "2",
                 "--k", "5", "--json", *common]) == 0  # fmt: skip
    per_target = json.loads(capsys.readouterr().out)["targets"]
    assert [t["id"] for t in per_target] == [0, 1, 2]
    for t in per_target:  # a confidence per method, its held-out percentile, the flag; no bin
        assert isinstance(t["near_copy"], bool) and isinstance(t["das"]["confidence"], float)
        assert 0 <= t["das"]["percentile"] <= 100  # among the run's 6 held-out images
        assert t["das"]["bin"] is None and t["random"]["bin"] is None  # N = 20: unlike digits8
    assert [t["source"] for t in per_target] == [f"samples.npz:{i}" for i in range(3)]
    assert main(["report", run, "--method", "das,dtrak", "--json", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["methods"] == ["das", "dtrak"]
    # Without --method the report shows every method that has scores of the targets.
    assert main(["report", run, "--json", "--out", str(tmp_path / "all.html"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["methods"] == ["das", "dtrak", "pixel-cos", "random"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("near copy: nearest training image") == 3  # the verdict of every target
    sections = html.split("<section class='target'")[1:]
    assert len(sections) == 3
    # the target and each method's 8 proponents and 4 opponents; the group view (digit
    # classes) adds its top group's members
    outside = [re.sub(r"<details class='groups'.*?</details>", "", s, flags=re.S) for s in sections]
    assert all(s.count("data:image/png;base64,") == 1 + 2 * (8 + 4) for s in outside)
    assert all(s.count("class='gbars'") == 2 for s in sections)
    top = json.loads((tmp_path / "run" / "scores" / "das-samples" / "topk.json").read_text())
    assert len(top) == 3 and len(top[0]["proponents"]) == 5
    scores = np.load(tmp_path / "run" / "scores" / "das-samples" / "scores.npy")
    assert scores.shape == (3, 20) and np.isfinite(scores).all()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--out", "{tmp}/r", "--data", "{tmp}/nothing.npz"], "nothing.npz"),
        (["generate", "{tmp}/missing-run"], "missing-run does not exist"),
        (["score", "{tmp}/missing-run"], "missing-run does not exist"),
        (["train", "--out", "{tmp}/r", "--steps", "0"], "--steps"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = subprocess.run(
        [sys.executable, "-m", "diffattr.cli", *argv, "--quiet"], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and needle in r.stderr.splitlines()[0]


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    for c in COMMANDS:
        assert c in text


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{run}"],
        ["featurize", "{run}"],
        ["score", "{run}"],
        ["report", "{run}"],
        ["lds", "build", "{run}", "--out", "{tmp}/bench"],
        ["counterfactual", "{run}", "--out", "{tmp}/cf"],
    ],
)
def test_a_missing_run_directory_is_named(tmp_path, capsys, argv):
    """Every command given a run directory that does not exist says exactly that (and
    writes nothing)."""
    argv = [a.format(run=tmp_path / "missing-run", tmp=tmp_path) for a in argv]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"run directory {tmp_path / 'missing-run'} does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def forty_captioned_images(folder) -> None:
    from diffattr.data import load_builtin, save_png

    digits = load_builtin("digits")
    lines = []
    for i in range(40):
        save_png(digits.images[i].expand(3, -1, -1), folder / f"{i:02d}.png")
        lines.append(f"{i:02d}.png\ta digit {int(digits.labels[i])}")
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")


def test_train_and_finetune_on_forty_images_with_the_default_split(tmp_path):
    """The default held-out split scales with the data: a fifth of 40 images (8), not 200."""
    from diffattr.run import RunDir

    folder = tmp_path / "imgs"
    forty_captioned_images(folder)
    quick = ["--steps", "2", "--batch-size", "4", "--quiet", "--threads", "1"]
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "r1"), *quick]) == 0
    assert main(["finetune", "--base", "tiny", "--data", str(folder), "--resolution", "8",
                 "--out", str(tmp_path / "r2"), *quick]) == 0  # fmt: skip
    for run in ("r1", "r2"):
        spec = RunDir(tmp_path / run).data_spec()
        train, val = spec.load()
        assert (spec.val_count, len(train), len(val)) == (8, 32, 8)
