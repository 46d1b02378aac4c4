"""Image folders (or one image file): every image below a folder, with optional captions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from diffattr.data.dataset import ImageDataset, _check_size
from diffattr.data.images import (
    DEFAULT_BACKGROUND,
    _is_colour,
    _open_image,
    _resize,
    _to_chw,
    has_transparency,
    parse_background,
)
from diffattr.errors import DataError, notice

#: File extensions (lower case) that :func:`load_image_folder` reads.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


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
            + (
                f" to {size}×{size}"
                if size is not None
                else " (to --size, or else the first image's size)"
            ),
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
