"""Counterfactual evaluation: remove a target's top attributed images, retrain, regenerate.

For each generated target x (a sample of the run, regenerated from its recorded seed) and each
method m, the k training images m credits most for x are removed; a model is retrained with the
run's training settings and common random numbers (same preset, steps, seed: it differs from
the original only through the removed data) and x is regenerated from the same seed with the
same sampler. The change is measured as

    pixel L2      ‖x − x'‖₂ over all pixels (images in [-1, 1])         larger: bigger change
    embedding cos cos(e(x), e(x')), e the in-domain encoder of
                  :mod:`diffattr.attribution.embedding`                  smaller: bigger change

against the same number of *random* removals per target (the null). Good attributions move
the image more than random removals.

Reference. Sampling is bit-reproducible only for the same batch composition, so every image
is regenerated alone (batch of one). Training is bit-reproducible only with the same number of
torch threads, so the default reference is a model retrained with *nothing* removed (k = 0) in
the same workers as the removals: distances then measure the removed data only. The run's own
model regenerating the target alone is the other choice (``reference="original"``); the
distance between the two ("none" row, a control) is 0 when the run was trained with the
workers' thread count (one per worker) and otherwise shows the numerical floor.

Retrainings are content-addressed: ``OUT/retrain/<hash of removed ids and settings>/`` holds
one model and ``images-<sampler><steps>.npz`` (the regenerated seeds), written atomically, so a
killed evaluation resumes without retraining finished models, identical removal sets (the k = 0
control shared by all targets; methods agreeing on a target's top k) are trained once, and
adding targets or methods later reuses everything already done.

Screened rows (``screens``, ``diffattr counterfactual --screen pixel-cos:10%``): for every
method that scores the model's features (not image methods such as ``pixel-cos``, nor methods
that compute their own features from the model, such as ``ekfac`` and ``combine``), a second
removal rule ``das screen=pixel-cos:10%``: the method's scores as ``diffattr score --screen``
computes them (each target scored on its M training images most similar by the screen's
similarity, M ≥ k), the top k of those removed. Its scores are cached apart from the
unscreened method's (``OUT/scores/<label>.screen-<similarity>-<M>-<kernel>/``, checked against
the screen recorded in their ``meta.json``); its retrainings are keyed by what they remove like
every other's, so a target on which both variants remove the same images is retrained once.

Paired sign tests compare every method with each baseline present — ``random`` and
``pixel-cos`` nearest removal, the baseline any attribution must beat — and with each other.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffattr.attribution.embedding import EncoderSettings
from diffattr.attribution.scores import Scores
from diffattr.errors import ConfigError, DiffattrError
from diffattr.fsio import atomic_write_bytes, atomic_write_json, atomic_write_npz, claim_manifest
from diffattr.seeding import derive_seed

if TYPE_CHECKING:  # the rest is imported where used: the CLI parser stays quick to build
    from diffattr.attribution.screening import Screen
    from diffattr.data import ImageDataset
    from diffattr.diffusion.sampling import Samples
    from diffattr.diffusion.training import TrainConfig
    from diffattr.parallel import Executor
    from diffattr.run import RunDir

#: Key namespace of the random removals ("CFA1").
COUNTERFACTUAL_KEY = 0x43464131
RANDOM = "random"
#: Pixel-cosine nearest removal: the baseline any attribution must beat.
PIXEL_NEAREST = "pixel-cos"
#: Baselines every other method is compared with (sign tests), in this order, when present.
BASELINES = (RANDOM, PIXEL_NEAREST)
CONTROL = "none"
METRICS = ("pixel_l2", "embedding_cos")
#: For each metric, +1 if larger values mean a bigger change of the image, −1 otherwise.
DIRECTION = {"pixel_l2": 1, "embedding_cos": -1}


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
    from diffattr.attribution.method_spec import parse_method_list
    from diffattr.attribution.methods import get_method

    [(name, options)] = parse_method_list(label)
    method = get_method(name, **options)
    return method.measure is not None and not method.needs_model


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


# ---------------------------------------------------------------------------- retraining


@dataclass
class RetrainJob:
    """One retraining without the training positions ``removed``, then regenerations of
    ``seeds`` (each alone); picklable for worker processes."""

    data: dict[str, Any]
    train: dict[str, Any]
    removed: np.ndarray
    out_dir: str
    seeds: list[int]
    sampler: str
    num_steps: int
    model_dir: str | None = None  # no retraining: regenerate with this model (the run's)
    family: str = "unconditional"  # the run's model family: how to retrain and regenerate


def images_file(out_dir: str | Path, sampler: str, num_steps: int) -> Path:
    return Path(out_dir) / f"images-{sampler}{num_steps}.npz"


def _read_images(path: Path) -> dict[int, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path) as z:
        images, seeds = z["images"], z["seeds"]
    return {int(s): images[i] for i, s in enumerate(seeds)}


def run_retrain_job(job: RetrainJob) -> str:
    """Retrain (resuming) and regenerate the seeds not yet in the job's images file."""
    from diffattr.families import get_family

    path = images_file(job.out_dir, job.sampler, job.num_steps)
    have = _read_images(path)
    missing = [int(s) for s in job.seeds if int(s) not in have]
    if not missing:
        return str(path)
    out = Path(job.out_dir)
    family = get_family(job.family)
    config = replace(family.config_from_dict(job.train), keep_checkpoints=False)
    if job.model_dir is not None:
        model_dir = Path(job.model_dir)
    else:
        dataset = family.retrain_set(job.data)
        removed = np.asarray(job.removed, dtype=np.int64)
        keep = np.setdiff1d(np.arange(len(dataset)), removed)
        if not (out / "job.json").is_file():
            removed_ids = dataset.ids[torch.as_tensor(removed)].tolist()
            atomic_write_json(out / "job.json", {"removed_ids": removed_ids, "kept": len(keep)})
        model_dir = family.train_model(dataset, config, out, keep)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    model = family.load_trained(config, model_dir)
    images = family.regenerate(model, job.data, config, missing, job.sampler, job.num_steps)
    have.update(zip(missing, images, strict=True))
    seeds = np.array(sorted(have), dtype=np.int64)
    stacked = np.stack([have[int(s)] for s in seeds])
    atomic_write_npz(path, seeds=seeds, images=stacked)
    return str(path)


