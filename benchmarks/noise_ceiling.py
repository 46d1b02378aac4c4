"""The noise ceiling of each LDS benchmark against the best row of every committed table.

The LDS correlates predictions with F averaged over S seeds. With r the agreement of two seeds
(Spearman over subsets, per target), the average's reliability is ρ_S = S·r / (1 + (S − 1)·r)
(Spearman–Brown) and no prediction correlates with it beyond √ρ_S — the ceiling
(:func:`diffattr.evaluation.ground_truth.noise_ceiling`, averaged over targets). Tables written
before it existed show r in their "noise ceiling" row; `lds eval` now writes both rows. This
script recomputes both from each benchmark's committed ground truth and lists, per target
kind, the highest LDS (cross-fitted λ) of any row of any committed table, failing if one is
above the ceiling.

    .venv/bin/python benchmarks/noise_ceiling.py benchmarks/lds/digits8 \\
        benchmarks/lds/digits8-independent benchmarks/lds/mnist8 \\
        --out benchmarks/results/noise-ceiling.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from diffattr.evaluation.ground_truth import KIND_NAMES, GroundTruth, noise_ceiling, seed_agreement

REFERENCES = {"noise ceiling", "seed agreement"}


def best_rows(bench: Path) -> dict[str, tuple[float, str]]:
    """Per kind, (LDS, 'table: method K') of the committed row with the highest LDS."""
    best: dict[str, tuple[float, str]] = {}
    for table in sorted(bench.glob("*.json")):
        if table.name == "lds.json":
            continue
        rows = json.loads(table.read_text())
        if not isinstance(rows, list):
            continue
        for row in rows:
            if not isinstance(row, dict) or row.get("method") in REFERENCES:
                continue
            for kind in KIND_NAMES.values():
                value = (row.get(kind) or {}).get("lds")
                if value is not None and np.isfinite(value) and value > best.get(kind, (-2, ""))[0]:
                    label = f"{table.stem}: {row['method']} K={row.get('timesteps') or '–'}"
                    best[kind] = (float(value), label)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("benches", nargs="+")
    p.add_argument("--out", default="benchmarks/results/noise-ceiling.md")
    args = p.parse_args()
    lines = [
        "# Noise ceiling",
        "",
        "Command: `.venv/bin/python benchmarks/noise_ceiling.py "
        + " ".join(args.benches)
        + f" --out {args.out}`.",
        "",
        "| benchmark | kind | seeds | seed agreement r | noise ceiling √ρ_S | best committed row "
        "(LDS) | below the ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    failed = False
    for bench in map(Path, args.benches):
        gt = GroundTruth.load(bench)
        r, ceiling = seed_agreement(gt), noise_ceiling(gt)
        best = best_rows(bench)
        for kind, name in KIND_NAMES.items():
            mask = gt.kinds == kind
            if not mask.any():
                continue
            c = float(np.nanmean(ceiling[mask])) if gt.F.shape[0] > 1 else float("nan")
            value, label = best.get(name, (float("nan"), "–"))
            ok = not (np.isfinite(c) and value > c)
            failed |= not ok
            lines.append(
                f"| {bench.name} | {name} | {gt.F.shape[0]} | {np.nanmean(r[mask]):.3f} | "
                f"{c:.3f} | {label} ({value:.3f}) | {'yes' if ok else '**no**'} |"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
