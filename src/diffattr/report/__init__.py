"""Self-contained HTML report: what each generated image owes to which training images.

One file, no network: images and plots are embedded as base64 PNG, CSS and the small sorting
script are inline (package resources ``report/assets/report.css`` and ``report.js``). Sections:

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

:func:`render_report` assembles the page from :mod:`.elements` (HTML building blocks),
:mod:`.tables`, :mod:`.figures` (plots) and :mod:`.confidence` (how sure, near copies).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.attribution.scores import Scores
from diffattr.attribution.scores.confidence import NEAR_COPY_QUANTILE
from diffattr.attribution.scores.names import Names
from diffattr.data import ImageDataset
from diffattr.fsio import atomic_write_bytes
from diffattr.report.confidence import (
    _confidence_section,
    confidence_text,
    near_copy_html,
    near_copy_rows,
)
from diffattr.report.elements import (
    _e,
    _figure,
    _float,
    _hover,
    _sort_attr,
    histogram_svg,
    png_data_uri,
    screen_note,
    target_lines,
)
from diffattr.report.figures import Plot, _plot_html, _write_plots, make_plots
from diffattr.report.tables import (
    _facts_table,
    _lds_table,
    _summary_table,
    load_rows,
    ranking_panel,
)

__all__ = [
    "Plot", "histogram_svg", "load_rows", "make_plots", "png_data_uri", "render_report",
    "write_report",
]  # fmt: skip

#: The page's style sheet and script (package resources, inlined into every report).
CSS, SCRIPT = (
    resources.files(__name__).joinpath(f"assets/{name}").read_text(encoding="utf-8")
    for name in ("report.css", "report.js")
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
    groups: dict[int, str] | None = None,
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

    ``groups``: training id → group (default: ``train``'s own labels, when it has some): each
    target gets its groups' shares of the attribution as bars, per method, and the top group's
    strongest members.

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
    if groups is None and names.groups:
        groups = dict(zip(names.ids.tolist(), names.groups, strict=True))
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
            "groups": s.by_group(groups) if groups else None,
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
        f"<title>{_e(title)}</title><style>\n{CSS}</style></head><body data-images-ok=''>",
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
            if top["groups"] is not None:
                parts.append(group_panel(top["groups"], row, train_uri, names))
            parts.append("</div>")
        parts.append("</div></section>")
    thumbs = json.dumps({str(i): train_uri(i) for i in sorted(ranked)})
    parts.insert(thumbs_at, f"<script type='application/json' id='thumbs'>{thumbs}</script>")
    parts.append(f"</section></main><script>\n{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def group_panel(grouped: Any, row: int, train_uri: Callable[[int], str], names: Names) -> str:
    """One target's groups under one method: each group's share as a bar (blue: it helped,
    red: it worked against), the top group named with its strongest members."""
    rows = grouped.rows()[row]
    shown = rows[:8]
    bars = []
    for g in shown:
        width = min(100.0, abs(g["share"]) * 100)
        cls = "gbar" if g["score"] >= 0 else "gbar opp"
        bars.append(
            f"<div class='grow' title='{_e(g['group'])}: {g['score']:+.3g} "
            f"({g['share']:+.0%} of the attribution, {g['size']} images)'>"
            f"<span class='gname'>{_e(g['group'])}</span>"
            f"<span class='{cls}' style='width:{width:.1f}%'></span>"
            f"<span class='gval'>{g['share']:+.0%}</span></div>"
        )
    top = rows[0]
    members = "".join(
        _figure(train_uri(m["train_id"]), [f"#{m['train_id']}", f"{m['score']:+.3g}"], "",
                f"member of {top['group']}: training image {m['train_id']}",
                _hover(names, m["train_id"], m["score"]))
        for m in top["top_members"]
    )  # fmt: skip
    more = f" ({len(rows) - len(shown)} smaller groups not shown)" if len(rows) > len(shown) else ""
    return (
        f"<details class='groups' open><summary>groups: <b>{_e(top['group'])}</b> "
        f"{top['share']:+.0%}{more}</summary><div class='gbars'>{''.join(bars)}</div>"
        f"<div class='label'>strongest members of {_e(top['group'])}</div>"
        f"<div class='grid'>{members}</div><p class='note'>A group's score is "
        f"{_e(grouped.meaning())}; its share is that over the sum of all groups' |scores|.</p>"
        "</details>"
    )


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
