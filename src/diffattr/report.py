"""Self-contained HTML report: what each generated image owes to which training images.

One file, no network: images and plots are embedded as base64 PNG, CSS and the small sorting
script are inline. Sections:

- run facts (data, training, quality figures) and a list of what is missing, with the
  command that would produce it;
- a sortable summary table: each target with, per method, its three most-credited training
  images and their scores (headers are buttons: click, or focus and press Enter);
- plots (matplotlib, Agg): score distributions, top-1 margins, LDS with CI bars, LDS vs
  timesteps and projection dimension, counterfactual distances — each only when its data
  exist; the PNGs are also written to ``plots_dir`` (``RUN/plots/`` by default);
- per target: the image beside each method's top proponents and opponents, methods side by
  side; each method's confidence κ (excess kurtosis of the target's scores), its calibrated
  bin and the mean LDS measured for that bin on the benchmarks; an expandable panel with the
  top-20 ranking and a histogram of all the target's scores; and the near-copy flag when
  held-out real images are given (``heldout``) or the scores carry one.

Missing parts (no scores, no LDS results yet) are reported, never fatal.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffattr.attribution.confidence import (
    DEFINITION,
    HELDOUT_REFERENCE,
    LIKE_FACTOR,
    NEAR_COPY_QUANTILE,
    NOT_LIKE,
    NearCopies,
    bin_lds,
    calibration_words,
    describe_data,
    like_calibration,
    method_calibration,
    near_copies,
)
from diffattr.attribution.names import FIELDS, Names
from diffattr.attribution.scores import Scores
from diffattr.data import ImageDataset, to_uint8_images
from diffattr.errors import DiffattrError
from diffattr.fsio import atomic_write_bytes, read_json

CSS = """
:root{color-scheme:light;--line:#d5d8de;--muted:#5f6670;--accent:#3358c4;--opp:#c8453c}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2125;
 background:#f6f7f9;line-height:1.4}
main{max-width:1400px;margin:0 auto;padding:.8rem 1rem 2rem}
h1{font-size:1.35rem;margin:.2rem 0 .3rem;overflow-wrap:anywhere}
h2{font-size:1.1rem;margin:1.6rem 0 .5rem;border-bottom:1px solid var(--line);padding-bottom:.2rem}
h3{font-size:.95rem;margin:0 0 .4rem} h4{font-size:.85rem;margin:0 0 .1rem}
nav{font-size:.85rem;display:flex;flex-wrap:wrap;gap:.3rem 1rem}
a{color:var(--accent)}
code{font-size:.9em;background:#eef0f4;padding:0 .2em;border-radius:3px}
.note{color:var(--muted);font-size:.85rem;max-width:62rem}
ul.missing{font-size:.85rem;color:#5c4300;background:#fff8e1;border:1px solid #f0d98c;
 border-radius:6px;padding:.5rem .8rem .5rem 1.8rem;max-width:62rem}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.82rem;background:#fff}
td,th{border:1px solid var(--line);padding:.25rem .45rem;vertical-align:middle;text-align:left}
th{background:#eef0f4;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.ci{font-size:.75rem;color:var(--muted)}
table.facts th{background:#f1f2f5}
table.facts td{overflow-wrap:anywhere}
th button{font:inherit;font-weight:600;color:inherit;background:none;border:0;padding:.1rem .2rem;
 margin:-.1rem -.2rem;cursor:pointer;border-radius:3px;text-align:left;white-space:nowrap}
th button:hover{background:#dde2ec}
th button:focus-visible{outline:2px solid var(--accent);outline-offset:1px}
th button::after{content:"\\2195";color:#9aa1ab;margin-left:.3em;font-size:.85em}
th[aria-sort=ascending] button::after{content:"\\25B2";color:var(--accent)}
th[aria-sort=descending] button::after{content:"\\25BC";color:var(--accent)}
figure{display:inline-flex;flex-direction:column;align-items:center;margin:0;font-size:.68rem;
 font-variant-numeric:tabular-nums;line-height:1.15}
figure:not(.plot) img{image-rendering:pixelated;width:56px;height:56px;border:2px solid #6c8ed8;
 border-radius:3px;background:#000}
figure.opp img{border-color:var(--opp)}
figure.target img{width:104px;height:104px;border-color:#333}
figure.mini img{width:40px;height:40px}
figcaption span{display:block;text-align:center;white-space:nowrap}
figure.target figcaption span{white-space:normal;max-width:8.5rem;overflow-wrap:anywhere}
figure.mini figcaption span{max-width:5.5rem;overflow:hidden;text-overflow:ellipsis}
details.panel td.name{max-width:12rem;overflow-wrap:anywhere}
.grid{display:grid;grid-template-columns:repeat(4,auto);gap:.3rem .35rem;justify-content:start}
.figs{display:flex;gap:.35rem}
.label{font-size:.7rem;color:var(--muted);margin:.35rem 0 .15rem;text-transform:uppercase;
 letter-spacing:.04em}
.target{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.6rem .7rem;
 margin:.7rem 0;scroll-margin-top:.5rem}
.row{display:flex;flex-wrap:wrap;gap:.8rem 1.4rem;align-items:flex-start}
.method{border-left:3px solid var(--line);padding-left:.6rem}
.plots{display:flex;flex-wrap:wrap;gap:1rem}
figure.plot{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.5rem .6rem;
 font-size:.8rem;max-width:100%;align-items:flex-start}
figure.plot .panels{display:flex;flex-wrap:wrap;gap:.5rem;max-width:100%}
figure.plot img{max-width:100%;height:auto;background:#fff}
figure.plot figcaption{max-width:44rem;color:var(--muted);margin-top:.3rem;line-height:1.35}
.conf{font-size:.75rem;margin:.1rem 0 .3rem;max-width:22rem}
.badge{display:inline-block;font-size:.7rem;font-weight:600;border-radius:3px;padding:0 .3em;
 border:1px solid var(--line);background:#eef0f4;white-space:nowrap}
.badge.high{background:#e3f4e6;border-color:#9ccfa6}.badge.medium{background:#fff5d6;
 border-color:#e9cf7d}.badge.low{background:#fbe4e2;border-color:#e5a29c}
.badge.copy{background:var(--opp);border-color:var(--opp);color:#fff}
.near{font-size:.72rem;max-width:14rem;margin-top:.3rem;color:var(--muted)}
.near.copy{color:#7a1d16;font-weight:600}
details.panel{margin-top:.4rem;font-size:.75rem;max-width:100%}
details.panel summary{cursor:pointer;color:var(--accent)}
details.panel table{font-size:.72rem;margin-top:.3rem}
details.panel td img,span.thumb{width:28px;height:28px;image-rendering:pixelated;display:block}
svg.hist{display:block;width:100%;max-width:280px;height:auto;margin-top:.3rem;background:#fff}
svg.hist text{font:10px system-ui,sans-serif;fill:#5f6670}
@media (max-width:640px){
 main{padding:.5rem .5rem 1.5rem} h1{font-size:1.1rem}
 figure:not(.plot) img{width:44px;height:44px} figure.target img{width:80px;height:80px}
 figure.mini img{width:40px;height:40px} figure{font-size:.62rem}
 td,th{padding:.2rem .3rem}
 .row{gap:.6rem .8rem}
 table.stack,table.stack thead,table.stack tbody{display:block}
 table.stack thead tr{display:flex;flex-wrap:wrap;gap:.3rem;margin-bottom:.3rem}
 table.stack th{border-radius:4px}
 table.stack tbody tr{display:flex;flex-wrap:wrap;align-items:flex-start;gap:.3rem .8rem;
  border:1px solid var(--line);border-radius:6px;background:#fff;margin:.4rem 0;padding:.3rem}
 table.stack td{border:0;padding:0}
 table.stack td[data-label]::before{content:attr(data-label);display:block;font-size:.68rem;
  color:var(--muted)}
}
"""

SCRIPT = """
(function(){
  function key(row, col){
    var cell = row.cells[col];
    if (!cell) return null;
    var raw = cell.hasAttribute('data-sort') ? cell.getAttribute('data-sort') : cell.textContent;
    raw = raw.trim();
    if (raw === '' || raw === '\u2013') return null;
    var num = Number(raw);
    return isNaN(num) ? raw.toLowerCase() : num;
  }
  function sortBy(th){
    var table = th.closest('table'), body = table.tBodies[0];
    var col = Number(th.getAttribute('data-col'));
    var now = th.getAttribute('aria-sort');
    var dir = now === 'ascending' ? 'descending' : now === 'descending' ? 'ascending' :
      (th.getAttribute('data-first') || 'ascending');
    table.querySelectorAll('th[aria-sort]').forEach(function(h){
      h.setAttribute('aria-sort', 'none');
    });
    th.setAttribute('aria-sort', dir);
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = key(a, col), y = key(b, col);
      if (x === null || y === null) return (x === null) - (y === null);
      var c = (typeof x === 'number' && typeof y === 'number') ? x - y :
        String(x).localeCompare(String(y));
      return dir === 'ascending' ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    var live = document.getElementById('sort-status');
    if (live) live.textContent = 'sorted by ' + th.textContent.trim() + ', ' + dir;
  }
  document.querySelectorAll('table.sortable th[aria-sort] button').forEach(function(b){
    b.addEventListener('click', function(){ sortBy(b.closest('th')); });
  });
  var thumbs = null;
  function fillThumbs(panel){  // ranking thumbnails: one shared copy of each image's data
    if (thumbs === null) {
      var map = document.getElementById('thumbs');
      thumbs = map ? JSON.parse(map.textContent) : {};
    }
    panel.querySelectorAll('span.thumb[data-thumb]').forEach(function(s){
      var uri = thumbs[s.getAttribute('data-thumb')];
      if (!uri) return;
      var img = document.createElement('img');
      img.src = uri;
      img.alt = s.getAttribute('aria-label') || '';
      s.replaceWith(img);
    });
  }
  document.querySelectorAll('details.panel').forEach(function(d){
    d.addEventListener('toggle', function(){ if (d.open) fillThumbs(d); });
  });
  window.addEventListener('load', function(){
    var imgs = Array.prototype.slice.call(document.images);
    var ok = imgs.filter(function(i){ return i.complete && i.naturalWidth > 0; }).length;
    document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
  });
})();
"""

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


@dataclass
class Plot:
    """One figure of the report: id, heading, caption and its panels (file name, PNG bytes)."""

    name: str
    title: str
    caption: str
    panels: list[tuple[str, bytes]]


# Files this report writes into plots_dir (so it can remove those it no longer draws).
PLOT_GLOBS = ("score_distribution-*.png", "top1_margins.png", "lds-*.png", "lds_vs_*.png")
PLOT_GLOBS += ("counterfactual.png",)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def load_rows(path: str | Path, what: str = "LDS results") -> list[dict[str, Any]]:
    """Rows of a results JSON (a list of objects), e.g. ``BENCH/results.json`` of ``lds eval``."""
    rows = read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DiffattrError(
            f"{path} holds no {what}: expected a JSON list of objects",
            hint="pass the results.json written by `diffattr lds eval`",
        )
    return rows


def make_plots(
    scores: dict[str, Scores],
    target_ids: Sequence[int],
    lds_rows: list[dict[str, Any]] | None,
    counterfactual_rows: list[dict[str, Any]] | None,
) -> tuple[list[Plot], list[str]]:
    """(plots, HTML notes on the plots that could not be drawn and why)."""
    from diffattr import plots as P

    out: list[Plot] = []
    missing: list[str] = []
    methods = list(scores)
    methods += [r["method"] for r in P.lds_summary_rows(lds_rows)]
    methods += [r.get("method") for r in counterfactual_rows or [] if isinstance(r, dict)]
    colors = P.method_colors(m for m in methods if isinstance(m, str))

    def add(
        name: str, title: str, caption: str, panels: list[tuple[str, Callable[[], Any]]], why: str
    ) -> None:
        drawn = []
        for file, make in panels:
            try:
                fig = make()
            except Exception as exc:  # a plot must never break the report
                missing.append(f"{_e(title)}: could not be drawn ({type(exc).__name__}: {_e(exc)})")
                return
            if fig is not None:
                drawn.append((file, P.png_bytes(fig)))
        if drawn:
            out.append(Plot(name, title, caption, drawn))
        else:
            missing.append(f"{_e(title)}: {why}")

    no_scores = "no scores yet (run <code>diffattr score</code>)"
    add(
        "score-distributions",
        "Score distributions",
        "Each method's scores over all training images, for the first targets (violins; dots "
        "are training images, ▲ the top proponent). A peaked distribution with a few outliers "
        "means a few training images get most of the credit.",
        [
            (
                f"score_distribution-{_safe(m)}.png",
                lambda s=s, m=m: P.plot_score_distribution(s, list(target_ids), color=colors[m]),
            )
            for m, s in scores.items()
        ],
        no_scores,
    )
    add(
        "top1-margins",
        "Top-1 margins",
        "Per target (one dot each): how many standard deviations the top proponent's score "
        "lies above the mean of that target's scores. Comparable across methods, whose scales "
        "differ.",
        [("top1_margins.png", lambda: P.plot_top1_margins(scores, colors) if scores else None)],
        no_scores,
    )
    no_lds = "no LDS results given (<code>--lds BENCH/results.json</code>)"
    kinds = [k for k, _ in P.lds_kinds(lds_rows)] or ["val"]
    add(
        "lds",
        "LDS per method",
        "Linear datamodeling score: Spearman correlation between the losses predicted from the "
        "scores and those measured on models retrained on random half subsets; λ cross-fitted; "
        "each method at its largest K. Thick bars: 95% bootstrap CI over targets; thin bars "
        "with caps: over subsets × targets. Dashed: the noise ceiling (the highest LDS the "
        "seed-averaged measurement allows: Spearman–Brown from the agreement of two seeds).",
        [(f"lds-{k}.png", lambda k=k: P.plot_lds(lds_rows, k, colors)) for k in kinds],
        no_lds if not lds_rows else "the LDS results hold no finite LDS values",
    )
    add(
        "lds-vs-timesteps",
        "LDS vs timesteps",
        "LDS against the number of timesteps K averaged per feature; bars: 95% CI over targets.",
        [
            (
                f"lds_vs_timesteps-{k}.png",
                lambda k=k: P.plot_lds_vs(lds_rows, "timesteps", k, colors),
            )
            for k in kinds
        ],
        no_lds
        if not lds_rows
        else "needs results for at least two K (<code>lds eval --timesteps 10,100</code>)",
    )
    if lds_rows and any(isinstance(r, dict) and "proj_dim" in r for r in lds_rows):
        add(
            "lds-vs-proj-dim",
            "LDS vs projection dimension",
            "LDS against the random projection's dimension k; bars: 95% CI over targets.",
            [
                (
                    f"lds_vs_proj_dim-{k}.png",
                    lambda k=k: P.plot_lds_vs(lds_rows, "proj_dim", k, colors),
                )
                for k in kinds
            ],
            "needs results for at least two projection dimensions",
        )
    add(
        "counterfactual",
        "Counterfactual distances",
        "Pixel L2 distance between each target and the image regenerated from the same seed by "
        "a model retrained without the target's top proponents under each method; larger means "
        "the method found training images that mattered.",
        [("counterfactual.png", lambda: P.plot_counterfactual(counterfactual_rows, colors=colors))],
        "no counterfactual results yet"
        if not counterfactual_rows
        else "the counterfactual results hold no pixel_l2 values",
    )
    return out, missing


def _plot_html(p: Plot) -> str:
    from diffattr.plots import DPI

    imgs = []
    for file, png in p.panels:
        w, h = Image.open(io.BytesIO(png)).size
        w, h = round(w * 96 / DPI), round(h * 96 / DPI)
        imgs.append(
            f"<img src='{_uri(png)}' width='{w}' height='{h}' "
            f"alt='{_e(p.title)} ({_e(file)})' data-file='{_e(file)}'>"
        )
    return (
        f"<figure class='plot' id='plot-{_e(p.name)}'><h3>{_e(p.title)}</h3>"
        f"<div class='panels'>{''.join(imgs)}</div>"
        f"<figcaption>{_e(p.caption)}</figcaption></figure>"
    )


def _facts_table(summary: dict[str, Any]) -> str:
    rows = []
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        rows.append(f"<tr><th scope='row'>{_e(key)}</th><td>{_e(value)}</td></tr>")
    return "<div class='scroll'><table class='facts'>" + "".join(rows) + "</table></div>"


def _merge_lds_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows merged by (method, K, projection dimension), as ``format_table`` does."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("method"), str):
            key = (r["method"], str(r.get("timesteps")), str(r.get("proj_dim")))
            merged.setdefault(key, {}).update(r)
    return list(merged.values())


def _lds_table(rows: list[dict[str, Any]]) -> str:
    rows = _merge_lds_rows(rows)
    kinds = [k for k in ("val", "gen") if any(isinstance(r.get(k), dict) for r in rows)]
    has_proj = any("proj_dim" in r for r in rows)
    names = {"val": "held-out real targets", "gen": "generated targets"}
    top, sub = [], []
    col = 0
    for label, first in (("method", "ascending"), ("K", "descending")) + (
        (("proj. dim", "descending"),) if has_proj else ()
    ):
        top.append(_th(label, col, first, span=" rowspan='2'"))
        col += 1
    for k in kinds:
        top.append(f"<th scope='colgroup' colspan='4'>{_e(names[k])}</th>")
        sub += [
            _th("LDS", col, "descending", "cross-fitted λ"),
            "<th scope='col'>95% CI: targets; subsets×targets</th>",
            _th("oracle λ", col + 2, "descending", "LDS at the best λ on all targets (optimistic)"),
            _th("default λ", col + 3, "descending", "LDS with the λ rule diffattr score uses"),
        ]
        col += 4

    def opt(v: Any) -> str:
        return (
            f"<td class='num' data-sort='{_e('' if v is None else v)}'>"
            f"{_e(DASH if v is None else v)}</td>"
        )

    body = []
    for r in rows:
        cells = [f"<td>{_e(r['method'])}</td>", opt(r.get("timesteps"))]
        if has_proj:
            cells.append(opt(r.get("proj_dim")))
        for k in kinds:
            d = r.get(k) if isinstance(r.get(k), dict) else {}
            lds, oracle = _float(d.get("lds")), _float(d.get("oracle_lds"))
            default = _float(d.get("default_lds"))
            cis = []
            for key in ("ci_targets", "ci_subsets_targets"):
                ci = d.get(key)
                ok = isinstance(ci, (list, tuple)) and len(ci) == 2
                lo, hi = (_float(ci[0]), _float(ci[1])) if ok else (None, None)
                cis.append(DASH if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]")
            if cis == [DASH, DASH]:
                cis = []
            cells += [
                f"<td class='num' data-sort='{_sort_attr(lds)}'>{_fmt(lds, '{:.3f}')}</td>",
                f"<td class='num ci'>{'<br>'.join(cis) or DASH}</td>",
                f"<td class='num' data-sort='{_sort_attr(oracle)}'>{_fmt(oracle, '{:.3f}')}</td>",
                f"<td class='num' data-sort='{_sort_attr(default)}'>{_fmt(default, '{:.3f}')}</td>",
            ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<div class='scroll'><table class='sortable' id='lds-table'><thead><tr>"
        + "".join(top)
        + "</tr><tr>"
        + "".join(sub)
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table></div>"
    )


KIND_WORDS = {"val": "held-out real", "gen": "generated"}
#: Column headings of the names in the ranking panel.
FIELD_WORDS = {"source": "file", "caption": "caption", "group": "group"}


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


def percentile_text(percentile: float | None, count: int | None) -> str:
    """'more concentrated than p% of the run's held-out images' (or '' without a reference)."""
    if percentile is None:
        return ""
    n = f" ({count} scored the same way)" if count else ""
    return f"more concentrated than {percentile:.0f}% of the run's held-out real images{n}"


def confidence_text(
    method: str,
    kappa: float | None,
    bin_name: str | None,
    screened: bool,
    kind: str,
    percentile: float | None = None,
    status: str | None = None,
    heldout_count: int | None = None,
) -> str:
    """HTML: κ, its percentile among the run's held-out images, its bin and the bin's measured
    mean LDS [CI] per benchmark (or why there is no bin: ``status``)."""
    k = DASH if kappa is None else f"{kappa:.3g}"
    entry = method_calibration(method)
    rel = percentile_text(percentile, heldout_count)
    head = f"confidence κ = {k}" + (f": {rel}" if rel else "")
    if screened:
        return f"{head}; <em>not calibrated</em> (screened scores: κ over the candidates only)"
    if entry is None:
        return f"{head}; <em>not calibrated</em> for {_e(method)}"
    if not entry.get("validated"):
        return (
            f"{head}; <em>not validated</em> for {_e(method)}: its κ did not predict "
            "per-target LDS on every held-out benchmark"
        )
    if bin_name is None:
        return head + (f"; <em>{_e(status)}</em>" if status else "")
    rows = bin_lds(entry, bin_name, kind)
    measured = "; ".join(
        f"{r['mean']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] on {_e(r['benchmark'])} "
        f"(n = {r['count']})"
        for r in rows
    )
    return (
        f"<span class='badge {bin_name}'>{bin_name} confidence</span> κ = {k}"
        + (f", {rel}" if rel else "")
        + f". Measured mean LDS of {KIND_WORDS.get(kind, kind)} targets in this bin: "
        f"{measured or DASH} ({_e(entry.get('settings', ''))})."
    )


def near_copy_html(
    near: dict[str, Any] | None, train_uri: Callable[[int], str], names: Names | None = None
) -> str:
    """The near-copy verdict of one target (``near``: one target's fields), or ''; the
    nearest training image named by id and, with ``names``, by file."""
    if near is None:
        return ""
    q = near["quantile"]
    rule = (
        f"{q:.0%} quantile of held-out real images' nearest-training-image distances"
        f" (pixel L2 {near['pixel_threshold']:.3g}"
        + (
            f"; embedding 1 − cos {near['embedding_threshold']:.3g}"
            if near.get("embedding_threshold") is not None
            else ""
        )
        + ")"
    )
    nearest = int(near["nearest_train_id"])
    label = _e(names.label(nearest) if names is not None else f"#{nearest}")
    dist = f"pixel L2 {near['pixel_distance']:.3g}"
    if near.get("embedding_distance") is not None:
        dist += f", 1 − cos {near['embedding_distance']:.3g}"
    if near["flagged"]:
        return (
            "<div class='near copy' data-near-copy='true'><span class='badge copy'>near copy"
            f"</span> nearest training image {label} ({dist}) is at most the {rule}."
            + _figure(train_uri(nearest), [f"#{nearest}", "nearest"], "opp",
                      f"nearest training image {nearest}", _hover(names, nearest))
            + "</div>"
        )  # fmt: skip
    return (
        f"<div class='near' data-near-copy='false'>not a near copy: nearest training image "
        f"{label} ({dist}) is farther than the {rule}.</div>"
    )


def _hover(names: Names | None, image_id: int, score: float | None = None) -> str:
    """The hover text of a training image: ``#ID file · caption · group`` (and its score)."""
    text = names.label(image_id) if names is not None else f"#{int(image_id)}"
    return text + ("" if score is None else f" · score {score:+.3g}")


def ranking_panel(
    values: np.ndarray,
    train_ids: np.ndarray,
    used: set[int],
    k: int,
    name: str,
    names: Names | None = None,
) -> str:
    """A closed ``<details>``: the top-k ranking (thumbnail, id, file, caption and group where
    known, score) and the histogram.

    Thumbnails are placeholders (``span.thumb``) that the page's script turns into images
    from one shared id → PNG map when the panel opens, so a training image ranked in many
    panels is embedded once; their ids are added to ``used``.
    """
    finite = np.isfinite(values)
    order = np.argsort(-np.where(finite, values, -np.inf), kind="stable")[: min(k, finite.sum())]
    ids = [int(train_ids[i]) for i in order]
    used.update(ids)
    fields = [f for f in FIELDS if names is not None and any(names.column(f, ids))]
    rows = "".join(
        f"<tr><td class='num'>{r + 1}</td><td title='{_e(_hover(names, i))}'><span "
        f"class='thumb' data-thumb='{i}' role='img' aria-label='training image {i}'></span></td>"
        f"<td class='num'>#{i}</td>"
        + "".join(f"<td class='name'>{_e(names.row(i)[f] or DASH)}</td>" for f in fields)
        + f"<td class='num'>{values[j]:+.3g}</td></tr>"
        for r, (i, j) in enumerate(zip(ids, order, strict=True))
    )
    heads = "".join(f"<th>{FIELD_WORDS[f]}</th>" for f in fields)
    return (
        f"<details class='panel'><summary>{_e(name)}: top {len(order)} of {int(finite.sum())} "
        "scored training images, and the score histogram</summary>"
        + histogram_svg(values, label=f"{name} scores")
        + "<div class='scroll'><table><thead><tr><th>rank</th><th>image</th><th>training id"
        f"</th>{heads}<th>score</th></tr></thead><tbody>{rows}</tbody></table></div></details>"
    )


def near_copy_rows(
    targets: torch.Tensor,
    target_list: list[int],
    train: ImageDataset,
    scores: dict[str, Scores],
    heldout: Any,
    quantile: float,
    encoder: Callable[[Any], Any] | None,
) -> dict[int, dict[str, Any]] | None:
    """Per target id, its near-copy fields: computed from ``heldout`` when given, else the
    first scores that carry them (``Scores.set_near_copies``); None when neither."""
    if heldout is not None:
        nc: NearCopies = near_copies(targets, train, heldout, quantile, encoder)
        meta = nc.to_meta()
        rows = {}
        for t, tid in enumerate(target_list):
            rows[tid] = {
                k: (v[t] if isinstance(v, list) else v) for k, v in meta.items() if k != "rule"
            }
        return rows
    for s in scores.values():
        meta = s.meta.get("near_copy")
        if meta:
            out = {}
            for t, tid in enumerate(s.target_ids.tolist()):
                out[int(tid)] = {
                    k: (v[t] if isinstance(v, list) else v) for k, v in meta.items() if k != "rule"
                }
            return out
    return None


def calibration_table(methods: Sequence[str], kind: str) -> str:
    """The committed calibration of the methods shown: cut points and bin LDS per benchmark."""
    rows = []
    for m in methods:
        entry = method_calibration(m)
        if entry is None or not entry.get("validated"):
            continue
        cuts = entry["cuts"]
        for bin_name, rng in zip(
            ("low", "medium", "high"),
            (f"κ < {cuts[0]:.3g}", f"{cuts[0]:.3g} ≤ κ < {cuts[1]:.3g}", f"κ ≥ {cuts[1]:.3g}"),
            strict=True,
        ):
            cells = "".join(
                f"<td class='num'>{r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
                f" (n = {r['count']})</td>"
                for r in bin_lds(entry, bin_name, kind)
            )
            rows.append(
                f"<tr><td>{_e(m)}</td><td>{bin_name}</td><td class='num'>{_e(rng)}</td>{cells}</tr>"
            )
    if not rows:
        return ""
    entry = next(method_calibration(m) for m in methods if method_calibration(m))
    benches = list(entry.get("lds", {}))
    return (
        "<div class='scroll'><table id='calibration-table'><thead><tr><th>method</th><th>bin"
        "</th><th>κ</th>"
        + "".join(f"<th>{_e(b)}: mean LDS [95% CI]</th>" for b in benches)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def target_lines(names: Names | None, target_id: int) -> list[str]:
    """A target's caption lines: its file (or samples row) or ``target ID``, then its caption
    or prompt when it has one."""
    row = names.row(target_id) if names is not None else {}
    lines = [row.get("source") or f"target {target_id}"]
    return lines + ([row["caption"]] if row.get("caption") else [])


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
    lds_rows: list[dict[str, Any]] | None = None,
    counterfactual_rows: list[dict[str, Any]] | None = None,
    plots_dir: str | Path | None = None,
    k_summary: int = 3,
    overlap_k: int = 10,
    figures: list[tuple[str, str | Path]] | None = None,
    heldout: torch.Tensor | None = None,
    near_copy_quantile: float = NEAR_COPY_QUANTILE,
    encoder: Callable[[Any], Any] | None = None,
    target_kind: str = "gen",
    k_ranking: int = 20,
    target_names: Names | None = None,
) -> str:
    """The report as one HTML string.

    Training images are named by id and, on hover and in the ranking panels, by file, caption
    and group (what ``train`` carries); targets by ``target_names`` (file, or samples row, and
    caption or prompt) unless ``target_captions`` are given.

    ``heldout``: real images not trained on (e.g. the run's validation images); with them each
    target gets a near-copy verdict: flagged when its nearest training image is at most the
    ``near_copy_quantile`` of the held-out images' own nearest-training-image distances (pixel
    L2; and embedding 1 − cos when ``encoder`` is given). Without them, a flag recorded in the
    scores (``Scores.set_near_copies``) is shown, else the check is listed as missing.
    ``target_kind``: which benchmark targets' measured LDS to quote per confidence bin
    ("gen": generated, "val": held-out real). ``k_ranking``: length of each target's
    expandable ranking.

    ``figures``: extra (caption, PNG file) pairs embedded in the plots section, e.g. the
    counterfactual picture (original / regenerated after each removal).

    ``lds_rows``: rows of ``BENCH/results.json`` (``diffattr lds eval``);
    ``counterfactual_rows``: ``[{"method": ..., "pixel_l2": [...]}, ...]``; both optional.
    When ``plots_dir`` is given, every plot panel is also written there as PNG (and plots
    this report wrote before but no longer draws are removed).
    """
    target_list = [int(t) for t in np.asarray(target_ids).tolist()]
    pos = {int(i): p for p, i in enumerate(train.ids.tolist())}
    uri_cache: dict[int, str] = {}

    def train_uri(train_id: int) -> str:
        if train_id not in uri_cache:
            uri_cache[train_id] = png_data_uri(train.images[pos[train_id]])
        return uri_cache[train_id]

    names = Names.of(train)
    target_uris = [png_data_uri(targets[t]) for t in range(len(target_list))]
    captions = [
        [c] if isinstance(c, str) else list(c)
        for c in target_captions or [target_lines(target_names, tid) for tid in target_list]
    ]

    # Per method: the row of each target and its top proponents / opponents.
    tops: dict[str, dict[str, Any]] = {}
    for name, s in scores.items():
        tops[name] = {
            "row": {int(t): r for r, t in enumerate(s.target_ids.tolist())},
            "pro": s.top_k(max(k_pro, k_summary, overlap_k)),
            "opp": s.top_k(k_opp, opponents=True),
            "screen": screen_note(s),
            "kappa": s.confidence(),
            "bins": s.confidence_bins(),
            "percentile": s.confidence_percentiles(),
            "status": s.calibration()[1],
            "heldout_count": len((s.meta.get("confidence_reference") or {}).get("values", [])),
            "values": s.values,
            "train_ids": s.train_ids,
        }
    near = near_copy_rows(targets, target_list, train, scores, heldout, near_copy_quantile, encoder)

    missing: list[str] = []
    if not scores:
        missing.append("No attribution scores yet: run <code>diffattr score RUN</code>.")
    if not lds_rows:
        missing.append(
            "No LDS results yet: run <code>diffattr lds build</code> and <code>diffattr lds "
            "eval</code>, then <code>diffattr report RUN --lds BENCH/results.json</code>."
        )
    if not counterfactual_rows:
        missing.append("No counterfactual results yet.")
    if near is None:
        missing.append(
            "No near-copy check: the report was not given held-out real images (the caller "
            "passes <code>heldout=</code>, e.g. the run's validation images)."
        )
    plots, plot_missing = make_plots(scores, target_list, lds_rows, counterfactual_rows)
    if plots_dir is not None:
        _write_plots(Path(plots_dir), plots)

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body data-images-ok=''>",
        "<main>",
        f"<h1>{_e(title)}</h1>",
        "<nav aria-label='sections'><a href='#run'>Run</a><a href='#summary'>Summary</a>"
        "<a href='#plots'>Plots</a>"
        + ("<a href='#lds'>LDS</a>" if lds_rows else "")
        + "<a href='#confidence'>How sure</a><a href='#targets'>Targets</a></nav>",
        "<section id='run'><h2>Run</h2>",
    ]
    if summary:
        parts.append(_facts_table(summary))
    if missing:
        parts.append("<ul class='missing'>" + "".join(f"<li>{m}</li>" for m in missing) + "</ul>")
    parts.append("</section>")

    # --- summary table ------------------------------------------------------------------
    parts.append("<section id='summary'><h2>Most-credited training images</h2>")
    if not scores:
        parts.append(
            "<p class='note'>No attribution scores yet: run <code>diffattr score</code>.</p>"
        )
    else:
        table = _summary_table(tops, target_list, target_uris, captions, train_uri,
                               (k_summary, overlap_k), near, names)  # fmt: skip
        parts.append(table)
    parts.append("</section>")

    # --- plots --------------------------------------------------------------------------
    parts.append("<section id='plots'><h2>Plots</h2>")
    if plots:
        parts.append("<div class='plots'>" + "".join(_plot_html(p) for p in plots) + "</div>")
    for caption, path in figures or []:
        uri = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(
            f"<figure class='extra'><img src='{uri}' alt='{_e(caption)}' "
            f"style='image-rendering:pixelated;max-width:100%'><figcaption>{_e(caption)}"
            "</figcaption></figure>"
        )
    if plot_missing:
        parts.append(
            "<p class='note'>Not drawn:</p><ul class='missing'>"
            + "".join(f"<li>{m}</li>" for m in plot_missing)
            + "</ul>"
        )
    parts.append("</section>")

    if lds_rows:
        parts.append(
            "<section id='lds'><h2>LDS results</h2><p class='note'>As written by "
            "<code>diffattr lds eval</code>. λ is cross-fitted (chosen on one half of the "
            "targets, reported on the other); the oracle column picks λ on all targets and is "
            "optimistic; the default column uses the λ rule that <code>diffattr score</code> "
            "applies, chosen without ground truth.</p>" + _lds_table(lds_rows) + "</section>"
        )

    parts.append(_confidence_section(list(scores), target_kind, near_copy_quantile, near, train))
    thumbs_at = len(parts)  # the ranking panels' shared thumbnails go here (filled below)
    ranked: set[int] = set()

    # --- per target ---------------------------------------------------------------------
    parts.append("<section id='targets'><h2>Targets</h2>")
    if scores:
        parts.append(
            "<p class='note'>Each target beside its top proponents (training images that most "
            "helped produce it; blue border, positive scores) and opponents (red border, most "
            "negative scores), per method. Captions: training id and score; hover over an "
            "image for its file, caption and group, listed in each ranking too.</p>"
        )
    for t, tid in enumerate(target_list):
        parts.append(f"<section class='target' id='target-{tid}'><div class='row'>")
        parts.append(
            "<div>"
            + _figure(target_uris[t], captions[t], "target", title=" · ".join(captions[t]))
            + near_copy_html(None if near is None else near.get(tid), train_uri, names)
            + "</div>"
        )
        for name, top in tops.items():
            row = top["row"].get(tid)
            if row is None:
                continue
            pid, pval = (a[:, :k_pro] for a in top["pro"])
            oid, oval = top["opp"]
            parts.append(f"<div class='method'><h4>{_e(name)}</h4>")
            if top["screen"]:
                parts.append(f"<div class='label'>{_e(top['screen'])}</div>")
            kappa = _float(top["kappa"][row])
            pct = None if top["percentile"] is None else _float(top["percentile"][row])
            bin_name, screened = top["bins"][row], bool(top["screen"])
            text = confidence_text(name, kappa, bin_name, screened, target_kind, pct,
                                   top["status"], top["heldout_count"])  # fmt: skip
            parts.append(
                f"<div class='conf' data-confidence='{_sort_attr(kappa)}' "
                f"data-percentile='{_sort_attr(pct)}' data-bin='{bin_name or ''}'>{text}</div>"
            )
            for label, ids, vals, cls in (
                ("proponents", pid, pval, ""),
                ("opponents", oid, oval, "opp"),
            ):
                parts.append(f"<div class='label'>top {ids.shape[1]} {label}</div>")
                parts.append("<div class='grid'>")
                for i, v in zip(ids[row], vals[row], strict=True):
                    if not np.isfinite(v):  # outside a screened target's candidates
                        continue
                    parts.append(
                        _figure(
                            train_uri(int(i)),
                            [f"#{int(i)}", f"{v:+.3g}"],
                            cls,
                            f"{label[:-1]}: training image {int(i)}, score {v:+.3g}",
                            _hover(names, int(i), float(v)),
                        )
                    )
                parts.append("</div>")
            values = top["values"][row]
            parts.append(ranking_panel(values, top["train_ids"], ranked, k_ranking, name, names))
            parts.append("</div>")
        parts.append("</div></section>")
    thumbs = json.dumps({str(i): train_uri(i) for i in sorted(ranked)})
    parts.insert(thumbs_at, f"<script type='application/json' id='thumbs'>{thumbs}</script>")
    parts.append(f"</section></main><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _summary_table(
    tops: dict[str, dict[str, Any]],
    target_list: list[int],
    target_uris: list[str],
    captions: list[list[str]],
    train_uri: Callable[[int], str],
    ks: tuple[int, int],
    near: dict[int, dict[str, Any]] | None = None,
    names: Names | None = None,
) -> str:
    k_summary, overlap_k = ks
    methods = list(tops)
    several = len(methods) > 1
    parts = [
        f"<p class='note'>Per target, each method's top {k_summary} proponents: training id "
        "and score (positive: the training image helps produce the target). Click a column "
        "heading, or focus it with Tab and press Enter, to sort; a method's column sorts by its "
        "top-1 score."
        + (
            f" <em>shared@{overlap_k}</em>: training images in every method's top {overlap_k}."
            if several
            else ""
        )
        + " Under each method: its confidence bin (or κ when the method is not calibrated)."
        + (" <span class='badge copy'>near copy</span> marks a target flagged as a near copy of "
           "a training image." if near is not None else "")
        + "</p>"
    ]  # fmt: skip
    head = [_th("target", 0)]
    head += [
        _th(
            f"{m}{' (screened)' if tops[m]['screen'] else ''} top-{k_summary}",
            c + 1,
            "descending",
            f"sort by {m}'s top-1 score",
        )
        for c, m in enumerate(methods)
    ]
    if several:
        head.append(_th(f"shared@{overlap_k}", len(methods) + 1, "descending"))
    parts.append(
        "<div class='scroll'><table class='sortable stack' id='summary-table'>"
        f"<caption style='{SR_ONLY}'>targets and their most-credited training images</caption>"
        "<thead><tr>" + "".join(head) + "</tr></thead><tbody>"
    )
    for t, tid in enumerate(target_list):
        flagged = near is not None and bool(near.get(tid, {}).get("flagged"))
        cells = [
            f"<td data-sort='{tid}'><a href='#target-{tid}'>"
            + _figure(target_uris[t], captions[t], "mini", title=" · ".join(captions[t]))
            + "</a>"
            + ("<span class='badge copy'>near copy</span>" if flagged else "")
            + "</td>"
        ]
        sets = []
        for m in methods:
            row = tops[m]["row"].get(tid)
            if row is None:
                cells.append(f"<td data-sort='' data-label='{_e(m)}'>{DASH}</td>")
                continue
            ids, vals = tops[m]["pro"]
            scored = np.isfinite(vals[row])
            sets.append({int(i) for i in ids[row, :overlap_k][scored[:overlap_k]]})
            figs = "".join(
                _figure(
                    train_uri(int(i)),
                    [f"#{int(i)}", f"{v:+.3g}"],
                    "mini",
                    f"training image {int(i)}, score {v:+.3g}",
                    _hover(names, int(i), float(v)),
                )
                for i, v in zip(ids[row, :k_summary], vals[row, :k_summary], strict=True)
                if np.isfinite(v)
            )
            top1 = _float(vals[row, 0]) if vals.shape[1] else None
            kappa, bin_name = _float(tops[m]["kappa"][row]), tops[m]["bins"][row]
            pct = None if tops[m]["percentile"] is None else _float(tops[m]["percentile"][row])
            conf = (
                f"<span class='badge {bin_name}'>{bin_name}</span> κ {_fmt(kappa, '{:.3g}')}"
                if bin_name
                else f"κ {_fmt(kappa, '{:.3g}')}"
            ) + ("" if pct is None else f" · above {pct:.0f}% of held-out")
            cells.append(
                f"<td data-sort='{_sort_attr(top1)}' data-label='{_e(m)}'>"
                f"<div class='figs'>{figs}</div><div class='conf'>{conf}</div></td>"
            )
        if several:
            shared = len(set.intersection(*sets)) if len(sets) == len(methods) else None
            cells.append(
                f"<td class='num' data-sort='{'' if shared is None else shared}' "
                f"data-label='shared@{overlap_k}'>{DASH if shared is None else shared}</td>"
            )
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    parts.append(f"<p id='sort-status' role='status' style='{SR_ONLY}'></p>")
    return "".join(parts)


def _confidence_section(
    methods: list[str],
    kind: str,
    quantile: float,
    near: dict[int, Any] | None,
    train: ImageDataset | None = None,
) -> str:
    """'How sure': how to read the numbers, whether this run's data are like the benchmarks',
    the calibration table and the near-copy rule."""
    table = calibration_table(methods, kind)
    flagged = sum(bool(v.get("flagged")) for v in (near or {}).values())
    return (
        "<section id='confidence'><h2>How sure can we be?</h2>"
        + how_to_read(quantile)
        + ("" if train is None else like_note(train.shape, len(train)))
        + "<p class='note'>Per target and "
        f"method, the confidence κ is the {_e(DEFINITION)}: a few training images standing "
        "far out of the bulk. On the LDS benchmarks (<code>benchmarks/confidence.py</code>) "
        "targets with a higher κ had a higher LDS (their attribution predicted retraining "
        "better); bins cut at the terciles of κ on the digits8 benchmark. Below: the mean "
        f"per-target LDS of {KIND_WORDS.get(kind, kind)} benchmark targets in each bin. A bin "
        "is an average over targets, not a guarantee for one image.</p>"
        + (table or "<p class='note'>None of the methods shown is calibrated.</p>")
        + "<p class='note'>Near copy: a target whose nearest training image (pixel L2) is "
        f"at most the {quantile:.0%} quantile of held-out real images' nearest-training-image "
        f"distances, i.e. closer than {1 - quantile:.0%} of real images not trained on."
        + (
            f" Flagged here: {flagged} of {len(near)} targets."
            if near is not None
            else " Not checked in this report (no held-out images given)."
        )
        + "</p></section>"
    )


def like_note(shape: tuple[int, int, int], count: int) -> str:
    """Whether this run's training data are like a calibration benchmark's, in one line."""
    bench = like_calibration(shape, count)
    data = _e(describe_data(shape, count))
    if bench:
        return (
            f"<p class='note' id='like'>This run's training data ({data}) are like {bench}'s: "
            "bins are shown.</p>"
        )
    return (
        f"<p class='note' id='like'>This run's training data ({data}) are not like the "
        f"benchmarks': no bins (<em>{NOT_LIKE}</em>); read κ against the held-out images.</p>"
    )


def how_to_read(quantile: float) -> str:
    """The plain-words paragraph 'How to read this': κ, the held-out percentile, the bin (and
    the benchmarks it comes from) and the near-copy flag."""
    return (
        "<div class='note' id='how-to-read'><h3>How to read this</h3><p><b>κ</b> says how "
        "concentrated a target's scores are: near 0 when credit is spread evenly over the "
        "training images (a bell curve), large when a few training images stand far above the "
        "rest. A concentrated attribution was more often right when checked by retraining, "
        "but κ has no fixed scale: what counts as large depends on the data, the model and "
        "the method.</p><p><b>More concentrated than p% of held-out images</b> puts κ on "
        "this run's own scale: the same method scored up to "
        f"{HELDOUT_REFERENCE} of the run's held-out real images (never trained on) the same "
        "way, and p is the share of them whose κ is lower. It needs no ground truth; a "
        "target well above the held-out images leans on particular training images more than "
        "an unseen real image does.</p><p><b>The bin</b> (low / medium / high) and the mean "
        "LDS beside it were measured on small benchmarks: "
        f"{_e(calibration_words())}. They are shown only for data like those: the same image "
        f"size and channels and a training set within a factor {LIKE_FACTOR:g} of its size; "
        f"otherwise the bin reads <em>{NOT_LIKE}</em>, as the numbers measured there do not "
        "transfer. A bin is an average over many targets, never a guarantee for one "
        "image.</p><p><b>Near copy</b> flags a target whose nearest training image is closer "
        f"than all but {quantile:.0%} of the held-out real images are to theirs: the model "
        "may have reproduced that training image.</p></div>"
    )


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


def _write_plots(plots_dir: Path, plots: list[Plot]) -> None:
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = set()
    for p in plots:
        for file, png in p.panels:
            atomic_write_bytes(plots_dir / file, png)
            written.add(file)
    for pattern in PLOT_GLOBS:
        for old in plots_dir.glob(pattern):
            if old.name not in written:
                old.unlink(missing_ok=True)


def write_report(
    path: str | Path, plots_dir: str | Path | bool | None = True, **kwargs: Any
) -> Path:
    """Render with :func:`render_report` and write atomically to ``path``.

    ``plots_dir``: where the plots' PNGs go; ``True`` (default): ``plots/`` beside the
    report; ``None`` or ``False``: embedded in the HTML only.
    """
    path = Path(path)
    if plots_dir is True:
        plots_dir = path.parent / "plots"
    atomic_write_bytes(path, render_report(plots_dir=plots_dir or None, **kwargs).encode())
    return path
