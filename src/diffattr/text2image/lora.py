"""LoRA adapters on a text-to-image UNet with ``peft``: attach, save, load.

A LoRA layer replaces W x by W x + (α/r) B A x with A ∈ ℝ^{r×k}, B ∈ ℝ^{d×r}; B starts at 0,
so an untrained adapter leaves the model unchanged. Only A and B are trained and attributed:
their parameter names contain ``.lora_A.`` / ``.lora_B.`` (:data:`LORA_PARAMS` selects them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffattr.errors import CheckpointError, ConfigError
from diffattr.seeding import derive_seed

#: ``--params`` regex of the LoRA parameters (the default for text-to-image runs).
LORA_PARAMS = r"\.lora_[AB]\."
LORA_FILE = "lora.safetensors"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSpec:
    """Rank r, scale α (default r) and the module names (suffixes) that get adapters."""

    rank: int = 4
    alpha: float | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be at least 1, got {self.rank}")
        if not self.target_modules:
            raise ConfigError("--lora-targets names no module")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        return cls(d["rank"], d.get("alpha"), tuple(d["target_modules"]))


def attach_lora(unet: torch.nn.Module, spec: LoraSpec, seed: int) -> torch.nn.Module:
    """Freeze ``unet`` and add LoRA adapters (A initialised from a stream keyed by ``seed``)."""
    from peft import LoraConfig

    spec.validate()
    unet.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
        target_modules=list(spec.target_modules),
        init_lora_weights=True,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(derive_seed(seed, 0x10A))
        unet.add_adapter(config)
    except ValueError as exc:
        raise ConfigError(
            f"cannot attach LoRA to {', '.join(spec.target_modules)}: {exc}",
            hint="--lora-targets names module suffixes of the UNet, e.g. to_q,to_k,to_v,to_out.0",
        ) from exc
    finally:
        torch.random.set_rng_state(state)
    return unet


def lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA parameters by their full names (detached copies)."""
    return {
        n: p.detach().clone().contiguous()
        for n, p in unet.named_parameters()
        if ".lora_A." in n or ".lora_B." in n
    }


def save_lora(unet: torch.nn.Module, directory: str | Path) -> Path:
    """Write the LoRA weights to ``directory/lora.safetensors`` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    path = Path(directory) / LORA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(unet), str(path))
    return path


def load_lora(unet: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """Copy saved LoRA weights into ``unet`` (which has adapters of the same spec)."""
    from safetensors.torch import load_file

    path = Path(directory) / LORA_FILE
    try:
        weights = load_file(str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read LoRA weights {path}: {exc}") from exc
    have = lora_state(unet)
    if set(weights) != set(have) or any(weights[k].shape != have[k].shape for k in have):
        raise CheckpointError(
            f"{path} holds LoRA weights of another rank or target modules",
            hint="the run's LoRA settings changed since training; retrain",
        )
    unet.load_state_dict(weights, strict=False)
    return unet


def load_adapted_unet(pipeline: Path, lora: Path | None, allow_pickle: bool) -> torch.nn.Module:
    """The pipeline's UNet (float32, eval mode, weights frozen) with the LoRA adapters of
    ``lora`` loaded as diffusers loads them (adapter ``default``; only they need gradients)."""
    from diffusers import UNet2DConditionModel

    unet_dir = pipeline / "unet"
    try:
        unet = UNet2DConditionModel.from_pretrained(
            unet_dir, local_files_only=True, low_cpu_mem_usage=False,
            use_safetensors=None if allow_pickle else True,
        ).float()  # fmt: skip
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the UNet in {unet_dir}: {exc}") from exc
    unet.requires_grad_(False)
    if lora is None:
        return unet.eval()
    try:
        unet.load_lora_adapter(
            str(lora.parent), weight_name=lora.name, prefix="unet", adapter_name="default",
            use_safetensors=lora.suffix == ".safetensors",
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"cannot load the LoRA weights {lora}: {exc}") from exc
    adapters = [p for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if not adapters:
        raise CheckpointError(
            f"{lora} holds no LoRA weights of this UNet (diffusers' format, keys 'unet.…')"
        )
    for p in adapters:
        p.requires_grad_(True)
    return unet.eval()
