"""Image datasets: loading, validation, splits, subsets, index files and image helpers.

Every dataset is held in memory as an :class:`ImageDataset` whose images are float32
``N×C×H×W`` tensors in ``[-1, 1]`` and whose rows carry stable integer ``ids``. Training
subsets, attribution scores and counterfactual removals all refer to these ids, so they
never depend on the order in which rows happen to be stored.

One module per concern, their public names all importable from here: :mod:`.dataset` (the
container), :mod:`.builtin` (digits, mnist, emoji), :mod:`.folders` (image folders and
captions), :mod:`.npz`, :mod:`.splits` (train/val split, subsets), :mod:`.indices` (index
files), :mod:`.images` (decoding, transparency, resizing, PNG and grids);
:func:`load_dataset` picks the loader.
"""

from __future__ import annotations

from pathlib import Path

from diffattr.data.builtin import (
    BUILTIN_DATASETS,
    _builtin_hint,
    builtin_names,
    is_builtin,
    load_builtin,
)
from diffattr.data.dataset import ImageDataset
from diffattr.data.folders import IMAGE_EXTENSIONS, load_image_folder
from diffattr.data.images import (
    DEFAULT_BACKGROUND,
    composite_rgba,
    has_transparency,
    make_grid,
    parse_background,
    resize_images,
    save_png,
    to_uint8_images,
)
from diffattr.data.indices import load_indices, save_indices
from diffattr.data.npz import load_npz, save_npz
from diffattr.data.splits import sample_subsets, train_val_split
from diffattr.errors import DataError

__all__ = [
    "BUILTIN_DATASETS", "DEFAULT_BACKGROUND", "IMAGE_EXTENSIONS", "ImageDataset", "builtin_names",
    "composite_rgba", "has_transparency", "is_builtin", "load_builtin", "load_dataset",
    "load_image_folder", "load_indices", "load_npz", "make_grid", "parse_background",
    "resize_images", "sample_subsets", "save_indices", "save_npz", "save_png", "to_uint8_images",
    "train_val_split",
]  # fmt: skip


def load_dataset(
    spec: str,
    size: int | None = None,
    mismatch: str = "error",
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
