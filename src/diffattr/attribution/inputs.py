"""What a method reads when it scores: :class:`ScoreInputs`, filled from feature stores by
the ``Attributor``, or in Gram form (ΦΦᵀ, φ(x)ᵀΦᵀ) from an LDS kernel cache or a screen's
block; model-based methods read its context fields, ensembles and combinations its ``scorer``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError

#: ``scorer(method, options, model=None, store_dir=None) -> (T, N) scores``: the same targets
#: and training set scored by another method (or the same method on another model).
MemberScorer = Callable[..., np.ndarray]


@dataclass(frozen=True)
class ScoreInputs:
    """What a method may read (immutable: a step that adds to it, e.g. a kernel, makes a new
    one with :func:`dataclasses.replace`). Feature-based methods need the features of their
    measure."""

    train_features: np.ndarray | None = None
    target_features: np.ndarray | None = None
    kernel: Any = None  # a fitted :class:`~diffattr.attribution.kernel.Kernel`
    target_inner: np.ndarray | None = None  # φ(x)ᵀΦᵀ, when precomputed (dual kernel)
    train_sqnorm: np.ndarray | None = None  # ‖φᵢ‖², with target_inner
    target_sqnorm: np.ndarray | None = None  # ‖φ(x)‖², with target_inner
    train_error: np.ndarray | None = None
    train_residual: np.ndarray | None = None
    train_images: torch.Tensor | None = None
    target_images: torch.Tensor | None = None
    train_conditioning: torch.Tensor | None = None  # per-sample model input beside (x_t, t)
    target_conditioning: torch.Tensor | None = None  # (a text-to-image model's captions)
    num_train: int = 0
    num_targets: int = 0
    train_gram: np.ndarray | None = None  # ΦΦᵀ (N×N), with target_inner (LDS kernel cache)
    feature_dim: int | None = None  # k, the width of Φ (the rank bound of a Gram-form kernel)
    # Context for the methods that need more than one store (filled by the caller):
    train_ids: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    target_seeds: np.ndarray | None = None  # generation seed per target, < 0 for real images
    targets: Any = None  # the targets as given, e.g. generated Samples with seeds (journey-trak)
    model: torch.nn.Module | None = None  # the attributed model
    schedule: Any = None  # its NoiseSchedule
    settings: Any = None  # the caller's resolved FeatureSettings
    store_dir: Path | None = None  # where model-based methods keep feature stores and caches
    lam: Any = None  # absolute λ or a Ridge rule; None: the method's default_ridge
    batch_size: int = 32
    device: str = "cpu"
    progress: bool = False
    scorer: MemberScorer | None = None  # scores of other methods / models on these targets


def require_inputs(inputs: ScoreInputs, method: str, *fields: str) -> None:
    """A :class:`ConfigError` naming the fields of ``inputs`` that ``method`` needs and lacks."""
    missing = [f for f in fields if getattr(inputs, f) is None]
    if missing:
        raise ConfigError(
            f"method {method!r} needs {', '.join(missing)} in its ScoreInputs",
            hint="score it through Attributor (which fills them), or set these fields",
        )


def training_set(inputs: ScoreInputs) -> ImageDataset:
    """The training images of ``inputs`` with their ids (0…N−1 if none) as an ImageDataset."""
    n = inputs.train_images.shape[0]
    ids = inputs.train_ids if inputs.train_ids is not None else np.arange(n)
    return ImageDataset(inputs.train_images, torch.as_tensor(np.asarray(ids)))


def images_fingerprint(
    images: torch.Tensor, ids: np.ndarray, conditioning: torch.Tensor | None = None
) -> str:
    """sha256 of target images, ids and conditioning, if any (names a target feature store)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images.numpy(), dtype=np.float32).tobytes())
    h.update(np.asarray(ids, dtype=np.int64).tobytes())
    if conditioning is not None:
        h.update(np.ascontiguousarray(conditioning.numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()


def as_images(targets: Any, ids: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """(images, ids) from a tensor, an :class:`ImageDataset` or generated ``Samples``."""
    if isinstance(targets, ImageDataset):
        return targets.images, targets.ids.numpy()
    images = getattr(targets, "images", targets)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise DataError("targets must be an N×C×H×W tensor, an ImageDataset or Samples")
    if ids is None:
        ids = np.arange(images.shape[0], dtype=np.int64)
    return images.float(), np.asarray(ids, dtype=np.int64)
