"""The text-to-image model family of a run directory: what the commands dispatch to.

A text-to-image run (``run.json`` ``"family": "text2image"``, made by ``diffattr finetune``)
holds LoRA weights in ``RUN/model/lora.safetensors`` on top of a base pipeline folder
(``train.preset``: a local Stable Diffusion snapshot, or ``RUN/base`` for ``--base tiny``),
the cached latents and caption embeddings of its data in ``RUN/latents/``, and the usual
``samples/``, ``features/``, ``scores/``. Attribution works in latent space: training samples
are (z₀, h(caption)), targets are (final latent, h(prompt)); features are gradients of the
engine's measures of the conditional UNet output with respect to the LoRA parameters only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.errors import ConfigError, DataError, DiffattrError
from diffattr.run import TEXT2IMAGE, RunDir
from diffattr.text2image.latents import LatentSet, encode_dataset
from diffattr.text2image.lora import LORA_PARAMS
from diffattr.text2image.pipeline import Components, encode_prompts, load_components

#: Methods that need more than the run's final model and its features.
UNSUPPORTED = ("tracin", "gas", "journey-trak", "ensemble", "ekfac", "combine")


def components(run: RunDir, unet: bool = False) -> Components:
    """The run's base pipeline (without its UNet unless asked: encoding only)."""
    return load_components(run.train_config().preset, unet=unet)


def latents_path(run: RunDir, comps: Components | None = None) -> Path:
    """The cache file of the run's training latents (encoded now if missing)."""
    from diffattr.text2image.latents import cache_key

    comps = comps or components(run)
    train_set, _ = run.data_spec().load()
    path = run.path / "latents" / f"{cache_key(train_set, comps)}.npz"
    if not path.is_file():
        encode_dataset(train_set, comps, run.path / "latents")
    return path


def train_latents(run: RunDir, comps: Components | None = None) -> LatentSet:
    """The run's training set in latent space (cached in ``RUN/latents``)."""
    from diffattr.text2image.latents import load_latents

    return load_latents(latents_path(run, comps), "train")


def attribution_model(run: RunDir) -> torch.nn.Module:
    """Base UNet + the run's fine-tuned LoRA weights."""
    from diffattr.text2image.training import load_finetuned

    if not (run.model_dir / "lora.safetensors").is_file():
        raise DiffattrError(
            f"{run.path} has no fine-tuned LoRA weights (model/lora.safetensors)",
            hint=f"finish the fine-tuning: rerun `diffattr finetune ... --out {run.path}`",
        )
    return load_finetuned(run.train_config(), run.model_dir)


def attribution_inputs(run: RunDir, settings) -> tuple[torch.nn.Module, LatentSet, Any]:
    """(model, training latents, feature settings) of a text-to-image run; ``settings``
    differentiate the LoRA parameters unless ``--params`` says otherwise."""
    if settings.params is None:
        settings = replace(settings, params=LORA_PARAMS)
    return attribution_model(run), train_latents(run), settings


def check_method(method: str) -> None:
    if method in UNSUPPORTED:
        raise ConfigError(
            f"{method} is not available for text-to-image runs",
            hint="use das, dtrak, trak, relative-if, renormalized-if, grad-dot, grad-cos, "
            "pixel-dot, pixel-cos (latents) or random",
        )


def prompt_targets(comps: Components, prompts: list[str], latents: torch.Tensor) -> LatentSet:
    return LatentSet(
        latents.float(),
        torch.arange(len(prompts), dtype=torch.int64),
        list(prompts),
        encode_prompts(comps, list(prompts)),
        "targets",
    )


def attribution_targets(run: RunDir, spec: str) -> tuple[str, LatentSet, np.ndarray]:
    """(name, targets in latent space with their caption embeddings, ids) for ``spec``:
    ``samples`` (generated: final latents and prompts), ``val`` or a samples ``.npz``."""
    from diffattr.text2image.sampling import load_text_samples

    comps = components(run)
    if spec == "val":
        _, val = run.data_spec().load()
        lat = encode_dataset(val, comps, run.path / "latents")
        lat.name = "val"
        return "val", lat, val.ids.numpy()
    path = run.samples_dir / "samples.npz" if spec == "samples" else Path(spec)
    if not path.is_file():
        if spec == "samples":
            raise DiffattrError(
                f"no generated samples in {run.samples_dir}",
                hint=f"run `diffattr generate {run.path}` first",
            )
        raise DataError(f"targets {spec!r} are neither 'samples', 'val' nor a file")
    s = load_text_samples(path)
    name = "samples" if spec == "samples" else path.stem
    return name, prompt_targets(comps, s.prompts, s.latents), np.arange(len(s))


# ---------------------------------------------------------------------------- commands


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.diffusion.training import checkpoints
    from diffattr.fsio import ensure_writable_dir, removed_on_error
    from diffattr.run import DataSpec
    from diffattr.text2image.pipeline import (
        check_pipeline_dir,
        read_schedule,
        write_tiny_pipeline,
    )
    from diffattr.text2image.training import LoraTrainConfig, finetune

    if args.size is not None and args.size != args.resolution:
        raise ConfigError("text-to-image runs resize images to --resolution; drop --size")
    spec = DataSpec(
        data=args.data,
        size=args.resolution,
        mismatch=args.mismatch,
        val_count=args.val_count,
        train_count=args.train_count,
        split_seed=args.split_seed,
    )
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    probe = LoraTrainConfig(
        preset=args.base, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, checkpoint_every=args.checkpoint_every, resolution=args.resolution,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets,
    )  # fmt: skip
    probe.validate()  # bad options, a missing base and bad data fail before --out is made
    if args.base != "tiny":
        check_pipeline_dir(args.base)
    train_set, _ = spec.load()
    from diffattr.text2image.latents import require_captions

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


def generation_prompts(args: argparse.Namespace, run: RunDir) -> list[str]:
    """``--prompt`` (repeatable) or ``--prompts FILE`` (one a line), cycled over ``--num``
    images; by default the run's distinct training captions."""
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            text = Path(args.prompts).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read prompts file {args.prompts}: {exc}") from exc
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        train_set, _ = run.data_spec().load()
        prompts = sorted(set(train_set.captions or []))
    if not prompts:
        raise ConfigError("no prompts", hint="pass --prompt TEXT or --prompts FILE")
    return [prompts[i % len(prompts)] for i in range(args.num)]


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.diffusion.presets import model_fingerprint
    from diffattr.text2image.sampling import generate, save_text_samples

    run = RunDir(args.run)
    if args.sampler != "ddim" or args.trajectory:
        raise ConfigError("text-to-image runs sample with DDIM only (no --trajectory)")
    if args.seed < 0 or args.num < 1:
        raise ConfigError("--seed must be non-negative and --num at least 1")
    prompts = generation_prompts(args, run)
    unet = attribution_model(run)
    comps = components(run)
    result = generate(
        comps, unet, prompts, np.arange(args.seed, args.seed + args.num),
        run.train_config().resolution, num_steps=args.steps,
        guidance_scale=args.guidance_scale, progress=not args.quiet,
    )  # fmt: skip
    out = Path(args.out) if args.out else run.samples_dir
    path = save_text_samples(result, out, model_fingerprint(unet))
    return {"samples": str(path), "grid": str(out / "grid.png"), "num": len(result)}
