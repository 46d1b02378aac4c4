"""Index files: 1-D or 2-D arrays of non-negative integers as ``.npy`` or ``.txt``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.errors import DataError
from diffattr.fsio import atomic_write


def _index_format(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".txt"):
        raise DataError(
            f"index file {p} must end in .npy or .txt", hint="use a .npy or .txt file name"
        )
    return suffix


def save_indices(path: str | os.PathLike[str], indices: np.ndarray | Sequence[Any]) -> None:
    """Atomically write a 1-D or 2-D array of non-negative integers (``.npy`` or ``.txt``)."""
    p = Path(path)
    fmt = _index_format(p)
    arr = np.asarray(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"indices for {p} must be integers, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise DataError(f"indices for {p} must be 1-D or 2-D, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DataError(f"indices for {p} must be non-negative, found {int(arr.min())}")
    if fmt == ".npy":
        atomic_write(p, lambda fh: np.save(fh, arr, allow_pickle=False))
    else:
        rows = arr[:, None] if arr.ndim == 1 else arr
        text = "".join(" ".join(str(int(v)) for v in row) + "\n" for row in rows)
        atomic_write(p, lambda fh: fh.write(text.encode("ascii")))


def _parse_index_text(p: Path) -> np.ndarray:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read index file {p}: {exc}") from exc
    rows: list[list[int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            row = [int(tok) for tok in line.replace(",", " ").split()]
        except ValueError:
            raise DataError(
                f"index file {p}, line {lineno}: expected integers, got {line[:60]!r}"
            ) from None
        if rows and len(row) != len(rows[0]):
            raise DataError(
                f"index file {p}, line {lineno}: {len(row)} values, "
                f"but earlier lines have {len(rows[0])}"
            )
        rows.append(row)
    if not rows:
        return np.zeros((0,), dtype=np.int64)
    arr = np.asarray(rows, dtype=np.int64)
    return arr[:, 0] if arr.shape[1] == 1 else arr


def load_indices(path: str | os.PathLike[str], max_index: int | None = None) -> np.ndarray:
    """Read an index file written by :func:`save_indices` (or by hand, for ``.txt``).

    Returns int64, 1-D or 2-D. A ``.txt`` file with one value per line gives a 1-D array.
    ``max_index`` is the largest allowed value (inclusive), e.g. ``len(dataset) - 1``.
    """
    p = Path(path)
    fmt = _index_format(p)
    if not p.is_file():
        raise DataError(f"index file {p} does not exist")
    if fmt == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read index file {p}: {exc}") from exc
        if not isinstance(arr, np.ndarray):
            raise DataError(f"index file {p} does not hold a single array")
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"index file {p} must hold integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    else:
        arr = _parse_index_text(p)
    if arr.ndim not in (1, 2):
        raise DataError(f"index file {p} must hold a 1-D or 2-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"index file {p} contains no indices")
    if arr.min() < 0:
        raise DataError(f"index file {p} contains a negative index {int(arr.min())}")
    if max_index is not None and arr.max() > max_index:
        raise DataError(
            f"index file {p} contains index {int(arr.max())}, above the largest valid "
            f"index {max_index}",
            hint="was the file made for a larger dataset?",
        )
    return arr
