"""Images with transparency are composited onto a background (white unless told otherwise)
before anything else: training folders, targets and palettes alike, with no library warning."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.data import composite_rgba, load_image_folder, parse_background
from diffattr.errors import DataError
from diffattr.run import DataSpec, RunDir

HIDDEN = [(255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 0, 0)]  # under alpha 0


def _rgba(i: int, size: int = 8) -> Image.Image:
    """A yellow square in the middle; everything else transparent over a saturated colour."""
    a = np.zeros((size, size, 4), dtype=np.uint8)
    a[..., :3] = HIDDEN[i % len(HIDDEN)]
    a[2:6, 2:6] = (255, 220 - 10 * i, 0, 255)
    a[2, 2, 3] = 128  # one half-transparent pixel
    return Image.fromarray(a, "RGBA")


def _palette(size: int = 8) -> Image.Image:
    """A palette image whose index 0 is a transparent red."""
    im = Image.new("P", (size, size), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    im.paste(1, (2, 2, 6, 6))
    im.info["transparency"] = 0
    return im


@pytest.fixture()
def rgba_folder(tmp_path):
    root = tmp_path / "rgba"
    root.mkdir()
    for i in range(12):
        _rgba(i).save(root / f"img{i:02d}.png")
    _palette().save(root / "pal.png", transparency=0)
    return root


def test_composite_is_what_a_viewer_shows():
    rgba = np.array([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.5]]])
    out = composite_rgba(rgba, (1.0, 1.0, 1.0))
    assert np.allclose(out, [[[1, 1, 1], [1, 0, 0], [0.5, 0.5, 1.0]]])
    assert parse_background("black") == (0.0, 0.0, 0.0)
    assert parse_background("0,128,255") == (0.0, 128 / 255, 1.0)
    with pytest.raises(DataError, match="not a colour"):
        parse_background("blurple")


def test_transparent_pixels_become_the_background(rgba_folder, capsys):
    ds = load_image_folder(rgba_folder)
    assert ds.shape == (3, 8, 8)
    x = (ds.images + 1) / 2  # [0, 1]
    corner = x[:, :, 0, 0]
    assert torch.allclose(corner, torch.ones_like(corner))  # white, not the hidden colours
    assert torch.allclose(x[0, :, 3, 3], torch.tensor([1.0, 220 / 255, 0.0]), atol=1e-6)
    assert torch.allclose(x[0, :, 2, 2], torch.tensor([1.0, (220 / 255 + 1) / 2, 0.5]), atol=3e-3)
    assert torch.allclose(x[1, :, 3, 3], torch.tensor([1.0, 210 / 255, 0.0]), atol=1e-6)
    pal = x[-1]  # pal.png sorts last: transparent red -> white, opaque blue stays
    assert torch.allclose(pal[:, 0, 0], torch.ones(3))
    assert torch.allclose(pal[:, 3, 3], torch.tensor([0.0, 0.0, 1.0]))
    err = capsys.readouterr().err
    assert "13 of 13 images" in err and "composited onto white" in err
    black = load_image_folder(rgba_folder, background="black")
    assert torch.allclose(black.images[:, :, 0, 0], -torch.ones(13, 3))
    assert black.fingerprint() != ds.fingerprint()


def test_train_and_score_see_composited_pixels(rgba_folder, tmp_path):
    """End to end through the CLI in a subprocess: no library warning reaches stderr."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-W", "default", "-m", "diffattr.cli"]
    train = subprocess.run(
        [*cmd, "train", "--data", str(rgba_folder), "--val-count", "2", "--steps", "2",
         "--batch-size", "4", "--out", str(run), "--quiet", "--threads", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert "Warning" not in train.stderr
    assert "composited onto white" in train.stderr
    spec = RunDir(run).data_spec()
    assert spec.background == "white"
    train_set, _ = spec.load()
    assert torch.allclose(train_set.images[:, :, 0, 0], torch.ones(len(train_set), 3))
    own = int(train_set.ids[0])  # a training image given back as a target file
    target = rgba_folder / f"img{own:02d}.png"
    score = subprocess.run(
        [*cmd, "score", str(run), "--targets", str(target),
         "--method", "pixel-cos", "--json", "--quiet", "--threads", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert score.returncode == 0, score.stderr
    assert "Warning" not in score.stderr
    meta = json.loads((run / "scores" / f"pixel-cos-img{own:02d}" / "meta.json").read_text())
    # composited exactly as its training copy: distance 0 to it (the hidden colour would
    # put it far from every training image)
    assert meta["near_copy"]["nearest_train_id"] == [own]
    assert meta["near_copy"]["pixel_distance"] == [0.0]
    black_run = tmp_path / "black"
    again = subprocess.run(
        [*cmd, "train", "--data", str(rgba_folder), "--val-count", "2", "--steps", "2",
         "--batch-size", "4", "--out", str(black_run), "--quiet", "--threads", "1",
         "--background", "black"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    black_set, _ = DataSpec(**RunDir(black_run).manifest()["data"]).load()
    assert torch.allclose(black_set.images[:, :, 0, 0], -torch.ones(len(black_set), 3))
