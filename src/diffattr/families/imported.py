"""The family of a user's own unconditional diffusers model (``diffattr import``).

An imported run (``"family": "diffusers"``) refers to a model folder it never copies or
changes: a pipeline saved by diffusers (``DDPMPipeline`` / ``DDIMPipeline``: ``unet/``,
``scheduler/``, ``model_index.json``) or a bare ``UNet2DModel`` folder with its scheduler's
folder. ``run.json`` records where the weights are and their sha256 (checked on every load),
the scheduler's config — which decides ᾱ_t, the number of training timesteps and the
prediction type (``epsilon``, ``v_prediction``, ``sample``) — and, when given, the training
settings LDS and counterfactual retraining need (``--train-config``).

Weights are read from safetensors files only, unless the user allows pickle-based ones
(``.bin``, ``.ckpt``, ``.pt``): loading a pickle runs code from whoever wrote it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr.errors import CheckpointError, ConfigError, DataError, DiffattrError
from diffattr.families.pixel import PixelFamily
from diffattr.families.weights import ImportedWeights
from diffattr.run import RunDir

DIFFUSERS = "diffusers"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def weight_files(unet_dir: Path) -> list[Path]:
    """The weight files of a diffusers model folder, sorted."""
    return sorted(p for p in unet_dir.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))


def check_weights(unet_dir: Path, allow_pickle: bool) -> list[Path]:
    """The folder's weight files; a :class:`CheckpointError` naming a pickle-based one unless
    ``allow_pickle``, or when there are none."""
    files = weight_files(unet_dir)
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not files:
        raise CheckpointError(f"{unet_dir} holds no model weights (.safetensors)")
    if not safe:
        refuse_pickle(pickled[0], allow_pickle)
    return safe or pickled


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """A :class:`CheckpointError` for a pickle-based weight file unless ``allow_pickle``."""
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle-based weight file: loading it runs code from whoever wrote it",
            hint="convert it to safetensors, or pass --allow-pickle if you trust its source",
        )


def fingerprint_files(files: list[Path]) -> str:
    """sha256 over the names and bytes of ``files`` (computed once per process while no
    file's size or modification time changes)."""
    stats = [(p, p.stat()) for p in files]
    return _fingerprint(tuple((str(p.resolve()), s.st_size, s.st_mtime_ns) for p, s in stats))


@functools.lru_cache(maxsize=64)
def _fingerprint(stamp: tuple[tuple[str, int, int], ...]) -> str:
    files = [Path(name) for name, _, _ in stamp]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_scheduler_config(scheduler_dir: Path) -> dict[str, Any]:
    """``scheduler_config.json`` of a scheduler folder; an error when it has none."""
    from diffattr.text2image.pipeline import read_scheduler_config as read

    cfg = read(scheduler_dir)
    if cfg is None:
        raise DiffattrError(
            f"no scheduler config in {scheduler_dir} (scheduler_config.json missing)",
            hint="pass --scheduler DIR: the folder of the scheduler the model was trained with",
        )
    return cfg


def is_text2image_pipeline(model_dir: Path) -> bool:
    """Whether ``model_dir`` is a pipeline folder with a VAE or a text encoder (named in its
    ``model_index.json`` or present as subfolders)."""
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return False
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {index}: {exc}") from exc
    parts = {"text_encoder", "vae"}
    return bool(parts & set(data)) or any((model_dir / p).is_dir() for p in parts)


def locate(model_dir: Path, scheduler_dir: Path | None) -> tuple[Path, Path]:
    """(UNet folder, scheduler folder) of a pipeline folder or a bare UNet folder."""
    if not model_dir.is_dir():
        raise DiffattrError(f"model folder {model_dir} does not exist")
    if (model_dir / "model_index.json").is_file():
        if is_text2image_pipeline(model_dir):
            raise ConfigError(
                f"{model_dir} is a text-to-image pipeline",
                hint="import it with import_text2image (diffattr.families.imported_text2image), "
                "as `diffattr import` does",
            )
        unet, scheduler = model_dir / "unet", scheduler_dir or model_dir / "scheduler"
    elif (model_dir / "config.json").is_file():
        if scheduler_dir is None:
            raise ConfigError(
                f"{model_dir} is a bare model folder: its noise schedule is not there",
                hint="pass --scheduler DIR (a folder with scheduler_config.json)",
            )
        unet, scheduler = model_dir, scheduler_dir
    else:
        raise DiffattrError(
            f"{model_dir} is neither a diffusers pipeline (model_index.json) nor a model folder "
            "(config.json)"
        )
    return unet, scheduler


class ImportedUNet(ImportedWeights):
    """A user's own unconditional diffusers model (module docstring): the UNet folder and its
    scheduler recorded at import, the weights' fingerprint checked on every load, sampled as
    its own pipeline samples."""

    def model_dir(self, run: RunDir) -> Path:
        return Path(self.source(run)["unet"])

    def model(self, run: RunDir) -> torch.nn.Module:
        src, unet = self.source(run), self.model_dir(run)
        files = check_weights(unet, self.allow_pickle(run))
        if fingerprint_files(files) != src["fingerprint"]:
            raise CheckpointError(
                f"the weights in {unet} changed since {run.path} was imported",
                hint="import the model again into a new run directory",
            )
        return load_model(unet, self.allow_pickle(run))

    def sample(
        self, model: torch.nn.Module, schedule: Any, seeds: Any, sampler: str = "ddim",
        num_steps: int = 50, trajectory: bool = False, progress: bool = True,
        alone: bool = False,
    ) -> Any:  # fmt: skip
        """The pipeline's images (its own scheduler, not ``sampler``), each generated alone."""
        if trajectory:
            raise ConfigError("imported models sample with their own scheduler (no --trajectory)")
        return pipeline_samples(model, schedule, seeds, num_steps, progress)


def diffusers_family() -> PixelFamily:
    """The family of imported unconditional diffusers models (``"family": "diffusers"``)."""
    return PixelFamily(DIFFUSERS, ImportedUNet())


def load_model(unet: Path, allow_pickle: bool = False) -> torch.nn.Module:
    """The ``UNet2DModel`` in folder ``unet`` (safetensors only unless ``allow_pickle``)."""
    from diffusers import UNet2DModel

    try:
        model = UNet2DModel.from_pretrained(
            unet, local_files_only=True, low_cpu_mem_usage=False,
            use_safetensors=None if allow_pickle else True,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the model in {unet}: {exc}") from exc
    return model.eval()


def pipeline_samples(
    model: torch.nn.Module, schedule: Any, seeds: Any, num_steps: int, progress: bool = True
) -> Any:
    """Images of the model's pipeline (``DDPMPipeline`` or ``DDIMPipeline``, by its own
    scheduler) with ``num_steps`` steps, one per seed, each generated alone from
    ``torch.Generator().manual_seed(seed)`` — what the pipeline gives for that generator;
    [-1, 1] ``Samples``."""
    from diffusers import DDIMPipeline, DDPMPipeline

    from diffattr.diffusion.sampling import Samples

    scheduler = schedule.scheduler("pipeline")
    pipelines = {"DDPMScheduler": DDPMPipeline, "DDIMScheduler": DDIMPipeline}
    kind = type(scheduler).__name__
    if kind not in pipelines:
        raise ConfigError(
            f"diffattr generates with DDPM or DDIM schedulers; this model's is {kind}",
            hint="attribute images you generated yourself: `diffattr score RUN --targets DIR`",
        )
    pipe = pipelines[kind](unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    images, noise = [], []
    for seed in tqdm(list(seeds), desc="generate (pipeline)", disable=not progress, unit="img"):
        noise.append(torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))))
        pixels = pipe(
            batch_size=1, generator=torch.Generator().manual_seed(int(seed)),
            num_inference_steps=num_steps, output_type="np",
        ).images[0]  # fmt: skip
        images.append(torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1)
    return Samples(
        images=torch.stack(images).float(), seeds=np.asarray(list(seeds), dtype=np.int64),
        initial_noise=torch.stack(noise), sampler="pipeline", num_steps=int(num_steps),
        timesteps=scheduler.timesteps.numpy().copy(),
    )  # fmt: skip


