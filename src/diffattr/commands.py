"""Subcommands built on the attribution engine: featurize, score, report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.errors import CheckpointError, ConfigError, DataError, DiffattrError

TARGETS_HELP = "samples (RUN/samples, default), val (held-out real images), or a samples .npz"


def parse_list(text: str, kind: type, option: str) -> list:
    """Comma-separated numbers of an option, or a :class:`ConfigError` naming the option."""
    try:
        values = [kind(x) for x in str(text).split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ConfigError(f"{option} takes comma-separated {what}, got {text!r}") from None
    return values


def parse_rows(text: str) -> tuple[int | None, int | None]:
    """``START:END`` (either may be omitted) of ``--rows``."""
    start, sep, end = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        a = int(start) if start.strip() else None
        b = int(end) if end.strip() else None
    except ValueError:
        raise ConfigError(f"--rows takes START:END (e.g. 0:1000), got {text!r}") from None
    if (
        (a is not None and a < 0)
        or (b is not None and b < 0)
        or (a is not None and b is not None and b <= a)
    ):
        raise ConfigError(f"--rows {text}: need 0 <= START < END")
    return a, b


def load_targets(run, spec: str) -> tuple[str, torch.Tensor, np.ndarray]:
    """(name, images, ids) of the targets named by ``spec``."""
    from diffattr.diffusion.sampling import load_samples

    if spec == "samples":
        path = run.samples_dir / "samples.npz"
        if not path.is_file():
            raise DiffattrError(
                f"no generated samples in {run.samples_dir}",
                hint=f"run `diffattr generate {run.path}` first",
            )
        s = load_samples(path)
        return "samples", s.images, np.arange(len(s))
    if spec == "val":
        _, val = run.data_spec().load()
        return "val", val.images, val.ids.numpy()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"targets {spec!r} are neither 'samples', 'val' nor a file")
    s = load_samples(path)
    return path.stem, s.images, np.arange(len(s))


def attribution_targets(run, spec: str) -> tuple[str, Any, np.ndarray]:
    """(name, targets as the run's attributor takes them, ids): the images of
    :func:`load_targets`, or for a text-to-image run latents with caption embeddings."""
    from diffattr.run import TEXT2IMAGE

    if run.family == TEXT2IMAGE:
        from diffattr.text2image.family import attribution_targets as latent_targets

        return latent_targets(run, spec)
    return load_targets(run, spec)


def add_feature_args(p: argparse.ArgumentParser, several_timesteps: bool = False) -> None:
    from diffattr.attribution.defaults import DEFAULT_TIMESTEPS

    g = p.add_argument_group("features")
    if several_timesteps:
        g.add_argument(
            "--timesteps",
            default=str(DEFAULT_TIMESTEPS),
            help=f"comma-separated K values (default: {DEFAULT_TIMESTEPS})",
        )
    else:
        g.add_argument(
            "--timesteps",
            type=int,
            default=DEFAULT_TIMESTEPS,
            help=f"timesteps K (default: {DEFAULT_TIMESTEPS})",
        )
    g.add_argument("--timestep-strategy", choices=["uniform", "first", "random"], default="uniform")
    g.add_argument("--no-normalize", action="store_true", help="no per-timestep L2 normalisation")
    g.add_argument("--noise-seed", type=int, default=0)
    g.add_argument(
        "--params",
        default=None,
        help="regex: only parameters whose name matches (text-to-image runs: the LoRA "
        "parameters by default)",
    )
    g.add_argument(
        "--projector",
        default="auto",
        choices=[
            "auto",
            "identity",
            "rademacher",
            "gaussian",
            "countsketch",
            "sparse-jl",
            "trak-cuda",
            "logra",
        ],
        help="auto: exact gradients when they fit in 4 GiB, else a sparse sketch; trak-cuda: "
        "traker's CUDA kernel (fast_jl; k a multiple of 512) on --device cuda, else rademacher; "
        "logra: per-layer Kronecker projection from activations and output gradients, never "
        "forming a full per-sample gradient (fastest; --proj-dim is then the per-layer rank r, "
        "default 16, giving up to r² dimensions per layer)",
    )
    g.add_argument(
        "--proj-dim",
        type=int,
        default=None,
        help="projection dimension k (logra: the per-layer rank r)",
    )
    g.add_argument("--proj-seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument(
        "--device",
        default="cpu",
        help="where gradients are computed: cpu (default), cuda, cuda:N, or auto (cuda when "
        "available)",
    )
    g.add_argument(
        "--grad-dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="precision of the gradient forward/backward passes (default: fp32); features "
        "are stored and kernels solved in float32/float64 either way; fp16 is meant for cuda",
    )


def feature_settings(args: argparse.Namespace, measure: str = "das"):
    from diffattr.attribution.featurize import FeatureSettings

    return FeatureSettings(
        measure=measure,
        timesteps=args.timesteps if isinstance(args.timesteps, int) else 10,
        timestep_strategy=args.timestep_strategy,
        normalize=not args.no_normalize,
        noise_seed=args.noise_seed,
        params=args.params,
        projector=args.projector,
        proj_dim=args.proj_dim,
        proj_seed=args.proj_seed,
        grad_dtype=getattr(args, "grad_dtype", "fp32"),
    )


def add_lambda_args(p: argparse.ArgumentParser) -> None:
    """The λ of kernel methods: one of three rules (default: each method's own, see README)."""
    from diffattr.attribution.ridge import DEFAULT_RIDGE

    g = p.add_argument_group(
        "λ of kernel methods (one of; default: each method's own rule, "
        f"{DEFAULT_RIDGE} for das, dtrak, trak and the other kernel methods)"
    ).add_mutually_exclusive_group()
    g.add_argument("--lambda", dest="lam", type=float, default=None, help="absolute λ")
    g.add_argument(
        "--relative-lambda", type=float, default=None, help="λ = c · mean eigenvalue of ΦᵀΦ"
    )
    g.add_argument(
        "--effective-dim",
        type=float,
        default=None,
        metavar="F",
        help="λ such that the ridge's effective dimension Σσ/(σ+λ) is F·min(N, k) for 0 < F < 1, "
        "or F dimensions (at most half of min(N, k)) for a whole number F",
    )


def lambda_from_args(args: argparse.Namespace):
    """Absolute λ, a :class:`Ridge` rule, or None (the method's default) from the λ options."""
    from diffattr.attribution.ridge import Ridge

    if getattr(args, "lam", None) is not None:
        if not args.lam > 0:
            raise ConfigError(f"--lambda must be positive, got {args.lam}")
        return float(args.lam)
    for option, rule in (("relative_lambda", "relative"), ("effective_dim", "effective-dim")):
        value = getattr(args, option, None)
        if value is not None:
            try:
                return Ridge(rule, value)
            except ConfigError as exc:
                raise ConfigError(f"--{option.replace('_', '-')}: {exc}") from None
    return None


def make_attributor(run, method: str, args: argparse.Namespace, **options: Any):
    from diffattr.attribution.attributor import Attributor
    from diffattr.diffusion.presets import load_unet
    from diffattr.run import TEXT2IMAGE

    settings = feature_settings(args)
    if run.family == TEXT2IMAGE:  # LoRA UNet, latents + caption embeddings, LoRA gradients
        from diffattr.text2image.family import attribution_inputs, check_method

        check_method(method)
        model, train_set, settings = attribution_inputs(run, settings)
    else:
        train_set, _ = run.data_spec().load()
        model = load_unet(run.model_dir)
        check_model_fits(model, train_set.shape, run.model_dir)
    return Attributor(
        model,
        train_set,
        run.features_dir,
        method=method,
        schedule=run.train_config().schedule,
        settings=settings,
        lam=lambda_from_args(args),
        batch_size=args.batch_size,
        device=getattr(args, "device", "cpu"),
        progress=not args.quiet,
        on_nonfinite=getattr(args, "on_nonfinite", "stop"),
        **options,
    )


def check_model_fits(model, shape: tuple[int, int, int], where) -> None:
    """A :class:`CheckpointError` unless ``model`` takes images of ``shape`` (C, H, W)."""
    cfg = model.config
    have = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.out_channels))
    c, h, w = shape
    if have != (c, h, c) or h != w:
        raise CheckpointError(
            f"the model in {where} is for {have[0]}×{have[1]}² images, but the run's data is "
            f"{c}×{h}×{w}",
            hint="the model directory was replaced by another architecture's; retrain with "
            "`diffattr train` or restore the run's model",
        )


