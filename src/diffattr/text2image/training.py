"""LoRA fine-tuning of a text-to-image UNet on captioned latents; seeded and resumable.

Loss per step: mean over the batch of ‖ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, h(c)) − ε‖² / d, with θ the
LoRA parameters only (the base UNet, VAE and text encoder stay frozen). Randomness follows
:mod:`diffattr.diffusion.training` (common random numbers): the LoRA initialisation is keyed by
the seed, batches by (seed, epoch), a sample's timestep and noise by (seed, sample id, visit).
Two fine-tunings with one seed on different subsets differ only through their data.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffattr.diffusion.presets import model_fingerprint
from diffattr.diffusion.schedule import NoiseSchedule, visit_noise
from diffattr.diffusion.training import (
    BatchStream,
    TrainConfig,
    _check_same_run,
    _lr_lambda,
    checkpoints,
    subset_hash,
)
from diffattr.errors import CheckpointError, DataError
from diffattr.fsio import atomic_directory, atomic_write_json, read_json
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


@dataclass
class _State:
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int


def _new_state(config: LoraTrainConfig) -> _State:
    unet = base_unet(config)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps))
    return _State(unet, optimizer, scheduler, 0)


def _save_checkpoint(state: _State, out_dir: Path, meta: dict[str, Any]) -> None:
    with atomic_directory(out_dir / "checkpoints" / f"step-{state.step:07d}") as tmp:
        save_lora(state.unet, tmp / "model")
        torch.save(
            {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()},
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_text(json.dumps({**meta, "step": state.step}, indent=2))


def _load_checkpoint(path: Path, config: LoraTrainConfig) -> _State:
    state = _new_state(config)
    try:
        load_lora(state.unet, path / "model")
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        state.optimizer.load_state_dict(trainer["optimizer"])
        state.scheduler.load_state_dict(trainer["scheduler"])
        state.step = int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"cannot resume from checkpoint {path}: {exc}",
            hint="delete that checkpoint directory to restart from the previous one",
        ) from exc
    state.unet.train()
    return state


def finetune(
    latents: LatentSet,
    config: LoraTrainConfig,
    out_dir: str | Path,
    subset: np.ndarray | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Fine-tune LoRA on ``latents`` (or its rows ``subset``) into ``out_dir``; resumable.

    Writes ``out_dir/checkpoints/step-N/`` (LoRA weights, optimizer; atomic), the final LoRA
    weights to ``out_dir/model/lora.safetensors`` and the manifest ``out_dir/train.json``.
    A finished run returns at once. Returns the final model directory.
    """
    config.validate()
    out_dir = Path(out_dir)
    positions = np.arange(len(latents)) if subset is None else np.asarray(subset, np.int64)
    if positions.size == 0:
        raise DataError("cannot fine-tune on an empty dataset or subset")
    if positions.min() < 0 or positions.max() >= len(latents):
        raise DataError(f"subset indices out of range for a dataset of {len(latents)} images")
    ids = latents.ids[torch.as_tensor(positions)].numpy()
    meta = {
        "config": config.weights_key(),
        "dataset_fingerprint": latents.fingerprint(),
        "subset_hash": subset_hash(ids),
        "num_train": int(positions.size),
    }
    manifest = out_dir / "train.json"
    if manifest.is_file() and (out_dir / "model" / "lora.safetensors").is_file():
        _check_same_run(read_json(manifest), meta, manifest)
        return out_dir / "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    found = checkpoints(out_dir)
    if found:
        prev = json.loads((found[-1][1] / "state.json").read_text())
        _check_same_run(prev, meta, found[-1][1] / "state.json")
        state = _load_checkpoint(found[-1][1], config)
    else:
        state = _new_state(config)
    schedule, seed = config.schedule, config.stream_seed()
    alphas = schedule.alphas_cumprod()
    stream = BatchStream(positions.size, config.batch_size, seed)
    shape = latents.shape
    t0 = time.time()
    bar = tqdm(total=config.steps, initial=state.step, desc="fine-tune LoRA", unit="step",
               disable=not progress)  # fmt: skip
    done_here = 0
    while state.step < config.steps:
        pos, visits = stream.batch(state.step)
        rows = torch.as_tensor(positions[pos])
        ts, noises = zip(
            *(
                visit_noise(seed, int(i), int(v), shape, schedule.num_train_timesteps)
                for i, v in zip(ids[pos], visits, strict=True)
            ),
            strict=True,
        )
        t, noise = torch.tensor(ts), torch.stack(noises)
        ab = alphas[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * latents.images[rows] + (1 - ab).sqrt() * noise
        pred = state.unet(xt, t, latents.conditioning[rows]).sample
        loss = F.mse_loss(pred, noise)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        done_here += 1
        bar.update(1)
        if state.step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            _save_checkpoint(state, out_dir, meta)
            if not config.keep_checkpoints:
                for _step, path in checkpoints(out_dir)[:-1]:
                    shutil.rmtree(path, ignore_errors=True)
        if stop_after is not None and done_here >= stop_after:
            bar.close()
            return out_dir / "model"
    bar.close()
    with atomic_directory(out_dir / "model") as tmp:
        save_lora(state.unet, tmp)
    atomic_write_json(
        manifest,
        {
            **meta,
            "steps_done": state.step,
            "model_fingerprint": model_fingerprint(state.unet),
            "seconds": round(time.time() - t0, 2),
        },
    )
    return out_dir / "model"
