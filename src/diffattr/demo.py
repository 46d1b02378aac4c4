"""The demo: train a tiny model on digits, generate, attribute with DAS (the default) and pixel
cosine (the baseline a copy check starts from), report.

Its training settings are the digits8 LDS benchmark's (500 images, 1,600 steps, batch 32), so
the LDS measured there is what the demo's DAS attains (``benchmarks/README.md``)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.fsio import atomic_write_json, ensure_writable_dir

#: The methods the demo attributes with.
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
    write the report; a summary with the report's path and the sample quality."""
    from diffattr.attribution.featurize import FeatureSettings
    from diffattr.commands.attribute import score_run, write_run_report
    from diffattr.diffusion.presets import load_unet, model_fingerprint
    from diffattr.diffusion.sampling import sample, save_samples
    from diffattr.diffusion.training import train
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
