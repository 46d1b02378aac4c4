"""Combinations of attribution methods: the mean of their per-target standardised scores.

    τ(x, zᵢ) = (1/M) Σ_m (τ_m(x, zᵢ) − μ_m(x)) / σ_m(x),

μ_m(x), σ_m(x) the mean and standard deviation of method m's scores of target x over the
training set. Standardising per target puts methods of different scales (a kernel score, an
influence) on one footing; the weights are equal, so nothing is tuned on ground truth. Each
member is scored by its own :class:`~diffattr.attribution.attributor.Attributor` on the same
model, training set and feature store directory (its own features, kernel and default λ), so
features one member computed are reused by a later run of it alone.

The registered method ``combine[methods=das+trak]`` (members joined by ``+``, each with its own
options in brackets: ``combine[methods=das+ekfac[normalize=true]]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffattr.errors import ConfigError


def standardise(scores: np.ndarray) -> np.ndarray:
    """(T, N) scores minus each target's mean over the training set, over its std (0 → 1)."""
    s = np.asarray(scores, dtype=np.float64)
    centred = s - s.mean(axis=1, keepdims=True)
    std = centred.std(axis=1, keepdims=True)
    return centred / np.where(std > 0, std, 1.0)


def combine_scores(parts: list[np.ndarray]) -> np.ndarray:
    """The mean of the parts' per-target standardised scores (module docstring)."""
    if not parts:
        raise ConfigError("a combination needs at least one method")
    shapes = {np.shape(p) for p in parts}
    if len(shapes) != 1:
        raise ConfigError(f"combined methods' scores differ in shape: {sorted(shapes)}")
    return np.mean([standardise(p) for p in parts], axis=0)


def parse_members(methods: Any) -> list[tuple[str, dict[str, Any]]]:
    """``das+ekfac[normalize=true]`` (or a list of such names) → [(name, options), …]."""
    from diffattr.attribution.methods.spec import parse_method_list, split_top_level

    if isinstance(methods, str):
        items = [m.strip() for m in split_top_level(methods, "+")]
    else:
        items = [str(m).strip() for m in methods or ()]
    if len(items) < 2 or not all(items):
        raise ConfigError(
            f"combine needs two or more methods joined by '+', got {methods!r}",
            hint="e.g. combine[methods=das+trak]",
        )
    return [parse_method_list(item)[0] for item in items]


def combination_from_inputs(inputs: Any, methods: Any = None) -> tuple[np.ndarray, dict]:
    """The registered ``combine`` method: each member scored through the inputs' ``scorer``
    (its own features and default λ, or the λ given), then :func:`combine_scores`.

    Options: ``methods``: the members, joined by + (das+ekfac), each standardised per target
    and averaged with equal weights."""
    from diffattr.attribution.methods.spec import method_label

    members = parse_members(methods)
    if inputs.context.scorer is None:
        raise ConfigError(
            "combine needs a scorer in its ScoreInputs", hint="score it through Attributor"
        )
    parts = [inputs.context.scorer(name, options, lam=inputs.lam) for name, options in members]
    return combine_scores(parts), {"combination_of": [method_label(n, o) for n, o in members]}
