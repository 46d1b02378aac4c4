"""What the evaluation reports: per-rule summaries with bootstrap intervals, paired sign
tests, the Markdown table, the picture and the header's words on screens."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffattr.evaluation.counterfactual.planning import BASELINES, CONTROL, RANDOM, screenable

if TYPE_CHECKING:
    from diffattr.attribution.screening import Screen

METRICS = ("pixel_l2", "embedding_cos")
#: For each metric, +1 if larger values mean a bigger change of the image, −1 otherwise.
DIRECTION = {"pixel_l2": 1, "embedding_cos": -1}


def sign_test(a: np.ndarray, b: np.ndarray, direction: int = 1) -> dict[str, Any]:
    """Paired two-sided sign test: does ``a`` change the image more than ``b`` per target?

    ``wins``: targets where a's change is bigger (a > b for direction +1, a < b for −1).
    """
    from scipy.stats import binomtest

    d = direction * (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    d = d[np.isfinite(d)]
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n = wins + losses
    return {
        "wins": wins,
        "ties": int(d.size - n),
        "losses": losses,
        "median_diff": float(direction * np.median(d)) if d.size else float("nan"),
        "p": float(binomtest(wins, n, 0.5).pvalue) if n else 1.0,
    }


def summarize_removals(
    values: dict[str, dict[str, np.ndarray]], bootstrap: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per method: per-target values, median, mean and bootstrap 95% CI per metric,
    and paired sign tests against the :data:`BASELINES` present (``random``, ``pixel-cos``)
    first, then the other (non-control) methods."""
    from diffattr.evaluation.stats import bootstrap_mean_ci

    rows = []
    compared = [m for m in values if m != CONTROL]
    for method, metrics in values.items():
        row: dict[str, Any] = {"method": method}
        for name in METRICS:
            v = np.asarray(metrics[name], dtype=np.float64)
            row[name] = [float(x) for x in v]
            row[f"{name}_median"] = float(np.median(v))
            row[f"{name}_mean"] = float(np.mean(v))
            row[f"{name}_ci"] = list(bootstrap_mean_ci(v, num=bootstrap, seed=seed))
        if method != RANDOM and method != CONTROL:
            others = [b for b in BASELINES if b in values and b != method]
            others += [m for m in compared if m != method and m not in others]
            row["paired"] = {
                other: {
                    name: sign_test(metrics[name], values[other][name], DIRECTION[name])
                    for name in METRICS
                }
                for other in others
            }
        rows.append(row)
    return rows


def removals_table(rows: list[dict[str, Any]], header: str = "") -> str:
    """Markdown: per-method summary, then the paired sign tests: every method against each
    baseline (``random``, then ``pixel-cos``), then the remaining pairs, each pair once."""

    def ci(r: dict[str, Any], name: str) -> str:
        lo, hi = r[f"{name}_ci"]
        return f"{r[f'{name}_mean']:.4f} [{lo:.4f}, {hi:.4f}]"

    lines = [header, ""] if header else []
    lines += [
        "| method | k | targets | pixel L2 median | pixel L2 mean [95% CI] "
        "| embedding cos median | embedding cos mean [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r.get('k', '')} | {len(r['pixel_l2'])} "
            f"| {r['pixel_l2_median']:.4f} | {ci(r, 'pixel_l2')} "
            f"| {r['embedding_cos_median']:.4f} | {ci(r, 'embedding_cos')} |"
        )
    pairs = [
        (r["method"], other, name, d[name])
        for stage in (*BASELINES, None)  # against each baseline, then the rest
        for r in rows
        for other, d in r.get("paired", {}).items()
        if stage is None or other == stage
        for name in METRICS
    ]
    seen: set[frozenset[str]] = set()
    if pairs:
        lines += [
            "",
            "Paired per target (wins: the first method changed the image more; two-sided sign "
            "test, ties dropped):",
            "",
            "| comparison | metric | wins / ties / losses | median difference | p |",
            "|---|---|---|---|---|",
        ]
        for a, b, name, t in pairs:
            key = frozenset((a, b, name))
            if key in seen:
                continue
            seen.add(key)
            lines.append(
                f"| {a} vs {b} | {name.replace('_', ' ')} | {t['wins']} / {t['ties']} / "
                f"{t['losses']} | {t['median_diff']:+.4f} | {t['p']:.3g} |"
            )
    return "\n".join(lines)


def column_caption(label: str, width: int) -> str:
    """``label`` in at most ``width`` characters, for a picture's column: a screened variant
    as ``das scr10%``; if too long, option names dropped, then a single option's value alone
    (``combine[methods=das+ekfac]`` → ``das+ekfac``), then cut."""
    base, sep, screen = label.partition(" screen=")
    suffix = f" scr{screen.rpartition(':')[2]}" if sep else ""
    if len(base + suffix) > width:
        base = re.sub(r"[\w-]+=", "", base)
    one_option = base.endswith("]") and "[" in base and ";" not in base
    if len(base + suffix) > width and one_option:
        base = base[base.index("[") + 1 : -1]
    text = base + suffix
    return text if len(text) <= width else text[: max(1, width - 1)] + "~"


def picture(
    images: dict[str, np.ndarray], methods: Sequence[str], num: int, path: Path,
    targets: Sequence[int] | None = None,
) -> list[str]:  # fmt: skip
    """PNG grid: one row per target (first ``num``, labelled with its sample index from
    ``targets``): reference, random, then ``methods``, each column named above it (shortened
    by :func:`column_caption` to fit). Returns the columns, each as ``caption (= label)``
    where the caption is not the label."""
    from diffattr.data import make_grid, save_png

    columns = ["reference", *[m for m in (RANDOM, *methods) if m in images]]
    n = min(num, images["reference"].shape[0])
    tiles = [torch.from_numpy(images[c][t]) for t in range(n) for c in columns]
    grid = make_grid(torch.stack(tiles), nrow=len(columns))
    size = int(tiles[0].shape[-1])
    scale = max(1, 64 // size)
    captions = [column_caption(c, (size + 1) * scale // 6) for c in columns]
    rows = [f"#{targets[t] if targets is not None else t}" for t in range(n)]
    save_png(grid, path, scale=scale, labels=(captions, rows, size))
    pairs = zip(captions, columns, strict=True)
    return [c if c == label else f"{c} (= {label})" for c, label in pairs]


def describe_screens(
    screens: Sequence[Screen], rules: Sequence[tuple[str, str, Screen | None]], k: int,
    num_train: int,
) -> str:  # fmt: skip
    """The header's sentence on screened rows ('' without screens)."""
    if not screens:
        return ""
    unscreened = [label for _, label, _ in rules if not screenable(label)]
    text = "".join(
        f"`METHOD screen={s}`: the method's scores on each target's M = {s.count(num_train)} "
        f"training images most similar by {s.similarity} only (kernel: {s.kernel}), its top "
        f"k = {k} of those removed. "
        for s in screens
    )
    if unscreened:
        shown = ", ".join(unscreened)
        text += f"Not screened (image methods, or features computed from the model): {shown}. "
    return text
