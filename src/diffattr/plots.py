"""Figures for the report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each ``plot_*`` function draws one small panel and returns a :class:`matplotlib.figure.Figure`,
or ``None`` when its data are missing or too thin to draw (the report then says what is
missing). One panel per figure lets the report lay panels side by side on a wide screen and
stack them on a phone. :func:`png_bytes` turns a figure into PNG bytes.

- :func:`plot_score_distribution`: one method's scores for the first few targets (violins,
  top-1 marked), so one can see whether a few training images stand out.
- :func:`plot_top1_margins`: per method, how far each target's top-1 score stands above the
  rest, in standard deviations of that target's scores (comparable across methods).
- :func:`plot_lds`: LDS per method with bootstrap CI bars for one target kind (``val``,
  ``gen``), noise ceiling as a dashed line. Rows are those ``diffattr lds eval`` writes to
  ``BENCH/results.json``.
- :func:`plot_lds_vs`: LDS against the number of timesteps K or the projection dimension.
- :func:`plot_counterfactual`: box plots of counterfactual pixel distances per method.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffattr.attribution.scores import Scores

KINDS = (("val", "held-out real targets"), ("gen", "generated targets"))
DPI = 144  # the report shows PNGs at 96 px per inch: crisp on high-density screens
CEILING = "noise ceiling"
#: Rows that are references, not methods: the ceiling and the agreement of two seeds.
REFERENCES = frozenset({CEILING, "seed agreement"})
# A colour per method, stable across figures (tab10 order).
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(dict.fromkeys(methods))}


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (Agg canvas; safe without a display and across threads)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _interval(d: dict[str, Any], key: str) -> tuple[float, float] | None:
    ci = d.get(key)
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    lo, hi = _finite(ci[0]), _finite(ci[1])
    return None if lo is None or hi is None else (lo, hi)


# --- scores -------------------------------------------------------------------------------


def plot_score_distribution(
    s: Scores,
    target_ids: Sequence[int] | None = None,
    max_targets: int = 6,
    color: str = PALETTE[0],
) -> Figure | None:
    """Violins of one method's scores for the first ``max_targets`` targets (▲: top-1)."""
    ids = [int(t) for t in s.target_ids.tolist()]
    wanted = [int(t) for t in (target_ids if target_ids is not None else ids) if int(t) in ids]
    rows = [ids.index(t) for t in wanted[:max_targets]]
    data = [s.values[r][np.isfinite(s.values[r])] for r in rows]
    keep = [i for i, d in enumerate(data) if d.size > 1]
    if not keep:
        return None
    fig = _new_figure(0.4 * len(keep) + 1.4, 2.6)
    ax = fig.subplots()
    pos = np.arange(1, len(keep) + 1)
    parts = ax.violinplot([data[i] for i in keep], positions=pos, showextrema=False, widths=0.8)
    for body in parts["bodies"]:
        body.set_facecolor(color)
        body.set_alpha(0.45)
    for p, i in zip(pos, keep, strict=True):
        d = data[i]
        ax.scatter(np.full(d.size, p), d, s=3, color="#333", alpha=0.35, linewidths=0)
        ax.scatter([p], [d.max()], marker="^", s=28, color=color, zorder=3)
    ax.axhline(0, color="#999", lw=0.6)
    ax.set_xticks(pos, [str(wanted[i]) for i in keep], fontsize=8)
    ax.set_xlim(0.4, len(keep) + 0.6)
    ax.set_xlabel("target", fontsize=8)
    ax.set_ylabel("score", fontsize=8)
    ax.set_title(s.method, fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    return fig


def top1_margins(s: Scores) -> np.ndarray:
    """Per target: (top-1 score − mean score) / std of scores (NaN when undefined)."""
    v = np.asarray(s.values, dtype=np.float64)
    out = np.full(v.shape[0], np.nan)
    for r, row in enumerate(v):
        row = row[np.isfinite(row)]
        if row.size > 1 and row.std() > 0:
            out[r] = (row.max() - row.mean()) / row.std()
    return out


def plot_top1_margins(
    scores: dict[str, Scores], colors: dict[str, str] | None = None
) -> Figure | None:
    """Distribution over targets of each method's standardised top-1 score."""
    margins = {m: top1_margins(s) for m, s in scores.items()}
    margins = {m: x[np.isfinite(x)] for m, x in margins.items()}
    margins = {m: x for m, x in margins.items() if x.size}
    if not margins:
        return None
    colors = colors or method_colors(margins)
    fig = _new_figure(0.8 * len(margins) + 1.6, 2.6)
    ax = fig.subplots()
    pos = np.arange(1, len(margins) + 1)
    box = ax.boxplot(
        list(margins.values()), positions=pos, widths=0.5, patch_artist=True, showfliers=False
    )
    for patch, m in zip(box["boxes"], margins, strict=True):
        patch.set_facecolor(colors[m])
        patch.set_alpha(0.4)
    rng = np.random.default_rng(0)
    for p, (m, x) in zip(pos, margins.items(), strict=True):
        jitter = rng.uniform(-0.12, 0.12, x.size)
        ax.scatter(p + jitter, x, s=10, color=colors[m], zorder=3, linewidths=0)
    ax.set_xticks(pos, list(margins), fontsize=8)
    ax.set_ylabel("top-1 score, SDs above mean", fontsize=8)
    ax.set_title("top-1 margin", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    return fig


# --- LDS ----------------------------------------------------------------------------------


def _lds_of(r: dict[str, Any], kind: str) -> float | None:
    d = r.get(kind)
    return _finite(d.get("lds")) if isinstance(d, dict) else None


def lds_rows(rows: Iterable[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Rows with a method name and at least one kind holding a finite LDS."""
    return [
        r
        for r in rows or []
        if isinstance(r, dict)
        and isinstance(r.get("method"), str)
        and any(_lds_of(r, k) is not None for k, _ in KINDS)
    ]


def lds_kinds(rows: Iterable[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """The (kind, label) pairs some method row has a finite LDS for."""
    rows = [r for r in lds_rows(rows) if r["method"] not in REFERENCES]
    return [(k, label) for k, label in KINDS if any(_lds_of(r, k) is not None for r in rows)]


def _size(r: dict[str, Any], key: str) -> float:
    """Sort key of K or the projection dimension; None (exact, unprojected) sorts last."""
    v = _finite(r.get(key))
    return math.inf if v is None else v


def lds_summary_rows(rows: Iterable[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One row per method, noise ceiling excluded: its largest K and projection dimension."""
    best: dict[str, dict[str, Any]] = {}
    for r in lds_rows(rows):
        if r["method"] in REFERENCES:
            continue
        old = best.get(r["method"])
        key = (_size(r, "timesteps"), _size(r, "proj_dim"))
        if old is None or key > (_size(old, "timesteps"), _size(old, "proj_dim")):
            best[r["method"]] = r
    return list(best.values())


def noise_ceilings(rows: Iterable[dict[str, Any]] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in lds_rows(rows):
        if r["method"] == CEILING:
            for kind, _ in KINDS:
                v = _lds_of(r, kind)
                if v is not None:
                    out[kind] = v
    return out


def plot_lds(
    rows: Iterable[dict[str, Any]] | None, kind: str = "val", colors: dict[str, str] | None = None
) -> Figure | None:
    """Bars of cross-fitted LDS per method (largest K) with CI bars, for one target kind.

    Thick bars: CI over targets; thin bars with caps: CI over subsets × targets (wider, it
    also counts the retrained models' randomness). Dashed line: the noise ceiling.
    """
    rows = list(rows or [])
    best = [r for r in lds_summary_rows(rows) if _lds_of(r, kind) is not None]
    if not best:
        return None
    colors = colors or method_colors(r["method"] for r in best)
    ceiling = noise_ceilings(rows).get(kind)
    fig = _new_figure(0.62 * len(best) + 1.6, 2.9)
    ax = fig.subplots()
    names = []
    for x, r in enumerate(best):
        d, v = r[kind], _lds_of(r, kind)
        k, pd = r.get("timesteps"), r.get("proj_dim")
        names.append(
            r["method"]
            + (f"\nK={k}" if k is not None else "")
            + (f"\nk={pd}" if pd is not None else "")
        )
        ax.bar(x, v, color=colors.get(r["method"], PALETTE[7]), alpha=0.75, width=0.6)
        for key, lw, cap, dx in (("ci_targets", 4, 0, 0.0), ("ci_subsets_targets", 1, 4, 0.2)):
            ci = _interval(d, key)
            if ci is not None:
                ax.errorbar(
                    x + dx,
                    v,
                    yerr=[[max(v - ci[0], 0)], [max(ci[1] - v, 0)]],
                    color="#222",
                    lw=lw,
                    capsize=cap,
                    fmt="none",
                )
    if ceiling is not None:
        ax.axhline(ceiling, ls="--", color="#555", lw=1)
        ax.annotate(
            "noise ceiling",
            (1, ceiling),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=7,
            color="#555",
        )
    ax.axhline(0, color="#999", lw=0.6)
    ax.set_xticks(range(len(best)), names, fontsize=7)
    ax.set_xlim(-0.6, len(best) - 0.4)
    ax.set_title(f"LDS, {dict(KINDS)[kind]}", fontsize=10)
    ax.set_ylabel("LDS (Spearman ρ)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    return fig


def plot_lds_vs(
    rows: Iterable[dict[str, Any]] | None,
    key: str = "timesteps",
    kind: str = "val",
    colors: dict[str, str] | None = None,
) -> Figure | None:
    """LDS against ``key`` (``timesteps`` or ``proj_dim``) for one target kind.

    One line per method (per method and K for ``proj_dim`` when several K are present); for
    ``timesteps``, each (method, K) uses its largest projection dimension. ``None`` unless some
    line has at least two distinct values of ``key``. Error bars: CI over targets.
    """
    rows = list(rows or [])
    other = "proj_dim" if key == "timesteps" else "timesteps"
    chosen: dict[tuple[str, float, Any], dict[str, Any]] = {}
    for r in lds_rows(rows):
        x = _finite(r.get(key))
        if r["method"] in REFERENCES or x is None or x <= 0 or _lds_of(r, kind) is None:
            continue
        line = r.get(other) if key == "proj_dim" else None
        slot = (r["method"], x, line)
        if slot not in chosen or _size(r, other) > _size(chosen[slot], other):
            chosen[slot] = r
    series: dict[tuple[str, Any], list[tuple[float, dict[str, Any]]]] = {}
    for (method, x, line), r in chosen.items():
        series.setdefault((method, line), []).append((x, r))
    series = {n: sorted(p, key=lambda t: t[0]) for n, p in series.items() if len(p) >= 2}
    if not series:
        return None
    several = {m: sum(1 for mm, _ in series if mm == m) > 1 for m, _ in series}
    colors = colors or method_colors(m for m, _ in series)
    fig = _new_figure(4.2, 3.0)
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for (method, line), points in series.items():
        xs = [x for x, _ in points]
        ys = [_lds_of(r, kind) for _, r in points]
        cis = [_interval(r[kind], "ci_targets") for _, r in points]
        lo = [0.0 if c is None else max(y - c[0], 0) for y, c in zip(ys, cis, strict=True)]
        hi = [0.0 if c is None else max(c[1] - y, 0) for y, c in zip(ys, cis, strict=True)]
        n = seen[method] = seen.get(method, -1) + 1
        ax.errorbar(
            xs,
            ys,
            yerr=[lo, hi],
            marker="o",
            ms=4,
            capsize=3,
            lw=1.3,
            color=colors.get(method, PALETTE[7]),
            ls=styles[n % len(styles)],
            label=f"{method} K={line}" if several[method] and line is not None else method,
        )
    ceiling = noise_ceilings(rows).get(kind)
    if ceiling is not None:
        ax.axhline(ceiling, ls="--", color="#555", lw=1, label=CEILING)
    all_x = sorted({x for p in series.values() for x, _ in p})
    if all_x[-1] / all_x[0] >= 8:
        ax.set_xscale("log", base=2 if key == "proj_dim" else 10)
    ax.set_xticks(all_x, [f"{x:g}" for x in all_x], fontsize=7)
    ax.minorticks_off()
    xlabel = "timesteps K" if key == "timesteps" else "projection dimension k"
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("LDS (Spearman ρ)", fontsize=8)
    ax.set_title(
        f"LDS vs {xlabel.split()[0]} {xlabel.split()[-1]}, {dict(KINDS)[kind]}", fontsize=9
    )
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(
        fontsize=7,
        frameon=False,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=min(3, len(series) + (ceiling is not None)),
    )
    return fig


# --- counterfactuals ----------------------------------------------------------------------


def plot_counterfactual(
    rows: Iterable[dict[str, Any]] | None,
    key: str = "pixel_l2",
    colors: dict[str, str] | None = None,
) -> Figure | None:
    """Box plots of counterfactual distances per method (larger: removing the top-credited
    training images changed the regenerated image more)."""
    data: dict[str, np.ndarray] = {}
    for r in rows or []:
        if not isinstance(r, dict) or not isinstance(r.get("method"), str):
            continue
        try:
            x = np.asarray(r.get(key) or [], dtype=np.float64).ravel()
        except (TypeError, ValueError):
            continue
        x = x[np.isfinite(x)]
        if x.size:
            data[r["method"]] = np.concatenate([data.get(r["method"], np.empty(0)), x])
    if not data:
        return None
    colors = colors or method_colors(data)
    fig = _new_figure(0.8 * len(data) + 1.6, 2.8)
    ax = fig.subplots()
    pos = np.arange(1, len(data) + 1)
    box = ax.boxplot(list(data.values()), positions=pos, widths=0.5, patch_artist=True)
    for patch, m in zip(box["boxes"], data, strict=True):
        patch.set_facecolor(colors.get(m, PALETTE[7]))
        patch.set_alpha(0.45)
    ax.set_xticks(pos, list(data), fontsize=8)
    ax.set_ylabel(key.replace("_", " "), fontsize=8)
    ax.set_title("counterfactual distance", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    return fig
