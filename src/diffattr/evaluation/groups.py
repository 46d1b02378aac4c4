"""Group ground truth: leave-one-group-out retraining, and how well group scores predict it.

Build: for every group g of the training set (digit classes, emoji categories, or a groups
file) and every seed s, retrain the run's model on the training set without g, exactly as an
LDS benchmark's subset models are retrained (:class:`~.ground_truth.SubsetJob`: the run's
training settings, common random numbers), and once more on the whole set; measure on the LDS
benchmark's targets the model output F of :mod:`.ground_truth`. The measured effect of
removing g on target x is

    ΔF_g(x) = mean_s [F(x; θ_{s, −g}) − F(x; θ_{s, all})]

(positive: without g the model fits x worse, so g helped produce it).

Evaluate: a method's group score S_g(x) = Σ_{i∈g} τ(x, zᵢ) (the mean for methods whose scores
do not add; default λ, :mod:`~diffattr.attribution.scores.groups`); per target, the Spearman
correlation over groups of S_g(x) and ΔF_g(x), and whether the top group agrees
(argmax S = argmax ΔF); means with bootstrap CIs over targets, per target kind (held-out real,
generated).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError
from diffattr.evaluation.ground_truth import KIND_NAMES, GroundTruth, SubsetJob, run_subset_job
from diffattr.evaluation.stats import spearman_columns
from diffattr.families import family_of
from diffattr.fsio import atomic_write_json, read_json
from diffattr.parallel import Executor
from diffattr.run import RunDir

#: Folder name of the model trained on every training image.
ALL = "all"


def group_positions(train_ids: np.ndarray, assignment: dict[int, str]) -> dict[str, np.ndarray]:
    """Group name → positions of its members in the training set (images without a group
    are never removed)."""
    out: dict[str, list[int]] = {}
    for pos, i in enumerate(np.asarray(train_ids).tolist()):
        if int(i) in assignment:
            out.setdefault(assignment[int(i)], []).append(pos)
    return {g: np.asarray(p, dtype=np.int64) for g, p in sorted(out.items())}


def build_group_truth(
    run: RunDir,
    lds_bench: str | Path,
    out_dir: str | Path,
    assignment: dict[int, str],
    seeds: list[int],
    executor: Executor,
) -> Path:
    """Retrain without each group (and on everything) per seed, measuring F on the LDS
    benchmark's targets (module docstring); resumable: finished models keep their ``F.npy``."""
    family = family_of(run)
    bench, out = Path(lds_bench), Path(out_dir)
    lds = read_json(bench / "lds.json")
    train_set, _ = run.data_spec().load()
    if train_set.fingerprint() != lds["dataset_fingerprint"]:
        raise DiffattrError(f"{run.path} is not the run the LDS benchmark {bench} was built on")
    groups = group_positions(train_set.ids.numpy(), assignment)
    if len(groups) < 2:
        raise DiffattrError("a group benchmark needs at least two groups")
    n = len(train_set)
    manifest = {
        "lds_bench": str(bench),
        "groups": {g: train_set.ids.numpy()[p].tolist() for g, p in groups.items()},
        "seeds": list(seeds),
        "train": lds["train"],
        "measure_timesteps": lds["config"]["measure_timesteps"],
        "measure_seed": lds["config"]["measure_seed"],
    }
    out.mkdir(parents=True, exist_ok=True)
    if (out / "groups.json").is_file() and read_json(out / "groups.json") != manifest:
        raise DiffattrError(
            f"{out} holds a group benchmark with other settings", hint="use another --out"
        )
    atomic_write_json(out / "groups.json", manifest)
    train_config = family.config_from_dict(lds["train"])
    names = [ALL, *groups]
    keep = {ALL: np.arange(n), **{g: np.setdiff1d(np.arange(n), p) for g, p in groups.items()}}
    jobs = [
        SubsetJob(
            family.job_data(run),
            replace(train_config, seed=s).to_dict(),
            keep[g],
            str(out / "models" / f"seed{s}-{_folder(names.index(g), g)}"),
            str(bench / "targets.npz"),
            manifest["measure_timesteps"],
            manifest["measure_seed"],
            "cpu",
            family.name,
        )  # fmt: skip
        for s in seeds
        for g in names
    ]
    finished = lambda job: (Path(job.out_dir) / "F.npy").is_file()  # noqa: E731
    executor.run_pending(run_subset_job, jobs, finished, "groups: retrain without each group")
    return out


def _folder(j: int, group: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in group)[:40]
    return ALL if group == ALL else f"group{j:03d}-{safe}"


