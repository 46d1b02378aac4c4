"""Datasets stored as NumPy ``.npz`` archives."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from diffattr.data.dataset import _RANGE_TOL, ImageDataset, _check_size
from diffattr.data.images import _resize
from diffattr.errors import DataError
from diffattr.fsio import atomic_write


def _npz_images(arr: np.ndarray, path: Path, pixel_range: np.ndarray | None) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim == 4:
        chw = arr.shape[1] in (1, 3)
        hwc = arr.shape[3] in (1, 3)
        if hwc and not chw:
            arr = arr.transpose(0, 3, 1, 2)
        elif not chw:
            raise DataError(
                f"{path}: images of shape {arr.shape} have neither 1 nor 3 channels",
                hint="store images as N×H×W, N×H×W×C or N×C×H×W with C = 1 or 3",
            )
    else:
        raise DataError(f"{path}: images must be N×H×W, N×H×W×C or N×C×H×W, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: images array is empty")

    if arr.dtype == np.uint8:
        lo_in, hi_in = 0.0, 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32)
        if not np.isfinite(a).all():
            raise DataError(f"{path}: images contain NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if pixel_range is not None:
            lo_in, hi_in = float(pixel_range[0]), float(pixel_range[1])
        elif lo < 0:
            lo_in, hi_in = -1.0, 1.0
        else:
            lo_in, hi_in = 0.0, 1.0
        if lo < lo_in - _RANGE_TOL or hi > hi_in + _RANGE_TOL:
            raise DataError(
                f"{path}: float images must lie in [0, 1] or [-1, 1], found [{lo:.4g}, {hi:.4g}]",
                hint="store uint8 images (0..255) or floats scaled to [0, 1] or [-1, 1]",
            )
    else:
        raise DataError(
            f"{path}: images have dtype {arr.dtype}; expected uint8 or float",
            hint="convert the images to uint8 (0..255) or float in [0, 1]",
        )
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if (lo_in, hi_in) != (-1.0, 1.0):
        t = (t - lo_in) / (hi_in - lo_in) * 2.0 - 1.0
    return t.clamp_(-1.0, 1.0).contiguous()


def load_npz(path: str | os.PathLike[str], size: int | None = None) -> ImageDataset:
    """Load images (and optional ``ids``, ``labels``, ``captions``) from a ``.npz`` file.

    ``images`` may be N×H×W, N×H×W×C or N×C×H×W (C in {1, 3}); uint8 is read as 0..255,
    floats as [0, 1] unless they contain negative values, then as [-1, 1]. Files written by
    :func:`save_npz` carry a ``pixel_range`` key that removes that guess.
    """
    p = Path(path)
    size = _check_size(size)
    if not p.is_file():
        raise DataError(f"npz file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.files)
            if "images" not in keys:
                raise DataError(
                    f"{p} has no 'images' array; keys found: {', '.join(keys) or '(none)'}",
                    hint="save the image array under the key 'images'",
                )
            arr = z["images"]
            ids = z["ids"] if "ids" in keys else None
            labels = z["labels"] if "labels" in keys else None
            captions = z["captions"] if "captions" in keys else None
            sources = z["sources"] if "sources" in keys else None
            label_names = z["label_names"] if "label_names" in keys else None
            pixel_range = z["pixel_range"] if "pixel_range" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(
            f"cannot read npz file {p}: {exc}",
            hint="the file is corrupt or not a NumPy .npz archive (object arrays are refused)",
        ) from exc

    if pixel_range is not None:
        pr = np.asarray(pixel_range, dtype=np.float64).reshape(-1)
        if pr.shape != (2,) or not pr[1] > pr[0]:
            raise DataError(f"{p}: pixel_range must be two increasing numbers, got {pixel_range}")
        pixel_range = pr
    images = _npz_images(arr, p, pixel_range)
    n = images.shape[0]
    if size is not None:
        images = _resize(images, (size, size))

    def _int_key(value: np.ndarray | None, key: str) -> torch.Tensor | None:
        if value is None:
            return None
        if not np.issubdtype(value.dtype, np.integer) or value.shape != (n,):
            raise DataError(
                f"{p}: {key!r} must be {n} integers, got dtype {value.dtype} shape {value.shape}"
            )
        return torch.from_numpy(value.astype(np.int64))

    ids_t = _int_key(ids, "ids")
    labels_t = _int_key(labels, "labels")
    caption_list = _npz_strings(captions, "captions", p, n)
    source_list = _npz_strings(sources, "sources", p, n) or [f"npz:{i}" for i in range(n)]
    names = None if label_names is None else _npz_strings(label_names, "label_names", p, None)
    try:
        return ImageDataset(
            images=images,
            ids=ids_t if ids_t is not None else torch.arange(n, dtype=torch.int64),
            labels=labels_t,
            captions=caption_list,
            name=p.stem,
            sources=source_list,
            label_names=names,
        )
    except DataError as exc:
        raise DataError(f"{p}: {exc}", hint=exc.hint) from exc


def _npz_strings(value: np.ndarray | None, key: str, p: Path, n: int | None) -> list[str] | None:
    """A string array of an npz file as a list (``n`` of them unless None)."""
    if value is None:
        return None
    if value.dtype.kind not in ("U", "S") or value.ndim != 1 or (n is not None and len(value) != n):
        want = f"{n} strings" if n is not None else "strings"
        raise DataError(f"{p}: {key!r} must be {want}, got dtype {value.dtype} shape {value.shape}")
    if value.dtype.kind == "S":
        return [c.decode("utf-8", errors="replace") for c in value.tolist()]
    return [str(c) for c in value.tolist()]


def save_npz(dataset: ImageDataset, path: str | os.PathLike[str]) -> None:
    """Write ``dataset`` as ``.npz`` (float32 images in [-1, 1], ids, labels, captions)."""
    p = Path(path)
    arrays: dict[str, np.ndarray] = {
        "images": np.ascontiguousarray(dataset.images.detach().cpu().numpy(), dtype=np.float32),
        "ids": dataset.ids.detach().cpu().numpy().astype(np.int64),
        "pixel_range": np.asarray([-1.0, 1.0], dtype=np.float32),
    }
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels.detach().cpu().numpy().astype(np.int64)
    if dataset.captions is not None:
        arrays["captions"] = np.asarray(dataset.captions, dtype=np.str_).reshape(len(dataset))
    if dataset.sources is not None:
        arrays["sources"] = np.asarray(dataset.sources, dtype=np.str_).reshape(len(dataset))
    if dataset.label_names:
        arrays["label_names"] = np.asarray(dataset.label_names, dtype=np.str_)
    atomic_write(p, lambda fh: np.savez(fh, **arrays))
