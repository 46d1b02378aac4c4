"""AbU and MUCS (attribution by unlearning, issue 29): their CPU cost beside DAS's, and their
hyper-parameters cross-fitted over targets on a committed LDS benchmark.

Cost (trains nothing; minutes at the defaults):

    .venv/bin/python benchmarks/unlearning.py --cost [--sizes 500,1000] [--targets 2] \
        [--timesteps 32] [--threads 2] [--out benchmarks/results/unlearning-cost.md]

A seeded random ``tiny`` UNet (``build_unet("tiny", 8, 1)`` after ``torch.manual_seed(0)``) on
the first N scikit-learn digits, targets the next images. Cost does not depend on what the
weights are, except MUCS's adaptive stop: MUCS is timed with ``l_null=1e30`` unless ``--mucs``
says otherwise, so that it takes ``max_steps``, the most a target costs (its rows show the
steps taken). Each method is timed in this process with one target and with 1 + ``--targets``
targets; the difference gives the per-target cost and the rest the once-per-call cost (AbU's
Fisher and both methods' before-losses; DAS's featurize of the training set, its kernel and
each scoring call's pass over the training store). CPU seconds are the process's (all
threads), wall seconds beside them. Per target at T targets = once/T + per target.

LDS tuning (long: hours; needs the benchmark's model):

    .venv/bin/python benchmarks/unlearning.py --lds [--run runs/lds-digits8] \
        [--bench benchmarks/lds/digits8] [--timesteps 32] [--num-targets 0] [--grid FILE.json] \
        [--out benchmarks/lds/digits8/unlearning.md]

Every configuration of the grid (below, or ``--grid`` {"abu": [{options}, …], "mucs": …}) is
scored on the benchmark's targets (all, or ``--num-targets`` of them, half held-out real and
half generated, seeded), scores cached under ``RUN/features/unlearning-lds`` (a rerun resumes);
then, per target kind, the configuration is chosen on one half of the targets and the LDS
reported on the other, and swapped (the λ cross-fit of ``lds eval``, :func:`summarize`), with
bootstrap CIs, the oracle configuration and the method's defaults beside it. The run's model
must exist: ``benchmarks/lds_digits8.sh --rebuild``'s train line makes it,

    .venv/bin/diffattr train --data digits --train-count 500 --val-count 200 --steps 1600 \
        --batch-size 32 --out runs/lds-digits8

The chosen configuration's final rows (K = 10, 32, 100 beside DAS) then come from
``diffattr lds eval BENCH --run RUN --method "abu[…],mucs[…]" --timesteps 10,32,100``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The default LDS grid (method defaults included, so the default row is comparable).
GRID: dict[str, list[dict[str, Any]]] = {
    "abu": [
        *({"eta": e} for e in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
        *({"eta": e, "steps": 5} for e in (1e-4, 3e-4, 1e-3)),
        {"eta": 1e-3, "damping": 1e-2},
    ],
    "mucs": [
        *({"lr": lr, "max_steps": s} for s in (20, 50) for lr in (1e-4, 2e-4, 5e-4, 1e-3)),
        {"lr": 2e-4, "max_steps": 50, "lam": 1.0},
    ],
}
TRAIN_LINE = (
    ".venv/bin/diffattr train --data digits --train-count 500 --val-count 200 --steps 1600 "
    "--batch-size 32 --out runs/lds-digits8"
)


class Clock:
    """CPU (process, all threads) and wall seconds since it was made."""

    def __init__(self) -> None:
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def read(self) -> tuple[float, float]:
        return time.process_time() - self.cpu, time.perf_counter() - self.wall


# ---------------------------------------------------------------------------- cost


def _unlearning_call(method: str, options: dict, model, train, targets, K: int) -> dict:
    """Score ``targets``; the method's metadata (MUCS: the steps each target took)."""
    from diffattr.attribution.inputs import ScoreInputs
    from diffattr.attribution.methods import get_method
    from diffattr.diffusion.schedule import NoiseSchedule

    inputs = ScoreInputs.of(
        train_images=train.images, target_images=targets, num_train=len(train),
        num_targets=len(targets), train_ids=train.ids.numpy(), model=model,
        schedule=NoiseSchedule(),
    )  # fmt: skip
    m = get_method(method, **{"timesteps": K, **options})
    m.score(inputs)
    return m.score_meta


