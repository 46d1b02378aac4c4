"""The forward noising process and the per-sample random streams of training.

x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with a linear β schedule (1e-4 → 0.02, T = 1000 by default), or
Stable Diffusion's ``scaled_linear`` one (β_t = (√β₀ + t/(T−1)·(√β_T − √β₀))², 0.00085 → 0.012).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffattr.errors import ConfigError
from diffattr.seeding import generator

BETA_SCHEDULES = ("linear", "scaled_linear")

#: Key namespaces, so streams of different purposes never coincide.
TRAIN_VISIT_KEY = 1
ATTRIBUTION_NOISE_KEY = 2
SAMPLING_KEY = 3
MEASUREMENT_KEY = 4
PERMUTATION_KEY = 5
INIT_KEY = 6


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM schedule: linear β (default) or ``scaled_linear`` (latent diffusion)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(
                f"unsupported beta schedule {self.beta_schedule!r}",
                hint=f"use one of {', '.join(BETA_SCHEDULES)}",
            )

    def to_dict(self) -> dict:
        """The settings; ``beta_schedule`` only when not linear (older runs keep their keys)."""
        d = asdict(self)
        if d["beta_schedule"] == "linear":
            del d["beta_schedule"]
        return d

    def scheduler(self, sampler: str, **settings) -> DDPMScheduler | DDIMScheduler:
        """diffusers' ``ddpm`` or ``ddim`` scheduler of this schedule; pixel models' settings
        (samples clipped to [-1, 1]; DDIM's final ᾱ = 1) unless ``settings`` say otherwise."""
        if sampler == "ddim":
            settings = {"clip_sample": True, "set_alpha_to_one": True, **settings}
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        return cls(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            **{"clip_sample": True, **settings},
        )

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0 … T−1 (float32)."""
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(
                self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps,
                dtype=torch.float64,
            ) ** 2  # fmt: skip
        else:
            betas = torch.linspace(
                self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64
            )
        return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε, with ``t`` a (B,) integer tensor."""
        ab = self.alphas_cumprod().to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def visit_noise(
    seed: int, sample_id: int, visit: int, shape: tuple[int, ...], num_timesteps: int
) -> tuple[int, torch.Tensor]:
    """Timestep and noise of training sample ``sample_id`` at its ``visit``-th visit.

    Drawn from a generator keyed by (seed, sample id, visit) alone, so it is the same in every
    model trained with ``seed`` whose subset contains the sample (common random numbers).
    """
    g = generator(seed, TRAIN_VISIT_KEY, sample_id, visit)
    t = int(torch.randint(num_timesteps, (1,), generator=g).item())
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    return t, noise


def keyed_noise(
    key: int, seed: int, sample_id: int, t: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Noise for (purpose ``key``, seed, sample id, timestep): reproducible in any process."""
    return torch.randn(shape, generator=generator(key, seed, sample_id, t), dtype=torch.float32)
