"""A user's own text-to-image diffusers pipeline (``diffattr import PIPELINE``).

An imported text-to-image run (``"family": "diffusers-text2image"``) refers to a Stable-
Diffusion-style pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) and, when there are some, LoRA adapters as diffusers' training
scripts save them (``pytorch_lora_weights.safetensors``), loaded by diffusers' own
``load_lora_adapter`` exactly as ``pipeline.load_lora_weights`` loads them. With adapters the
features are gradients with respect to the LoRA parameters (the default ``params``); without,
with respect to all of the UNet's weights, or those ``--params`` selects.

Nothing is copied or changed: ``run.json`` records the folders, the scheduler's config (ᾱ_t,
number of timesteps, prediction type: ε, v or x₀) and the sha256 of every weight file, checked
whenever they are loaded; weights are read from safetensors files only unless the user allows
pickle-based ones. LDS and counterfactual evaluations retrain by fine-tuning LoRA adapters of
the imported ones' shape on the base pipeline with ``--train-config``'s settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from diffattr.errors import CheckpointError, ConfigError, DiffattrError
from diffattr.families.imported import check_weights, fingerprint_files, refuse_pickle
from diffattr.families.text2image import TextToImageFamily
from diffattr.families.weights import ImportedWeights
from diffattr.run import RunDir
from diffattr.text2image.lora import load_adapted_unet
from diffattr.text2image.pipeline import Components

TEXT2IMAGE_DIFFUSERS = "diffusers-text2image"
#: File names diffusers' LoRA training scripts save (``save_lora_weights``), preferred first.
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
#: Pipeline parts whose weights the run fingerprints.
WEIGHT_PARTS = ("unet", "vae", "text_encoder")


def find_lora(pipeline: Path, lora: Path | None, allow_pickle: bool) -> Path | None:
    """The LoRA weight file: ``lora`` (a file, or a folder holding one of
    :data:`LORA_WEIGHT_NAMES`), else one in the pipeline folder itself, else None."""
    if lora is not None and not lora.exists():
        raise CheckpointError(f"LoRA weights {lora} do not exist")
    found = lora
    if lora is None or lora.is_dir():
        folder = lora or pipeline
        found = next((folder / n for n in LORA_WEIGHT_NAMES if (folder / n).is_file()), None)
        if found is None and lora is None:
            return None
        if found is None:
            raise CheckpointError(
                f"{folder} holds no LoRA weights ({' or '.join(LORA_WEIGHT_NAMES)})",
                hint="pass --lora FILE: the weights your LoRA training saved",
            )
    refuse_pickle(found, allow_pickle)
    return found


def lora_keys(path: Path) -> list[str]:
    """The tensor names in a LoRA weight file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        return list(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
        raise CheckpointError(f"cannot read LoRA weights {path}: {exc}") from exc


def check_unet_only(path: Path) -> None:
    """A :class:`ConfigError` for LoRA weights that also adapt the text encoder."""
    keys = lora_keys(path)
    text = [k for k in keys if k.startswith(("text_encoder", "lora_te"))]
    if text:
        raise ConfigError(
            f"{path} also adapts the text encoder ({text[0]}); diffattr attributes UNet "
            "adapters only",
            hint="export the UNet's LoRA weights alone (save_lora_weights(unet_lora_layers=…))",
        )
    if not keys:
        raise CheckpointError(f"{path} holds no tensors")


def vae_factor(vae_dir: Path) -> int:
    """Pixels per latent cell of the VAE in ``vae_dir``: 2^(levels − 1)."""
    path = vae_dir / "config.json"
    try:
        levels = len(json.loads(path.read_text())["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the VAE's config {path}: {exc}") from exc
    return 2 ** (levels - 1)


def part_fingerprints(pipeline: Path, lora: Path | None, allow_pickle: bool) -> dict[str, str]:
    """sha256 of each weight-holding part's files (and of the LoRA file)."""
    out = {p: fingerprint_files(check_weights(pipeline / p, allow_pickle)) for p in WEIGHT_PARTS}
    if lora is not None:
        out["lora"] = fingerprint_files([lora])
    return out


class ImportedPipeline(ImportedWeights):
    """A user's own text-to-image pipeline (module docstring): its folder, adapters and
    scheduler recorded at import, every weight file's fingerprint checked on load."""

    def base(self, run: RunDir, family: Any = None) -> Path:
        return Path(self.source(run)["pipeline"])

    def resolution(self, run: RunDir, family: Any = None) -> int:
        return int(self.source(run)["resolution"])

    def lora(self, run: RunDir) -> Path | None:
        lora = self.source(run).get("lora")
        return None if lora is None else Path(lora)

    def adapted(self, run: RunDir) -> bool:
        return self.lora(run) is not None

    def model_dir(self, run: RunDir) -> Path:
        """The imported LoRA file (what the family's ``load_trained`` reads as the run's own
        model), or the UNet's folder when there are no adapters."""
        return self.lora(run) or self.base(run) / "unet"

    def verify(self, run: RunDir) -> None:
        src = self.source(run)
        now = part_fingerprints(self.base(run), self.lora(run), self.allow_pickle(run))
        changed = [part for part, fp in now.items() if src["fingerprints"].get(part) != fp]
        if changed:
            where = self.lora(run) if changed[0] == "lora" else self.base(run) / changed[0]
            raise CheckpointError(
                f"the weights in {where} changed since {run.path} was imported",
                hint="import the model again into a new run directory",
            )

    def components(self, run: RunDir, family: Any, unet: bool) -> Components:
        from diffattr.text2image.pipeline import load_components

        self.verify(run)
        comps = load_components(
            self.base(run), unet=False, schedule=family.schedule(run),
            safetensors_only=not self.allow_pickle(run),
        )  # fmt: skip
        return replace(comps, unet=self.model(run, family, verified=True)) if unet else comps

    def model(self, run: RunDir, family: Any, verified: bool = False) -> torch.nn.Module:
        """The pipeline's UNet, with the imported LoRA adapters when there are some."""
        if not verified:
            self.verify(run)
        return load_adapted_unet(self.base(run), self.lora(run), self.allow_pickle(run))


def text2image_diffusers_family() -> TextToImageFamily:
    """The family of imported text-to-image pipelines (``"family": "diffusers-text2image"``)."""
    return TextToImageFamily(TEXT2IMAGE_DIFFUSERS, ImportedPipeline())


def import_text2image(
    pipeline: str | Path,
    run_dir: str | Path,
    spec: Any,
    lora: str | Path | None = None,
    resolution: int | None = None,
    scheduler: str | Path | None = None,
    train_config: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> RunDir:
    """Make ``run_dir`` an imported run of the text-to-image pipeline in ``pipeline`` on
    ``spec``'s captioned images (resized to ``resolution``, by default the pipeline's own:
    the UNet's sample size times the VAE's factor); ``scheduler``: the scheduler's folder when
    not the pipeline's own.

    Checks the weights (safetensors unless ``allow_pickle``), that the LoRA weights adapt the
    UNet only, that the scheduler's process is one diffattr follows, and that the images
    have captions; records the folders, the scheduler config and the weights' fingerprints.
    ``train_config``: ``diffattr finetune``'s settings for retraining (needs adapters).
    """
    from diffattr.families.imported import read_scheduler_config
    from diffattr.fsio import ensure_writable_dir
    from diffattr.text2image.latents import require_captions
    from diffattr.text2image.pipeline import check_pipeline_dir, schedule_from_config

    pipeline = check_pipeline_dir(Path(pipeline).expanduser().resolve())
    lora_file = find_lora(pipeline, None if lora is None else Path(lora).expanduser(), allow_pickle)
    lora_file = None if lora_file is None else lora_file.resolve()
    if lora_file is not None:
        check_unet_only(lora_file)
    fingerprints = part_fingerprints(pipeline, lora_file, allow_pickle)
    scheduler = Path(scheduler).expanduser().resolve() if scheduler else pipeline / "scheduler"
    cfg = read_scheduler_config(scheduler)
    schedule = schedule_from_config(cfg)
    unet = load_adapted_unet(pipeline, lora_file, allow_pickle)
    factor = vae_factor(pipeline / "vae")
    if None not in (spec.size, resolution) and spec.size != resolution:
        raise ConfigError("text-to-image runs resize images to --resolution; drop --size")
    resolution = int(resolution or spec.size or unet.config.sample_size * factor)
    if resolution < factor or resolution % factor:
        raise ConfigError(
            f"--resolution {resolution} is not a positive multiple of the VAE's factor {factor}"
        )
    spec, train_set, _ = replace(spec, size=resolution).resolve()
    require_captions(train_set)
    retrain = None
    if train_config is not None:
        if lora_file is None:
            raise ConfigError(
                "--train-config: retraining fine-tunes LoRA adapters, and this pipeline has none",
                hint="import the pipeline with its LoRA weights (--lora FILE), or evaluate "
                "without LDS and counterfactual retraining",
            )
        retrain = retrain_settings(train_config, pipeline, unet, resolution, schedule)
    if (Path(run_dir) / "run.json").is_file():
        raise DiffattrError(
            f"{run_dir} already holds a run", hint="import into a new --out directory"
        )
    run = RunDir(ensure_writable_dir(run_dir))
    run.update("family", TEXT2IMAGE_DIFFUSERS)
    run.update("data", asdict(spec))
    run.update("source", {
        "pipeline": str(pipeline),
        "lora": None if lora_file is None else str(lora_file),
        "resolution": resolution,
        "scheduler": str(scheduler),
        "scheduler_config": cfg,
        "fingerprints": fingerprints,
        "allow_pickle": bool(allow_pickle),
    })  # fmt: skip
    if retrain is not None:
        run.update("train", retrain.to_dict())
    return run


def retrain_settings(
    given: dict[str, Any], pipeline: Path, unet: torch.nn.Module, resolution: int, schedule: Any
) -> Any:
    """``diffattr finetune``'s settings from a ``--train-config`` mapping: the base is the
    imported pipeline, the resolution and noise process the run's, and the adapters' rank,
    scale and target modules default to the imported adapters'."""
    from dataclasses import fields

    from diffattr.text2image.training import LoraTrainConfig

    adapter = unet.peft_config["default"]
    targets = adapter.target_modules
    if isinstance(targets, str):  # a pattern, not module names: the user names them
        targets = given.get("lora_targets", given.get("lora-targets"))
        if targets is None:
            raise ConfigError(
                "--train-config: the imported adapters name their modules by a pattern",
                hint="give lora_targets: the module names that get adapters",
            )
    settings = {str(k).replace("-", "_"): v for k, v in given.items()}
    fixed = {"preset", "schedule", "resolution", "ema_decay"}
    known = {f.name for f in fields(LoraTrainConfig)} - fixed
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"--train-config: {unknown[0]!r} is not a fine-tuning setting",
            hint=f"use {', '.join(sorted(known))} (the base, resolution and noise schedule "
            "are the imported pipeline's)",
        )
    defaults = {
        "lora_rank": int(adapter.r),
        "lora_alpha": float(adapter.lora_alpha),
        "lora_targets": sorted(targets),
    }
    try:
        config = LoraTrainConfig(**{
            **defaults, **settings, "preset": str(pipeline), "resolution": resolution,
            "schedule": schedule,
        })  # fmt: skip
    except TypeError as exc:
        raise ConfigError(f"--train-config: {exc}") from None
    config.validate()
    return config
