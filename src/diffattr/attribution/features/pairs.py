"""Which (x_t, t, target) pairs a sample's gradient averages over.

A :class:`~diffattr.attribution.features.gradients.GradientComputer` averages a sample's
gradient over K pairs; a pair source says which: their timesteps (:meth:`timesteps_of`) and
the model inputs at them (:meth:`inputs`). The default, :class:`NoisedPairs`, is the diffusion
objective's: the clean image noised with keyed noise,

    x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε,   ε keyed by (ATTRIBUTION_NOISE_KEY, noise seed, id, t),

at the K timesteps of a :class:`TimestepSpec`. Journey-TRAK's pairs (points along a generated
image's own sampling trajectory) are another source, so both go through one featurize pipeline.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, NoiseSchedule, keyed_noise


class PairSource(Protocol):
    """K pairs per sample: their timesteps and the model's inputs at them."""

    #: K: pairs per sample (the average's denominator).
    num: int

    def timesteps_of(self, sample_id: int) -> np.ndarray:
        """The K timesteps of sample ``sample_id``."""

    def inputs(
        self, x0: torch.Tensor, ids: np.ndarray, rows: list[int], ts: list[int], device: Any
    ) -> tuple[torch.Tensor, ...]:
        """(rows, x_t, t, target, ᾱ_t) of pairs (sample ``rows[j]`` of ``x0``/``ids``, t =
        ``ts[j]``) on ``device``; the target is what the model predicts."""

    def describe(self) -> dict[str, Any]:
        """What a feature store records of the pairs beyond its settings (added to them)."""


class NoisedPairs:
    """The diffusion objective's pairs (module docstring)."""

    def __init__(self, timesteps: Any, noise_seed: int, schedule: NoiseSchedule) -> None:
        timesteps.validate(schedule.num_train_timesteps)
        self.spec, self.noise_seed, self.schedule = timesteps, noise_seed, schedule
        self.num = int(timesteps.num)
        self.alphas = schedule.alphas_cumprod()

    def timesteps_of(self, sample_id: int) -> np.ndarray:
        return self.spec.for_sample(int(sample_id), self.schedule.num_train_timesteps)

    def inputs(self, x0, ids, rows, ts, device) -> tuple[torch.Tensor, ...]:
        shape = tuple(x0.shape[1:])
        noise = torch.stack([
            keyed_noise(ATTRIBUTION_NOISE_KEY, self.noise_seed, int(ids[i]), int(t), shape)
            for i, t in zip(rows, ts, strict=True)
        ]).to(device)  # fmt: skip
        r, t = torch.tensor(rows), torch.tensor(ts).to(device)
        x = x0[r].to(device)
        if self.alphas.device != t.device:
            self.alphas = self.alphas.to(t.device)
        xt = self.schedule.add_noise(x, noise, t)
        return r, xt, t, self.schedule.target(x, noise, t), self.alphas[t]

    def describe(self) -> dict[str, Any]:
        return {}  # the settings' timesteps and noise seed say it all
