"""What a method reads when it scores: :class:`ScoreInputs` — the images and ids, the
:class:`Features` (filled from feature stores by the ``Attributor``, or in Gram form
(ΦΦᵀ, φ(x)ᵀΦᵀ) from an LDS kernel cache or a screen's block) apart from the
:class:`ModelContext` that model-based methods read (ensembles and combinations its
``scorer``), and the fitted kernel and λ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
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
class Features:
    """The features a kernel or feature method scores: the primal form (Φ, φ(x)) or the Gram
    form (ΦΦᵀ and φ(x)ᵀΦᵀ, with ‖φᵢ‖², ‖φ(x)‖² and the width k), and the training error and
    residual columns DAS weights by."""

    train: np.ndarray | None = None  # Φ (N × k)
    target: np.ndarray | None = None  # φ(x) (T × k)
    train_gram: np.ndarray | None = None  # ΦΦᵀ (N × N)
    target_inner: np.ndarray | None = None  # φ(x)ᵀΦᵀ (T × N)
    train_sqnorm: np.ndarray | None = None  # ‖φᵢ‖², with target_inner
    target_sqnorm: np.ndarray | None = None  # ‖φ(x)‖², with target_inner
    dim: int | None = None  # k, the width of Φ (the rank bound of a Gram-form kernel)
    train_error: np.ndarray | None = None
    train_residual: np.ndarray | None = None


@dataclass(frozen=True)
class ModelContext:
    """What methods that compute their own features read (``Method.needs_model``): the
    attributed model and its noise process, the caller's resolved feature settings, where to
    keep feature stores and caches, how to compute, and a ``scorer`` of other methods on the
    same targets (ensembles, combinations)."""

    model: torch.nn.Module | None = None
    schedule: Any = None  # its NoiseSchedule
    settings: Any = None  # the caller's resolved FeatureSettings
    store_dir: Path | None = None
    batch_size: int = 32
    device: str = "cpu"
    progress: bool = False
    scorer: MemberScorer | None = None


@dataclass(frozen=True)
class ScoreInputs:
    """What a method may read (immutable: a step that adds to it, e.g. a kernel, makes a new
    one with :meth:`updated`): the images and their ids,
    the ``features`` (:class:`Features`), the model ``context`` (:class:`ModelContext`), the
    fitted kernel and λ. :meth:`of` builds one from flat field names."""

    features: Features = Features()
    context: ModelContext = ModelContext()
    kernel: Any = None  # a fitted :class:`~diffattr.attribution.kernel.Kernel`
    lam: Any = None  # absolute λ or a Ridge rule; None: the method's default_ridge
    train_images: torch.Tensor | None = None
    target_images: torch.Tensor | None = None
    train_conditioning: torch.Tensor | None = None  # per-sample model input beside (x_t, t)
    target_conditioning: torch.Tensor | None = None  # (a text-to-image model's captions)
    num_train: int = 0
    num_targets: int = 0
    train_ids: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    target_seeds: np.ndarray | None = None  # generation seed per target, < 0 for real images
    targets: Any = None  # the targets as given, e.g. generated Samples with seeds (journey-trak)

    @classmethod
    def of(cls, **fields: Any) -> ScoreInputs:
        """Inputs from flat names: :class:`Features`' as ``train_features``,
        ``target_features``, ``feature_dim`` or their own names, :class:`ModelContext`'s and
        this class's by theirs."""
        parts = _route(fields)
        return cls(Features(**parts["features"]), ModelContext(**parts["context"]), **parts["top"])

    def updated(self, **fields: Any) -> ScoreInputs:
        """A copy with these fields replaced (flat names, as :meth:`of` takes them)."""
        parts = _route(fields)
        return replace(
            self,
            features=replace(self.features, **parts["features"]),
            context=replace(self.context, **parts["context"]),
            **parts["top"],
        )


#: Flat names of :class:`Features` fields that differ from the field's own name.
_FEATURE_ALIASES = {"train_features": "train", "target_features": "target", "feature_dim": "dim"}


def _route(fields: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat field names sorted into features, context and the rest (a TypeError names an
    unknown one)."""
    feature_names = {f.name for f in dataclass_fields(Features)}
    context_names = {f.name for f in dataclass_fields(ModelContext)}
    top_names = {f.name for f in dataclass_fields(ScoreInputs)} - {"features", "context"}
    out: dict[str, dict[str, Any]] = {"features": {}, "context": {}, "top": {}}
    for name, value in fields.items():
        name = _FEATURE_ALIASES.get(name, name)
        if name in feature_names:
            out["features"][name] = value
        elif name in context_names:
            out["context"][name] = value
        elif name in top_names:
            out["top"][name] = value
        else:
            raise TypeError(f"ScoreInputs has no field {name!r}")
    return out


def require_inputs(inputs: ScoreInputs, method: str, *fields: str) -> None:
    """A :class:`ConfigError` naming the fields of ``inputs`` that ``method`` needs and lacks
    (flat names, as :meth:`ScoreInputs.of` takes them)."""
    missing = [f for f in fields if _field(inputs, f) is None]
    if missing:
        raise ConfigError(
            f"method {method!r} needs {', '.join(missing)} in its ScoreInputs",
            hint="score it through Attributor (which fills them), or set these fields",
        )


def _field(inputs: ScoreInputs, name: str) -> Any:
    """The value of a flat field name."""
    name = _FEATURE_ALIASES.get(name, name)
    for part in (inputs.features, inputs.context, inputs):
        if name in {f.name for f in dataclass_fields(part)}:
            return getattr(part, name)
    raise TypeError(f"ScoreInputs has no field {name!r}")


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
