"""The forward noising process and the per-sample random streams of training.

x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with a linear β schedule (1e-4 → 0.02, T = 1000 by default), or
Stable Diffusion's ``scaled_linear`` one (β_t = (√β₀ + t/(T−1)·(√β_T − √β₀))², 0.00085 → 0.012).
A model diffattr did not train brings its own scheduler config: then ᾱ_t (any beta schedule
diffusers' DDPM-type schedulers offer, ``squaredcos_cap_v2`` and trained betas included), T and
the prediction type come from diffusers' scheduler built from that config, exactly. The model
predicts its *target*: ε (``epsilon``), v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (``v_prediction``) or x₀
(``sample``); its loss is ‖prediction − target‖²/d.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffattr.errors import ConfigError
from diffattr.seeding import generator

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: Beta schedules of a model's own scheduler config that diffattr follows (ᾱ from diffusers).
SCHEDULER_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: diffusers schedulers whose training process is x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε over T steps.
DDPM_TYPE_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
)  # fmt: skip

#: Key namespaces, so streams of different purposes never coincide.
TRAIN_VISIT_KEY = 1
ATTRIBUTION_NOISE_KEY = 2
SAMPLING_KEY = 3
MEASUREMENT_KEY = 4
PERMUTATION_KEY = 5
INIT_KEY = 6


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM schedule: linear β (default) or ``scaled_linear`` (latent diffusion), or a model's
    own ``scheduler_config`` (:meth:`from_scheduler_config`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    scheduler_config: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        allowed = SCHEDULER_BETA_SCHEDULES if self.scheduler_config else BETA_SCHEDULES
        if self.beta_schedule not in allowed:
            raise ConfigError(
                f"unsupported beta schedule {self.beta_schedule!r}",
                hint=f"use one of {', '.join(allowed)}",
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"unsupported prediction type {self.prediction_type!r}",
                hint=f"diffattr follows {', '.join(PREDICTION_TYPES)}",
            )

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """The process of a model's own scheduler (``scheduler_config.json``); a
        :class:`ConfigError` for one whose training process diffattr does not follow."""
        kind = config.get("_class_name", "DDPMScheduler")
        if kind not in DDPM_TYPE_SCHEDULERS:
            raise ConfigError(
                f"scheduler {kind} is not a DDPM-type scheduler (x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε)",
                hint=f"supported: {', '.join(DDPM_TYPE_SCHEDULERS)}",
            )
        if config.get("trained_betas") is None:
            beta_schedule = str(config.get("beta_schedule", "linear"))
        else:
            beta_schedule = "linear"  # ᾱ from the trained betas themselves
        return cls(
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 1e-4)),
            float(config.get("beta_end", 0.02)),
            beta_schedule,
            str(config.get("prediction_type", "epsilon")),
            dict(config),
        )

    def to_dict(self) -> dict:
        """The settings; ``beta_schedule``, ``prediction_type`` and ``scheduler_config`` only
        when not the defaults (older runs keep their keys)."""
        d = asdict(self)
        for key, default in (("beta_schedule", "linear"), ("prediction_type", "epsilon"),
                             ("scheduler_config", None)):  # fmt: skip
            if d[key] == default:
                del d[key]
        return d

    def scheduler(self, sampler: str, **settings) -> Any:
        """diffusers' ``ddpm`` or ``ddim`` scheduler of this schedule; pixel models' settings
        (samples clipped to [-1, 1]; DDIM's final ᾱ = 1) unless ``settings`` say otherwise.
        ``pipeline``: a model's own scheduler, as its config describes it."""
        if self.scheduler_config:
            import diffusers

            kind = self.scheduler_config.get("_class_name", "DDPMScheduler")
            cls = getattr(diffusers, kind) if sampler == "pipeline" else (
                DDIMScheduler if sampler == "ddim" else DDPMScheduler
            )  # fmt: skip
            return cls.from_config(self._config(), **settings)
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
        """ᾱ_t for t = 0 … T−1 (float32); a model's own scheduler's, exactly, when it has one."""
        return self._alphas_cumprod.clone()

    @cached_property
    def _alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t, computed once per schedule (noising runs on every micro-batch and step)."""
        if self.scheduler_config:
            return DDPMScheduler.from_config(self._config()).alphas_cumprod.clone()
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
        ab = self._alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model predicts at (x_t, t): ε, v = √ᾱ_t ε − √(1−ᾱ_t) x₀, or x₀."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        ab = self._alpha_bar(t, x0)
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * x0

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t per sample, shaped to broadcast over ``like`` (B × …) on its device."""
        return self._alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def _config(self) -> dict[str, Any]:
        return {k: v for k, v in (self.scheduler_config or {}).items() if not k.startswith("_")}


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
