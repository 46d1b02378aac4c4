"""Self-contained HTML report: each target beside its top proponents and opponents per method.

Images are embedded as base64 PNG (no network, one file). Missing parts (no scores yet, no
quality figures) are left out with a note rather than failing.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffattr.attribution.scores import Scores
from diffattr.data import ImageDataset, to_uint8_images
from diffattr.fsio import atomic_write_bytes

CSS = """
body{font-family:system-ui,sans-serif;margin:1rem;color:#222;background:#fafafa}
h1{font-size:1.4rem} h2{font-size:1.1rem;margin:1.2rem 0 .4rem}
.target{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6rem;margin:.6rem 0}
.row{display:flex;flex-wrap:wrap;gap:.8rem;align-items:flex-start}
.method{border-left:3px solid #88a;padding-left:.5rem}
figure{display:inline-block;margin:0 .15rem;text-align:center;font-size:.7rem}
figure img{image-rendering:pixelated;width:64px;height:64px;border:1px solid #ccc}
figure.opp img{border-color:#c66} .label{font-weight:600;font-size:.8rem;margin:.2rem 0}
table{border-collapse:collapse;font-size:.85rem} td,th{border:1px solid #ccc;padding:.2rem .5rem}
.note{color:#666;font-size:.85rem}
@media (max-width:600px){figure img{width:48px;height:48px}}
"""


def png_data_uri(image_chw: torch.Tensor, size: int = 64) -> str:
    """A C×H×W image in [-1, 1] as a ``data:image/png;base64`` URI, upscaled (nearest)."""
    arr = to_uint8_images(image_chw)[0]
    im = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr)
    im = im.resize((size, size), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(uri: str, caption: str, cls: str = "") -> str:
    return (
        f'<figure class="{cls}"><img src="{uri}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_report(
    targets: torch.Tensor,
    target_ids: np.ndarray,
    train: ImageDataset,
    scores: dict[str, Scores],
    title: str = "diffattr report",
    k_pro: int = 8,
    k_opp: int = 4,
    summary: dict[str, Any] | None = None,
    target_captions: list[str] | None = None,
) -> str:
    """The report as one HTML string."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if summary:
        parts.append("<h2>Summary</h2><table>")
        for key, value in summary.items():
            parts.append(
                f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
            )
        parts.append("</table>")
    if not scores:
        parts.append(
            "<p class='note'>No attribution scores yet: run <code>diffattr score</code>.</p>"
        )
    else:
        parts.append(
            "<p class='note'>Each target (left) beside its top proponents (training images "
            "that most helped produce it, positive scores) and opponents (red border, most "
            "negative scores), per method. Captions: training id and score.</p>"
        )
    pos = {int(i): p for p, i in enumerate(train.ids.tolist())}
    tops = {m: (s.top_k(k_pro), s.top_k(k_opp, opponents=True), s) for m, s in scores.items()}
    for t, tid in enumerate(np.asarray(target_ids).tolist()):
        cap = target_captions[t] if target_captions else f"target {tid}"
        parts.append(f"<section class='target' id='target-{tid}'><div class='row'>")
        parts.append(_figure(png_data_uri(targets[t]), cap))
        for name, ((pid, pval), (oid, oval), s) in tops.items():
            row = list(s.target_ids).index(tid) if tid in set(s.target_ids.tolist()) else None
            if row is None:
                continue
            parts.append(f"<div class='method'><div class='label'>{html.escape(name)}</div>")
            for i, v in zip(pid[row], pval[row], strict=True):
                parts.append(_figure(png_data_uri(train.images[pos[int(i)]]), f"#{i} {v:+.3g}"))
            parts.append("<br>")
            for i, v in zip(oid[row], oval[row], strict=True):
                parts.append(
                    _figure(png_data_uri(train.images[pos[int(i)]]), f"#{i} {v:+.3g}", "opp")
                )
            parts.append("</div>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, **kwargs: Any) -> Path:
    """Render with :func:`render_report` and write atomically to ``path``."""
    path = Path(path)
    atomic_write_bytes(path, render_report(**kwargs).encode())
    return path
