"""Stable-Diffusion-style pipelines from a local folder, or tiny ones built from config.

A pipeline folder has the diffusers layout ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
and ``scheduler/`` (what ``StableDiffusionPipeline.save_pretrained`` writes and what a
downloaded Stable Diffusion 1.x/2.x snapshot holds). Everything is read with
``from_pretrained(path, local_files_only=True)``: the network is never used.

:func:`write_tiny_pipeline` builds a random one from config (a ≈0.2M-parameter
``UNet2DConditionModel``, a two-level ``AutoencoderKL``, a 2-layer CLIP text model and a
byte-level CLIP tokenizer written locally) for tests and CPU demos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import CheckpointError, ConfigError
from diffattr.fsio import atomic_directory
from diffattr.seeding import derive_seed

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TINY_MAX_TOKENS = 16
TINY_UNET = {
    "block_out_channels": (32, 32),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (16, 32),
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
#: Stable Diffusion's training schedule (scheduler/scheduler_config.json of SD 1.x).
SD_SCHEDULE = NoiseSchedule(1000, 0.00085, 0.012, "scaled_linear")


@dataclass
class Components:
    """The parts of a pipeline diffattr uses; ``resolution`` is the image side in pixels."""

    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    schedule: NoiseSchedule
    path: Path

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell: 2^(levels − 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.vae_factor:
            raise ConfigError(
                f"--resolution {resolution} is not a multiple of the VAE's factor {self.vae_factor}"
            )
        side = resolution // self.vae_factor
        return int(self.vae.config.latent_channels), side, side


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers' loading and saving (ours report progress)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _byte_alphabet() -> list[str]:
    """One printable character per byte value (printable Latin-1 bytes map to themselves, the
    others to code points from 256 on), as byte-level BPE vocabularies spell them."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, shift = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shift))
            shift += 1
    return out


def write_tiny_tokenizer(path: str | Path, max_tokens: int = TINY_MAX_TOKENS) -> Path:
    """A byte-level CLIP tokenizer without merges: every character is a token (local files)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_tokens
    )
    tok.save_pretrained(path)
    return path


def write_tiny_pipeline(path: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Build a tiny random text-to-image pipeline (weights keyed by ``seed``) and save it in
    the diffusers folder layout at ``path`` (atomic). ``sample_size``: latent side."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _quiet_transformers()
    path = Path(path)
    with atomic_directory(path) as tmp:
        tok = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp / "tokenizer"))
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(derive_seed(seed, 0x5D))
            unet = UNet2DConditionModel(sample_size=sample_size, **TINY_UNET)
            vae = AutoencoderKL(sample_size=sample_size * 2, **TINY_VAE)
            text = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tok),
                    max_position_embeddings=TINY_MAX_TOKENS,
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    **TINY_TEXT,
                )
            )
        finally:
            torch.random.set_rng_state(state)
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text.save_pretrained(tmp / "text_encoder")
        s = SD_SCHEDULE
        DDPMScheduler(
            num_train_timesteps=s.num_train_timesteps,
            beta_start=s.beta_start,
            beta_end=s.beta_end,
            beta_schedule=s.beta_schedule,
            clip_sample=False,
        ).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(
            json.dumps({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "tiny"})
        )
    return path


def schedule_from_config(cfg: dict[str, Any]) -> NoiseSchedule:
    """The training noise process a scheduler config describes.

    A config of the classic kind (ε-prediction, ``linear`` or ``scaled_linear`` betas, no
    trained betas) gives the schedule from its four numbers, as every text-to-image run made
    so far recorded it; any other (``v_prediction`` or ``sample``, ``squaredcos_cap_v2``,
    trained betas) is followed exactly through diffusers' own scheduler
    (:meth:`NoiseSchedule.from_scheduler_config`, which refuses processes it cannot follow).
    """
    classic = (
        cfg.get("prediction_type", "epsilon") == "epsilon"
        and cfg.get("trained_betas") is None
        and cfg.get("beta_schedule", "scaled_linear") in ("linear", "scaled_linear")
    )
    if not classic:
        return NoiseSchedule.from_scheduler_config(cfg)
    return NoiseSchedule(
        int(cfg.get("num_train_timesteps", 1000)),
        float(cfg.get("beta_start", 0.00085)),
        float(cfg.get("beta_end", 0.012)),
        str(cfg.get("beta_schedule", "scaled_linear")),
    )


def read_scheduler_config(scheduler_dir: str | Path) -> dict[str, Any] | None:
    """``scheduler_config.json`` of a scheduler folder (None when it has none)."""
    cfg_path = Path(scheduler_dir) / "scheduler_config.json"
    if not cfg_path.is_file():
        return None
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc


def read_schedule(path: str | Path) -> NoiseSchedule:
    """The training noise process of a pipeline folder (``scheduler/scheduler_config.json``;
    Stable Diffusion 1.x's when the folder has none): ε-, v- or x₀-prediction."""
    cfg = read_scheduler_config(Path(path) / "scheduler")
    return SD_SCHEDULE if cfg is None else schedule_from_config(cfg)


def check_pipeline_dir(path: str | Path) -> Path:
    """``path`` as a folder holding a pipeline, or a :class:`CheckpointError` naming what is
    missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"no text-to-image pipeline folder at {path}",
            hint="pass --base tiny, or a local folder with unet/ vae/ text_encoder/ tokenizer/ "
            "(a Stable Diffusion snapshot saved with save_pretrained)",
        )
    missing = [s for s in SUBFOLDERS[:4] if not (path / s).is_dir()]
    if missing:
        raise CheckpointError(
            f"{path} is not a diffusers pipeline folder: no {', '.join(missing)}/",
            hint="give the folder that holds model_index.json and those subfolders",
        )
    return path


def load_components(
    path: str | Path,
    unet: bool = True,
    schedule: NoiseSchedule | None = None,
    safetensors_only: bool = False,
) -> Components:
    """Load a pipeline's parts from a local folder (float32, eval mode, no gradients).

    ``unet=False`` skips the UNet (latent and caption encoding only); ``schedule``: the noise
    process when not the folder's own (an imported run's recorded one); ``safetensors_only``:
    never read pickle-based weight files.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_transformers()
    path = check_pipeline_dir(path)
    schedule = schedule or read_schedule(path)
    kw: dict[str, Any] = {"local_files_only": True}
    if safetensors_only:
        kw["use_safetensors"] = True
    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(
                path / "unet", low_cpu_mem_usage=False, **kw
            )
            if unet
            else None,
            "vae": AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False, **kw),
            "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", **kw),
            "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
        }
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the pipeline in {path}: {exc}") from exc
    for name in ("unet", "vae", "text_encoder"):
        if parts[name] is not None:
            parts[name] = parts[name].float().eval().requires_grad_(False)
    return Components(schedule=schedule, path=path, **parts)


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], batch_size: int = 64):
    """Caption embeddings (N, L, D) float32: the text encoder's last hidden state for prompts
    padded to the tokenizer's maximum length (what the UNet cross-attends to)."""
    tok = components.tokenizer
    out = []
    for s in range(0, len(prompts), batch_size):
        ids = tok(
            list(prompts[s : s + batch_size]),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(components.text_encoder(ids)[0].float())
    return torch.cat(out)
