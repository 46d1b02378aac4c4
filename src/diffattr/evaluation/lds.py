"""Linear datamodeling score (LDS) of attribution methods on a built benchmark
(:mod:`.ground_truth`).

Evaluate (``diffattr lds eval``): LDS(x) = Spearman over subsets of Σ_{i∈Sⱼ} τ(x, zᵢ) and
−F(x; θ_Sⱼ) (positive τ = helps produce x = lowers its loss). λ of kernel methods is cross-fitted:
chosen on one half of the targets, reported on the other, and swapped; the oracle λ (best on
the reported targets, as in the literature) is a separate column, and so is the LDS of the
method's default λ rule (what ``diffattr score`` gives a user, chosen without ground truth).
A λ chosen at either end of the grid is flagged: the optimum may lie outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError
from diffattr.evaluation.ground_truth import (
    GEN,
    KIND_NAMES,
    VAL,
    GroundTruth,
    lds_per_target,
    noise_ceiling,
    seed_agreement,
)
from diffattr.evaluation.kernel_cache import KernelCache, cache_inputs, kernel_cache
from diffattr.evaluation.stats import bootstrap_lds_ci, bootstrap_mean_ci, finite_mean
from diffattr.families import get_family, open_run
from diffattr.families.bound import BoundRun
from diffattr.fsio import read_json
from diffattr.run import UNCONDITIONAL, RunDir

#: Relative λ grid of the cross-fit: half-decade steps from 1e-7 to 10 (the best λ of the
#: committed benchmarks lies between 1e-5 and 0.1 relative; a choice at an end is flagged).
DEFAULT_LAMBDAS = (
    1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0
)  # fmt: skip


def cross_fit(
    lds_by_lambda: np.ndarray, mask: np.ndarray, seed: int = 0, repeats: int = 1
) -> tuple[np.ndarray, list[int]]:
    """Per-target LDS with λ chosen on the other half of the targets (within ``mask``).

    ``lds_by_lambda``: (L, T). Targets in ``mask`` are split in two halves at random (seeded);
    each half is scored with the λ index maximising mean LDS on the other half.
    Returns the (T_mask,) LDS values and the chosen λ indices.
    """
    idx = np.flatnonzero(mask)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(idx)
    halves = [perm[: len(perm) // 2], perm[len(perm) // 2 :]]
    out = np.empty(lds_by_lambda.shape[1])
    chosen = []
    for a, b in ((0, 1), (1, 0)):
        best = int(np.nanargmax(np.nanmean(lds_by_lambda[:, halves[a]], axis=1)))
        out[halves[b]] = lds_by_lambda[best, halves[b]]
        chosen.append(best)
    return out[idx], chosen


def summarize(
    gt: GroundTruth,
    scores_by_lambda: list[np.ndarray],
    lambdas: list[float],
    seed: int = 0,
    bootstrap: int = 1000,
    default_scores: np.ndarray | None = None,
    default_lambda: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Per target kind: cross-fitted LDS with CIs (targets; subsets × targets), oracle LDS,
    and the LDS of ``default_scores`` (the method's default λ rule, named ``default_lambda``;
    λ-free methods: their one score). ``lambda_at_edge``: a cross-fitted or oracle λ is the
    first or last of a grid of more than one."""
    lds = np.stack([lds_per_target(gt, s) for s in scores_by_lambda])  # (L, T)
    if default_scores is None:
        default_lds, default_lambda = (lds[0], None) if len(lambdas) == 1 else (None, None)
    else:
        default_lds = lds_per_target(gt, default_scores)
    out: dict[str, dict[str, Any]] = {}
    for kind, name in KIND_NAMES.items():
        mask = gt.kinds == kind
        if not mask.any():
            continue
        if len(lambdas) > 1:
            values, chosen = cross_fit(lds, mask, seed)
        else:
            values, chosen = lds[0, mask], [0, 0]
        oracle_idx = int(np.nanargmax(np.nanmean(lds[:, mask], axis=1)))
        best_scores = scores_by_lambda[chosen[0]][mask]
        pred = gt.predicted(best_scores)
        meas = gt.measured()[:, mask]
        out[name] = {
            "lds": float(np.nanmean(values)),
            "ci_targets": bootstrap_mean_ci(values, seed=seed),
            "ci_subsets_targets": bootstrap_lds_ci(pred, meas, num=bootstrap, seed=seed),
            "lambda_chosen": [lambdas[c] for c in chosen],
            "oracle_lds": float(np.nanmean(lds[oracle_idx, mask])),
            "oracle_lambda": lambdas[oracle_idx],
            "num_targets": int(mask.sum()),
        }
        if len(lambdas) > 1:
            out[name]["lambda_at_edge"] = _at_edge(lds[:, mask], {*chosen, oracle_idx})
        if default_lds is not None:
            out[name]["default_lds"] = float(np.nanmean(default_lds[mask]))
            out[name]["default_ci_targets"] = bootstrap_mean_ci(default_lds[mask], seed=seed)
            if default_lambda is not None:
                out[name]["default_lambda"] = default_lambda
    return out


