"""Candidate screening (the DAS paper's dataset compression) measured on the LDS benchmarks.

For each benchmark, DAS at K timesteps with its default λ rule, every target screened to its
M most pixel-cosine-similar training images (M = 2%, 5%, 10%, 20% and 40% of N), with the
kernel fitted

- ``union``: once on the union of the candidates of a group of 16 targets (as `diffattr score`
  scores the demo's 16 generated images; over all 400 benchmark targets the union would be
  nearly the whole set) — the default;
- ``candidates``: on each target's own M candidates (the paper's form);
- ``all``: on all N (the unscreened scores kept on the candidates only: no saving).

Per target kind: LDS over all N with unscored images at 0 (they add nothing to a subset's
predicted output) and at the target's lowest candidate score ("scored as the lowest");
keep@10, the fraction of the unscreened DAS's top 10 that the screen keeps; and M
cross-fitted like λ (chosen on one half of the targets, reported on the other, swapped) with a
95% bootstrap interval over targets.

Nothing is recomputed from the models (the benchmarks' committed kernel caches), except the
optional timing (`--timing-run RUN`): `Attributor.score` of 16 generated targets of the
benchmark, unscreened and screened, each into a fresh feature store, on this machine.

    .venv/bin/python benchmarks/screening.py benchmarks/lds/digits8 benchmarks/lds/mnist8 \
        --timing-run runs/lds-digits8 --out benchmarks/results/screening.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffattr.attribution.defaults import DEFAULT_TIMESTEPS
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.methods import ScoreInputs, get_method
from diffattr.attribution.screening import Screen, candidate_rows, restrict, screened_scores
from diffattr.evaluation.ground_truth import KIND_NAMES, GroundTruth, lds_per_target
from diffattr.evaluation.kernel_cache import cache_inputs, kernel_cache
from diffattr.evaluation.lds import cross_fit, method_scores
from diffattr.fsio import read_json
from diffattr.run import DataSpec

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.4)
GROUP = 16
BOOTSTRAP = 1000
KERNELS = ("union", "candidates", "all")
TIMED_FRACTIONS = FRACTIONS  # the default union kernel; `all` costs the unscreened time


def mean_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    v = values[np.isfinite(values)]
    rng = np.random.default_rng(seed)
    boots = rng.choice(v, size=(BOOTSTRAP, v.size)).mean(axis=1)
    return float(v.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def filled(scores: np.ndarray, how: str) -> np.ndarray:
    """NaN (unscored) → 0, or → each target's lowest candidate score."""
    out = np.array(scores, copy=True)
    if how == "zero":
        return np.nan_to_num(out, nan=0.0)
    low = np.nanmin(out, axis=1, keepdims=True)
    return np.where(np.isnan(out), low, out)


def grouped_scores(method, inputs: ScoreInputs, cand: np.ndarray, kernel: str, dim: int):
    """Screened scores, targets taken GROUP at a time (the union kernel depends on the group)."""
    out = np.empty((inputs.num_targets, inputs.num_train))
    everyone = np.arange(inputs.num_train)
    for start in range(0, inputs.num_targets, GROUP):
        group = np.arange(start, min(start + GROUP, inputs.num_targets))
        sub = restrict(inputs, everyone, group)
        out[group], _ = screened_scores(method, sub, cand[group], kernel, dim=dim)
    return out


def measure(bench: Path, timesteps: int) -> dict:
    """Per-target LDS of every (kernel, fill, M), the unscreened DAS's, and keep@10."""
    gt = GroundTruth.load(bench)
    train_set, _ = DataSpec(**read_json(bench / "lds.json")["data"]).load()
    cache = kernel_cache(None, bench, gt, FeatureSettings(measure="das", timesteps=timesteps))
    das = get_method("das")
    inputs = cache_inputs(cache, train_set.images, gt.images)
    full = method_scores("das", cache, [None], train_set.images, gt.images)[0]
    sim = get_method("pixel-cos").score(inputs)
    top10 = np.argsort(-full, axis=1)[:, :10]
    n = len(train_set)
    sizes = [int(round(f * n)) for f in FRACTIONS]
    lds = {}
    keep = {}
    for m in sizes:
        cand = candidate_rows(sim, m)
        keep[m] = float(np.mean([np.isin(top10[t], cand[t]).mean() for t in range(len(cand))]))
        for kernel in KERNELS:
            scores = grouped_scores(das, inputs, cand, kernel, cache.dim)
            for fill in ("zero", "lowest"):
                lds[kernel, fill, m] = lds_per_target(gt, filled(scores, fill))
    return {"bench": bench.name, "N": n, "sizes": sizes, "gt": gt, "keep": keep, "lds": lds,
            "unscreened": lds_per_target(gt, full)}  # fmt: skip


def ekfac_row(bench: Path) -> dict | None:
    """The benchmark's committed EK-FAC (loss query) row at the largest K, for comparison."""
    rows = []
    for path in bench.glob("*.json"):
        data = read_json(path)
        if isinstance(data, list):
            rows += [r for r in data if isinstance(r, dict) and r.get("method") == "ekfac"]
    return max(rows, key=lambda r: r["timesteps"]) if rows else None