def _das_call(model, train, pools: list[torch.Tensor], K: int) -> list[tuple[float, float]]:
    """(CPU, wall) of featurizing the training set and fitting the kernel, then of scoring
    each of ``pools`` (their features and the products with the training store)."""
    from diffattr.attribution.attributor import Attributor
    from diffattr.attribution.features.featurize import FeatureSettings

    scratch = Path(tempfile.mkdtemp(prefix="unlearning-cost-"))
    try:
        att = Attributor(model, train, scratch, method="das",
                         settings=FeatureSettings(timesteps=K), progress=False)  # fmt: skip
        clock = Clock()
        att.featurize()
        att.kernel()
        out = [clock.read()]
        for targets in pools:
            clock = Clock()
            att.score(targets)
            out.append(clock.read())
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cost(args: argparse.Namespace) -> str:
    from diffattr.data import load_builtin
    from diffattr.diffusion.presets import build_unet

    torch.set_num_threads(args.threads)
    digits = load_builtin("digits")
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1).eval()
    # MUCS timed at max_steps, the most a target costs: with L_null this large its stop never
    # triggers (a random network's target loss may start above 0.95·L_null)
    options = {"abu": _options(args.abu), "mucs": _options(args.mucs or "l_null=1e30")}
    rows = []
    started = time.perf_counter()
    for n in (int(s) for s in args.sizes.split(",")):
        if n + 1 + args.targets > len(digits):
            sys.exit(f"--sizes {n}: digits has {len(digits)} images, {n + 1 + args.targets} needed")
        train = digits.subset(np.arange(n))
        pool = digits.images[n : n + 1 + args.targets]
        for method in ("abu", "mucs"):
            timed = []
            for targets in (pool[:1], pool):
                clock = Clock()
                meta = _unlearning_call(method, options[method], model, train, targets,
                                        args.timesteps)  # fmt: skip
                timed.append(clock.read())
            per = [(b - a) / args.targets for a, b in zip(timed[0], timed[1], strict=True)]
            once = [a - p for a, p in zip(timed[0], per, strict=True)]
            note = f" ({meta['steps_taken']['median']:.0f} steps)" if method == "mucs" else ""
            rows.append((n, method, options[method], once, per, note))
        fit, one, more = _das_call(model, train, [pool[:1], pool], args.timesteps)
        per = [(b - a) / args.targets for a, b in zip(one, more, strict=True)]
        once = [f + a - p for f, a, p in zip(fit, one, per, strict=True)]
        rows.append((n, "das", {}, once, per, ""))
    lines = [
        f"| N | method | once per call: CPU s (wall) | per target: CPU s (wall) "
        f"| per target at {args.amortise} targets: CPU s |",
        "|---|---|---|---|---|",
    ]
    for n, method, opts, once, per, note in rows:
        label = method + (f"[{';'.join(f'{k}={v}' for k, v in opts.items())}]" if opts else "")
        label += note
        lines.append(
            f"| {n} | {label} | {once[0]:.1f} ({once[1]:.1f}) | {per[0]:.2f} ({per[1]:.2f}) "
            f"| {once[0] / args.amortise + per[0]:.2f} |"
        )
    header = (
        f"Command: `.venv/bin/python benchmarks/unlearning.py {shlex.join(sys.argv[1:])}`\n\n"
        f"Machine: {platform.machine()}, torch.set_num_threads({args.threads}), torch "
        f"{torch.__version__}; seeded random `tiny` UNet, digits 8×8, K = {args.timesteps} "
        f"(AbU's loss timesteps, MUCS's bank, DAS's feature timesteps); method defaults unless "
        f"given; {args.targets} + 1 targets per call; total {time.perf_counter() - started:.0f} "
        f"s wall.\n\n"
    )
    return header + "\n".join(lines)


# ---------------------------------------------------------------------------- LDS tuning


def _options(text: str | None) -> dict[str, Any]:
    """``key=value;key=value`` as method options (as on the command line)."""
    if not text:
        return {}
    from diffattr.attribution.methods.spec import parse_method_list

    return parse_method_list(f"x[{text}]")[0][1]