#: LDS by which an end of the λ grid must beat its neighbour to count as a choice at the edge.
EDGE_TOLERANCE = 1e-3


def _at_edge(lds: np.ndarray, chosen: set[int]) -> bool:
    """Whether a chosen λ index is an end of the grid where the mean LDS (over ``lds``'s
    targets) still rises towards that end — the optimum may lie beyond it. A plateau (a λ so
    small that the kernel no longer changes, or so large that it only scales) is not flagged."""
    means = np.nanmean(lds, axis=1)
    last = len(means) - 1
    return any(
        (i == 0 and means[0] > means[1] + EDGE_TOLERANCE)
        or (i == last and means[last] > means[last - 1] + EDGE_TOLERANCE)
        for i in chosen
    )


def method_scores(
    method: str, cache: KernelCache | None, ridges: list[Any], train_images, target_images,
    **options: Any,
) -> list[np.ndarray]:  # fmt: skip
    """Scores (T, N) per λ rule in ``ridges`` (a :class:`Ridge`, or None for the method's
    default); one entry for kernel-free methods."""
    from diffattr.attribution.methods import get_method

    inputs = cache_inputs(cache, train_images, target_images)
    return get_method(method, **options).score_grid(inputs, ridges)


def lambda_grid(lambdas: list[float]) -> list[Any]:
    """The relative-λ grid as rules, then None: the method's default rule (last entry)."""
    from diffattr.attribution.kernel.ridge import Ridge

    return [Ridge("relative", c) for c in lambdas] + [None]


def summarize_grid(
    gt: GroundTruth, scores: list[np.ndarray], lambdas: list[float], method: str, bootstrap: int
) -> dict[str, dict[str, Any]]:
    """:func:`summarize` of scores over :func:`lambda_grid` (one entry: a λ-free method)."""
    from diffattr.attribution.methods import get_method

    if len(scores) == 1:
        return summarize(gt, scores, [None], bootstrap=bootstrap)
    ridge = get_method(method).default_ridge
    return summarize(
        gt, scores[:-1], lambdas, bootstrap=bootstrap, default_scores=scores[-1],
        default_lambda=str(ridge) if ridge is not None else "the base method's default",
    )  # fmt: skip


