"""LoRA fine-tuning of a text-to-image UNet on captioned latents; seeded and resumable.

Loss per step: mean over the batch of ‖ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, h(c)) − ε‖² / d, with θ the
LoRA parameters only (the base UNet, VAE and text encoder stay frozen). Randomness follows
:mod:`diffattr.diffusion.training` (common random numbers): the LoRA initialisation is keyed by
the seed, batches by (seed, epoch), a sample's timestep and noise by (seed, sample id, visit).
Two fine-tunings with one seed on different subsets differ only through their data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.diffusion.training import Recipe, TrainConfig, TrainState, fit, optimizer_state
from diffattr.errors import CheckpointError, DataError
from diffattr.text2image.latents import LatentSet
from diffattr.text2image.lora import DEFAULT_TARGETS, LoraSpec, attach_lora, load_lora, save_lora


@dataclass
class LoraTrainConfig(TrainConfig):
    """:class:`TrainConfig` of a LoRA fine-tuning; ``preset`` is the base pipeline folder and
    ``schedule`` its training schedule. No EMA (``ema_decay`` is ignored)."""

    preset: str = ""
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 0
    ema_decay: float = 0.0
    resolution: int = 512
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)

    def lora(self) -> LoraSpec:
        return LoraSpec(self.lora_rank, self.lora_alpha, tuple(self.lora_targets))

    def validate(self) -> None:
        super().validate()
        self.lora().validate()
        if self.resolution < 1:
            raise DataError(f"--resolution must be positive, got {self.resolution}")


def base_unet(config: LoraTrainConfig) -> torch.nn.Module:
    """The base pipeline's UNet with fresh LoRA adapters (initialisation keyed by the seed)."""
    from diffusers import UNet2DConditionModel

    from diffattr.text2image.pipeline import check_pipeline_dir

    path = check_pipeline_dir(config.preset) / "unet"
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=False
        ).float()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the base UNet from {path}: {exc}") from exc
    return attach_lora(unet, config.lora(), config.stream_seed())


def load_finetuned(config: LoraTrainConfig, model_dir: str | Path) -> torch.nn.Module:
    """The base UNet with the fine-tuned LoRA weights of ``model_dir`` (eval mode)."""
    return load_lora(base_unet(config), model_dir).eval()


class LoraRecipe(Recipe):
    """LoRA adapters on the base pipeline's UNet (no EMA); :func:`fit` trains them."""

    desc = "fine-tune LoRA"
    log_every = 10
    final_file = "lora.safetensors"

    def __init__(self, config: LoraTrainConfig) -> None:
        self.config = config

    def new_state(self) -> TrainState:
        unet = base_unet(self.config)
        return optimizer_state(unet, self.config, [p for p in unet.parameters() if p.requires_grad])

    def save_weights(self, state: TrainState, directory: Path) -> None:
        save_lora(state.model, directory / "model")

    def load_weights(self, state: TrainState, directory: Path) -> None:
        load_lora(state.model, directory / "model")

    def save_final(self, state: TrainState, directory: Path) -> torch.nn.Module:
        save_lora(state.model, directory)
        return state.model


def finetune(
    latents: LatentSet,
    config: LoraTrainConfig,
    out_dir: str | Path,
    subset: np.ndarray | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Fine-tune LoRA on ``latents`` (or its rows ``subset``) into ``out_dir``; resumable
    (:func:`~diffattr.diffusion.training.fit`): checkpoints hold the LoRA weights and the
    optimizer, the final LoRA weights go to ``out_dir/model/lora.safetensors``."""
    return fit(latents, config, out_dir, LoraRecipe(config), subset, progress, stop_after)
