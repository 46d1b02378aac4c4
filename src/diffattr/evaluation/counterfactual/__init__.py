"""Counterfactual evaluation: remove a target's top attributed images, retrain, regenerate.

For each generated target x (a sample of the run, regenerated from its recorded seed) and each
method m, the k training images m credits most for x are removed; a model is retrained with the
run's training settings and common random numbers (same preset, steps, seed: it differs from
the original only through the removed data) and x is regenerated from the same seed with the
same sampler. The change is measured as

    pixel L2      ‖x − x'‖₂ over all pixels (images in [-1, 1])         larger: bigger change
    embedding cos cos(e(x), e(x')), e the in-domain encoder of
                  :mod:`diffattr.attribution.methods.embedding`     smaller: bigger change

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

Parts: :mod:`.planning` (settings, removal rules, scores and their top k, the random null),
:mod:`.retraining` (jobs, their keys and images files), :mod:`.measuring` (retrain, regenerate,
distances) and :mod:`.reporting` (summaries, sign tests, table, picture); every name is
importable from here, and :func:`run_counterfactual` puts them together.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffattr.errors import ConfigError
from diffattr.evaluation.counterfactual.measuring import (
    _check_samples,
    embedding_cos,
    evaluate_removals,
    pixel_l2,
)
from diffattr.evaluation.counterfactual.planning import (
    BASELINES,
    CONTROL,
    COUNTERFACTUAL_KEY,
    PIXEL_NEAREST,
    RANDOM,
    CounterfactualConfig,
    aligned_values,
    random_removals,
    removal_rules,
    removal_scores,
    resolve_k,
    same_screen,
    scores_cache_name,
    screenable,
    screened_label,
    top_proponents,
)
from diffattr.evaluation.counterfactual.reporting import (
    DIRECTION,
    METRICS,
    column_caption,
    describe_screens,
    picture,
    removals_table,
    sign_test,
    summarize_removals,
)
from diffattr.evaluation.counterfactual.retraining import (
    RetrainJob,
    images_file,
    removal_key,
    run_retrain_job,
)
from diffattr.fsio import atomic_write_bytes, atomic_write_json, atomic_write_npz, claim_manifest

if TYPE_CHECKING:
    from diffattr.parallel import Executor
    from diffattr.run import RunDir

__all__ = [
    "BASELINES", "CONTROL", "COUNTERFACTUAL_KEY", "DIRECTION", "METRICS", "PIXEL_NEAREST", "RANDOM",
    "CounterfactualConfig", "RetrainJob", "aligned_values", "column_caption", "describe_screens",
    "embedding_cos", "evaluate_removals", "images_file", "picture", "pixel_l2", "random_removals",
    "removal_key", "removal_rules", "removal_scores", "removals_table", "resolve_k",
    "run_counterfactual", "run_retrain_job", "same_screen", "scores_cache_name", "screenable",
    "screened_label", "sign_test", "summarize_removals", "top_proponents",
]  # fmt: skip


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
    from diffattr.families import open_run

    bound = open_run(run)
    spec, train_config = run.data_spec(), bound.family.train_config(run)
    train_set, _ = spec.load()
    k = resolve_k(config.k, len(train_set))
    rules = removal_rules(
        [m for m in config.methods if m != RANDOM], config.screens, k, len(train_set)
    )  # a screen smaller than k is refused before anything is written
    samples_path = run.samples_dir / "samples.npz"
    samples, fp = _check_samples(run, samples_path, bound.model)
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
        scores, sources[row] = removal_scores(
            bound, label, train_set, samples_path, out / "scores", settings,
            {"progress": progress, **(attributor_options or {})}, rescore, screen, fp,
        )  # fmt: skip
        removals[row] = top_proponents(aligned_values(scores, train_set, targets), k)
    rows, images = evaluate_removals(
        run, out, removals, targets, executor, config.reference, config.encoder,
        config.bootstrap, progress, model=bound.model,
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
    table = removals_table(rows, header)
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
