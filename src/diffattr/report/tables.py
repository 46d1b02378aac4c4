"""The report's tables: run facts, the sortable summary of each target's most-credited images,
LDS results, and each target's expandable ranking."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.attribution.scores.names import FIELDS, Names
from diffattr.errors import DiffattrError
from diffattr.fsio import read_json
from diffattr.report.elements import (
    DASH,
    SR_ONLY,
    _e,
    _figure,
    _float,
    _fmt,
    _hover,
    _sort_attr,
    _th,
    histogram_svg,
)

#: Column headings of the names in the ranking panel.
FIELD_WORDS = {"source": "file", "caption": "caption", "group": "group"}


def load_rows(path: str | Path, what: str = "LDS results") -> list[dict[str, Any]]:
    """Rows of a results JSON (a list of objects), e.g. ``BENCH/results.json`` of ``lds eval``."""
    rows = read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DiffattrError(
            f"{path} holds no {what}: expected a JSON list of objects",
            hint="pass the results.json written by `diffattr lds eval`",
        )
    return rows


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