def driver_plan(args: argparse.Namespace) -> argparse.Namespace:
    """The options this process works under when ``args`` spreads work over an executor.

    ``--device cuda`` with ``--executor local|ray`` on a driver without a GPU means GPUs on the
    workers only: the driver plans (and scores) on the CPU, the workers featurize on
    ``args.device``. Otherwise ``args`` itself.
    """
    sharded = getattr(args, "executor", "inprocess") != "inprocess"
    if sharded and str(args.device).startswith("cuda") and not torch.cuda.is_available():
        return argparse.Namespace(**{**vars(args), "device": "cpu"})
    return args


def cmd_featurize(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.shards import featurize_with_executor
    from diffattr.parallel import workers_from_args
    from diffattr.run import RunDir

    run = RunDir(args.run)
    bounds = parse_rows(args.rows) if getattr(args, "rows", None) else None
    out: dict[str, Any] = {}
    plan = driver_plan(args)
    with workers_from_args(args) as executor:
        for method in args.method.split(","):
            att = make_attributor(run, method, plan)
            rows = None
            if bounds is not None:
                n = len(att.train)
                a, b = bounds[0] or 0, n if bounds[1] is None else bounds[1]
                if a >= n or b > n:
                    raise ConfigError(
                        f"--rows {args.rows} is outside the {n} training rows (0:{n})"
                    )
                rows = np.arange(a, b)
            if att.method.measure is None:
                continue
            if executor is not None:
                store = featurize_with_executor(
                    att, run.path, method, executor, rows, device=args.device
                )
                if rows is None and not store.is_complete():
                    raise DiffattrError(
                        f"feature store {store.path} is incomplete after the workers finished",
                        hint="rerun the same command to compute the missing rows",
                    )
            else:
                store = att.featurize(rows)
            _featurize_summary(out, run, att, method, store, rows, args)
    return out


def _featurize_summary(out, run, att, method, store, rows, args) -> None:
    """Add one method's stores to ``featurize``'s summary (and featurize the targets)."""
    out[f"train_store[{method}]"] = str(store.path)
    if rows is not None:
        done = f"{store.num_done}/{store.num_rows} done"
        out[f"rows[{method}]"] = f"{rows[0]}:{rows[-1] + 1} ({done})"
    if args.targets:
        _, targets, ids = attribution_targets(run, args.targets)
        cond = getattr(targets, "conditioning", None)
        store = att.featurize_targets(getattr(targets, "images", targets), ids, cond)
        out[f"target_store[{method}]"] = str(store.path)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"residual": args.residual, "leverage": args.leverage, "squared": args.squared}


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.method_spec import method_label, parse_method_list
    from diffattr.attribution.shards import featurize_with_executor
    from diffattr.diffusion.sampling import load_samples
    from diffattr.parallel import workers_from_args
    from diffattr.run import RunDir

    if args.k < 1:
        raise ConfigError(f"--k must be at least 1, got {args.k}")
    run = RunDir(args.run)
    screen = None
    if getattr(args, "screen", None):
        from diffattr.attribution.screening import Screen

        screen = Screen.parse(args.screen, args.screen_kernel)
    name, images, ids = attribution_targets(run, args.targets)
    out: dict[str, Any] = {}
    plan = driver_plan(args)
    with workers_from_args(args) as executor:
        for method, given in parse_method_list(args.method):
            options: dict[str, Any] = {}
            if method == "das":
                options = method_options(args)
            elif method == "random":
                options = {"seed": args.noise_seed}
            elif method in ("tracin", "gas"):
                options = {"checkpoints": str(run.path)}
            options.update(given)
            targets: Any = images
            if method == "journey-trak":  # needs the recorded seeds, not just the images
                if args.targets == "val":
                    raise DiffattrError("journey-trak attributes generated images only")
                path = args.targets
                if args.targets == "samples":
                    path = run.samples_dir / "samples.npz"
                targets = load_samples(path)
            att = make_attributor(run, method, plan, **options)
            if executor is not None:
                att.executor = executor  # the scoring tiles
                featurize_all = screen is None  # a screen featurizes its candidates only
                if featurize_all and att.method.measure is not None and not att.method.needs_model:
                    featurize_with_executor(
                        att, run.path, method, executor, None, options, device=args.device
                    )
            scores = att.score(targets, ids, screen=screen)
            label = method_label(method, given)
            out[label] = str(scores.save(run.scores_dir / f"{label}-{name}", k=args.k))
    return out