def timing(run_dir: Path, bench: Path, timesteps: int) -> list[dict]:
    """Wall seconds of Attributor.score for 16 generated targets, each case in a fresh store."""
    from diffattr.attribution.attributor import Attributor
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.diffusion.presets import load_unet
    from diffattr.families import family_of
    from diffattr.run import RunDir

    torch.set_num_threads(2)
    run = RunDir(run_dir)
    train_set, _ = run.data_spec().load()
    gt = GroundTruth.load(bench)
    targets = gt.images[np.flatnonzero(gt.kinds == 1)[:GROUP]]
    model = load_unet(run.model_dir)
    n = len(train_set)
    out = []
    for m in [None, *(int(round(f * n)) for f in TIMED_FRACTIONS)]:
        screen = None if m is None else Screen("pixel-cos", m)
        with tempfile.TemporaryDirectory() as store:
            att = Attributor(
                model, train_set, store, "das", schedule=family_of(run).train_config(run).schedule,
                settings=FeatureSettings(timesteps=timesteps), progress=False,
            )  # fmt: skip
            t0 = time.perf_counter()
            s = att.score(targets, screen=screen)
            seconds = time.perf_counter() - t0
        union = s.meta.get("screen", {}).get("union", n)
        out.append({"M": m or n, "union": union, "seconds": seconds})
        print(f"timing M={m or n}: union {union}, {seconds:.1f} s", flush=True)
    return out


def fmt(c: tuple[float, float, float]) -> str:
    return f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"


def tables(results: list[dict], timesteps: int) -> str:
    lines = [
        f"DAS, K = {timesteps}, default λ rule; candidates by pixel cosine. Per M: mean LDS over "
        "targets, unscored images at 0 / at the target's lowest candidate score.",
        "",
        "| benchmark | M (of N) | kind | union kernel | candidates kernel | all-N kernel | "
        "keep@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gt = r["gt"]
        for kind, name in KIND_NAMES.items():
            mask = gt.kinds == kind
            lines.append(
                f"| {r['bench']} | {r['N']} (unscreened) | {name} | "
                f"{np.nanmean(r['unscreened'][mask]):.3f} | | | 1.00 |"
            )
            for m in r["sizes"]:
                cells = [
                    "{:.3f} / {:.3f}".format(
                        *(np.nanmean(r["lds"][k, f, m][mask]) for f in ("zero", "lowest"))
                    )
                    for k in KERNELS
                ]
                lines.append(
                    f"| {r['bench']} | {m} ({m / r['N']:.0%}) | {name} | "
                    + " | ".join(cells)
                    + f" | {r['keep'][m]:.2f} |"
                )
    lines += [
        "",
        "M cross-fitted (chosen from the grid on one half of the targets, reported on the "
        "other, swapped; unscored = 0), mean LDS [95% bootstrap CI over targets] and the M "
        "chosen by each half; beside it the unscreened DAS and the benchmark's EK-FAC row "
        "(cross-fitted, its largest K):",
        "",
        "| benchmark | kind | unscreened DAS | union kernel (M) | candidates kernel (M) | "
        "all-N kernel (M) | EK-FAC (K) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gt = r["gt"]
        ek = r.get("ekfac")
        for kind, name in KIND_NAMES.items():
            mask = gt.kinds == kind
            cells = []
            for k in KERNELS:
                by_m = np.stack([r["lds"][k, "zero", m] for m in r["sizes"]])
                crossed, chosen = cross_fit(by_m, mask)
                ms = "/".join(str(r["sizes"][c]) for c in chosen)
                cells.append(f"{fmt(mean_ci(crossed))} ({ms})")
            ekc = "–" if not ek or name not in ek else f"{ek[name]['lds']:.3f} ({ek['timesteps']})"
            lines.append(
                f"| {r['bench']} | {name} | {fmt(mean_ci(r['unscreened'][mask]))} | "
                + " | ".join(cells)
                + f" | {ekc} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("benches", nargs="+", help="LDS benchmark directories with kernel caches")
    p.add_argument("--timesteps", type=int, default=DEFAULT_TIMESTEPS)
    p.add_argument("--timing-run", default=None, help="time scoring on this run (first bench)")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args()
    results = []
    for b in args.benches:
        results.append(measure(Path(b), args.timesteps))
        results[-1]["ekfac"] = ekfac_row(Path(b))
    text = tables(results, args.timesteps)
    if args.timing_run:
        t = timing(Path(args.timing_run), Path(args.benches[0]), args.timesteps)
        base = t[0]["seconds"]
        text += (
            f"\n\nWall time of `Attributor.score` for {GROUP} generated targets of "
            f"{Path(args.benches[0]).name} (run {args.timing_run}, K = {args.timesteps}, 2 "
            "threads, fresh feature store each):\n\n| M | training images featurized | "
            "seconds | vs unscreened |\n|---|---|---|---|\n"
            + "\n".join(
                f"| {r['M']} | {r['union']} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}× |"
                for r in t
            )
        )
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        cmd = " ".join(["benchmarks/screening.py", *args.benches])
        if args.timesteps != DEFAULT_TIMESTEPS:
            cmd += f" --timesteps {args.timesteps}"
        if args.timing_run:
            cmd += f" --timing-run {args.timing_run}"
        Path(args.out).write_text(f"Command: `.venv/bin/python {cmd} --out {args.out}`\n\n{text}\n")


if __name__ == "__main__":
    main()
