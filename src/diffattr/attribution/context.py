"""Scores of the model-based baselines on LDS benchmark targets.

The model-based baselines (``tracin``, ``gas``, ``journey-trak``, ``ensemble``, ``ekfac``;
``Method.needs_model``) read the context fields of :class:`ScoreInputs` (model, schedule,
settings, store directory, ids, the targets as given), which :class:`Attributor` fills.
:func:`benchmark_scores` scores them on LDS benchmark targets, per λ rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def benchmark_scores(
    method: str,
    options: dict[str, Any],
    ridges: list[Any],
    *,
    model: Any,
    train: Any,
    target_images: Any,
    target_ids: np.ndarray,
    target_seeds: np.ndarray | None,
    schedule: Any,
    settings: Any,
    store_dir: Any,
    run_dir: Any = None,
    gram: np.ndarray | None = None,
    trak_inner: np.ndarray | None = None,
    progress: bool = False,
    device: str = "cpu",
) -> list[np.ndarray]:
    """(T, N) scores per λ rule in ``ridges`` (a :class:`Ridge`, or None for the method's
    default; one entry for λ-free methods) of a model-based method on LDS benchmark targets
    (``Method.needs_model``), for ``evaluation.lds.evaluate_benchmark``.

    ``target_seeds``: generation seeds per target, < 0 for real images. ``run_dir`` is the
    default ``checkpoints`` of tracin/gas. journey-trak: generated targets (seed ≥ 0; the whole
    set regenerated as ``sample(model, seeds)`` made it, DDIM 50 steps unless ``sampler`` /
    ``num_steps`` options say otherwise) get trajectory features; real targets have no
    trajectory and get TRAK's own target features, so journey-trak equals TRAK on them.
    ``gram`` / ``trak_inner``: the TRAK kernel cache's ΦΦᵀ and φ(x)ᵀΦᵀ for these features and
    targets, if at hand (journey-trak then recomputes neither).
    """
    import torch

    from diffattr.attribution.attributor import Attributor
    from diffattr.attribution.kernel import Kernel, dual_gram, inner_products
    from diffattr.attribution.methods import METHODS, ScoreInputs, get_method
    from diffattr.errors import ConfigError

    options = dict(options)
    if method not in METHODS or not METHODS[method].needs_model:
        raise ConfigError(f"{method!r} is not a model-based method")
    inputs = ScoreInputs(
        train_images=train.images,
        target_images=target_images,
        num_train=len(train),
        num_targets=len(target_images),
        train_ids=train.ids.numpy(),
        target_ids=np.asarray(target_ids),
        targets=target_images,
        model=model,
        schedule=schedule,
        settings=settings,
        store_dir=store_dir,
        progress=progress,
        device=device,
    )
    if method in ("tracin", "gas"):
        options.setdefault("checkpoints", None if run_dir is None else str(run_dir))
    m = get_method(method, **options)  # also checks the options
    if method != "journey-trak":
        base = options.get("base", "trak")
        if method == "ensemble" and METHODS[base].uses_kernel:
            out = []
            for ridge in ridges:
                inputs.lam = ridge
                out.append(m.score(inputs))
            return out
        return [m.score(inputs)]

    from diffattr.attribution.journey import journey_features
    from diffattr.diffusion.sampling import Samples, initial_noise

    seeds = np.full(len(target_images), -1) if target_seeds is None else np.asarray(target_seeds)
    att = Attributor(
        model, train, store_dir, method="trak", schedule=schedule, settings=settings,
        progress=progress, device=device,
    )  # fmt: skip
    phi = att.featurize().features
    n = phi.shape[0]
    inner = np.zeros((len(target_images), n))
    gen = np.flatnonzero(seeds >= 0)
    real = np.flatnonzero(seeds < 0)
    if gen.size:
        samples = Samples(
            images=target_images[torch.as_tensor(gen)],
            seeds=seeds[gen],
            initial_noise=initial_noise(seeds[gen], tuple(target_images.shape[1:])),
            sampler=options.get("sampler", "ddim"),
            num_steps=int(options.get("num_steps", 50)),
            timesteps=np.empty(0, dtype=np.int64),
        )
        feats = journey_features(
            model, samples, att.settings, schedule, store_dir,
            target_ids=np.asarray(target_ids)[gen], steps=options.get("steps"),
            generation_batch_size=options.get("generation_batch_size"),
            progress=progress, device=att.device,
        )  # fmt: skip
        inner[gen] = inner_products(feats, phi)
    if real.size and trak_inner is not None:
        inner[real] = np.asarray(trak_inner, dtype=np.float64)[real]
    elif real.size:
        tstore = att.featurize_targets(
            target_images[torch.as_tensor(real)], np.asarray(target_ids)[real]
        )
        inner[real] = inner_products(tstore.features, phi)
    if gram is None:
        gram = dual_gram(phi)
    gram = np.asarray(gram, dtype=np.float64)
    rank = min(n, phi.shape[1])
    return [
        Kernel.from_gram(gram, m.lambda_rule(r).resolve(gram, rank)).solve_inner(inner)
        for r in ridges
    ]
