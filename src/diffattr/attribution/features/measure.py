"""Model-output functions: the scalar f differentiated per (sample, timestep).

Each measure maps the UNet's noise prediction ε_θ(x_t, t) ∈ ℝᵈ (one sample, C×H×W), the noise ε
that made x_t, and ᾱ_t to a scalar. They are pure tensor functions, safe under ``torch.func``.

- ``das`` — the output itself reduced to a scalar: mean (default) Σε_θ/d, sum Σε_θ, or a seeded
  random sketch vᵀε_θ/√d with v ∈ {±1}ᵈ (DAS compares predicted distributions, not losses).
- ``dtrak`` — D-TRAK's output norms: square ‖ε_θ‖² (default), mean, l1 ‖ε_θ‖₁, l2 ‖ε_θ‖₂,
  linf max|ε_θ|.
- ``loss`` — the diffusion loss ‖ε_θ − ε‖²/d (TRAK on diffusion).
- ``weighted-loss`` — the loss in x₀ space, SNR(t)·‖ε_θ − ε‖²/d with SNR = ᾱ_t/(1 − ᾱ_t).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffattr.errors import ConfigError
from diffattr.seeding import generator

MeasureFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

VARIANTS: dict[str, tuple[str, ...]] = {
    "das": ("mean", "sum", "sketch"),
    "dtrak": ("square", "mean", "l1", "l2", "linf"),
    "loss": ("mean",),
    "weighted-loss": ("snr",),
}


@dataclass(frozen=True)
class Measure:
    """A named measure with its variant; ``fn(output, noise, alpha_bar) -> scalar``."""

    name: str
    variant: str
    fn: MeasureFn = field(compare=False, repr=False)
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "variant": self.variant, **self.options}

    def __call__(self, output: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor):
        return self.fn(output, noise, alpha_bar)


def _sketch_vector(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = generator(seed, 977)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(torch.float32)


def make_measure(
    name: str,
    variant: str | None = None,
    output_shape: tuple[int, ...] | None = None,
    sketch_seed: int = 0,
) -> Measure:
    """Build a registered measure; ``variant`` defaults to the first listed in ``VARIANTS``."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown measure {name!r}", hint=f"choose from {sorted(VARIANTS)}")
    variant = variant or VARIANTS[name][0]
    if variant not in VARIANTS[name]:
        raise ConfigError(
            f"measure {name!r} has no variant {variant!r}", hint=f"choose from {VARIANTS[name]}"
        )
    options: dict[str, Any] = {}
    fn: MeasureFn
    if name == "das":
        if variant == "mean":
            fn = lambda out, eps, ab: out.mean()  # noqa: E731
        elif variant == "sum":
            fn = lambda out, eps, ab: out.sum()  # noqa: E731
        else:
            if output_shape is None:
                raise ConfigError("the 'sketch' variant needs the output shape")
            v = _sketch_vector(tuple(output_shape), sketch_seed)
            scale = float(v.numel()) ** -0.5
            options = {"sketch_seed": sketch_seed}
            fn = lambda out, eps, ab: (out * v.to(out.device)).sum() * scale  # noqa: E731
    elif name == "dtrak":
        fn = {
            "square": lambda out, eps, ab: out.pow(2).sum(),
            "mean": lambda out, eps, ab: out.mean(),
            "l1": lambda out, eps, ab: out.abs().sum(),
            "l2": lambda out, eps, ab: out.pow(2).sum().sqrt(),
            "linf": lambda out, eps, ab: out.abs().amax(),
        }[variant]
    elif name == "loss":
        fn = lambda out, eps, ab: (out - eps).pow(2).mean()  # noqa: E731
    else:
        fn = lambda out, eps, ab: (out - eps).pow(2).mean() * ab / (1 - ab)  # noqa: E731
    return Measure(name, variant, fn, options)


def parse_measure(spec: str, output_shape: tuple[int, ...] | None = None) -> Measure:
    """``"das"``, ``"das:sum"``, ``"dtrak:l2"``, ... → :class:`Measure`."""
    name, _, variant = spec.partition(":")
    return make_measure(name, variant or None, output_shape)
