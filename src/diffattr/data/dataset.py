"""The dataset container :class:`ImageDataset` and the option checks the loaders share."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffattr.errors import DataError

_RANGE_TOL = 1e-4


def _as_tensor(value: Any, what: str, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise DataError(f"dataset {name!r}: {what} must be a torch.Tensor, got {type(value).__name__}")


def _as_int64(value: Any, what: str, name: str, n: int) -> torch.Tensor:
    t = _as_tensor(value, what, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(f"dataset {name!r}: {what} must be integers, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise DataError(
            f"dataset {name!r}: {what} must have shape ({n},) to match {n} images, "
            f"got {tuple(t.shape)}"
        )
    return t.to(torch.int64)


@dataclass(eq=False)
class ImageDataset:
    """Images in ``[-1, 1]`` with stable integer ids and optional labels and captions.

    ``images`` is float32 ``N×C×H×W``; ``ids`` is int64 ``(N,)`` and unique; ``labels``
    (int64 ``(N,)``) and ``captions`` (``N`` strings) are optional. ``sources`` names where
    each image came from (a file path relative to the folder, ``npz:ROW``, or a built-in's
    ``digits:ID`` / ``emoji:FILE``); ``label_names[v]`` is the name of label value ``v``.

    Ids are the one id space of every result: a folder's images get ids ``0..N-1`` in the
    sorted order of their relative paths (held-out images included), a built-in's its
    original order; a train/val split or a subset keeps them.
    """

    images: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor | None = None
    captions: list[str] | None = None
    name: str = "dataset"
    sources: list[str] | None = None
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        name = self.name
        images = _as_tensor(self.images, "images", name)
        if images.dim() != 4:
            raise DataError(
                f"dataset {name!r}: images must be N×C×H×W, got shape {tuple(images.shape)}"
            )
        if images.dtype != torch.float32:
            raise DataError(f"dataset {name!r}: images must be float32, got {images.dtype}")
        n = images.shape[0]
        if n == 0:
            raise DataError(f"dataset {name!r} has no images")
        if min(images.shape[1:]) == 0:
            raise DataError(f"dataset {name!r}: empty image shape {tuple(images.shape[1:])}")
        if not bool(torch.isfinite(images).all()):
            raise DataError(f"dataset {name!r}: images contain NaN or infinite values")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.0 - _RANGE_TOL or hi > 1.0 + _RANGE_TOL:
            raise DataError(
                f"dataset {name!r}: pixel values must lie in [-1, 1], found [{lo:.4g}, {hi:.4g}]",
                hint="scale images with x * 2 - 1 (from [0, 1]) or x / 127.5 - 1 (from 0..255)",
            )
        self.images = images
        self.ids = _as_int64(self.ids, "ids", name, n)
        uniq = torch.unique(self.ids)
        if uniq.numel() != n:
            dup = _first_duplicate(self.ids.cpu().numpy())
            raise DataError(f"dataset {name!r}: ids must be unique, id {dup} occurs twice")
        if self.labels is not None:
            self.labels = _as_int64(self.labels, "labels", name, n)
        if self.captions is not None:
            captions = list(self.captions)
            if len(captions) != n:
                raise DataError(f"dataset {name!r}: {len(captions)} captions for {n} images")
            bad = next((c for c in captions if not isinstance(c, str)), None)
            if bad is not None:
                raise DataError(
                    f"dataset {name!r}: captions must be strings, got {type(bad).__name__}"
                )
            self.captions = captions
        if self.sources is not None:
            sources = [str(v) for v in self.sources]
            if len(sources) != n:
                raise DataError(f"dataset {name!r}: {len(sources)} sources for {n} images")
            self.sources = sources
        if self.label_names is not None:
            self.label_names = [str(v) for v in self.label_names]

    def describe(self, position: int) -> dict[str, Any]:
        """What is known of the image at ``position``: id, and source, caption and group
        (the label's name, else the label) where present."""
        out: dict[str, Any] = {"id": int(self.ids[position])}
        if self.sources is not None:
            out["source"] = self.sources[position]
        if self.captions is not None:
            out["caption"] = self.captions[position]
        if self.labels is not None:
            label = int(self.labels[position])
            names = self.label_names
            out["group"] = names[label] if names and 0 <= label < len(names) else str(label)
        return out

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.shape
        extra = []
        if self.labels is not None:
            extra.append("labels")
        if self.captions is not None:
            extra.append("captions")
        more = f", with {' and '.join(extra)}" if extra else ""
        return f"ImageDataset({self.name!r}, {len(self)} images {c}×{h}×{w}{more})"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)``."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """Rows at the given *positions* (not ids), keeping their ids, labels and captions."""
        pos = np.asarray(
            indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices
        ).reshape(-1)
        if pos.size and not np.issubdtype(pos.dtype, np.integer):
            raise DataError(f"dataset {self.name!r}: subset positions must be integers")
        pos = pos.astype(np.int64)
        n = len(self)
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            bad = int(pos[(pos < 0) | (pos >= n)][0])
            raise DataError(f"dataset {self.name!r}: position {bad} out of range for {n} images")
        idx = torch.from_numpy(pos).to(self.images.device)
        return ImageDataset(
            images=self.images.index_select(0, idx),
            ids=self.ids.index_select(0, idx.to(self.ids.device)),
            labels=None
            if self.labels is None
            else self.labels.index_select(0, idx.to(self.labels.device)),
            captions=None if self.captions is None else [self.captions[int(i)] for i in pos],
            name=self.name,
            sources=None if self.sources is None else [self.sources[int(i)] for i in pos],
            label_names=self.label_names,
        )

    def fingerprint(self) -> str:
        """SHA-256 hex digest of shape, images and ids (stable across processes)."""
        h = hashlib.sha256()
        h.update(b"diffattr-imagedataset-v1\0")
        h.update(repr(tuple(int(s) for s in self.images.shape)).encode())
        h.update(b"\0")
        img = np.ascontiguousarray(self.images.detach().cpu().numpy(), dtype="<f4")
        h.update(memoryview(img).cast("B"))
        h.update(b"\0")
        ids = np.ascontiguousarray(self.ids.detach().cpu().numpy(), dtype="<i8")
        h.update(memoryview(ids).cast("B"))
        return h.hexdigest()

    def position_of(self, ids: int | Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Row positions of the given ids (same shape as ``ids``, int64)."""
        q = np.asarray(ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids)
        if q.size and not np.issubdtype(q.dtype, np.integer):
            raise DataError(f"dataset {self.name!r}: ids to look up must be integers")
        q = q.astype(np.int64)
        own = self.ids.cpu().numpy()
        order = np.argsort(own, kind="stable")
        sorted_ids = own[order]
        where = np.searchsorted(sorted_ids, q.reshape(-1))
        clipped = np.minimum(where, len(own) - 1)
        found = sorted_ids[clipped] == q.reshape(-1)
        if not found.all():
            bad = int(q.reshape(-1)[~found][0])
            raise DataError(
                f"dataset {self.name!r} has no image with id {bad}",
                hint="ids refer to the dataset the scores or indices were made for; "
                "check that the same dataset (and split) is used",
            )
        return order[clipped].reshape(q.shape).astype(np.int64)


def _first_duplicate(values: np.ndarray) -> int:
    seen: set[int] = set()
    for v in values.tolist():
        if v in seen:
            return int(v)
        seen.add(v)
    return -1


def _check_size(size: int | None, option: str = "size") -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or int(size) < 1:
        raise DataError(f"option {option} must be a positive integer, got {size!r}")
    return int(size)


def _check_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DataError(f"{option} must be an integer, got {value!r}")
    return int(value)
