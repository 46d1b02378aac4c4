"""diffattr.data.folders: image folders: modes, sizes, corrupt files, captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.data import (
    load_dataset,
    load_image_folder,
)
from diffattr.errors import DataError


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_gray_recursive_sorted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for rel in ["b.png", "a.png", "sub/c.png", "sub/deeper/a.PNG"]:
        arr = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
        _write_png(tmp_path / rel, arr)
        arrays[rel] = arr
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert len(ds) == 4 and ds.shape == (1, 5, 7)
    assert ds.ids.tolist() == [0, 1, 2, 3]
    order = sorted(arrays)  # a.png, b.png, sub/c.png, sub/deeper/a.PNG
    for i, rel in enumerate(order):
        expect = torch.from_numpy(arrays[rel].astype(np.float32) / 255 * 2 - 1)
        assert torch.allclose(ds.images[i, 0], expect, atol=1e-6)
    assert ds.captions is None and ds.labels is None
    # load_dataset dispatches folders too.
    assert load_dataset(str(tmp_path)).fingerprint() == ds.fingerprint()


def test_image_folder_rgb_and_mixed_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
    _write_png(tmp_path / "0_rgb.png", rgb)
    _write_png(tmp_path / "1_gray.png", gray)
    ds = load_image_folder(tmp_path)
    assert ds.shape == (3, 6, 6)
    assert torch.allclose(
        ds.images[0], torch.from_numpy(rgb.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)
    )
    assert torch.equal(ds.images[1, 0], ds.images[1, 2])  # gray replicated
    one = load_image_folder(tmp_path, channels=1)
    assert one.shape == (1, 6, 6)
    with pytest.raises(DataError, match="channels"):
        load_image_folder(tmp_path, channels=2)


def test_image_folder_jpeg_round_trip(tmp_path: Path) -> None:
    arr = np.full((8, 8, 3), 200, dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.JPG", quality=95)
    ds = load_image_folder(tmp_path)
    assert ds.shape == (3, 8, 8)
    assert float((ds.images - (200 / 255 * 2 - 1)).abs().max()) < 0.05


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _write_png(tmp_path / "b.png", np.zeros((6, 5), dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path)
    assert "a.png" in str(info.value) and "b.png" in str(info.value)
    resized = load_image_folder(tmp_path, mismatch="resize")
    assert resized.shape == (1, 4, 4)
    sized = load_dataset(str(tmp_path), size=8, mismatch="resize")
    assert sized.shape == (1, 8, 8)
    with pytest.raises(DataError, match="mismatch"):
        load_image_folder(tmp_path, mismatch="crop")


def test_image_folder_corrupt_files(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _write_png(good / "a.png", np.zeros((4, 4), dtype=np.uint8))
    (good / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError, match="garbage.png"):
        load_image_folder(good)

    trunc = tmp_path / "trunc"
    src = tmp_path / "full.png"
    arr = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(arr).save(src)
    data = src.read_bytes()
    trunc.mkdir()
    (trunc / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        load_image_folder(trunc)


def test_image_folder_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_image_folder_captions(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _write_png(tmp_path / "sub" / "b.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "captions.txt").write_text("sub/b.png\ta cat\na.png\ta dog\n")
    ds = load_image_folder(tmp_path)
    assert ds.captions == ["a dog", "a cat"]

    (tmp_path / "captions.txt").unlink()
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "x", "sub/b.png": "y"}))
    assert load_image_folder(tmp_path).captions == ["x", "y"]

    (tmp_path / "captions.json").write_text(
        json.dumps({"a.png": "x", "sub/b.png": "y", "gone.png": "z"})
    )
    with pytest.raises(DataError, match="gone.png"):
        load_image_folder(tmp_path)
