"""LDS against CPU cost: which method, K and projection a user should run by default.

    .venv/bin/python benchmarks/cost.py --run runs/lds-digits8 --bench benchmarks/lds/digits8 \
        --out benchmarks/results/cost.md

Cost: CPU seconds per 1,000 training images and per target, measured on the benchmark's own
run (the `tiny` UNet) with torch.set_num_threads(2), in this process, each configuration
timed on the same subset of training images (``--images``) and scaled linearly:

- kernel methods (das, dtrak, trak): ``featurize`` of the subset into a fresh store (the
  store writes included), exact per-sample gradients or ``logra`` r = 16; a target costs one
  image's features (scoring a target against 1,000 training rows is a single product, and the
  kernel's Cholesky of the N × N Gram is a second or less at these N);
- ekfac: kronfluence's factor fit on the subset's N·K items plus the training gradients,
  timed with ``--targets-small`` and ``--targets-large`` targets; the difference gives the
  per-target cost and the rest is the per-training-image cost.

LDS: read from the benchmark's committed ``lds eval`` tables (cross-fitted λ and the default
λ rule), nothing recomputed; a configuration without a committed row is shown as "–".
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffattr.attribution.features.featurize import FeatureSettings, featurize
from diffattr.attribution.methods.influence import ekfac_scores
from diffattr.diffusion.presets import load_unet
from diffattr.run import RunDir

MEASURES = {"das": "das", "dtrak": "dtrak", "trak": "loss"}


def time_featurize(model, images, ids, schedule, settings: FeatureSettings) -> float:
    scratch = Path(tempfile.mkdtemp(prefix="cost-"))
    try:
        t0 = time.perf_counter()
        featurize(model, images, ids, scratch / "store", settings, schedule, "cost",
                  progress=False)  # fmt: skip
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def time_ekfac(model, images, ids, targets, schedule, K: int) -> float:
    from diffattr.attribution.features.gradients import TimestepSpec

    scratch = Path(tempfile.mkdtemp(prefix="cost-ekfac-"))
    try:
        t0 = time.perf_counter()
        ekfac_scores(model, images, ids, targets, np.arange(len(targets)), scratch,
                     schedule=schedule, timesteps=TimestepSpec(K))  # fmt: skip
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def committed_lds(bench: Path) -> dict[tuple[str, int, str], dict]:
    """(method label, K, projection) → {kind: (cross-fit, default)} from every table's JSON."""
    out: dict[tuple[str, int, str], dict] = {}
    for path in sorted(bench.glob("*.json")):
        if path.name == "lds.json":
            continue
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            continue
        proj = "logra" if path.stem.startswith("logra-r16") else "exact"
        if path.stem.startswith(("logra-r8", "logra-r32", "sweep", "ablation", "unnormalised")):
            continue
        for r in rows:
            if not isinstance(r, dict) or r.get("timesteps") is None:
                continue
            if r.get("projector") not in (None, "logra"):
                continue
            key = (r["method"], int(r["timesteps"]), proj)
            entry = out.setdefault(key, {})
            for kind in ("val", "gen"):
                d = r.get(kind)
                if isinstance(d, dict) and "lds" in d:
                    entry[kind] = (d["lds"], d.get("default_lds", d["lds"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/lds-digits8")
    p.add_argument("--bench", default="benchmarks/lds/digits8")
    p.add_argument("--images", type=int, default=64, help="training images timed per case")
    p.add_argument("--timesteps", default="10,32,100")
    p.add_argument("--targets-small", type=int, default=4)
    p.add_argument("--targets-large", type=int, default=36)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    from diffattr.families import family_of

    run = RunDir(args.run)
    model = load_unet(run.model_dir)
    schedule = family_of(run).train_config(run).schedule
    train, val = run.data_spec().load()
    images, ids = train.images[: args.images], train.ids.numpy()[: args.images]
    n = len(ids)
    Ks = [int(k) for k in args.timesteps.split(",")]
    lds = committed_lds(Path(args.bench))
    rows = []
    t_start = time.time()
    for K in Ks:
        for method, measure in MEASURES.items():
            for proj in ("exact", "logra"):
                settings = FeatureSettings(measure=measure, timesteps=K)
                if proj == "exact":
                    settings = replace(settings, projector="identity")
                else:
                    settings = replace(settings, projector="logra", proj_dim=16)
                seconds = time_featurize(model, images, ids, schedule, settings)
                rows.append((method, K, proj, seconds / n * 1000, seconds / n))
        small = time_ekfac(model, images, ids, val.images[: args.targets_small], schedule, K)
        large = time_ekfac(model, images, ids, val.images[: args.targets_large], schedule, K)
        per_target = max(0.0, (large - small) / (args.targets_large - args.targets_small))
        per_train = (small - args.targets_small * per_target) / n
        rows.append(("ekfac", K, "exact", per_train * 1000, per_target))
    lines = [
        "| method | K | features | CPU s per 1,000 training images | CPU s per target "
        "| val LDS (cross-fit / default λ) | gen LDS (cross-fit / default λ) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, K, proj, per_k, per_t in rows:
        entry = lds.get((method, K, proj), {})
        cells = []
        for kind in ("val", "gen"):
            v = entry.get(kind)
            cells.append("–" if v is None else f"{v[0]:.3f} / {v[1]:.3f}")
        name = "logra r=16" if proj == "logra" else "exact gradients"
        lines.append(
            f"| {method} | {K} | {name} | {per_k:.1f} | {per_t:.3f} | {cells[0]} | {cells[1]} |"
        )
    text = "\n".join(lines)
    header = (
        f"Command: `.venv/bin/python benchmarks/cost.py --run {args.run} --bench {args.bench} "
        f"--images {args.images}{' --out ' + args.out if args.out else ''}`\n\n"
        f"Machine: {platform.machine()}, torch.set_num_threads(2), torch {torch.__version__}; "
        f"{n} training images timed per case, total {time.time() - t_start:.0f} s.\n\n"
    )
    print(header + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(header + text + "\n")


if __name__ == "__main__":
    main()
