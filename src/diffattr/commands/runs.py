"""Commands that make or extend a run: ``demo``, ``train``, ``finetune``, ``generate``."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.commands.options import add_data_args, add_train_args, data_spec, train_config
from diffattr.errors import ConfigError, DataError, DiffattrError


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.features.gradients import resolve_device
    from diffattr.diffusion.training import checkpoints, train
    from diffattr.fsio import ensure_writable_dir, removed_on_error
    from diffattr.run import RunDir

    config = train_config(args)
    config.validate()  # bad options and data fail before --out is created
    device = resolve_device(args.device)
    spec, train_set, _ = data_spec(args).resolve()
    with removed_on_error(args.out, keep=lambda p: bool(checkpoints(p))):
        run = RunDir(ensure_writable_dir(args.out))
        run.start(spec, config)
        t0 = time.time()
        model_dir = train(train_set, config, run.path, progress=not args.quiet, device=device)
    return {"model": str(model_dir), "num_train": len(train_set), "seconds": time.time() - t0}


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.diffusion.training import checkpoints
    from diffattr.families.text2image import components, train_latents
    from diffattr.fsio import ensure_writable_dir, removed_on_error
    from diffattr.run import TEXT2IMAGE, RunDir
    from diffattr.text2image.latents import require_captions
    from diffattr.text2image.pipeline import check_pipeline_dir, read_schedule, write_tiny_pipeline
    from diffattr.text2image.training import LoraTrainConfig, finetune

    if args.size is not None and args.size != args.resolution:
        raise ConfigError("text-to-image runs resize images to --resolution; drop --size")
    spec = data_spec(args, size=args.resolution)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    probe = LoraTrainConfig(
        preset=args.base, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, checkpoint_every=args.checkpoint_every, resolution=args.resolution,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets,
    )  # fmt: skip
    probe.validate()  # bad options, a missing base and bad data fail before --out is made
    if args.base != "tiny":
        check_pipeline_dir(args.base)
    spec, train_set, _ = spec.resolve()
    require_captions(train_set)
    with removed_on_error(args.out, keep=lambda p: bool(checkpoints(p))):
        run = RunDir(ensure_writable_dir(args.out))
        if args.base == "tiny":
            base = run.path / "base"
            if not (base / "unet").is_dir():
                write_tiny_pipeline(base, seed=0, sample_size=max(1, args.resolution // 2))
        else:
            base = Path(args.base).expanduser()
        config = replace(probe, preset=str(base.resolve()), schedule=read_schedule(base))
        run.start(spec, config, TEXT2IMAGE)
        comps = components(run)
        comps.latent_shape(args.resolution)  # resolution fits the VAE
        latents = train_latents(run, comps)
        t0 = time.time()
        model_dir = finetune(latents, config, run.path, progress=not args.quiet)
    return {"model": str(model_dir), "num_train": len(latents), "seconds": time.time() - t0}


def given_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` (repeatable) and the lines of ``--prompts FILE``."""
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            text = Path(args.prompts).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read prompts file {args.prompts}: {exc}") from exc
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.families import family_of
    from diffattr.run import RunDir

    if args.seed < 0:
        raise DiffattrError(f"--seed must be non-negative, got {args.seed}")
    if args.steps < 1:
        raise DiffattrError(f"--steps must be at least 1, got {args.steps}")
    if args.num < 1:
        raise DiffattrError(f"--num must be at least 1, got {args.num}")
    run = RunDir(args.run)
    out = Path(args.out) if args.out else run.samples_dir
    path = family_of(run).generate(
        run, np.arange(args.seed, args.seed + args.num), out, sampler=args.sampler,
        num_steps=args.steps, trajectory=args.trajectory, prompts=given_prompts(args),
        guidance_scale=args.guidance_scale, progress=not args.quiet,
    )  # fmt: skip
    return {"samples": str(path), "grid": str(out / "grid.png"), "num": args.num}


def cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.config import load_file
    from diffattr.families.imported import import_model, is_text2image_pipeline
    from diffattr.families.imported_text2image import import_text2image

    given = load_file(args.train_config) if args.train_config else None
    model = Path(args.model).expanduser()
    if is_text2image_pipeline(model):
        run = import_text2image(
            model, args.out, data_spec(args), args.lora, args.resolution, args.scheduler,
            given, args.allow_pickle,
        )  # fmt: skip
        source = run.manifest()["source"]
        return {"run": str(run.path), "model": source["pipeline"], "lora": source["lora"],
                "fingerprints": source["fingerprints"]}  # fmt: skip
    for option in ("lora", "resolution"):
        if getattr(args, option) is not None:
            raise ConfigError(
                f"--{option} is for text-to-image pipelines; {model} is an unconditional model"
            )
    run = import_model(model, args.out, data_spec(args), args.scheduler, given, args.allow_pickle)
    source = run.manifest()["source"]
    return {"run": str(run.path), "model": source["unet"], "fingerprint": source["fingerprint"]}


#: The methods the demo attributes with: DAS (the default) and pixel cosine (the baseline a
#: copy check starts from).
DEMO_METHODS = [("das", {}), ("pixel-cos", {})]


