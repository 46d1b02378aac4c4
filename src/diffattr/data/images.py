"""Image helpers: decoding files (transparency composited onto a background), resizing,
conversion to ``uint8``, PNG writing and grids."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffattr.data.dataset import ImageDataset, _check_int
from diffattr.errors import DataError
from diffattr.fsio import atomic_write

#: The colour images with transparency are composited onto unless told otherwise.
DEFAULT_BACKGROUND = "white"

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


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
