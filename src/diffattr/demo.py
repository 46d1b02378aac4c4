"""The demo: train a tiny model on digits, generate, attribute with DAS (the default) and pixel
cosine (the baseline a copy check starts from), report.

Its training settings are the digits8 LDS benchmark's (500 images, 1,600 steps, batch 32), so
the LDS measured there is what the demo's DAS attains (``benchmarks/README.md``)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from diffattr.fsio import atomic_write_json, ensure_writable_dir


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.gradients import resolve_device
    from diffattr.cli import _data_spec, _train_config
    from diffattr.commands import cmd_report, cmd_score
    from diffattr.diffusion.presets import load_unet, model_fingerprint
    from diffattr.diffusion.sampling import sample, save_samples
    from diffattr.diffusion.training import train
    from diffattr.quality import quality_report
    from diffattr.run import RunDir

    t0 = time.time()
    device = resolve_device(getattr(args, "device", "cpu"))
    run = RunDir(ensure_writable_dir(args.out))
    spec, config = _data_spec(args), _train_config(args)
    train_set, val_set = spec.load()
    run.start(spec, config)
    say = (lambda *a: None) if args.quiet else print
    say(f"[1/4] training the {config.preset} model on {len(train_set)} {spec.data} images")
    train(train_set, config, run.path, progress=not args.quiet, device=device)
    model = load_unet(run.model_dir)
    say(f"[2/4] generating {args.num_targets} images")
    samples = sample(model, np.arange(args.num_targets), config.schedule, progress=not args.quiet)
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
    score_args = argparse.Namespace(
        **{
            **vars(args),
            "run": str(run.path),
            "method": "das,pixel-cos",
            "targets": "samples",
            "k": 10,
            "lam": None,
            "relative_lambda": None,
            "effective_dim": None,
            "residual": "error",
            "leverage": False,
            "squared": False,
            "timestep_strategy": "uniform",
            "no_normalize": False,
            "noise_seed": 0,
            "params": None,
            "projector": "auto",
            "proj_dim": None,
            "proj_seed": 0,
            "batch_size": 32,
        }
    )
    cmd_score(score_args)
    say("[4/4] writing the report")
    score_args.out = None
    report = cmd_report(score_args)["report"]
    return {
        "report": report,
        "samples": str(run.samples_dir / "grid.png"),
        "quality": quality,
        "seconds": round(time.time() - t0, 1),
    }