def removal_key(removed_ids: np.ndarray, train_config: TrainConfig, dataset_fp: str) -> str:
    """Names a retraining: sha256 of the sorted removed ids, weight settings and data."""
    h = hashlib.sha256(b"diffattr-counterfactual-v1\0")
    h.update(np.sort(np.asarray(removed_ids, dtype=np.int64)).astype("<i8").tobytes())
    h.update(json.dumps(train_config.weights_key(), sort_keys=True).encode())
    h.update(dataset_fp.encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- measurement


def pixel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ‖a − b‖₂ over all pixels (float64)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.sqrt((d.reshape(d.shape[0], -1) ** 2).sum(axis=1))


def embedding_cos(encoder: Callable[[torch.Tensor], Any], a: np.ndarray, b: np.ndarray):
    """Row-wise cosine of the embeddings of ``a`` and ``b`` under ``encoder``."""
    from diffattr.attribution.embedding import embed

    ea = embed(encoder, torch.from_numpy(np.asarray(a, dtype=np.float32)))
    eb = embed(encoder, torch.from_numpy(np.asarray(b, dtype=np.float32)))
    na = np.maximum(np.linalg.norm(ea, axis=1), 1e-30)
    nb = np.maximum(np.linalg.norm(eb, axis=1), 1e-30)
    return (ea * eb).sum(axis=1) / (na * nb)


def sign_test(a: np.ndarray, b: np.ndarray, direction: int = 1) -> dict[str, Any]:
    """Paired two-sided sign test: does ``a`` change the image more than ``b`` per target?

    ``wins``: targets where a's change is bigger (a > b for direction +1, a < b for −1).
    """
    from scipy.stats import binomtest

    d = direction * (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    d = d[np.isfinite(d)]
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n = wins + losses
    return {
        "wins": wins,
        "ties": int(d.size - n),
        "losses": losses,
        "median_diff": float(direction * np.median(d)) if d.size else float("nan"),
        "p": float(binomtest(wins, n, 0.5).pvalue) if n else 1.0,
    }


def summarize(
    values: dict[str, dict[str, np.ndarray]], bootstrap: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per method: per-target values, median, mean and bootstrap 95% CI per metric,
    and paired sign tests against the :data:`BASELINES` present (``random``, ``pixel-cos``)
    first, then the other (non-control) methods."""
    from diffattr.evaluation.stats import bootstrap_mean_ci

    rows = []
    compared = [m for m in values if m != CONTROL]
    for method, metrics in values.items():
        row: dict[str, Any] = {"method": method}
        for name in METRICS:
            v = np.asarray(metrics[name], dtype=np.float64)
            row[name] = [float(x) for x in v]
            row[f"{name}_median"] = float(np.median(v))
            row[f"{name}_mean"] = float(np.mean(v))
            row[f"{name}_ci"] = list(bootstrap_mean_ci(v, num=bootstrap, seed=seed))
        if method != RANDOM and method != CONTROL:
            others = [b for b in BASELINES if b in values and b != method]
            others += [m for m in compared if m != method and m not in others]
            row["paired"] = {
                other: {
                    name: sign_test(metrics[name], values[other][name], DIRECTION[name])
                    for name in METRICS
                }
                for other in others
            }
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], header: str = "") -> str:
    """Markdown: per-method summary, then the paired sign tests: every method against each
    baseline (``random``, then ``pixel-cos``), then the remaining pairs, each pair once."""

    def ci(r: dict[str, Any], name: str) -> str:
        lo, hi = r[f"{name}_ci"]
        return f"{r[f'{name}_mean']:.4f} [{lo:.4f}, {hi:.4f}]"

    lines = [header, ""] if header else []
    lines += [
        "| method | k | targets | pixel L2 median | pixel L2 mean [95% CI] "
        "| embedding cos median | embedding cos mean [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r.get('k', '')} | {len(r['pixel_l2'])} "
            f"| {r['pixel_l2_median']:.4f} | {ci(r, 'pixel_l2')} "
            f"| {r['embedding_cos_median']:.4f} | {ci(r, 'embedding_cos')} |"
        )
    pairs = [
        (r["method"], other, name, d[name])
        for stage in (*BASELINES, None)  # against each baseline, then the rest
        for r in rows
        for other, d in r.get("paired", {}).items()
        if stage is None or other == stage
        for name in METRICS
    ]
    seen: set[frozenset[str]] = set()
    if pairs:
        lines += [
            "",
            "Paired per target (wins: the first method changed the image more; two-sided sign "
            "test, ties dropped):",
            "",
            "| comparison | metric | wins / ties / losses | median difference | p |",
            "|---|---|---|---|---|",
        ]
        for a, b, name, t in pairs:
            key = frozenset((a, b, name))
            if key in seen:
                continue
            seen.add(key)
            lines.append(
                f"| {a} vs {b} | {name.replace('_', ' ')} | {t['wins']} / {t['ties']} / "
                f"{t['losses']} | {t['median_diff']:+.4f} | {t['p']:.3g} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- scores


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, sort_keys=True, default=str)) == json.loads(
        json.dumps(b, sort_keys=True, default=str)
    )


def method_scores(
    run: RunDir,
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
    """Scores of all samples by method ``label`` (restricted by ``screen`` if given), and
    where they came from.

    Reuses ``cache_dir/<name>/`` (:func:`scores_cache_name`: scores computed by an earlier
    call) or the run's ``RUN/scores/<label>-samples/`` (``diffattr score``) when their feature
    settings match those of the run's attributor for ``settings`` (and ``attributor_options``:
    λ, batch size, device, progress), their screen is ``screen`` (none for None) and the model
    fingerprint they record, if any, is ``model_fp``; otherwise computes them and saves them to
    ``cache_dir/<name>/`` with ``model_fp``.
    """
    from diffattr.attribution.method_spec import parse_method_list
    from diffattr.attribution.methods import METHODS, TRAJECTORIES, get_method
    from diffattr.diffusion.sampling import load_samples
    from diffattr.families import family_of

    [(name, options)] = parse_method_list(label)
    get_method(name, **options)  # an unknown method or option fails here
    options = METHODS[name].options_from({"run_dir": str(run.path)}, options)
    family = family_of(run)
    att = family.attributor(run, name, options, settings, **(attributor_options or {}))
    wanted = att.settings.to_dict() if att.method.measure is not None else None
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
            and same_screen(s.meta.get("screen"), screen)
            and s.meta.get("model_fingerprint", model_fp) == model_fp
        ):
            return s, str(d)
    if TRAJECTORIES in att.method.requirements():
        targets = family.trajectory_targets(run, str(samples_path))
    else:
        targets = family.targets(run, str(samples_path))[1]
    scores = att.score(targets, np.arange(num), screen=screen)
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


# ---------------------------------------------------------------------------- evaluation


def _check_samples(run: RunDir, path: Path) -> tuple[Samples, str]:
    from diffattr.diffusion.presets import model_fingerprint
    from diffattr.diffusion.sampling import load_samples
    from diffattr.families import family_of

    if not path.is_file():
        raise DiffattrError(
            f"no generated samples in {path.parent}",
            hint=f"run `diffattr generate {run.path}` first",
        )
    samples = load_samples(path)
    with np.load(path) as z:
        recorded = str(z["model_fingerprint"]) if "model_fingerprint" in z.files else ""
    fp = model_fingerprint(family_of(run).model(run))
    if recorded and recorded != fp:
        raise DiffattrError(
            f"{path} was generated by another model than {family_of(run).model_dir(run)}",
            hint=f"regenerate the targets with `diffattr generate {run.path}`",
        )
    return samples, fp


def evaluate_removals(
    run: RunDir,
    out_dir: str | Path,
    removals: dict[str, np.ndarray],
    targets: Sequence[int],
    executor: Executor,
    reference: str = "retrain",
    encoder_settings: EncoderSettings | None = None,
    bootstrap: int = 2000,
    progress: bool = True,
    control: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Retrain without each removal set, regenerate, measure; the machinery of
    :func:`run_counterfactual` for removals chosen by any means.

    ``removals``: method → (T, k) training *positions* removed for each of ``targets``
    (indices into the run's samples). Returns the summary rows (one per method, plus the
    k = 0 control ``none`` unless ``control`` is false, which needs ``reference="original"``)
    and the images: ``original`` (as stored), ``original_alone``, ``control``, ``reference``
    and one array per method, each (T, C, H, W).
    """
    from diffattr.attribution.embedding import load_or_train_encoder
    from diffattr.families import family_of

    if reference not in ("retrain", "original"):
        raise ConfigError(f"unknown reference {reference!r}", hint="use retrain or original")
    if not control and reference == "retrain":
        raise ConfigError("the k = 0 control is the reference: it cannot be left out")
    out = Path(out_dir)
    samples_path = run.samples_dir / "samples.npz"
    samples, fp = _check_samples(run, samples_path)
    targets = [int(t) for t in targets]
    if not targets or min(targets) < 0 or max(targets) >= len(samples):
        raise ConfigError(f"targets must be sample indices in [0, {len(samples)})")
    seeds = [int(samples.seeds[t]) for t in targets]
    family = family_of(run)
    train_config = family.train_config(run)
    train_set, _ = run.data_spec().load()
    data_fp = train_set.fingerprint()
    ids = train_set.ids.numpy()
    data = family.retrain_data(run, samples_path)

    # One job per distinct removal set; each regenerates every seed that needs it.
    plan: dict[str, tuple[np.ndarray, set[int]]] = {}
    where: dict[str, list[str]] = {}
    if CONTROL in removals:
        raise ConfigError(f"{CONTROL!r} names the k = 0 control; call the method otherwise")
    sets = dict(removals)
    if control:
        sets[CONTROL] = np.zeros((len(targets), 0), dtype=np.int64)
    for method, rem in sets.items():
        rem = np.asarray(rem, dtype=np.int64)
        if rem.ndim != 2 or rem.shape[0] != len(targets):
            raise ConfigError(f"{method}: need one row of removed positions per target")
        if rem.size and (rem.min() < 0 or rem.max() >= len(ids)):
            raise ConfigError(f"{method}: removed positions must lie in [0, {len(ids)})")
        where[method] = []
        for row, seed in enumerate(seeds):
            positions = np.unique(rem[row])
            key = removal_key(ids[positions], train_config, data_fp)
            plan.setdefault(key, (positions, set()))[1].add(seed)
            where[method].append(key)
    jobs = [
        RetrainJob(
            data,
            train_config.to_dict(),
            positions,
            str(out / "retrain" / key),
            sorted(job_seeds),
            samples.sampler,
            samples.num_steps,
            family=family.name,
        )
        for key, (positions, job_seeds) in plan.items()
    ]
    # The run's model regenerates the targets alone in a worker too (same arithmetic).
    original = RetrainJob(
        data,
        train_config.to_dict(),
        np.zeros(0, dtype=np.int64),
        str(out / "original" / fp[:16]),
        seeds,
        samples.sampler,
        samples.num_steps,
        model_dir=str(family.model_dir(run)),
        family=family.name,
    )
    list(executor.map(run_retrain_job, [*jobs, original], desc="counterfactual: retrain"))

    cache: dict[str, dict[int, np.ndarray]] = {}

    def image(key: str, seed: int) -> np.ndarray:
        if key not in cache:
            cache[key] = _read_images(
                images_file(out / "retrain" / key, samples.sampler, samples.num_steps)
            )
        return cache[key][seed]

    regenerated = {
        m: np.stack([image(k, s) for k, s in zip(keys, seeds, strict=True)])
        for m, keys in where.items()
    }
    found = _read_images(images_file(original.out_dir, samples.sampler, samples.num_steps))
    alone = np.stack([found[s] for s in seeds])
    ref = regenerated[CONTROL] if reference == "retrain" else alone
    encoder, _ = load_or_train_encoder(
        train_set.images, ids, encoder_settings or EncoderSettings(), run.features_dir, progress
    )
    values: dict[str, dict[str, np.ndarray]] = {}
    for method in [RANDOM, *[m for m in removals if m != RANDOM]]:
        if method not in removals:
            continue
        values[method] = {
            "pixel_l2": pixel_l2(ref, regenerated[method]),
            "embedding_cos": embedding_cos(encoder, ref, regenerated[method]),
        }
    if control:
        values[CONTROL] = {
            "pixel_l2": pixel_l2(alone, regenerated[CONTROL]),
            "embedding_cos": embedding_cos(encoder, alone, regenerated[CONTROL]),
        }
    rows = summarize(values, bootstrap=bootstrap)
    for r in rows:
        m = r["method"]
        r["targets"], r["seeds"] = targets, seeds
        if m == CONTROL:
            r["k"], r["control"] = 0, True
            r["note"] = "k = 0 retraining vs the run's own model (numerical floor; 0 = exact)"
        else:
            rem = np.asarray(removals[m])
            r["k"] = int(rem.shape[1])
            r["removed_ids"] = [[int(i) for i in ids[row]] for row in rem]
        r["reference"] = reference
        r["retrain"] = where[m]  # OUT/retrain/<key> of each target's retraining
    images = {
        "original": samples.images[targets].numpy(),
        "original_alone": alone,
        "reference": ref,
        **{m: regenerated[m] for m in removals},
    }
    if control:
        images["control"] = regenerated[CONTROL]
    return rows, images


def column_caption(label: str, width: int) -> str:
    """``label`` in at most ``width`` characters, for a picture's column: a screened variant
    as ``das scr10%``; if too long, option names dropped, then a single option's value alone
    (``combine[methods=das+ekfac]`` → ``das+ekfac``), then cut."""
    base, sep, screen = label.partition(" screen=")
    suffix = f" scr{screen.rpartition(':')[2]}" if sep else ""
    if len(base + suffix) > width:
        base = re.sub(r"[\w-]+=", "", base)
    one_option = base.endswith("]") and "[" in base and ";" not in base
    if len(base + suffix) > width and one_option:
        base = base[base.index("[") + 1 : -1]
    text = base + suffix
    return text if len(text) <= width else text[: max(1, width - 1)] + "~"


def picture(
    images: dict[str, np.ndarray], methods: Sequence[str], num: int, path: Path,
    targets: Sequence[int] | None = None,
) -> list[str]:  # fmt: skip
    """PNG grid: one row per target (first ``num``, labelled with its sample index from
    ``targets``): reference, random, then ``methods``, each column named above it (shortened
    by :func:`column_caption` to fit). Returns the columns, each as ``caption (= label)``
    where the caption is not the label."""
    from diffattr.data import make_grid, save_png

    columns = ["reference", *[m for m in (RANDOM, *methods) if m in images]]
    n = min(num, images["reference"].shape[0])
    tiles = [torch.from_numpy(images[c][t]) for t in range(n) for c in columns]
    grid = make_grid(torch.stack(tiles), nrow=len(columns))
    size = int(tiles[0].shape[-1])
    scale = max(1, 64 // size)
    captions = [column_caption(c, (size + 1) * scale // 6) for c in columns]
    rows = [f"#{targets[t] if targets is not None else t}" for t in range(n)]
    save_png(grid, path, scale=scale, labels=(captions, rows, size))
    pairs = zip(captions, columns, strict=True)
    return [c if c == label else f"{c} (= {label})" for c, label in pairs]


def describe_screens(
    screens: Sequence[Screen], rules: Sequence[tuple[str, str, Screen | None]], k: int,
    num_train: int,
) -> str:  # fmt: skip
    """The header's sentence on screened rows ('' without screens)."""
    if not screens:
        return ""
    unscreened = [label for _, label, _ in rules if not screenable(label)]
    text = "".join(
        f"`METHOD screen={s}`: the method's scores on each target's M = {s.count(num_train)} "
        f"training images most similar by {s.similarity} only (kernel: {s.kernel}), its top "
        f"k = {k} of those removed. "
        for s in screens
    )
    if unscreened:
        shown = ", ".join(unscreened)
        text += f"Not screened (image methods, or features computed from the model): {shown}. "
    return text


def run_counterfactual(
    run: RunDir,
    out_dir: str | Path,
    config: CounterfactualConfig,
    executor: Executor,
    settings: Any = None,
    attributor_options: dict[str, Any] | None = None,
    rescore: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole evaluation: scores → top-k removals (and random ones; screened variants for
    ``config.screens``) → retrain → regenerate → ``OUT/results.json`` (rows usable as
    ``counterfactual_rows`` of the report), ``OUT/results.md``, ``OUT/counterfactual.png``,
    ``OUT/images.npz`` and ``OUT/counterfactual.json`` (settings, score sources)."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from diffattr.families import family_of

    spec, train_config = run.data_spec(), family_of(run).train_config(run)
    train_set, _ = spec.load()
    k = resolve_k(config.k, len(train_set))
    rules = removal_rules(
        [m for m in config.methods if m != RANDOM], config.screens, k, len(train_set)
    )  # a screen smaller than k is refused before anything is written
    samples_path = run.samples_dir / "samples.npz"
    samples, fp = _check_samples(run, samples_path)
    manifest = {
        "run": str(run.path),
        "data": asdict(spec),
        "train": train_config.weights_key(),
        "dataset_fingerprint": train_set.fingerprint(),
        "model_fingerprint": fp,
    }
    keys = ("data", "train", "dataset_fingerprint", "model_fingerprint")
    claim_manifest(out / "counterfactual.json", manifest, keys, "a counterfactual evaluation")
    last = config.first_target + config.num_targets
    if last > len(samples):
        raise ConfigError(
            f"{config.num_targets} targets from {config.first_target} need {last} samples; "
            f"{samples_path} holds {len(samples)}",
            hint=f"generate more with `diffattr generate {run.path} --num {last}`",
        )
    targets = list(range(config.first_target, last))
    methods = [row for row, _, _ in rules]
    removals = {RANDOM: random_removals(len(train_set), k, targets, config.seed)}
    sources = {RANDOM: f"seeded random (seed {config.seed})"}
    for row, label, screen in rules:
        scores, sources[row] = method_scores(
            run, label, train_set, samples_path, out / "scores", settings,
            {"progress": progress, **(attributor_options or {})}, rescore, screen, fp,
        )  # fmt: skip
        removals[row] = top_proponents(aligned_values(scores, train_set, targets), k)
    rows, images = evaluate_removals(
        run, out, removals, targets, executor, config.reference, config.encoder,
        config.bootstrap, progress,
    )  # fmt: skip
    screened = {row: (label, s) for row, label, s in rules if s is not None}
    for r in rows:
        r["scores_source"] = sources.get(r["method"])
        if r["method"] in screened:
            label, screen = screened[r["method"]]
            count = screen.count(len(train_set))
            r["screen"] = {**screen.describe(), "M": count, "screened_method": label}
    columns = ["reference", RANDOM, *methods]
    if config.picture_targets > 0:
        columns = picture(
            images, methods, config.picture_targets, out / "counterfactual.png", targets
        )
    header = (
        f"Counterfactual evaluation of {run.path}: k = {k} of {len(train_set)} training images "
        f"removed per target, {len(targets)} targets (samples {targets[0]}–{targets[-1]}), "
        f"{samples.sampler} with {samples.num_steps} steps, each image regenerated alone; "
        f"reference: {'a k = 0 retraining' if config.reference == 'retrain' else 'the run model'}"
        ". Larger pixel L2 / smaller embedding cosine (in-domain autoencoder): bigger change. "
        f"`{CONTROL}`: k = 0 retraining vs the run's model (0 = bit-exact). "
        f"{describe_screens(config.screens, rules, k, len(train_set))}"
        f"counterfactual.png columns: {', '.join(columns)}."
    )
    table = format_table(rows, header)
    atomic_write_json(out / "results.json", rows)
    atomic_write_bytes(out / "results.md", (table + "\n").encode())
    atomic_write_npz(out / "images.npz", targets=np.array(targets), **images)
    atomic_write_json(
        out / "counterfactual.json",
        {**manifest, "config": config.to_dict(), "k": k, "scores_sources": sources},
    )
    return {
        "results": str(out / "results.json"),
        "table": str(out / "results.md"),
        "picture": str(out / "counterfactual.png"),
        "retrainings": len({key for r in rows for key in r["retrain"]}),
        "table_text": table,
    }
