"""What the removal sets of a counterfactual benchmark have in common with the pixel-nearest
ones, and whether that explains how much each moved the regenerated target.

    .venv/bin/python benchmarks/counterfactual_removals.py benchmarks/counterfactual/digits8 \
        --data digits --out benchmarks/results/counterfactual-removals-digits8.md

For every target and removal rule (the rows of the counterfactual's ``results.json``):

- overlap: the share of its k removed images that pixel-cos nearest also removes;
- pixel cos: the mean pixel cosine of its removed images to the target (the run's model's
  image of the target, ``cache/original``);
- same group: the share of its removed images in the group (digit class, emoji category) most
  common among the target's 25 pixel-nearest training images, the target's likely group.

Then, per rule, the medians over targets beside the measured change (embedding cosine of the
regenerated target, smaller = bigger change), and within each target, over the attribution
rules (random left out), the Spearman correlation of each property with the change, its mean
over targets with a bootstrap CI (targets differ in how easily they move; comparing rules on
the same target takes that out). Reads only committed files and the built-in data set.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from diffattr.data import load_builtin

BASELINES = ("random", "none")


def target_images(results_dir: Path) -> np.ndarray:
    """The run's model's images of the targets (the k = 0 control's ``original`` regeneration)."""
    files = sorted(glob.glob(str(results_dir / "cache" / "original" / "*" / "images-*.npz")))
    if not files:
        raise SystemExit(f"no cache/original/*/images-*.npz under {results_dir}")
    with np.load(files[0]) as z:
        return z["images"][np.argsort(z["seeds"])]


def flat_unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def properties(rows: list[dict], data, images: np.ndarray, near: int = 25) -> dict:
    """rule → (T, 3) overlap with pixel-cos, mean pixel cosine, same-group share; and the
    (T,) embedding cosine of each rule."""
    pos = {int(i): p for p, i in enumerate(data.ids.tolist())}
    train = flat_unit(data.images.numpy())
    labels = data.labels.numpy() if data.labels is not None else None
    pixel = {r["method"]: r for r in rows}["pixel-cos"]["removed_ids"]
    out, change = {}, {}
    tgt = flat_unit(images)
    sims = tgt @ train.T  # (T, N) pixel cosines to every image of the data set
    for r in rows:
        if r["method"] == "none":
            continue
        props = []
        for t, removed in enumerate(r["removed_ids"]):
            rows_ = np.array([pos[int(i)] for i in removed])
            overlap = len(set(removed) & set(pixel[t])) / len(removed)
            cos = float(sims[t, rows_].mean())
            group = np.nan
            if labels is not None:
                candidates = np.array([pos[int(i)] for i in pixel[t]])[:near]
                likely = np.bincount(labels[candidates]).argmax()
                group = float((labels[rows_] == likely).mean())
            props.append((overlap, cos, group))
        out[r["method"]] = np.array(props)
        change[r["method"]] = np.asarray(r["embedding_cos"], dtype=np.float64)
    return {"props": out, "change": change}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--data", default="digits", help="the built-in data set of the run")
    ap.add_argument("--size", type=int, default=None, help="its --size, as the run's")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = json.loads((args.results_dir / "results.json").read_text())
    data = load_builtin(args.data, args.size)
    got = properties(rows, data, target_images(args.results_dir))
    props, change = got["props"], got["change"]
    lines = [
        f"Removal sets of `{args.results_dir}` (k = {rows[0]['k']}, {len(rows[0]['targets'])} "
        f"targets): medians over targets. Overlap: share also removed by pixel-cos nearest; "
        "pixel cos: mean pixel cosine of the removed images to the target; same group: share "
        "in the group most common among the target's pixel-nearest images; embedding cos: the "
        "regenerated target against the reference (smaller: bigger change).",
        "",
        f"Command: `.venv/bin/python benchmarks/counterfactual_removals.py {args.results_dir} "
        f"--data {args.data}" + (f" --size {args.size}" if args.size else "") + "`",
        "",
        "| rule | overlap with pixel-cos | pixel cos | same group | embedding cos |",
        "|---|---|---|---|---|",
    ]
    for rule, p in props.items():
        med = np.nanmedian(p, axis=0)
        lines.append(
            f"| {rule} | {med[0]:.2f} | {med[1]:.3f} | {med[2]:.2f} | "
            f"{np.median(change[rule]):.4f} |"
        )
    methods = [m for m in props if m not in BASELINES]
    T = len(change[methods[0]])
    lines += [
        "",
        f"Within each target, over its {len(methods)} attribution rules: Spearman correlation of "
        "each property with the embedding cosine (negative: more of it, bigger change); mean "
        "over targets, 95% bootstrap CI over targets.",
        "",
        "| property | mean within-target Spearman ρ [95% CI] |",
        "|---|---|",
    ]
    y = np.stack([change[m] for m in methods], axis=1)  # (T, rules)
    rng = np.random.default_rng(0)
    for j, name in enumerate(("overlap with pixel-cos", "pixel cos", "same group")):
        x = np.stack([props[m][:, j] for m in methods], axis=1)
        if np.isnan(x).any():
            continue
        rho = np.array([
            spearmanr(x[t], y[t]).statistic if np.ptp(x[t]) > 0 else np.nan for t in range(T)
        ])  # fmt: skip
        rho = rho[np.isfinite(rho)]
        boot = [rng.choice(rho, rho.size).mean() for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        lines.append(f"| {name} | {rho.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] ({rho.size} targets) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
