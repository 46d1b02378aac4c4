"""The report's HTML building blocks: escaping, number formats, images as data URIs, figures,
sortable headers, the score histogram and how images and screens are named."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffattr.attribution.scores import Scores
from diffattr.attribution.scores.names import Names
from diffattr.data import to_uint8_images

SR_ONLY = "position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)"
DASH = "\u2013"


def png_data_uri(image_chw: torch.Tensor, size: int = 64) -> str:
    """A C×H×W image in [-1, 1] as a ``data:image/png;base64`` URI, upscaled (nearest)."""
    arr = to_uint8_images(image_chw)[0]
    im = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr)
    im = im.resize((size, size), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return _uri(buf.getvalue())


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _figure(
    uri: str, caption: str | Sequence[str], cls: str = "", alt: str | None = None, title: str = ""
) -> str:
    """An image with a caption; a list caption puts each item on its own line. ``title``:
    shown on hover (the image's file, caption and group)."""
    lines = [caption] if isinstance(caption, str) else list(caption)
    text = " ".join(lines)
    spans = " ".join(f"<span>{_e(x)}</span>" for x in lines)
    tip = f' title="{_e(title)}"' if title else ""
    return (
        f'<figure class="{cls}"{tip}><img src="{uri}" alt="{_e(alt or text)}">'
        f"<figcaption>{spans}</figcaption></figure>"
    )


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(v: float | None, fmt: str = "{:+.3g}") -> str:
    if v is None:
        return DASH
    text = fmt.format(v)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def _sort_attr(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def _th(label: str, col: int, first: str = "ascending", title: str = "", span: str = "") -> str:
    """A sortable column header: a focusable button (Enter or Space sorts, like a click)."""
    tip = f' title="{_e(title)}"' if title else ""
    return (
        f'<th scope="col" aria-sort="none" data-col="{col}" data-first="{first}"{tip}{span}>'
        f'<button type="button">{_e(label)}</button></th>'
    )


def histogram_svg(values: np.ndarray, bins: int = 24, label: str = "scores") -> str:
    """An inline SVG histogram of the finite ``values`` with its own axis labels.

    Bar heights: counts per equal-width bin between the smallest and largest value; a dashed
    line marks 0 when it lies inside; the x axis is labelled with both ends.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return ""
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
    w, h, left, bottom, top = 280, 110, 30, 26, 8
    plot_w, plot_h = w - left - 6, h - bottom - top
    peak = max(int(counts.max()), 1)
    bar = plot_w / bins
    rects = "".join(
        f"<rect x='{left + i * bar:.1f}' y='{top + plot_h * (1 - c / peak):.1f}' "
        f"width='{max(bar - 1, 0.5):.1f}' height='{plot_h * c / peak:.1f}' fill='#6c8ed8'/>"
        for i, c in enumerate(counts)
        if c
    )
    zero = ""
    if lo < 0 < hi:
        x0 = left + plot_w * (0 - lo) / (hi - lo)
        zero = (
            f"<line x1='{x0:.1f}' x2='{x0:.1f}' y1='{top}' y2='{top + plot_h}' stroke='#333' "
            "stroke-dasharray='3 2'/>"
        )
        if 0.2 * plot_w < x0 - left < 0.8 * plot_w:  # its label would not hit the ends'
            zero += f"<text x='{x0:.1f}' y='{top + plot_h + 11}' text-anchor='middle'>0</text>"
    base = top + plot_h
    return (
        f"<svg class='hist' viewBox='0 0 {w} {h}' role='img' aria-label='histogram of "
        f"{_e(label)}: {v.size} values from {lo:.3g} to {hi:.3g}'>"
        f"<line x1='{left}' x2='{left + plot_w}' y1='{base}' y2='{base}' stroke='#999'/>"
        f"<line x1='{left}' x2='{left}' y1='{top}' y2='{base}' stroke='#999'/>{rects}{zero}"
        f"<text x='{left}' y='{base + 11}' text-anchor='start'>{lo:.3g}</text>"
        f"<text x='{left + plot_w}' y='{base + 11}' text-anchor='end'>{hi:.3g}</text>"
        f"<text x='{left + plot_w / 2:.0f}' y='{h - 2}' text-anchor='middle'>score</text>"
        f"<text x='{left - 3}' y='{top + 8}' text-anchor='end'>{peak}</text>"
        f"<text x='{left - 3}' y='{base}' text-anchor='end'>0</text>"
        f"<text x='9' y='{top + plot_h / 2:.0f}' text-anchor='middle' "
        f"transform='rotate(-90 9 {top + plot_h / 2:.0f})'>training images</text></svg>"
    )


def _hover(names: Names | None, image_id: int, score: float | None = None) -> str:
    """The hover text of a training image: ``#ID file · caption · group`` (and its score)."""
    text = names.label(image_id) if names is not None else f"#{int(image_id)}"
    return text + ("" if score is None else f" · score {score:+.3g}")


def target_lines(names: Names | None, target_id: int) -> list[str]:
    """A target's caption lines: its file (or samples row) or ``target ID``, then its caption
    or prompt when it has one."""
    row = names.row(target_id) if names is not None else {}
    lines = [row.get("source") or f"target {target_id}"]
    return lines + ([row["caption"]] if row.get("caption") else [])


def screen_note(s: Scores) -> str:
    """How screened scores were made ('' for unscreened scores)."""
    screen = s.meta.get("screen")
    if not screen:
        return ""
    return (
        f"screened: each target scored on its {screen.get('candidates', screen['size'])} most "
        f"similar training images by {screen['similarity']} (kernel on the {screen['kernel']}); "
        "the rest unscored"
    )
