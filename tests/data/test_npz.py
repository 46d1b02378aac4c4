"""diffattr.data.npz: npz data files: round trips, layouts, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.data import (
    ImageDataset,
    load_dataset,
    load_npz,
    save_npz,
)
from diffattr.errors import DataError


def test_npz_round_trip(tmp_path: Path, make_tiny) -> None:
    ds = make_tiny(c=3)
    path = tmp_path / "out" / "tiny.npz"
    save_npz(ds, path)
    back = load_npz(path)
    assert torch.equal(back.images, ds.images)
    assert torch.equal(back.ids, ds.ids)
    assert torch.equal(back.labels, ds.labels)
    assert back.captions == ds.captions
    assert back.fingerprint() == ds.fingerprint()
    assert not [p for p in path.parent.iterdir() if p.name != "tiny.npz"]  # no temp files left
    # All-non-negative [-1, 1] data survives thanks to the stored pixel_range.
    bright = ImageDataset(ds.images.abs(), ds.ids)
    save_npz(bright, path)
    assert torch.equal(load_dataset(str(path)).images, bright.images)


def test_npz_uint8_nhwc_and_float01(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images=u8, labels=np.arange(5))
    ds = load_npz(tmp_path / "u8.npz")
    assert ds.shape == (3, 6, 6) and ds.ids.tolist() == list(range(5))
    expect = torch.from_numpy(u8.astype(np.float32) / 255 * 2 - 1).permute(0, 3, 1, 2)
    assert torch.allclose(ds.images, expect, atol=1e-6)
    assert ds.labels.tolist() == list(range(5))

    f01 = rng.random((4, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=f01, ids=np.array([7, 3, 9, 1]))
    ds = load_npz(tmp_path / "f.npz", size=10)
    assert ds.shape == (1, 10, 10) and ds.ids.tolist() == [7, 3, 9, 1]
    assert float(ds.images.min()) >= -1 and float(ds.images.max()) <= 1


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 4, 4)), targets=np.zeros(2))
    with pytest.raises(DataError) as info:
        load_npz(tmp_path / "k.npz")
    assert "pixels" in str(info.value) and "targets" in str(info.value)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(DataError, match="bad.npz"):
        load_npz(bad)
    with pytest.raises(DataError, match="no built-in dataset, folder or .npz"):
        load_dataset(str(tmp_path / "missing_thing"))