def import_model(
    model_dir: str | Path,
    run_dir: str | Path,
    spec: Any,
    scheduler_dir: str | Path | None = None,
    train_config: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> RunDir:
    """Make ``run_dir`` an imported run of the model in ``model_dir`` on ``spec``'s data.

    Checks the weights (safetensors unless ``allow_pickle``), that the scheduler's process is
    one diffattr follows exactly, and that the model takes the data's images; records the
    folders and the weights' fingerprint. ``train_config``: ``diffattr train``'s settings
    (the preset defaults to the imported UNet's architecture, the schedule to its own).
    """
    from diffattr.diffusion.schedule import NoiseSchedule
    from diffattr.families.pixel import check_model_fits
    from diffattr.fsio import ensure_writable_dir

    unet, scheduler = locate(Path(model_dir).expanduser().resolve(), scheduler_dir)
    scheduler = Path(scheduler).expanduser().resolve()
    files = check_weights(unet, allow_pickle)
    cfg = read_scheduler_config(scheduler)
    schedule = NoiseSchedule.from_scheduler_config(cfg)  # refuses what it cannot follow
    spec, train_set, _ = spec.resolve()
    model = load_model(unet, allow_pickle)
    try:
        check_model_fits(model, train_set.shape, unet)
    except CheckpointError as exc:
        hint = f"resize the data to the model's size: --size {model.config.sample_size}"
        raise DataError(str(exc), hint=hint) from None
    if train_config is not None:
        retrain_settings(train_config, unet, schedule)  # bad settings fail before --out
    if (Path(run_dir) / "run.json").is_file():
        raise DiffattrError(
            f"{run_dir} already holds a run", hint="import into a new --out directory"
        )
    run = RunDir(ensure_writable_dir(run_dir))
    source = {
        "unet": str(unet),
        "scheduler": str(scheduler),
        "scheduler_config": cfg,
        "fingerprint": fingerprint_files(files),
        "weights": [p.name for p in files],
        "allow_pickle": bool(allow_pickle),
    }
    from dataclasses import asdict

    run.update("family", DIFFUSERS)
    run.update("data", asdict(spec))
    run.update("source", source)
    if train_config is not None:
        run.update("train", retrain_settings(train_config, unet, schedule).to_dict())
    return run


def retrain_settings(given: dict[str, Any], unet: Path, schedule: Any) -> Any:
    """``diffattr train``'s settings from a ``--train-config`` mapping: the architecture is the
    imported UNet's (``preset``), the noise process its scheduler's."""
    from dataclasses import fields

    from diffattr.diffusion.training import TrainConfig

    settings = {str(k).replace("-", "_"): v for k, v in given.items()}
    known = {f.name for f in fields(TrainConfig)} - {"schedule"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"--train-config: {unknown[0]!r} is not a training setting",
            hint=f"use {', '.join(sorted(known))} (the noise schedule is the model's own)",
        )
    try:
        config = TrainConfig(**{"preset": str(unet), **settings, "schedule": schedule})
    except TypeError as exc:
        raise ConfigError(f"--train-config: {exc}") from None
    config.validate()
    return config
