"""diffattr.data.images: image helpers: PNGs, grids, resizing, sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.data import (
    ImageDataset,
    load_dataset,
    load_image_folder,
    load_npz,
    make_grid,
    save_npz,
    save_png,
    to_uint8_images,
)
from diffattr.errors import DataError


def test_uint8_png_and_grid(tmp_path: Path, make_tiny) -> None:
    ds = make_tiny(n=5, c=3, hw=4)
    u8 = to_uint8_images(ds.images)
    assert u8.shape == (5, 4, 4, 3) and u8.dtype == np.uint8
    assert to_uint8_images(torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3))[0, 0].tolist() == [
        [0],
        [128],
        [255],
    ]
    grid = make_grid(ds.images, nrow=3, pad=1)
    assert grid.shape == (3, 2 * 4 + 3, 3 * 4 + 4)
    assert torch.equal(grid[:, 1:5, 1:5], ds.images[0])
    assert torch.equal(grid[:, 6:10, 1:5], ds.images[3])
    assert make_grid(ds.images, nrow=8, pad=0).shape == (3, 4, 20)
    save_png(grid, tmp_path / "g" / "grid.png")
    with Image.open(tmp_path / "g" / "grid.png") as im:
        assert im.size == (16, 11) and im.mode == "RGB"
    save_png(ds.images[0, :1], tmp_path / "gray.png")
    with Image.open(tmp_path / "gray.png") as im:
        assert im.mode == "L"


def test_a_resize_that_would_not_fit_in_memory_is_refused_before_allocating():

    with pytest.raises(DataError, match="more than an eighth of this machine"):
        load_dataset("digits", size=100_000)  # 1797 × 100,000² floats: ~72 TB


def test_every_image_carries_its_source(tmp_path, digits):
    assert digits.sources[17] == "digits:17"
    assert digits.describe(17) == {"id": 17, "source": "digits:17", "group": "7"}
    root = tmp_path / "f"
    (root / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png"):
        Image.fromarray(np.full((4, 4), 100, dtype=np.uint8)).save(root / name)
    (root / "captions.txt").write_text("a.png\tan a\nb.png\ta b\nsub/c.png\ta c\n")
    ds = load_image_folder(root)
    assert ds.sources == ["a.png", "b.png", "sub/c.png"]  # ids follow the sorted paths
    part = ds.subset([2, 0])
    assert part.sources == ["sub/c.png", "a.png"]
    assert part.describe(0) == {"id": 2, "source": "sub/c.png", "caption": "a c"}
    save_npz(part, tmp_path / "p.npz")
    back = load_npz(tmp_path / "p.npz")
    assert back.sources == ["sub/c.png", "a.png"] and back.ids.tolist() == [2, 0]
    np.savez(tmp_path / "plain.npz", images=np.zeros((3, 4, 4), dtype=np.uint8))
    assert load_npz(tmp_path / "plain.npz").sources == ["npz:0", "npz:1", "npz:2"]
    with pytest.raises(DataError, match="3 sources for 2 images"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.arange(2), sources=["a", "b", "c"])