def counterfactual_figures(results: str | None) -> list[tuple[str, Path]]:
    """The counterfactual picture next to its results.json, when there is one."""
    if not results or not (Path(results).parent / "counterfactual.png").is_file():
        return []
    caption = "Counterfactual: reference, then regenerated after random / method removals"
    return [(caption, Path(results).parent / "counterfactual.png")]


def scored_methods(run: Any, targets: str) -> list[str]:
    """The methods with scores of ``targets`` in ``run`` (``RUN/scores/METHOD-TARGETS``), sorted."""
    suffix = f"-{targets}"
    if not run.scores_dir.is_dir():
        return []
    return sorted(
        d.name[: -len(suffix)]
        for d in run.scores_dir.iterdir()
        if d.name.endswith(suffix) and (d / "scores.npy").is_file()
    )


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.scores import Scores
    from diffattr.fsio import read_json
    from diffattr.report import load_rows, write_report
    from diffattr.run import RunDir

    run = RunDir(args.run)
    name, images, ids = load_targets(run, args.targets)
    train_set, _ = run.data_spec().load()
    scores = {}
    train_ids = train_set.ids.numpy()
    for method in args.method.split(",") if args.method else scored_methods(run, name):
        d = run.scores_dir / f"{method}-{name}"
        if (d / "scores.npy").is_file():
            try:
                s = Scores.load(d)
            except DiffattrError as exc:
                raise DiffattrError(f"{d / 'scores.npy'}: {exc}", hint=exc.hint) from exc
            except (OSError, ValueError, EOFError) as exc:
                raise DiffattrError(f"cannot read scores in {d}: {exc}") from exc
            if not np.array_equal(np.sort(s.train_ids), np.sort(train_ids)):
                raise DiffattrError(
                    f"{d / 'scores.npy'} scores {s.train_ids.size} training samples, but the "
                    f"run's training set has {train_ids.size} (other ids)",
                    hint=f"rerun `diffattr score {run.path} --method {method}`",
                )
            if not np.isin(np.asarray(ids), s.target_ids).all():
                raise DiffattrError(
                    f"{d / 'scores.npy'} holds {s.target_ids.size} targets, not the "
                    f"{len(ids)} {name} targets of the report",
                    hint=f"rerun `diffattr score {run.path} --method {method}`",
                )
            scores[method] = s
    summary: dict[str, Any] = {"run": str(run.path), "training images": len(train_set)}
    if (run.path / "quality.json").is_file():
        summary.update(read_json(run.path / "quality.json"))
    path = write_report(
        Path(args.out) if args.out else run.report_path,
        targets=images,
        target_ids=ids,
        train=train_set,
        scores=scores,
        title=f"diffattr report: {run.path.name} ({name})",
        summary=summary,
        lds_rows=load_rows(args.lds) if getattr(args, "lds", None) else None,
        counterfactual_rows=[
            r
            for r in load_rows(args.counterfactual, "counterfactual results")
            if not r.get("control")
        ]
        if getattr(args, "counterfactual", None)
        else None,
        figures=counterfactual_figures(getattr(args, "counterfactual", None)),
    )
    return {"report": str(path), "methods": sorted(scores)}


