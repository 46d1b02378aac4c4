"""Which training images each removal rule takes away: the evaluation's settings, the rules
(every method, and its screened variants), each method's scores (cached) and their top k, and
the random null."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffattr.attribution.methods.embedding import EncoderSettings
from diffattr.attribution.scores import Scores
from diffattr.errors import ConfigError
from diffattr.seeding import derive_seed

if TYPE_CHECKING:  # the rest is imported where used: the CLI parser stays quick to build
    from diffattr.attribution.screening import Screen
    from diffattr.data import ImageDataset
    from diffattr.families.bound import BoundRun

#: Key namespace of the random removals ("CFA1").
COUNTERFACTUAL_KEY = 0x43464131
RANDOM = "random"
#: Pixel-cosine nearest removal: the baseline any attribution must beat.
PIXEL_NEAREST = "pixel-cos"
#: Baselines every other method is compared with (sign tests), in this order, when present.
BASELINES = (RANDOM, PIXEL_NEAREST)
CONTROL = "none"


@dataclass
class CounterfactualConfig:
    """Settings of a counterfactual evaluation.

    ``k``: images removed per target, a count (≥ 1), a fraction of the training set (< 1) or
    0 (nothing removed). ``methods``: method labels as on the command line (``das``,
    ``das[leverage=true]``); the random null is always added. ``reference``: ``retrain``
    (a k = 0 retraining, default) or ``original`` (the run's model). ``screens``: for each
    method scoring the model's features, one more removal rule per screen (module docstring).
    """

    methods: list[str] = field(default_factory=lambda: ["das", "dtrak"])
    k: float = 10
    num_targets: int = 8
    first_target: int = 0
    seed: int = 0
    reference: str = "retrain"
    picture_targets: int = 6
    bootstrap: int = 2000
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    screens: list[Screen] = field(default_factory=list)

    def validate(self) -> None:
        if self.reference not in ("retrain", "original"):
            raise ConfigError(
                f"unknown reference {self.reference!r}", hint="use retrain or original"
            )
        if self.num_targets < 1 or self.first_target < 0:
            raise ConfigError("--num-targets must be ≥ 1 and --first-target ≥ 0")
        if self.k < 0:
            raise ConfigError("--k must be ≥ 0 (a count, or a fraction below 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_k(k: float, num_train: int) -> int:
    """Images to remove: ``k`` itself when ≥ 1 (an integer), else round(k · N) (at least 1)."""
    if k < 0:
        raise ConfigError(f"--k must be ≥ 0, got {k}")
    if k == 0:
        return 0
    if k < 1:
        count = max(1, int(round(k * num_train)))
    elif float(k).is_integer():
        count = int(k)
    else:
        raise ConfigError(f"--k {k}: give a whole count or a fraction below 1")
    if count >= num_train:
        raise ConfigError(f"--k {k} would remove {count} of {num_train} training images")
    return count


def screened_label(label: str, screen: Screen) -> str:
    """The row of ``label`` screened by ``screen``, named as ``lds eval`` names it
    (``das screen=pixel-cos:10%``)."""
    return f"{label} screen={screen}"


def screenable(label: str) -> bool:
    """Whether a screen can restrict method ``label``: it scores the model's features, which
    :meth:`~diffattr.attribution.attributor.Attributor.score` computes for the candidates
    (image methods and methods computing their own features from the model: no)."""
    from diffattr.attribution.methods import get_method
    from diffattr.attribution.methods.spec import parse_method_list

    [(name, options)] = parse_method_list(label)
    method = get_method(name, **options)
    return method.uses_stored_features()


def removal_rules(
    methods: Sequence[str], screens: Sequence[Screen], k: int, num_train: int
) -> list[tuple[str, str, Screen | None]]:
    """(row label, method label, screen or None) of each removal rule but ``random``: every
    method, each screenable one followed by its screened variants. Refuses a screen keeping
    fewer than ``k`` images per target, and screens that apply to no method."""
    for screen in screens:
        m = screen.count(num_train)
        if m < k:
            raise ConfigError(
                f"--screen {screen} keeps M = {m} of {num_train} training images per target, "
                f"fewer than the k = {k} removed (--k)",
                hint=f"use a screen of at least {k} images, or a smaller --k",
            )
    rules: list[tuple[str, str, Screen | None]] = []
    for label in methods:
        rules.append((label, label, None))
        if screens and screenable(label):
            rules += [(screened_label(label, s), label, s) for s in screens]
    if screens and len(rules) == len(methods):
        raise ConfigError(
            f"--screen applies to none of the methods {', '.join(methods) or '(none)'}",
            hint="screen a method that scores the model's features: das, dtrak, trak, …",
        )
    return rules


def top_proponents(scores: np.ndarray, k: int) -> np.ndarray:
    """(T, k) training positions with the highest scores per row (ties: lower position)."""
    if k == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    s = np.where(np.isfinite(scores), scores, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)


def random_removals(num_train: int, k: int, targets: Sequence[int], seed: int) -> np.ndarray:
    """(T, k) random training positions per target, keyed by (seed, target index)."""
    out = np.zeros((len(targets), k), dtype=np.int64)
    for row, t in enumerate(targets):
        rng = np.random.default_rng(derive_seed(COUNTERFACTUAL_KEY, seed, int(t)))
        out[row] = rng.permutation(num_train)[:k]
    return out


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, sort_keys=True, default=str)) == json.loads(
        json.dumps(b, sort_keys=True, default=str)
    )


def removal_scores(
    bound: BoundRun,
    label: str,
    train_set: ImageDataset,
    samples_path: Path,
    cache_dir: Path,
    settings: Any = None,
    attributor_options: dict[str, Any] | None = None,
    rescore: bool = False,
    screen: Screen | None = None,
    model_fp: str | None = None,
) -> tuple[Scores, str]:
    """Scores of all samples of ``bound``'s run by method ``label`` (restricted by ``screen``
    if given), and where they came from.

    Reuses ``cache_dir/<name>/`` (:func:`scores_cache_name`: scores computed by an earlier
    call) or the run's ``RUN/scores/<label>-samples/`` (``diffattr score``) when their feature
    settings match those of the run's attributor for ``settings`` (and ``attributor_options``:
    λ, batch size, device, progress), their method options (as resolved) are the method's,
    their screen is ``screen`` (none for None) and the model
    fingerprint they record, if any, is ``model_fp``; otherwise computes them and saves them to
    ``cache_dir/<name>/`` with ``model_fp``.
    """
    from diffattr.attribution.methods.spec import parse_method_list
    from diffattr.diffusion.sampling import load_samples

    [(name, given)] = parse_method_list(label)
    run, kwargs = bound.run, attributor_options or {}
    wanted, options = bound.describe(name, given, settings, **kwargs)  # options as resolved
    samples = load_samples(samples_path)
    num = len(samples)
    own = cache_dir / scores_cache_name(label, screen)
    candidates = [own]
    if not rescore:
        candidates.append(run.scores_dir / f"{label}-samples")
    for d in candidates:
        if not (d / "scores.npy").is_file() or not (d / "meta.json").is_file():
            continue
        s = Scores.load(d)
        if (
            set(s.train_ids.tolist()) == set(train_set.ids.tolist())
            and np.array_equal(s.target_ids, np.arange(num))
            and (wanted is None or _same(s.meta.get("features"), wanted))
            and _same(s.meta.get("options", {}), options)
            and same_screen(s.meta.get("screen"), screen)
            and s.meta.get("model_fingerprint", model_fp) == model_fp
        ):
            return s, str(d)
    scores = bound.score(name, given, str(samples_path), settings, screen, heldout=False, **kwargs)
    if model_fp is not None:
        scores.meta["model_fingerprint"] = model_fp
    scores.save(own)
    return scores, "computed"


def scores_cache_name(label: str, screen: Screen | None = None) -> str:
    """Folder of ``OUT/scores/`` holding ``label``'s scores: the label, or for a screened
    variant ``das.screen-pixel-cos-10%-union`` (never an unscreened method's folder)."""
    if screen is None:
        return label
    return f"{label}.screen-{str(screen).replace(':', '-')}-{screen.kernel}"


def same_screen(recorded: dict[str, Any] | None, screen: Screen | None) -> bool:
    """Whether scores whose ``meta.json`` records screen ``recorded`` were made with
    ``screen`` (None: unscreened scores only)."""
    if screen is None or not recorded:
        return screen is None and not recorded
    return _same({k: recorded.get(k) for k in ("similarity", "size", "kernel")}, screen.describe())


def aligned_values(scores: Scores, train_set: ImageDataset, targets: Sequence[int]) -> np.ndarray:
    """(T, N) scores of the chosen targets, columns in training-set position order."""
    pos = train_set.position_of(scores.train_ids)
    row = {int(t): r for r, t in enumerate(scores.target_ids.tolist())}
    out = np.empty((len(targets), len(train_set)), dtype=np.float64)
    out[:, pos] = scores.values[[row[int(t)] for t in targets]]
    return out