def run_demo(
    out: str | Path,
    spec: Any,
    config: Any,
    num_targets: int = 16,
    timesteps: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config`` on ``spec``'s data into ``out``, generate ``num_targets`` images,
    score them with :data:`DEMO_METHODS` (default settings, features at ``timesteps``) and
    write the report; a summary with the report's path and the sample quality.

    Its training settings are the digits8 LDS benchmark's (500 images, 1,600 steps, batch 32),
    so the LDS measured there is what the demo's DAS attains (``benchmarks/README.md``)."""
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.commands.attribute import score_run, write_run_report
    from diffattr.diffusion.presets import load_unet, model_fingerprint
    from diffattr.diffusion.sampling import sample, save_samples
    from diffattr.diffusion.training import train
    from diffattr.fsio import atomic_write_json, ensure_writable_dir
    from diffattr.quality import quality_report
    from diffattr.run import RunDir

    t0 = time.time()
    run = RunDir(ensure_writable_dir(out))
    spec, train_set, val_set = spec.resolve()
    run.start(spec, config)
    say = print if progress else (lambda *a: None)
    say(f"[1/4] training the {config.preset} model on {len(train_set)} {spec.data} images")
    train(train_set, config, run.path, progress=progress, device=device)
    model = load_unet(run.model_dir)
    say(f"[2/4] generating {num_targets} images")
    samples = sample(model, np.arange(num_targets), config.schedule, progress=progress)
    save_samples(samples, run.samples_dir, model_fingerprint(model))
    quality = quality_report(
        sample(model, np.arange(1000, 1256), config.schedule, progress=False).images,
        train_set.images,
        val_set.images,
        train_set.labels,
        val_set.labels,
    )
    atomic_write_json(run.path / "quality.json", quality)
    say("[3/4] attributing with DAS and pixel cosine")
    settings = FeatureSettings()
    if timesteps is not None:
        settings = replace(settings, timesteps=timesteps)
    score_run(run, DEMO_METHODS, settings=settings, device=device, progress=progress)
    say("[4/4] writing the report")
    report, _ = write_run_report(run)
    return {
        "report": str(report),
        "samples": str(run.samples_dir / "grid.png"),
        "quality": quality,
        "seconds": round(time.time() - t0, 1),
    }


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.features.gradients import resolve_device

    return run_demo(
        args.out, data_spec(args), train_config(args), args.num_targets, args.timesteps,
        device=resolve_device(args.device), progress=not args.quiet,
    )  # fmt: skip


def register(add) -> None:
    from diffattr.attribution.defaults import DEFAULT_TIMESTEPS
    from diffattr.text2image.lora import DEFAULT_TARGETS

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
    add_data_args(p)
    # The digits8 LDS benchmark's settings, so its measured LDS is the demo's.
    add_train_args(p, steps=1600)
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
    add_data_args(p)
    add_train_args(p)

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
    g = p.add_argument_group("text-to-image runs")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt (repeat for several; cycled over --num; default: the training captions)",
    )
    g.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one a line")
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance w (default 1: the conditional model alone)",
    )

    p = add(
        "import",
        "make a run from a diffusers model folder diffattr did not train (it is never copied "
        "or changed), on the images it was trained on",
        """
        diffattr import ~/models/ddpm-cifar10-32 --data ./cifar-train --out runs/cifar-ddpm
        diffattr import ./my-unet --scheduler ./my-scheduler --data ./imgs --out runs/mine \\
            --train-config train.json
        diffattr import ~/models/stable-diffusion-v1-5 --lora ./my-lora --data ./paintings \\
            --out runs/art
        """,
        cmd_import,
    )
    p.add_argument(
        "model",
        help="a DDPMPipeline/DDIMPipeline folder, a UNet2DModel folder, or a text-to-image "
        "pipeline folder (StableDiffusionPipeline: unet/ vae/ text_encoder/ tokenizer/)",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="DIR",
        help="the scheduler's folder (scheduler_config.json): needed for a bare model folder",
    )
    p.add_argument(
        "--train-config",
        default=None,
        metavar="FILE",
        help="the model's training settings (`diffattr train` options, or `diffattr finetune` "
        "options for a text-to-image pipeline's LoRA, as JSON or TOML): LDS and "
        "counterfactual evaluations retrain with them",
    )
    g = p.add_argument_group("text-to-image pipelines")
    g.add_argument(
        "--lora",
        default=None,
        metavar="PATH",
        help="LoRA weights to attribute (a file, or the folder diffusers' LoRA training wrote: "
        "pytorch_lora_weights.safetensors); default: those in the pipeline folder, if any, "
        "else the UNet's own weights",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels (default: the pipeline's own, the UNet's sample size times "
        "the VAE's factor)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle-based weights (.bin, .ckpt, .pt): this runs code from whoever "
        "wrote the file",
    )
    add_data_args(p)

    p = add(
        "finetune",
        "fine-tune LoRA adapters of a text-to-image pipeline on captioned images "
        "(a text-to-image run; resumes an interrupted one)",
        """
        diffattr finetune --base ~/models/stable-diffusion-v1-5 --data ./paintings \\
            --resolution 512 --lora-rank 4 --steps 2000 --out runs/art
        diffattr finetune --base tiny --data captioned.npz --resolution 16 --steps 200 \\
            --lr 1e-3 --out runs/tiny-t2i
        """,
        cmd_finetune,
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--base",
        required=True,
        help="local pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), or "
        "'tiny' for a small random one built from config",
    )
    add_data_args(p)
    g = p.add_argument_group("LoRA fine-tuning")
    g.add_argument("--resolution", type=int, default=512, help="image side in pixels (512)")
    g.add_argument("--lora-rank", type=int, default=4, help="LoRA rank r (default: 4)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale α (default: r)")
    g.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated UNet module names that get adapters (default: attention projections)",
    )
    g.add_argument("--steps", type=int, default=500, help="training steps (default: 500)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--checkpoint-every", type=int, default=100)
