"""Options shared by several commands, and their parsing into library settings."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from diffattr.errors import ConfigError

TARGETS_HELP = (
    "samples (RUN/samples, default), val (held-out real images), a samples .npz from "
    "`diffattr generate`, or your images: an image file, a folder (searched recursively) or an "
    ".npz of images; images of another size are resized only if the run resized its own "
    "(--size or --mismatch resize), else refused"
)


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


def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options every command (and every step of ``lds`` and ``data``) takes."""
    from diffattr.config import add_config_option

    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: $DIFFATTR_THREADS, else the cores other processes leave "
        "idle, at least 1)",
    )
    add_config_option(p)


# ---------------------------------------------------------------------------- data, training


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        help="built-in dataset (digits, mnist, emoji; a size suffix such as emoji16 resizes), "
        "image folder, or .npz (default: digits)",
    )
    g.add_argument("--size", type=int, default=None, help="resize images to SIZE×SIZE")
    g.add_argument(
        "--mismatch",
        choices=["error", "resize"],
        default="error",
        help="image folders with mixed sizes: refuse (default) or resize",
    )
    g.add_argument(
        "--val-count",
        type=int,
        default=None,
        help="held-out images (default: a fifth of the images, at most 200)",
    )
    g.add_argument("--train-count", type=int, default=None, help="cap on training images")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split")
    g.add_argument(
        "--background",
        default="white",
        metavar="COLOR",
        help="what transparent pixels become: images with an alpha channel or a transparent "
        "palette colour are composited onto it (a name, #rrggbb or r,g,b; default: white)",
    )


def add_train_args(p: argparse.ArgumentParser, steps: int = 3000) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--preset", default="tiny", help="tiny, cifar, a config JSON or model dir")
    g.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps})")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--checkpoint-every", type=int, default=500)
    g.add_argument(
        "--device",
        default="cpu",
        help="where the model trains: cpu (default), cuda, cuda:N or auto; weights, timesteps "
        "and noise are drawn on CPU either way (CUDA runs are not bit-reproducible)",
    )


def data_spec(args: argparse.Namespace, size: int | None = None) -> Any:
    from diffattr.run import DataSpec

    return DataSpec(
        data=args.data,
        size=args.size if size is None else size,
        mismatch=args.mismatch,
        val_count=args.val_count,
        train_count=args.train_count,
        split_seed=args.split_seed,
        background=args.background,
    )


def train_config(args: argparse.Namespace) -> Any:
    from diffattr.diffusion.training import TrainConfig

    return TrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )


# ---------------------------------------------------------------------------- features, λ


def add_feature_args(p: argparse.ArgumentParser, several_timesteps: bool = False) -> None:
    from diffattr.attribution.defaults import DEFAULT_TIMESTEPS
    from diffattr.attribution.features.projection import KINDS as PROJECTION_KINDS

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
        choices=["auto", *(k for k in PROJECTION_KINDS if k != "none"), "logra"],
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


def feature_settings(args: argparse.Namespace, measure: str = "das") -> Any:
    from diffattr.attribution.features.featurize import FeatureSettings

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
    from diffattr.attribution.kernel.ridge import DEFAULT_RIDGE

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


def lambda_from_args(args: argparse.Namespace) -> Any:
    """Absolute λ, a :class:`Ridge` rule, or None (the method's default) from the λ options."""
    from diffattr.attribution.kernel.ridge import Ridge

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


def attributor_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`Attributor` settings the feature and λ options give (besides the method)."""
    return {
        "lam": lambda_from_args(args),
        "batch_size": args.batch_size,
        "device": getattr(args, "device", "cpu"),
        "progress": not args.quiet,
        "on_nonfinite": getattr(args, "on_nonfinite", "stop"),
    }


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


def one_method(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The single (method, options) of ``--method`` (an index serves one method)."""
    from diffattr.attribution.methods.spec import parse_method_list

    methods = parse_method_list(args.method)
    if len(methods) != 1:
        raise ConfigError(
            f"--method names {len(methods)} methods; an index serves one",
            hint="build one index per method",
        )
    return methods[0]


def screen_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~diffattr.attribution.screening.Screen` of ``--screen``, or None."""
    if not getattr(args, "screen", None):
        return None
    from diffattr.attribution.screening import Screen

    return Screen.parse(args.screen, args.screen_kernel)


def add_screen_args(p: argparse.ArgumentParser) -> None:
    """``--screen`` and ``--screen-kernel``."""
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


def add_index_args(p: argparse.ArgumentParser) -> None:
    """What chooses an index (``index``, ``query``, ``serve``): λ, screen and feature options."""
    add_lambda_args(p)
    add_screen_args(p)
    add_feature_args(p)
