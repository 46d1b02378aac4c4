"""TracInCP and GAS: gradient similarities summed over saved training checkpoints.

    TracInCP(x, zᵢ) = Σ_c η_c φ_c(x)ᵀ φ_c(zᵢ)           (Pruthi et al., 2020)
    GAS(x, zᵢ)      = Σ_c η_c cos(φ_c(x), φ_c(zᵢ))      (Hammoudeh & Lowd, 2022)

φ_c are the stored features (loss gradients by default: ``measure="loss"``, timestep-averaged,
per-timestep normalised unless ``settings.normalize`` is off, projected as ``settings`` say) of
checkpoint c's model; η_c its learning rate (1 unless given). No kernel. Each checkpoint's train
and target features go to their own resumable stores in ``store_dir``, named by the settings and
the checkpoint's weight fingerprint, so rescoring or adding checkpoints recomputes nothing.
Training saves checkpoints at ``RUN/checkpoints/step-N/ema`` (:func:`checkpoint_models`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffattr.attribution.features.featurize import (
    DEFAULT_MAX_EXACT_BYTES,
    FeatureSettings,
    featurize,
)
from diffattr.attribution.features.gradients import select_parameters
from diffattr.attribution.features.store import FeatureStore
from diffattr.attribution.kernel import _blocks
from diffattr.data import ImageDataset
from diffattr.diffusion.presets import load_unet, model_fingerprint
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import CheckpointError, ConfigError

KINDS = ("dot", "cos")


def resolve_checkpoints(spec: Any) -> list[tuple[str, nn.Module | Path]]:
    """(label, model or model directory) for ``spec``: a run directory (its saved checkpoints'
    EMA weights), a model directory, or a list of models / model directories."""
    from diffattr.diffusion.training import checkpoint_models

    if isinstance(spec, str) and "," in spec:  # command line: tracin[checkpoints=DIR,DIR]
        spec = [part.strip() for part in spec.split(",") if part.strip()]
    if isinstance(spec, str | Path):
        path = Path(spec)
        found = checkpoint_models(path)
        if found:
            return [(f"step-{step}", p) for step, p in found]
        if (path / "config.json").is_file():
            return [(path.name, path)]
        raise CheckpointError(
            f"no saved checkpoints in {path} (expected checkpoints/step-N/ema)",
            hint="train with checkpoints kept (--checkpoint-every) or pass model directories",
        )
    if isinstance(spec, nn.Module):
        spec = [spec]
    try:
        items = list(spec)
    except TypeError as exc:
        raise ConfigError(
            "checkpoints must be a run directory or a list of models / model directories"
        ) from exc
    if not items:
        raise ConfigError("no checkpoints given", hint="pass checkpoints=[...] or a run directory")
    out: list[tuple[str, nn.Module | Path]] = []
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            out.append((f"model-{i}", item))
        elif isinstance(item, str | Path):
            out.append((Path(item).name, Path(item)))
        else:
            raise ConfigError(f"checkpoint {i} is a {type(item).__name__}, not a model or path")
    return out


def _as_model(item: nn.Module | Path) -> nn.Module:
    return item if isinstance(item, nn.Module) else load_unet(item)


def checkpoint_store(
    model: nn.Module,
    images: torch.Tensor,
    ids: np.ndarray,
    store_dir: Path,
    role: str,
    settings: FeatureSettings,
    schedule: NoiseSchedule,
    data_fingerprint: str,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
) -> FeatureStore:
    """Features of ``images`` under one checkpoint, in a store keyed by its fingerprint."""
    fp = model_fingerprint(model)
    path = store_dir / f"{role}-{settings.measure}-{settings.key()}-ckpt{fp[:12]}"
    return featurize(
        model,
        images,
        ids,
        path,
        settings,
        schedule,
        data_fingerprint,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=f"featurize {role} (checkpoint {fp[:8]})",
    )


def _similarity(tphi: np.ndarray, phi: np.ndarray, kind: str, block: int = 4096) -> np.ndarray:
    t = np.asarray(tphi, dtype=np.float64)
    if kind == "cos":
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)
    n = phi.shape[0]
    out = np.empty((t.shape[0], n), dtype=np.float64)
    for sl in _blocks(n, block):
        f = np.asarray(phi[sl], dtype=np.float64)
        if kind == "cos":
            f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-30)
        out[:, sl] = t @ f.T
    return out


def tracin_scores(
    checkpoint_models: list[nn.Module] | list[str | Path] | str | Path,
    train: ImageDataset,
    targets: Any,
    settings: FeatureSettings,
    store_dir: str | Path,
    kind: str = "dot",
    learning_rates: list[float] | str | float | None = None,
    schedule: NoiseSchedule | None = None,
    target_ids: np.ndarray | None = None,
    measure: str | None = "loss",
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    max_exact_bytes: int = DEFAULT_MAX_EXACT_BYTES,
) -> np.ndarray:
    """(T, N) TracInCP (``kind="dot"``) or GAS (``kind="cos"``) scores.

    ``targets``: images (N×C×H×W), an ImageDataset or generated Samples; ``target_ids`` key
    their timestep noise (default 0…T−1, as :class:`Attributor`). ``measure`` overrides
    ``settings.measure`` (None keeps it). ``settings.projector="auto"`` is resolved per model.
    """
    from diffattr.attribution.inputs import as_images, images_fingerprint

    if kind not in KINDS:
        raise ConfigError(f"unknown TracIn kind {kind!r}", hint="use 'dot' (TracInCP) or 'cos'")
    ckpts = resolve_checkpoints(checkpoint_models)
    if learning_rates is None:
        weights = [1.0] * len(ckpts)
    else:
        if isinstance(learning_rates, str):  # command line: learning_rates=1e-3,5e-4
            learning_rates = learning_rates.split(",")
        elif isinstance(learning_rates, int | float):
            learning_rates = [learning_rates] * len(ckpts)
        weights = [float(w) for w in learning_rates]
        if len(weights) != len(ckpts):
            raise ConfigError(
                f"{len(weights)} learning rates for {len(ckpts)} checkpoints",
                hint="give one learning rate per checkpoint",
            )
    images, ids = as_images(targets, target_ids)
    if tuple(images.shape[1:]) != tuple(train.images.shape[1:]):
        raise ConfigError(
            f"target images are {tuple(images.shape[1:])}, the training images "
            f"{tuple(train.images.shape[1:])}"
        )
    schedule = schedule or NoiseSchedule()
    store_dir = Path(store_dir)
    base = settings if measure is None else replace(settings, measure=measure)
    train_fp, target_fp = train.fingerprint(), images_fingerprint(images, ids)
    total = np.zeros((images.shape[0], len(train)), dtype=np.float64)
    for (_label, item), eta in zip(ckpts, weights, strict=True):
        model = _as_model(item)
        named = dict(model.named_parameters())
        num_params = sum(named[n].numel() for n in select_parameters(model, base.params))
        s = base.resolved(num_params, len(train), max_exact_bytes)
        common = {"batch_size": batch_size, "device": device, "progress": progress}
        train_store = checkpoint_store(
            model, train.images, train.ids.numpy(), store_dir, "train", s, schedule, train_fp,
            **common,
        )  # fmt: skip
        target_store = checkpoint_store(
            model, images, ids, store_dir, f"targets-{target_fp[:10]}", s, schedule, target_fp,
            **common,
        )  # fmt: skip
        total += eta * _similarity(target_store.features, train_store.features, kind)
    return total


def tracin_from_inputs(
    inputs: Any,
    kind: str,
    method: str,
    checkpoints: Any = None,
    learning_rates: list[float] | str | float | None = None,
    measure: str | None = "loss",
) -> tuple[np.ndarray, dict[str, Any]]:
    """The registered ``tracin`` / ``gas`` methods: :func:`tracin_scores` from ScoreInputs.

    Options: ``checkpoints``: the training checkpoints summed over (a run directory, or
    checkpoint folders separated by commas; default the run's); ``learning_rates``: each
    checkpoint's learning rate, its weight in the sum (a number, or one per checkpoint
    separated by commas; unset: 1 each);
    ``measure``: the gradients' measure (loss, das or dtrak)."""
    if checkpoints is None:
        raise ConfigError(
            f"method {method!r} needs checkpoints",
            hint="pass checkpoints=RUN_DIR (its checkpoints/step-N/ema) or a list of models",
        )
    from diffattr.attribution.inputs import require_inputs, training_set

    require_inputs(inputs, method, "train_images", "target_images", "settings", "store_dir")
    train = training_set(inputs)
    ckpts = resolve_checkpoints(checkpoints)
    values = tracin_scores(
        [item for _, item in ckpts],
        train,
        inputs.target_images,
        inputs.context.settings,
        inputs.context.store_dir,
        kind=kind,
        learning_rates=learning_rates,
        schedule=inputs.context.schedule,
        target_ids=inputs.target_ids,
        measure=measure,
        batch_size=inputs.context.batch_size,
        device=inputs.context.device,
        progress=inputs.context.progress,
    )
    meta = {"checkpoints": [label for label, _ in ckpts], "tracin_kind": kind}
    return values, meta
