"""The report's plots (matplotlib, drawn by :mod:`diffattr.plots`): each embedded and written to
``plots_dir``; a plot that cannot be drawn is listed with the reason, never fatal."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffattr.attribution.scores import Scores
from diffattr.fsio import atomic_write_bytes
from diffattr.report.elements import _e, _uri


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