def _target_subset(gt, num: int, seed: int = 0) -> np.ndarray:
    """Positions of ``num`` targets (0: all), half of each kind where there are enough."""
    if num <= 0 or num >= len(gt.kinds):
        return np.arange(len(gt.kinds))
    rng = np.random.default_rng(seed)
    kinds = np.unique(gt.kinds)
    picked = []
    for i, kind in enumerate(kinds):
        pool = np.flatnonzero(gt.kinds == kind)
        take = num // len(kinds) + (i < num % len(kinds))
        picked.append(rng.choice(pool, size=min(take, pool.size), replace=False))
    return np.sort(np.concatenate(picked))


def _subset_gt(gt, rows: np.ndarray):
    return replace(
        gt, F=gt.F[..., rows], kinds=gt.kinds[rows], images=gt.images[rows],
        keys=gt.keys[rows], seeds=None if gt.seeds is None else gt.seeds[rows],
    )  # fmt: skip


def _config_label(method: str, options: dict[str, Any]) -> str:
    from diffattr.attribution.methods.spec import method_label

    return method_label(method, options)


def _das_reference(args, gt_all, gt, rows: np.ndarray) -> dict[str, Any]:
    """The default DAS (K = ``--timesteps``, λ by its default rule) on the same targets, from
    the benchmark's committed kernel cache."""
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.attribution.methods import get_method
    from diffattr.evaluation.kernel_cache import cache_inputs, kernel_cache
    from diffattr.evaluation.lds import summarize
    from diffattr.families import get_family
    from diffattr.fsio import read_json

    manifest = read_json(Path(args.bench) / "lds.json")
    train = get_family(manifest.get("family", "unconditional")).benchmark_train_set(manifest)
    settings = FeatureSettings(measure="das", timesteps=args.timesteps)
    cache = kernel_cache(None, Path(args.bench), gt_all, settings)
    inputs = cache_inputs(cache, train.images, gt_all.images)
    values = get_method("das").score_grid(inputs, [None])[0][rows]
    summary = summarize(gt, [values], ["default"], bootstrap=args.bootstrap,
                        default_scores=values, default_lambda="default")  # fmt: skip
    return summary, values


