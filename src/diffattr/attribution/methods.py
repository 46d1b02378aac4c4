"""Scorers: turn stored features (or images) into attribution scores τ(x, zᵢ).

Kernel methods share K(x, i) = φ(x)ᵀ G⁻¹ φᵢ with G = ΦᵀΦ + λI (:mod:`.kernel`):

- ``das``    φ are gradients of the *output* ε_θ reduced to a scalar (measure ``das``);
             τ = K(x, i) · wᵢ / (1 − hᵢ)^[leverage], squared on request (the KL form).
             wᵢ per ``residual``: ``error`` (default) eᵢ / mean(e), the per-sample training error
             over timesteps normalised across samples; ``signed`` rᵢ / rms(r), the reduced
             residual mean(ε_θ − ε); ``raw`` rᵢ as stored; ``none`` 1. With ``raw`` residuals,
             leverage on and a linear model, τ is exactly the leave-one-out change of the
             target's prediction, φ(x)ᵀ(θ₋ᵢ − θ) (Sherman–Morrison).
- ``dtrak``  K(x, i) on gradients of ‖ε_θ‖² (D-TRAK).
- ``trak``   K(x, i) on gradients of the diffusion loss (TRAK).
Kernel-free baselines: ``grad-dot`` φ(x)ᵀφᵢ and ``grad-cos`` (cosine) on loss gradients;
``pixel-dot`` / ``pixel-cos`` on raw pixels; ``random`` (seeded N(0,1), the LDS null).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from diffattr.attribution.kernel import Kernel
from diffattr.errors import ConfigError
from diffattr.seeding import derive_seed


@dataclass
class ScoreInputs:
    """What a method may read. Feature-based methods need the features of their measure."""

    train_features: np.ndarray | None = None
    target_features: np.ndarray | None = None
    kernel: Kernel | None = None
    target_inner: np.ndarray | None = None  # φ(x)ᵀΦᵀ, when precomputed (dual kernel)
    train_sqnorm: np.ndarray | None = None  # ‖φᵢ‖², with target_inner
    target_sqnorm: np.ndarray | None = None  # ‖φ(x)‖², with target_inner
    train_error: np.ndarray | None = None
    train_residual: np.ndarray | None = None
    train_images: torch.Tensor | None = None
    target_images: torch.Tensor | None = None
    num_train: int = 0
    num_targets: int = 0


@dataclass
class Method(ABC):
    """A registered attribution method."""

    name: ClassVar[str]
    measure: ClassVar[str | None] = None  # feature measure needed; None for image methods
    uses_kernel: ClassVar[bool] = False
    options: dict[str, Any] = field(default_factory=dict)

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """(T, N) float64 scores."""


class KernelMethod(Method):
    uses_kernel = True

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        assert inputs.kernel is not None
        if inputs.target_inner is not None:
            return inputs.kernel.solve_inner(inputs.target_inner)
        assert inputs.target_features is not None
        return inputs.kernel.cross(inputs.target_features)


class DAS(KernelMethod):
    name = "das"
    measure = "das"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        k = super().score(inputs)
        residual = self.options.get("residual", "error")
        if residual == "error":
            e = np.asarray(inputs.train_error, dtype=np.float64)
            w = e / max(float(e.mean()), 1e-30)
        elif residual == "signed":
            r = np.asarray(inputs.train_residual, dtype=np.float64)
            w = r / max(float(np.sqrt(np.mean(r**2))), 1e-30)
        elif residual == "raw":
            w = np.asarray(inputs.train_residual, dtype=np.float64)
        elif residual == "none":
            w = np.ones(k.shape[1])
        else:
            raise ConfigError(
                f"unknown DAS residual {residual!r}", hint="use error, signed, raw or none"
            )
        scores = k * w[None, :]
        if self.options.get("leverage", False):
            assert inputs.kernel is not None
            h = np.clip(inputs.kernel.leverage(), 0.0, 1.0 - 1e-6)
            scores = scores / (1.0 - h)[None, :]
        if self.options.get("squared", False):
            scores = scores**2
        return scores


class DTRAK(KernelMethod):
    name = "dtrak"
    measure = "dtrak"


class TRAK(KernelMethod):
    name = "trak"
    measure = "loss"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    return a @ b.T


class GradDot(Method):
    name = "grad-dot"
    measure = "loss"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        if inputs.target_inner is not None:
            return np.asarray(inputs.target_inner, dtype=np.float64)
        t = np.asarray(inputs.target_features, dtype=np.float64)
        return t @ np.asarray(inputs.train_features, dtype=np.float64).T


class GradCos(Method):
    name = "grad-cos"
    measure = "loss"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        if inputs.target_inner is not None:
            norms = np.sqrt(np.outer(inputs.target_sqnorm, inputs.train_sqnorm))
            return np.asarray(inputs.target_inner, dtype=np.float64) / np.maximum(norms, 1e-30)
        return _cosine(inputs.target_features, inputs.train_features)


class PixelDot(Method):
    name = "pixel-dot"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        a = inputs.target_images.reshape(inputs.num_targets, -1).double()
        b = inputs.train_images.reshape(inputs.num_train, -1).double()
        return (a @ b.T).numpy()


class PixelCos(Method):
    name = "pixel-cos"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return _cosine(
            inputs.target_images.reshape(inputs.num_targets, -1).numpy(),
            inputs.train_images.reshape(inputs.num_train, -1).numpy(),
        )


class RandomScores(Method):
    name = "random"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(int(self.options.get("seed", 0)), 31337))
        return rng.standard_normal((inputs.num_targets, inputs.num_train))


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (DAS, DTRAK, TRAK, GradDot, GradCos, PixelDot, PixelCos, RandomScores)
}


def get_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method by name."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}", hint=f"choose from {sorted(METHODS)}")
    return METHODS[name](options=options)
