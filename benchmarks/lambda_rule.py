"""How well λ rules that need no ground truth do against the cross-fitted λ, per benchmark.

For every cached kernel of each benchmark (a measure, K and projection; exact features), the
LDS of: the cross-fitted relative λ (chosen on half the targets, reported on the other half,
over `lds eval`'s default grid), the effective-dimension rule df(λ) = F · min(N, k) for several
fractions F, and the former default (relative λ = 0.1). Nothing is recomputed from the models:
the benchmarks' committed kernel caches are enough (seconds).

    .venv/bin/python benchmarks/lambda_rule.py benchmarks/lds/digits8 benchmarks/lds/mnist8 \
        --out benchmarks/results/lambda-rule.md
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from diffattr.attribution.kernel.ridge import DEFAULT_RIDGE, Ridge
from diffattr.evaluation.ground_truth import KIND_NAMES, GroundTruth, lds_per_target
from diffattr.evaluation.kernel_cache import KernelCache
from diffattr.evaluation.lds import DEFAULT_LAMBDAS, cross_fit, method_scores
from diffattr.fsio import read_json
from diffattr.run import DataSpec

METHOD_OF_MEASURE = {"das": "das", "dtrak": "dtrak", "loss": "trak"}
#: effective-dim values tried: fractions of min(N, k), then counts of dimensions
FRACTIONS = (0.2, 0.3, 0.4, 0.5, 100, 150, 200, 300)


def rows_for(bench: Path) -> list[dict]:
    gt = GroundTruth.load(bench)
    train_set, _ = DataSpec(**read_json(bench / "lds.json")["data"]).load()
    out = []
    for path in sorted((bench / "kernels").glob("*.npz")):
        cache = KernelCache.load(path)
        feats = cache.meta["features"]
        if feats.get("projector") not in ("identity", None):
            continue
        method = METHOD_OF_MEASURE[feats["measure"]]
        rules = [Ridge("relative", c) for c in DEFAULT_LAMBDAS]
        rules += [Ridge("effective-dim", f) for f in FRACTIONS] + [Ridge("relative", 0.1)]
        scores = method_scores(method, cache, rules, train_set.images, gt.images)
        lds = np.stack([lds_per_target(gt, s) for s in scores])
        grid = len(DEFAULT_LAMBDAS)
        scale = cache.scale()
        rank = min(cache.gram.shape[0], cache.dim)
        for kind, name in KIND_NAMES.items():
            mask = gt.kinds == kind
            crossed, chosen = cross_fit(lds[:grid], mask)
            oracle = int(np.nanargmax(np.nanmean(lds[:grid][:, mask], axis=1)))
            row = {
                "bench": bench.name,
                "method": method,
                "K": feats["timesteps"],
                "normalize": feats["normalize"],
                "kind": name,
                "crossfit": float(np.nanmean(crossed)),
                "crossfit_lambda": [DEFAULT_LAMBDAS[c] for c in chosen],
                "oracle_lambda": DEFAULT_LAMBDAS[oracle],
                "rules": {
                    str(r): float(np.nanmean(lds[grid + i, mask]))
                    for i, r in enumerate(rules[grid:])
                },
                "default_relative": DEFAULT_RIDGE.resolve(cache.gram, rank) / scale,
            }
            out.append(row)
    return out


def table(rows: list[dict]) -> str:
    rule_names = [str(Ridge("effective-dim", f)) for f in FRACTIONS] + ["relative:0.1"]
    head = (
        "| benchmark | method | K | norm. | targets | cross-fit λ (relative) | cross-fit LDS | "
        + " | ".join(f"`{r}`" for r in rule_names)
        + f" | `{DEFAULT_RIDGE}` as relative λ |"
    )
    lines = [head, "|" + "---|" * (8 + len(rule_names))]
    for r in rows:
        lams = "/".join(f"{v:g}" for v in r["crossfit_lambda"])
        cells = []
        for name in rule_names:
            v = r["rules"][name]
            mark = "**" if name == str(DEFAULT_RIDGE) else ""
            cells.append(f"{mark}{v:.3f}{mark}")
        lines.append(
            f"| {r['bench']} | {r['method']} | {r['K']} | {'yes' if r['normalize'] else 'no'} | "
            f"{r['kind']} | {lams} | {r['crossfit']:.3f} | "
            + " | ".join(cells)
            + f" | 10^{math.log10(r['default_relative']):.2f} |"
        )
    lines += [
        "",
        "| rule | "
        + " | ".join(f"{b} mean / worst" for b in dict.fromkeys(r["bench"] for r in rows))
        + " |",
        "|---|" + "---|" * len(dict.fromkeys(r["bench"] for r in rows)),
    ]
    for name in rule_names:
        cells = []
        for bench in dict.fromkeys(r["bench"] for r in rows):
            gaps = [r["rules"][name] - r["crossfit"] for r in rows if r["bench"] == bench]
            cells.append(f"{np.mean(gaps):+.3f} / {min(gaps):+.3f}")
        mark = " (default)" if name == str(DEFAULT_RIDGE) else ""
        lines.append(f"| `{name}`{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("benches", nargs="+", help="LDS benchmark directories with kernel caches")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args()
    rows = [r for b in args.benches for r in rows_for(Path(b))]
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            f"Command: `.venv/bin/python benchmarks/lambda_rule.py {' '.join(args.benches)} "
            f"--out {args.out}`\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
