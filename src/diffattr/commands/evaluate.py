"""Evaluation commands: ``lds build``, ``lds eval``, ``counterfactual`` (library code in
:mod:`diffattr.evaluation`; these parse options and write the tables)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.commands.options import (
    add_common_options,
    add_feature_args,
    add_lambda_args,
    attributor_kwargs,
    feature_settings,
    parse_list,
)
from diffattr.errors import ConfigError, DiffattrError


def cmd_lds_build(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.features.gradients import resolve_device
    from diffattr.evaluation.ground_truth import LDSConfig, build
    from diffattr.families import family_of
    from diffattr.fsio import removed_on_error
    from diffattr.parallel import executor_from_args
    from diffattr.run import RunDir

    if args.measure_timesteps < 1:
        raise ConfigError(f"--measure-timesteps must be at least 1, got {args.measure_timesteps}")
    for name in ("subsets", "num_val", "num_gen"):
        if getattr(args, name) < (1 if name == "subsets" else 0):
            raise ConfigError(f"--{name.replace('_', '-')} must not be {getattr(args, name)}")
    if not 0.0 < args.fraction <= 1.0:
        raise ConfigError(f"--fraction must be in (0, 1], got {args.fraction}")
    seeds = parse_list(args.seeds, int, "--seeds")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be non-negative, got {args.seeds}")
    run = RunDir(args.run)
    family_of(run).train_config(run)  # a missing or damaged run fails before --out is made
    device = args.device
    if args.executor != "ray":  # Ray workers may have GPUs the driver lacks: they check there
        device = resolve_device(device)
    config = LDSConfig(
        num_subsets=args.subsets,
        fraction=args.fraction,
        seeds=seeds,
        subset_seed=args.subset_seed,
        measure_timesteps=args.measure_timesteps,
        num_val=args.num_val,
        num_gen=args.num_gen,
        common_random_numbers=not args.independent,
    )
    with (
        executor_from_args(args) as executor,
        removed_on_error(args.out, keep=lambda p: (p / "models").is_dir()),
    ):
        bench = build(
            RunDir(args.run), args.out, config, executor, progress=not args.quiet, device=device
        )
    return {"benchmark": str(bench), "models": config.num_subsets * len(config.seeds)}


def check_benchmark_files(bench: Path) -> None:
    """A clear error naming the first missing or unreadable file of a built LDS benchmark."""
    import zipfile

    from diffattr.fsio import read_json

    if not (bench / "ground_truth.npz").is_file():
        return  # evaluate_benchmark says "run `diffattr lds build` first"
    read_json(bench / "lds.json")
    for name, keys in (
        ("ground_truth.npz", ("F_t",)),
        ("targets.npz", ("images", "kinds", "keys")),
        ("subsets.npy", ()),
    ):
        path = bench / name
        try:
            loaded = np.load(path, allow_pickle=False)  # an archive, or one .npy array
            missing = [k for k in keys if k not in loaded.files] if keys else []
        except FileNotFoundError:
            raise DiffattrError(
                f"LDS benchmark {bench} has no {name}", hint="rerun `diffattr lds build`"
            ) from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DiffattrError(
                f"cannot read {path}: {exc}", hint="the benchmark is damaged; rerun `lds build`"
            ) from None
        if missing:
            raise DiffattrError(f"{path} has no {missing[0]!r} array", hint="rerun `lds build`")


def lds_screens(args: argparse.Namespace) -> list[Any] | None:
    """``lds eval --screen A:M,B:M2``: screens applied as masks (the kernel on all N); ``none``
    in the list also gives the unscreened rows."""
    from diffattr.attribution.methods.spec import split_top_level
    from diffattr.attribution.screening import Screen

    if not getattr(args, "screen", None):
        return None
    texts = split_top_level(args.screen, ",")
    return [None if t.strip() == "none" else Screen.parse(t, "all") for t in texts]


def cmd_lds_eval(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.methods.spec import parse_method_list
    from diffattr.evaluation.lds import evaluate_benchmark, format_table
    from diffattr.fsio import atomic_write_bytes, atomic_write_json
    from diffattr.run import RunDir

    check_benchmark_files(Path(args.bench))
    rows = evaluate_benchmark(
        args.bench,
        RunDir(args.run) if args.run else None,
        parse_method_list(args.method),
        parse_list(args.timesteps, int, "--timesteps"),
        parse_list(args.lambdas, float, "--lambdas") if args.lambdas else None,
        base_settings=feature_settings(args),
        progress=not args.quiet,
        bootstrap=args.bootstrap,
        measure_timesteps=args.measure_timesteps,
        seeds=parse_list(args.seed_index, int, "--seed-index") if args.seed_index else None,
        device=args.device,
        screens=lds_screens(args),
    )
    table = format_table(rows)
    out = Path(args.out) if args.out else Path(args.bench) / "results.md"
    atomic_write_bytes(out, (table + "\n").encode())
    atomic_write_json(out.with_suffix(".json"), rows)
    if not args.quiet and not args.json:
        print(table)
    return {"table": str(out), "rows": rows}


def _lds_without_step(args: argparse.Namespace) -> dict[str, Any]:
    raise DiffattrError("`diffattr lds` needs a step", hint="use `lds build` or `lds eval`")


def cmd_counterfactual(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.methods.spec import method_label, parse_method_list, split_top_level
    from diffattr.attribution.screening import Screen
    from diffattr.evaluation.counterfactual import CounterfactualConfig, run_counterfactual
    from diffattr.fsio import ensure_writable_dir
    from diffattr.parallel import executor_from_args
    from diffattr.run import RunDir

    run = RunDir(args.run)
    run.manifest()
    config = CounterfactualConfig(
        methods=[method_label(m, o) for m, o in parse_method_list(args.method)],
        k=args.k,
        num_targets=args.num_targets,
        first_target=args.first_target,
        seed=args.seed,
        reference=args.reference,
        picture_targets=args.picture_targets,
        bootstrap=args.bootstrap,
        screens=[
            Screen.parse(text, args.screen_kernel)
            for text in split_top_level(args.screen or "", ",")
            if text.strip()
        ],
    )
    with executor_from_args(args) as executor:
        summary = run_counterfactual(
            run,
            ensure_writable_dir(args.out),
            config,
            executor,
            settings=feature_settings(args),
            attributor_options=attributor_kwargs(args),
            rescore=args.rescore,
            progress=not args.quiet,
        )
    table = summary.pop("table_text")
    if not args.quiet and not args.json:
        print(table)
    return summary


def register(add) -> None:
    from diffattr.parallel import add_executor_args

    p = add(
        "lds",
        "linear datamodeling score: build ground truth by retraining, evaluate methods",
        """
        diffattr lds build runs/digits --out bench/digits --subsets 24 --seeds 0,1
        diffattr lds eval bench/digits --run runs/digits --method das,dtrak,trak,random
        """,
        _lds_without_step,
    )
    sub = p.add_subparsers(dest="lds_command", metavar="STEP")
    b = sub.add_parser(
        "build",
        help="retrain subset models and measure the ground truth (resumable)",
        description="retrain subset models and measure the ground truth (resumable)",
        epilog="examples:\n  diffattr lds build runs/digits --out bench/digits --subsets 24 "
        "--seeds 0,1 --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.set_defaults(handler=cmd_lds_build)
    b.add_argument("run", help="run directory of the full model")
    b.add_argument("--out", required=True, help="benchmark directory")
    b.add_argument("--subsets", type=int, default=24, help="subsets M (default: 24)")
    b.add_argument("--fraction", type=float, default=0.5, help="subset fraction α (0.5)")
    b.add_argument("--seeds", default="0,1", help="training seeds per subset (default: 0,1)")
    b.add_argument("--subset-seed", type=int, default=0)
    b.add_argument(
        "--measure-timesteps", type=int, default=100, help="timesteps in F (default: 100)"
    )
    b.add_argument("--num-val", type=int, default=200, help="held-out real targets")
    b.add_argument("--num-gen", type=int, default=200, help="generated targets")
    b.add_argument(
        "--independent",
        action="store_true",
        help="no common random numbers: each subset model gets its own init and noise",
    )
    add_executor_args(b)
    b.add_argument(
        "--device",
        default="cpu",
        help="where subset models train and are measured: cpu (default), cuda, cuda:N, auto",
    )
    e = sub.add_parser(
        "eval",
        help="LDS of methods on a built benchmark (cross-fitted λ, bootstrap CIs)",
        description="LDS of methods on a built benchmark (cross-fitted λ, bootstrap CIs)",
        epilog="examples:\n  diffattr lds eval bench/digits --run runs/digits "
        "--method das,dtrak,trak,grad-cos,pixel-cos,random --timesteps 10,100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.set_defaults(handler=cmd_lds_eval)
    e.add_argument("bench", help="benchmark directory made by `lds build`")
    e.add_argument("--run", default=None, help="run directory (needed unless kernels are cached)")
    e.add_argument(
        "--method",
        default="das,dtrak,trak,grad-cos,pixel-cos,random",
        help="comma-separated methods, options in brackets: das[residual=none;leverage=true]",
    )
    e.add_argument("--lambdas", default=None, help="relative λ grid, comma-separated")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    e.add_argument(
        "--measure-timesteps", type=int, default=None, help="F over fewer timesteps (ablation)"
    )
    e.add_argument("--seed-index", default=None, help="use only these seed indices (ablation)")
    e.add_argument(
        "--screen",
        default=None,
        metavar="SIMILARITY:M[,…]",
        help="evaluate each method's scores kept on each target's M most similar training "
        "images only (the kernel on all N; unscored images add 0), one row per screen; "
        "'none' in the list adds the unscreened rows (none,pixel-cos:5%%)",
    )
    e.add_argument("--out", default=None, help="table file (default: BENCH/results.md)")
    add_feature_args(e, several_timesteps=True)
    for q in (b, e):
        add_common_options(q)

    p = add(
        "counterfactual",
        "remove each target's top attributed training images, retrain, regenerate, compare "
        "with random removals",
        """
        diffattr counterfactual runs/digits --method das,dtrak --k 10 --num-targets 8 \\
            --out bench/cf-digits --workers 2
        diffattr counterfactual runs/digits --method das --k 0.02 --reference original \\
            --out bench/cf-digits
        diffattr counterfactual runs/digits --method pixel-cos,das --screen pixel-cos:10% \\
            --k 25 --out bench/cf-digits
        """,
        cmd_counterfactual,
    )
    p.add_argument("run", help="run directory (with generated samples)")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument(
        "--method",
        default="das,dtrak",
        help="comma-separated methods, options in brackets (default: das,dtrak); the random "
        "null is always added",
    )
    p.add_argument(
        "--k",
        type=float,
        default=10,
        help="training images removed per target: a count, or a fraction below 1 (default: 10)",
    )
    p.add_argument("--num-targets", type=int, default=8, help="generated targets (default: 8)")
    p.add_argument("--first-target", type=int, default=0, help="index of the first sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the random removals")
    p.add_argument(
        "--reference",
        choices=["retrain", "original"],
        default="retrain",
        help="compare with a k = 0 retraining (default; exact under any thread count) or the "
        "run's own model",
    )
    p.add_argument("--picture-targets", type=int, default=6, help="rows of counterfactual.png")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--rescore", action="store_true", help="recompute scores, ignoring RUN/scores")
    p.add_argument(
        "--screen",
        default=None,
        metavar="SIMILARITY:M[,…]",
        help="also remove, for each method scoring the model's features (das, dtrak, …; not "
        "pixel-cos, ekfac, combine), the top k of its scores on each target's M most similar "
        "training images only (as `diffattr score --screen`; M ≥ k): one more row per screen, "
        "labelled 'das screen=pixel-cos:10%%'",
    )
    p.add_argument(
        "--screen-kernel",
        choices=["union", "candidates", "all"],
        default="union",
        help="with --screen: fit the kernel on the union of all targets' candidates "
        "(default), on each target's own candidates, or on all training images",
    )
    add_lambda_args(p)
    add_executor_args(p)
    add_feature_args(p)
