"""Every form of ``--targets`` that ``score --help`` documents works, and targets of another size
follow the run's one size policy (resized with a note only if the run resized its own images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffattr.cli import build_parser, main
from diffattr.commands.options import TARGETS_HELP

COMMON = ["--quiet", "--threads", "1"]


def _folder(root, n: int, size: int) -> None:
    root.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 255, (size, size), dtype=np.uint8)).save(root / f"{i}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("forms")
    _folder(base / "data", 14, 8)
    out = base / "run"
    assert main(["train", "--data", str(base / "data"), "--val-count", "4", "--steps", "2",
                 "--batch-size", "4", "--out", str(out), *COMMON]) == 0  # fmt: skip
    assert main(["generate", str(out), "--num", "2", "--steps", "2", *COMMON]) == 0
    return base, out


def test_help_lists_every_form(capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["score"].format_help()
    for form in ("samples", "val", "image file", "folder", ".npz of images"):
        assert form in TARGETS_HELP and form in " ".join(help_text.split())


def test_every_documented_form_scores(run, tmp_path):
    base, out = run
    np.savez(tmp_path / "imgs.npz", images=np.zeros((3, 8, 8), dtype=np.uint8))
    forms = {
        "samples": 2,
        "val": 4,
        str(out / "samples" / "samples.npz"): 2,  # a samples .npz
        str(base / "data" / "3.png"): 1,  # an image file
        str(base / "data"): 14,  # a folder
        str(tmp_path / "imgs.npz"): 3,  # an .npz of images
    }
    for spec, count in forms.items():
        assert main(["score", str(out), "--targets", spec, "--method", "pixel-cos", *COMMON]) == 0
        found = sorted((out / "scores").glob("pixel-cos-*"), key=lambda p: p.stat().st_mtime)
        assert np.load(found[-1] / "scores.npy").shape[0] == count, spec


def test_other_sizes_are_refused_without_size(run, tmp_path, capsys):
    _, out = run
    _folder(tmp_path / "big", 2, 16)
    assert main(["score", str(out), "--targets", str(tmp_path / "big"), "--method",
                 "pixel-cos", *COMMON]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "16×16 images, the run's training images 8×8" in err and "--size" in err


def test_other_sizes_are_resized_with_a_note_when_the_run_resized(tmp_path, capsys):
    _folder(tmp_path / "data", 12, 16)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--size", "8", "--val-count", "4",
                 "--steps", "2", "--batch-size", "4", "--out", str(out), *COMMON]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["score", str(out), "--targets", str(tmp_path / "data" / "1.png"), "--method",
                 "pixel-cos", *COMMON]) == 0  # fmt: skip
    assert "resized from 16×16 to 8×8, as the run's training images were (--size 8)" in (
        capsys.readouterr().err
    )
