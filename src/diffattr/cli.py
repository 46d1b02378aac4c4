"""Command-line interface: ``diffattr demo | train | generate | featurize | score | report``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError

Handler = Callable[[argparse.Namespace], dict[str, Any]]
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _add_common(p: argparse.ArgumentParser) -> None:
    from diffattr.config import add_config_option

    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    add_config_option(p)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        help="built-in dataset (digits, mnist, mnist16), image folder, or .npz (default: digits)",
    )
    g.add_argument("--size", type=int, default=None, help="resize images to SIZE×SIZE")
    g.add_argument(
        "--mismatch",
        choices=["error", "resize"],
        default="error",
        help="image folders with mixed sizes: refuse (default) or resize",
    )
    g.add_argument("--val-count", type=int, default=200, help="held-out images (default: 200)")
    g.add_argument("--train-count", type=int, default=None, help="cap on training images")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split")


def _add_train_args(p: argparse.ArgumentParser, steps: int = 3000) -> None:
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


def _data_spec(args: argparse.Namespace):
    from diffattr.run import DataSpec

    return DataSpec(
        data=args.data,
        size=args.size,
        mismatch=args.mismatch,
        val_count=args.val_count,
        train_count=args.train_count,
        split_seed=args.split_seed,
    )


def _train_config(args: argparse.Namespace):
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


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.gradients import resolve_device
    from diffattr.diffusion.training import checkpoints, train
    from diffattr.fsio import ensure_writable_dir, removed_on_error
    from diffattr.run import RunDir

    spec, config = _data_spec(args), _train_config(args)
    config.validate()  # bad options and data fail before --out is created
    device = resolve_device(args.device)
    train_set, _ = spec.load()
    with removed_on_error(args.out, keep=lambda p: bool(checkpoints(p))):
        run = RunDir(ensure_writable_dir(args.out))
        run.start(spec, config)
        t0 = time.time()
        model_dir = train(train_set, config, run.path, progress=not args.quiet, device=device)
    return {"model": str(model_dir), "num_train": len(train_set), "seconds": time.time() - t0}


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.diffusion.presets import load_unet, model_fingerprint
    from diffattr.diffusion.sampling import sample, save_samples
    from diffattr.run import TEXT2IMAGE, RunDir

    if args.seed < 0:
        raise DiffattrError(f"--seed must be non-negative, got {args.seed}")
    if args.steps < 1:
        raise DiffattrError(f"--steps must be at least 1, got {args.steps}")
    run = RunDir(args.run)
    if run.family == TEXT2IMAGE:
        from diffattr.text2image.family import cmd_generate as generate_text2image

        return generate_text2image(args)
    if args.prompt or args.prompts:
        raise DiffattrError(f"{run.path} is an unconditional run: it takes no prompts")
    model = load_unet(run.model_dir)
    num_train_timesteps = run.train_config().schedule.num_train_timesteps
    if args.steps > num_train_timesteps:
        raise DiffattrError(f"--steps must be at most {num_train_timesteps}, got {args.steps}")
    seeds = np.arange(args.seed, args.seed + args.num)
    samples = sample(
        model,
        seeds,
        schedule=run.train_config().schedule,
        sampler=args.sampler,
        num_steps=args.steps,
        record_trajectory=args.trajectory,
        progress=not args.quiet,
    )
    out = Path(args.out) if args.out else run.samples_dir
    path = save_samples(samples, out, model_fingerprint(model))
    return {"samples": str(path), "grid": str(out / "grid.png"), "num": len(samples)}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.demo import run_demo

    return run_demo(args)


COMMANDS: dict[str, tuple[str, str, Handler]] = {}


def build_parser() -> argparse.ArgumentParser:
    from diffattr.attribution.defaults import DEFAULT_TIMESTEPS

    parser = argparse.ArgumentParser(
        prog="diffattr",
        description="Which training images made a diffusion model produce this image?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              diffattr demo --out runs/demo
              diffattr train --data digits --out runs/digits --steps 3000
              diffattr generate runs/digits --num 16
            """
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, examples: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        _add_common(p)
        return p

    p = add(
        "demo",
        "train a tiny model on digits, generate, attribute, write the report (defaults: the "
        "digits8 LDS benchmark's settings, 500 training images, 1,600 steps, batch 32; DAS "
        "and pixel cosine)",
        """
        diffattr demo                      # writes runs/demo/report.html
        diffattr demo --out /tmp/demo --steps 1000
        """,
        cmd_demo,
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    _add_data_args(p)
    # The digits8 LDS benchmark's settings, so its measured LDS is the demo's.
    _add_train_args(p, steps=1600)
    p.set_defaults(train_count=500, batch_size=32)
    p.add_argument("--num-targets", type=int, default=16, help="images to generate")
    p.add_argument(
        "--timesteps",
        type=int,
        default=DEFAULT_TIMESTEPS,
        help=f"timesteps per feature (default: {DEFAULT_TIMESTEPS})",
    )

    p = add(
        "train",
        "train a diffusion model (resumes an interrupted run)",
        """
        diffattr train --data digits --out runs/digits
        diffattr train --data ./my_images --size 16 --preset tiny --out runs/mine
        """,
        cmd_train,
    )
    p.add_argument("--out", required=True, help="run directory")
    _add_data_args(p)
    _add_train_args(p)

    p = add(
        "generate",
        "generate images from a trained run, recording seeds and initial noise",
        """
        diffattr generate runs/digits --num 16
        diffattr generate runs/digits --num 8 --seed 100 --sampler ddpm --out runs/digits/ddpm
        diffattr generate runs/art --num 8 --prompt "a painting in the style of Monet"
        """,
        cmd_generate,
    )
    p.add_argument("run", help="run directory made by `diffattr train` or `diffattr finetune`")
    p.add_argument("--num", type=int, default=16, help="number of images (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed+i")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    p.add_argument("--trajectory", action="store_true", help="record x_t along the path")
    p.add_argument("--out", default=None, help="output directory (default: RUN/samples)")
    from diffattr.text2image.cli import add_finetune_parser, add_generate_args

    add_generate_args(p)
    add_finetune_parser(add)

    from diffattr.commands import register

    register(add)
    return parser


def _limit_blas_threads(threads: int) -> None:
    """Hold NumPy/SciPy BLAS to ``threads`` too (spinning BLAS threads on busy cores make
    kernel solves many times slower)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return
    threadpool_limits(limits=threads)


def main(argv: Sequence[str] | None = None) -> int:
    from diffattr.config import apply_config

    def _report(exc: DiffattrError) -> None:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        apply_config(parser, argv)  # --config FILE: option defaults; flags still override
    except DiffattrError as exc:
        if "--debug" in argv:
            raise
        _report(exc)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise DiffattrError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
            _limit_blas_threads(args.threads)
        summary = args.handler(args)
    except DiffattrError as exc:
        if args.debug:
            raise
        _report(exc)
        return 2
    except OSError as exc:  # environment trouble not caught closer to its cause
        if args.debug:
            raise
        from diffattr.errors import storage_error

        where = exc.filename if exc.filename is not None else "a file"
        if exc.errno is not None and exc.errno in _WRITE_ERRNOS:
            _report(storage_error(where, exc))
        else:
            _report(DiffattrError(f"{where}: {exc.strerror or exc}"))
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif not args.quiet:
        for key, value in summary.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = f"{len(value)} entries (--json prints them)"
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