def cmd_lds_build(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.gradients import resolve_device
    from diffattr.evaluation.lds import LDSConfig, build
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
    RunDir(args.run).train_config()  # a missing or damaged run fails before --out is made
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
    """``lds eval --screen A:M,B:M2``: screens applied as masks (the kernel on all N)."""
    from diffattr.attribution.method_spec import split_top_level
    from diffattr.attribution.screening import Screen

    if not getattr(args, "screen", None):
        return None
    return [Screen.parse(text, "all") for text in split_top_level(args.screen, ",")]


def cmd_lds_eval(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.method_spec import parse_method_list
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


def register(add) -> None:
    from diffattr.parallel import add_executor_args

    p = add(
        "featurize",
        "compute and store training (and target) features for attribution",
        """
        diffattr featurize runs/digits --method das,dtrak
        diffattr featurize runs/digits --method trak --targets samples \\
            --projector countsketch --proj-dim 4096
        diffattr featurize runs/digits --executor local --workers 2      # 2 worker processes
        diffattr featurize runs/digits --executor ray --ray-address auto  # an existing cluster
        diffattr featurize runs/cifar --device cuda --grad-dtype bf16 \\
            --projector trak-cuda --proj-dim 4096
        """,
        cmd_featurize,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--method", default="das", help="comma-separated methods (default: das)")
    p.add_argument("--targets", default=None, help="also featurize targets: " + TARGETS_HELP)
    p.add_argument(
        "--rows",
        default=None,
        metavar="START:END",
        help="only these training rows (one worker's share; workers on disjoint rows of one "
        "store run side by side)",
    )
    p.add_argument(
        "--on-nonfinite",
        choices=["stop", "skip"],
        default="stop",
        help="a sample with NaN/Inf gradients: stop with an error naming it (default), or "
        "record it as skipped (scored 0) with a warning",
    )
    add_feature_args(p)
    add_executor_args(p, default="inprocess")

    p = add(
        "score",
        "score targets against the training set; writes scores and top-k tables",
        """
        diffattr score runs/digits --method das,dtrak
        diffattr score runs/digits --method das --targets val --leverage --k 20
        diffattr score runs/big --method das --executor ray --ray-address auto  # tiles on Ray
        """,
        cmd_score,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--method",
        default="das",
        help="comma-separated methods (default: das); options in brackets, e.g. "
        "das[leverage=true], tracin[checkpoints=RUN]",
    )
    p.add_argument("--targets", default="samples", help=TARGETS_HELP)
    p.add_argument("--k", type=int, default=10, help="top-k written to topk.csv/json")
    add_lambda_args(p)
    p.add_argument("--residual", choices=["error", "signed", "raw", "none"], default="error")
    p.add_argument("--leverage", action="store_true", help="DAS: divide by 1 − hᵢ")
    p.add_argument("--squared", action="store_true", help="DAS: square the scores (KL form)")
    p.add_argument(
        "--screen",
        default=None,
        metavar="SIMILARITY:M",
        help="score each target on its M most similar training images only (pixel-cos, "
        "pixel-dot or embedding-cos; M images or a share: pixel-cos:200, pixel-cos:5%%): the "
        "others get no score (NaN in scores.npy, absent from the top-k tables)",
    )
    p.add_argument(
        "--screen-kernel",
        choices=["union", "candidates", "all"],
        default="union",
        help="with --screen: fit the kernel once on the union of all targets' candidates "
        "(default), on each target's own candidates (the DAS paper's form), or on all training "
        "images (no saving: the screen only restricts which images are scored)",
    )
    add_feature_args(p)
    add_executor_args(p, default="inprocess")

    p = add(
        "report",
        "write the HTML report of a run",
        """
        diffattr report runs/digits
        diffattr report runs/digits --method das,dtrak,trak --out /tmp/report.html
        """,
        cmd_report,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--method",
        default=None,
        help="comma-separated methods to show (default: every method with scores of the targets)",
    )
    p.add_argument("--targets", default="samples", help=TARGETS_HELP)
    p.add_argument("--out", default=None, help="output file (default: RUN/report.html)")
    p.add_argument(
        "--lds",
        default=None,
        metavar="RESULTS_JSON",
        help="LDS results to plot: BENCH/results.json from `diffattr lds eval`",
    )
    p.add_argument(
        "--counterfactual",
        default=None,
        metavar="RESULTS_JSON",
        help="counterfactual results to plot: OUT/results.json from `diffattr counterfactual`",
    )

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
        "images only (the kernel on all N; unscored images add 0), one row per screen",
    )
    e.add_argument("--out", default=None, help="table file (default: BENCH/results.md)")
    add_feature_args(e, several_timesteps=True)
    for q in (b, e):
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
        q.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    from diffattr.evaluation.counterfactual import add_counterfactual_parser

    add_counterfactual_parser(add)