def lds(args: argparse.Namespace) -> str:
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.evaluation.ground_truth import KIND_NAMES, GroundTruth, lds_per_target
    from diffattr.evaluation.lds import summarize
    from diffattr.families import open_run
    from diffattr.run import RunDir

    run = RunDir(args.run)
    if not (run.model_dir / "config.json").is_file():
        sys.exit(f"no trained model in {run.model_dir}; make it first with\n  {TRAIN_LINE}")
    torch.set_num_threads(args.threads)
    grid = json.loads(Path(args.grid).read_text()) if args.grid else GRID
    methods = [m for m in args.methods.split(",") if m]
    gt_all = GroundTruth.load(args.bench)
    rows = _target_subset(gt_all, args.num_targets)
    gt = _subset_gt(gt_all, rows)
    tag = hashlib.sha256(np.asarray(gt.keys, dtype=np.int64).tobytes()).hexdigest()[:8]
    cache = run.features_dir / "unlearning-lds"
    cache.mkdir(parents=True, exist_ok=True)
    bound = open_run(run)
    settings = FeatureSettings(timesteps=args.timesteps)
    out_lines, report, defaults = [], {}, {}
    for method in methods:
        configs = [dict(c) for c in grid[method]]
        if {} not in configs:
            configs.append({})  # the defaults, reported beside the cross-fit
        scores, seconds = [], []
        for options in configs:
            label = _config_label(method, options)
            path = cache / f"{label}-K{args.timesteps}-{tag}.npy"
            if path.is_file():
                scores.append(np.load(path))
                seconds.append(json.loads(path.with_suffix(".json").read_text())["cpu_s"])
                continue
            print(f"scoring {label} on {len(rows)} targets …", flush=True)
            att = bound.attributor(method, options, settings, progress=True)
            inputs = att.inputs(gt.images, gt.images, gt.keys).updated(settings=settings)
            clock = Clock()
            values = att.method.score(inputs)
            cpu, wall = clock.read()
            np.save(path, values)
            meta = {"cpu_s": cpu, "wall_s": wall, "meta": getattr(att.method, "score_meta", {})}
            path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
            scores.append(values)
            seconds.append(cpu)
        labels = [_config_label(method, o) for o in configs]
        default = labels.index(_config_label(method, {}))
        defaults[method] = scores[default]
        summary = summarize(
            gt, scores, labels, bootstrap=args.bootstrap, default_scores=scores[default],
            default_lambda=labels[default],
        )  # fmt: skip
        per_target = [s / len(rows) for s in seconds]
        report[method] = {"configs": labels, "cpu_s_per_target": per_target, "summary": summary}
        for kind, d in summary.items():
            lo, hi = d["ci_targets"]
            out_lines.append(
                f"| {method} | {kind} | {d['lds']:.3f} [{lo:.3f}, {hi:.3f}] "
                f"| {' / '.join(d['lambda_chosen'])} | {d['oracle_lds']:.3f} "
                f"({d['oracle_lambda']}) | {d['default_lds']:.3f} | {d['num_targets']} "
                f"| {np.mean(seconds) / len(rows):.1f} |"
            )
    das, das_values = _das_reference(args, gt_all, gt, rows)  # default DAS, same targets
    for kind, d in das.items():
        lo, hi = d["ci_targets"]
        out_lines.append(
            f"| das (default) | {kind} | {d['default_lds']:.3f} [{lo:.3f}, {hi:.3f}] | – | – "
            f"| {d['default_lds']:.3f} | {d['num_targets']} | – |"
        )
    report["das"] = das
    out_lines += [
        "",
        "Paired on the same targets, each method's defaults against the default DAS "
        "(per-target LDS difference, mean [95% bootstrap CI over targets]; wins):",
        "",
        "| method | kind | LDS − DAS's [CI] | wins / targets |",
        "|---|---|---|---|",
    ]
    das_lds = lds_per_target(gt, das_values)
    rng = np.random.default_rng(0)
    for method, values in defaults.items():
        diff = lds_per_target(gt, values) - das_lds
        for kind in np.unique(gt.kinds):
            d = diff[(gt.kinds == kind) & np.isfinite(diff)]
            boot = [rng.choice(d, d.size).mean() for _ in range(args.bootstrap)]
            lo, hi = np.percentile(boot, [2.5, 97.5])
            name = KIND_NAMES.get(int(kind), str(kind))
            out_lines.append(f"| {method} | {name} | {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"| {(d > 0).sum()} / {d.size} |")  # fmt: skip
    header = (
        f"Command: `.venv/bin/python benchmarks/unlearning.py {shlex.join(sys.argv[1:])}`\n\n"
        f"Benchmark {args.bench}, run {args.run}, K = {args.timesteps}, "
        f"{len(rows)} targets; configurations chosen on one half of each kind's targets and "
        f"reported on the other (and swapped); CI over targets.\n\n"
        "| method | kind | LDS cross-fit [CI] | chosen (half A / half B) | oracle (config) "
        "| defaults | targets | CPU s per target |\n|---|---|---|---|---|---|---|---|\n"
    )
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    return header + "\n".join(out_lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cost", action="store_true", help="CPU seconds per target beside DAS")
    mode.add_argument("--lds", action="store_true", help="cross-fit the hyper-parameters")
    p.add_argument("--timesteps", type=int, default=32, help="K (default: 32, DAS's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the table here (--lds: and JSON)")
    cost_args = p.add_argument_group("--cost")
    cost_args.add_argument("--sizes", default="500,1000", help="training set sizes N")
    cost_args.add_argument("--targets", type=int, default=2, help="targets timed beyond one")
    cost_args.add_argument("--amortise", type=int, default=400, help="targets per call shown")
    cost_args.add_argument("--abu", default=None, help="abu options, e.g. 'draws=64;steps=1'")
    cost_args.add_argument("--mucs", default=None, help="mucs options, e.g. 'max_steps=20'")
    lds_args = p.add_argument_group("--lds")
    lds_args.add_argument("--run", default="runs/lds-digits8")
    lds_args.add_argument("--bench", default="benchmarks/lds/digits8")
    lds_args.add_argument("--methods", default="abu,mucs")
    lds_args.add_argument("--num-targets", type=int, default=0, help="0: all targets")
    lds_args.add_argument("--grid", default=None, help="JSON {method: [options, …]}")
    lds_args.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
    text = cost(args) if args.cost else lds(args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
