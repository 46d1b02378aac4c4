"""Ensembles: the mean of a method's scores over several models (TRAK-style).

TRAK averages φ_m(x)ᵀ(Φ_mᵀΦ_m + λ_mI)⁻¹φ_{m,i} over M independently trained models (or
checkpoints) m; each member keeps its own features, kernel and λ (the λ rule is shared, so
each λ_m scales with its own features). :func:`ensemble_scores` averages any parts — Scores,
(T, N) arrays, or attributors together with the targets to score; the registered ``ensemble``
method builds one :class:`Attributor` per model, with stores in ``STORE/ensemble/<model>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from diffattr.attribution.scores import Scores
from diffattr.errors import ConfigError


def ensemble_scores(
    parts: Sequence[Any],
    targets: Any = None,
    target_ids: np.ndarray | None = None,
    train_ids: np.ndarray | None = None,
    method: str | None = None,
) -> Scores:
    """Mean of the parts' scores.

    Each part is a :class:`Scores`, a (T, N) array, or anything with ``score(targets,
    target_ids)`` returning Scores (an :class:`Attributor`; then ``targets`` is required).
    Scores parts must agree on train and target ids; arrays take ``train_ids`` (default
    0…N−1) and ``target_ids`` (default 0…T−1).
    """
    if len(parts) == 0:
        raise ConfigError("an ensemble needs at least one member")
    values, names = [], []
    ref_train = ref_target = None
    for i, part in enumerate(parts):
        if hasattr(part, "score") and not isinstance(part, Scores | np.ndarray):
            if targets is None:
                raise ConfigError("ensemble_scores: attributor members need the targets")
            part = part.score(targets, target_ids)
        if isinstance(part, Scores):
            v, tr, tg = np.asarray(part.values, np.float64), part.train_ids, part.target_ids
            names.append(part.method)
        else:
            v = np.asarray(part, dtype=np.float64)
            if v.ndim != 2:
                raise ConfigError(f"ensemble member {i} is not a (targets × train) matrix")
            tr = np.arange(v.shape[1]) if train_ids is None else np.asarray(train_ids)
            tg = np.arange(v.shape[0]) if target_ids is None else np.asarray(target_ids)
            names.append("array")
        if ref_train is None:
            ref_train, ref_target = tr, tg
        elif not (np.array_equal(tr, ref_train) and np.array_equal(tg, ref_target)):
            raise ConfigError(
                f"ensemble member {i} scores other training or target samples than member 0",
                hint="score every member on the same training set and targets",
            )
        values.append(v)
    mean = np.mean(values, axis=0)
    label = method or (f"ensemble-{names[0]}" if len(set(names)) == 1 else "ensemble")
    return Scores(mean, ref_train, ref_target, label, {"ensemble": len(values), "members": names})


def ensemble_from_inputs(
    inputs: Any,
    base: str = "trak",
    models: Sequence[nn.Module | str | Path] | None = None,
    include_self: bool = True,
    base_options: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The registered ``ensemble`` method: ``base`` scored on each member model (through the
    inputs' ``scorer``, each member's features in ``store_dir/ensemble/<fingerprint>``), then
    the mean.

    Options: ``base``: the method scored on every member; ``models``: the other members' model
    folders, separated by commas; ``include_self``: whether the run's own model is a member;
    ``base_options``: the base method's options (Python only)."""
    from diffattr.diffusion.presets import load_unet, model_fingerprint

    if base == "ensemble":
        raise ConfigError("an ensemble of ensembles is not supported")
    members: list[nn.Module] = []
    if include_self:
        if inputs.context.model is None:
            raise ConfigError("ensemble: include_self needs the attributed model in ScoreInputs")
        members.append(inputs.context.model)
    if isinstance(models, str | Path):  # command line: ensemble[models=DIR,DIR]
        models = [part.strip() for part in str(models).split(",") if part.strip()]
    for m in models or []:
        members.append(m if isinstance(m, nn.Module) else load_unet(m))
    if not members:
        raise ConfigError("ensemble: no member models", hint="pass models=[...]")
    if inputs.context.store_dir is None or inputs.context.scorer is None:
        raise ConfigError(
            "ensemble needs store_dir and scorer in its ScoreInputs",
            hint="score it through Attributor, or call ensemble.ensemble_scores",
        )
    values, fingerprints = [], []
    for i, model in enumerate(members):
        fp = model_fingerprint(model)
        fingerprints.append(fp[:12])
        own = include_self and i == 0
        store = (
            Path(inputs.context.store_dir)
            if own
            else Path(inputs.context.store_dir) / "ensemble" / fp[:12]
        )
        values.append(
            inputs.context.scorer(
                base, base_options or {}, model=model, store_dir=store, lam=inputs.lam
            )
        )
    mean = np.mean(np.asarray(values, dtype=np.float64), axis=0).astype(np.float32)  # as Scores
    return mean.astype(np.float64), {"ensemble_of": base, "members": fingerprints}