def evaluate_benchmark(
    bench_dir: str | Path,
    run: RunDir | None,
    methods: list[tuple[str, dict[str, Any]]],
    timesteps: list[int],
    lambdas: list[float] | None = None,
    base_settings=None,
    progress: bool = True,
    bootstrap: int = 1000,
    measure_timesteps: int | None = None,
    seeds: list[int] | None = None,
    device: str = "cpu",
    screens: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """LDS rows (method × K) for a built benchmark; features come from ``run`` or the cache.

    ``measure_timesteps`` / ``seeds`` evaluate against F over fewer timesteps or seeds (ablation).
    ``device``: where features are computed. ``screens``: instead of the plain scores, each
    method's scores kept on each :class:`~diffattr.attribution.screening.Screen`'s candidates
    only (the kernel on all N, ``--screen-kernel all``; unscored images add 0 to a subset's
    prediction), one row per screen (``None`` in the list: the plain scores' row).
    """
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.attribution.methods import METHODS, get_method
    from diffattr.attribution.methods.spec import method_label

    bench = Path(bench_dir)
    gt = GroundTruth.load(bench, measure_timesteps, seeds)
    manifest = read_json(bench / "lds.json")
    family = get_family(manifest.get("family", UNCONDITIONAL))
    train_set = family.benchmark_train_set(manifest)  # latents, for latent targets
    lambdas = list(lambdas or DEFAULT_LAMBDAS)
    ctx = _EvalContext(
        open_run(run) if run is not None else None,
        bench,
        gt,
        train_set,
        base_settings or FeatureSettings(),
        lambdas,
        progress,
        device,
    )
    rows: list[dict[str, Any]] = []
    keep = {screen: _screen_mask(ctx, screen) for screen in screens or [] if screen is not None}
    ceilings = {"noise ceiling": noise_ceiling(gt), "seed agreement": seed_agreement(gt)}
    for method, options in methods:
        if method not in METHODS:
            get_method(method)  # raises the standard unknown-method error
        m = get_method(method, **options)  # also checks the options
        feature_free = m.image_only()
        for K in [None] if feature_free else timesteps:
            scores = _scores_at(ctx, method, options, K)
            for screen in screens or [None]:
                screened = (
                    scores if screen is None else [np.where(keep[screen], s, 0.0) for s in scores]
                )
                summary = summarize_grid(gt, screened, lambdas, method, bootstrap)
                label = method_label(method, options)
                row = {"method": label if screen is None else f"{label} screen={screen}",
                       "timesteps": K, **summary}  # fmt: skip
                if screen is not None:
                    row["screen"] = screen.describe()
                if m.measure is not None and ctx.base.projector not in ("identity", "auto"):
                    row.update(projector=ctx.base.projector, proj_dim=ctx.base.proj_dim)
                rows.append(row)
    for name, kind in (("val", VAL), ("gen", GEN)):
        mask = gt.kinds == kind
        for label, per_target in ceilings.items() if mask.any() else ():
            rows.append(
                {
                    "method": label,
                    "timesteps": None,
                    name: {"lds": finite_mean(per_target[mask])},  # NaN with one seed
                }  # fmt: skip
            )
    return rows


@dataclass
class _EvalContext:
    """What scoring a method on a benchmark needs besides the method."""

    bound: BoundRun | None  # the run, opened (features from its model), if given
    bench: Path
    gt: GroundTruth
    train_set: Any
    base: Any  # FeatureSettings
    lambdas: list[float]
    progress: bool
    device: str


def _scores_at(ctx: _EvalContext, method: str, options: dict[str, Any], K: int | None):
    """Scores (T, N) of a method at K: one per relative λ of the grid then the default rule
    (methods whose scores depend on λ), or a single entry. A combination
    (``Method.components``) is combined from its members' default-λ scores, each computed as
    it would be alone (and cached so). Kernel methods score from the benchmark's kernel cache
    of their measure; methods that compute features from the model get the run's model and
    its features too."""
    from diffattr.attribution.methods import get_method, method_context, resolve_method
    from diffattr.attribution.methods.combination import combine_scores

    m = get_method(method, **options)
    members = m.components()
    if members:
        return [combine_scores([_scores_at(ctx, n, o, K)[-1] for n, o in members])]
    settings = replace(ctx.base, timesteps=K)
    cache = None
    if m.measure is not None:
        settings = replace(settings, measure=m.measure)
        cache = kernel_cache(ctx.bound, ctx.bench, ctx.gt, settings, ctx.progress, ctx.device)
    grid = lambda_grid(ctx.lambdas)
    if not m.needs_model:
        inputs = cache_inputs(cache, ctx.train_set.images, ctx.gt.images)
        run_dir = ctx.bound.run.path if ctx.bound is not None else None
        return resolve_method(method, options, method_context(settings, run_dir)).score_grid(
            inputs, grid
        )
    if ctx.bound is None:
        raise DiffattrError(f"{method} computes features from the model", hint="pass --run RUN")
    gram = cache.gram_fields() if cache is not None else None  # TRAK's for journey-trak
    return ctx.bound.score_grid(
        method, options, settings, ctx.gt.images, ctx.gt.keys, ctx.gt.seeds, gram, grid,
        device=ctx.device, progress=ctx.progress,
    )  # fmt: skip


def _screen_mask(ctx: _EvalContext, screen: Any) -> np.ndarray:
    """(T, N) True on each target's candidates: scores are kept there, 0 elsewhere."""
    from diffattr.attribution.screening import candidate_rows, similarity_scores

    if screen.kernel != "all":
        raise DiffattrError(
            f"lds eval applies a screen to the scores of the full kernel (--screen-kernel all), "
            f"not {screen.kernel!r}",
            hint="benchmarks/screening.py measures the union and candidates kernels",
        )
    images = ctx.train_set.images
    inputs = cache_inputs(None, images, ctx.gt.images).updated(
        train_ids=np.asarray(ctx.train_set.ids),
        store_dir=ctx.bound.run.features_dir if ctx.bound is not None else None,
    )
    cand = candidate_rows(similarity_scores(screen, inputs), screen.count(len(images)))
    keep = np.zeros((len(ctx.gt.images), len(images)), dtype=bool)
    np.put_along_axis(keep, cand, True, axis=1)
    return keep


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: method, K, then per target kind the cross-fitted LDS [CIs], the oracle
    and the default λ rule's LDS. † marks a λ chosen at an end of the grid (footnote)."""

    def cell(r: dict[str, Any], kind: str) -> tuple[str, str, str]:
        d = r.get(kind)
        if not d:
            return "", "", ""
        if "ci_targets" not in d:
            return ("n/a (one seed)" if np.isnan(d["lds"]) else f"{d['lds']:.3f}"), "", ""
        lo, hi = d["ci_targets"]
        slo, shi = d["ci_subsets_targets"]
        edge = " †" if d.get("lambda_at_edge") else ""
        default = f"{d['default_lds']:.3f}" if "default_lds" in d else ""
        return (
            f"{d['lds']:.3f} [{lo:.3f}, {hi:.3f}] [{slo:.3f}, {shi:.3f}]{edge}",
            f"{d['oracle_lds']:.3f}",
            default,
        )

    lines = [
        "| method | K | val LDS (cross-fit λ) [CI targets] [CI subsets×targets] | val oracle λ "
        "| val default λ | gen LDS (cross-fit λ) [CI targets] [CI subsets×targets] "
        "| gen oracle λ | gen default λ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    merged: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in rows:
        merged.setdefault((r["method"], r["timesteps"]), {}).update(r)
    edge = False
    for (method, K), r in merged.items():
        v, vo, vd = cell(r, "val")
        g, go, gd = cell(r, "gen")
        edge = edge or any(r.get(k, {}).get("lambda_at_edge") for k in ("val", "gen"))
        lines.append(
            f"| {method} | {K if K is not None else '–'} | {v} | {vo} | {vd} | {g} | {go} | {gd} |"
        )
    if edge:
        lines.append("")
        lines.append("† λ chosen at an end of the grid: widen `--lambdas` past it.")
    return "\n".join(lines)