def measured_effects(out_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """(group names, ΔF (T, G)): the measured effect of removing each group on each target."""
    out = Path(out_dir)
    manifest = read_json(out / "groups.json")
    groups = list(manifest["groups"])
    names = [ALL, *groups]
    per_seed = []
    for s in manifest["seeds"]:
        f = [np.load(out / "models" / f"seed{s}-{_folder(j, g)}" / "F.npy") for j, g in
             enumerate(names)]  # fmt: skip
        f = np.stack([x.reshape(x.shape[0], -1).mean(axis=1) for x in f], axis=1)  # (T, 1+G)
        per_seed.append(f[:, 1:] - f[:, :1])
    return groups, np.mean(per_seed, axis=0)


def group_agreement(
    scores: np.ndarray,
    train_ids: np.ndarray,
    groups: dict[str, list[int]],
    effects: np.ndarray,
    additive: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per target: (Spearman over groups of the group scores — sums, or means for scores that
    do not add — and the measured effects, whether their top groups agree)."""
    from diffattr.attribution.scores.groups import group_scores

    assignment = {int(i): g for g, members in groups.items() for i in members}
    predicted = group_scores(scores, train_ids, assignment, additive)
    order = [predicted.groups.index(g) for g in groups]
    s = predicted.values[:, order]
    rho = spearman_columns(s.T, effects.T)
    top = s.argmax(axis=1) == effects.argmax(axis=1)
    return rho, top


def bootstrap_mean(values: np.ndarray, num: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap CI of the mean over ``values`` (NaN ignored)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (num, v.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def evaluate_groups(
    out_dir: str | Path,
    run: RunDir | None,
    methods: list[tuple[str, dict[str, Any]]],
    timesteps: int,
    progress: bool = True,
    bootstrap: int = 1000,
) -> list[dict[str, Any]]:
    """Rows per method: per target kind, mean Spearman over groups and top-1 agreement with
    bootstrap CIs over targets (module docstring); scores at the method's default λ from the
    LDS benchmark's kernel caches (or the run's model)."""
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.attribution.methods import get_method
    from diffattr.attribution.methods.spec import method_label
    from diffattr.evaluation.lds import _EvalContext, _scores_at
    from diffattr.families import get_family, open_run
    from diffattr.run import UNCONDITIONAL

    out = Path(out_dir)
    manifest = read_json(out / "groups.json")
    bench = Path(manifest["lds_bench"])
    gt = GroundTruth.load(bench)
    lds = read_json(bench / "lds.json")
    train_set = get_family(lds.get("family", UNCONDITIONAL)).benchmark_train_set(lds)
    groups, effects = measured_effects(out)
    ctx = _EvalContext(
        open_run(run) if run is not None else None, bench, gt, train_set, FeatureSettings(),
        [], progress, "cpu",
    )  # fmt: skip
    rows = []
    for method, options in methods:
        scores = _scores_at(ctx, method, options, timesteps)[-1]
        m = get_method(method, **options)
        rho, top = group_agreement(
            scores, train_set.ids.numpy(), manifest["groups"], effects, m.additive
        )
        image_only = m.image_only()  # K does not apply
        row: dict[str, Any] = {
            "method": method_label(method, options),
            "timesteps": None if image_only else timesteps,
        }
        for kind, name in KIND_NAMES.items():
            mask = gt.kinds == kind
            if not mask.any():
                continue
            row[name] = {
                "spearman": float(np.nanmean(rho[mask])),
                "spearman_ci": bootstrap_mean(rho[mask], bootstrap),
                "top1": float(top[mask].mean()),
                "top1_ci": bootstrap_mean(top[mask].astype(float), bootstrap),
                "targets": int(mask.sum()),
            }
        rows.append(row)
    return rows


def format_group_table(rows: list[dict[str, Any]], groups: int) -> str:
    """A markdown table of :func:`evaluate_groups` rows (chance: top-1 = 1/groups)."""
    lines = [
        "| method | K | real: Spearman over groups [CI] | real: top-1 group [CI] | "
        "generated: Spearman [CI] | generated: top-1 [CI] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for kind in ("val", "gen"):
            d = r.get(kind)
            if d is None:
                cells += ["–", "–"]
                continue
            cells.append(
                f"{d['spearman']:.3f} [{d['spearman_ci'][0]:.3f}, {d['spearman_ci'][1]:.3f}]"
            )
            cells.append(f"{d['top1']:.2f} [{d['top1_ci'][0]:.2f}, {d['top1_ci'][1]:.2f}]")
        k = "–" if r["timesteps"] is None else r["timesteps"]
        lines.append(f"| {r['method']} | {k} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Chance: Spearman 0, top-1 {1 / groups:.2f} ({groups} groups).")
    return "\n".join(lines) + "\n"


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """The rows as JSON beside the table."""
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")
