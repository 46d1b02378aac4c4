"""K-FAC / EK-FAC influence functions for diffusion models, through ``kronfluence``.

    τ(x, zᵢ) = ∇_θ f(x)ᵀ (F + λI)⁻¹ ∇_θ L(zᵢ)

with L the diffusion training loss of a training sample, averaged over the K feature timesteps
(the same timesteps and keyed noise as the stored features: (ATTRIBUTION_NOISE_KEY, noise seed,
sample id, t)), F a Kronecker-factored curvature of the training objective over every
``nn.Linear`` and ``nn.Conv2d`` of the UNet (kronfluence's ``ekfac``, ``kfac``, ``diagonal`` or
``identity`` = plain gradient dot products), and λ kronfluence's damping (absolute, or by
default 0.1 × the mean eigenvalue of each layer's factor).

F: with ``fisher="true"`` (default) the sampled Fisher of the Gaussian likelihood that the loss
‖ε_θ − y‖²/d is the negative log of (σ² = d/2), y = ε_θ + √(d/2)·ξ with ξ keyed by (sample id,
t) — i.e. the Gauss–Newton matrix (2/d) JᵀJ, deterministic; ``fisher="empirical"`` uses the
true noise ε.

Query f(x), averaged over the same K timesteps: ``loss`` (default) the diffusion loss of x —
positive τ = upweighting zᵢ lowers x's loss = helps, the sign convention of TRAK; ``das`` the
mean of ε_θ (DAS's output measure); ``dtrak`` ‖ε_θ‖² (D-TRAK's). For the last two the sign
follows kronfluence's convention (positive = upweighting zᵢ *lowers* f(x)).

kronfluence's pairwise scores are linear in each gradient, so each sample is expanded into its
K (sample, t) items, scored item by item, and the (T·K) × (N·K) matrix averaged in K×K blocks.
Factors and scores are cached under ``out_dir/kronfluence`` by model, data and settings.

kronfluence is optional: ``pip install --no-deps kronfluence accelerate einops einconv
opt-einsum psutil`` (it declares torchvision but never imports it; installing that from PyPI
could replace a CPU torch).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffattr.attribution.gradients import TimestepSpec
from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, NoiseSchedule, keyed_noise
from diffattr.errors import ConfigError
from diffattr.seeding import generator

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
QUERIES = ("loss", "das", "dtrak")
FISHERS = ("true", "empirical")
#: Key namespace of the sampled-Fisher targets.
FISHER_KEY = 0x4B464331
#: Bytes of per-item query gradients kronfluence holds for one query batch (4 per parameter
#: per item). Every query batch makes one pass over all N·K training items, so the pairwise
#: scoring time is ∝ the number of query batches: they are made as large as this allows.
QUERY_BATCH_BYTES = 1 << 30
INSTALL_HINT = (
    "pip install --no-deps kronfluence accelerate einops einconv opt-einsum psutil "
    "(kronfluence declares torchvision but does not import it)"
)


def _kronfluence():
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as exc:
        raise ConfigError(
            f"method 'ekfac' needs the optional package kronfluence ({exc})", hint=INSTALL_HINT
        ) from exc
    return Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs


def tracked_parameter_names(model: nn.Module) -> list[str]:
    """Parameters kronfluence differentiates: weights and biases of Linear and Conv2d layers."""
    names = []
    for mname, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            names += [f"{mname}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return names


class _Items(torch.utils.data.Dataset):
    """(sample, timestep) items: (row, x₀, t, ε, ᾱ_t, sample id)."""

    def __init__(
        self,
        images: torch.Tensor,
        ids: np.ndarray,
        spec: TimestepSpec,
        schedule: NoiseSchedule,
        noise_seed: int,
    ) -> None:
        alphas = schedule.alphas_cumprod()
        T = schedule.num_train_timesteps
        shape = tuple(images.shape[1:])
        self.items = []
        self.per_sample = spec.num
        for r, sid in enumerate(np.asarray(ids, dtype=np.int64)):
            ts = spec.for_sample(int(sid), T)
            if ts.size != spec.num:
                raise ConfigError("every sample needs the same number of timesteps")
            for t in ts:
                eps = keyed_noise(ATTRIBUTION_NOISE_KEY, noise_seed, int(sid), int(t), shape)
                self.items.append((r, images[r], int(t), eps, alphas[int(t)], int(sid)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _make_task(Task, query: str, fisher: str, noise_seed: int):
    class DiffusionTask(Task):
        def _forward(self, batch, model):
            _, x0, t, eps, ab, _ = batch
            a = ab.view(-1, *([1] * (x0.dim() - 1)))
            out = model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample
            return out, eps

        def compute_train_loss(self, batch, model, sample=False):
            out, eps = self._forward(batch, model)
            if sample:
                sids, t = batch[5], batch[2]
                d = out[0].numel()
                with torch.no_grad():
                    xi = torch.stack(
                        [
                            torch.randn(
                                out.shape[1:],
                                generator=generator(FISHER_KEY, noise_seed, int(s), int(tt)),
                            )
                            for s, tt in zip(sids.tolist(), t.tolist(), strict=True)
                        ]
                    ).to(out)
                    eps = out.detach() + (d / 2) ** 0.5 * xi
            return (out - eps).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model):
            out, eps = self._forward(batch, model)
            if query == "loss":
                return (out - eps).pow(2).flatten(1).mean(1).sum()
            if query == "das":
                return out.flatten(1).mean(1).sum()
            return out.pow(2).flatten(1).sum(1).sum()

    return DiffusionTask()


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(np.ascontiguousarray(p.detach().cpu().numpy(), dtype="<f4").tobytes())
        elif isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p, dtype="<i8").tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def query_batch_size(num_params: int, num_items: int, budget: int | None = None) -> int:
    """Query items per kronfluence batch: as many 4·``num_params``-byte gradients as fit in
    ``budget`` (default QUERY_BATCH_BYTES), at least 1, at most ``num_items``."""
    budget = QUERY_BATCH_BYTES if budget is None else budget
    return max(1, min(num_items, budget // max(1, 4 * num_params)))


def ekfac_scores(
    model: nn.Module,
    train_images: torch.Tensor,
    train_ids: np.ndarray,
    target_images: torch.Tensor,
    target_ids: np.ndarray,
    out_dir: str | Path,
    schedule: NoiseSchedule | None = None,
    timesteps: TimestepSpec | None = None,
    noise_seed: int = 0,
    strategy: str = "ekfac",
    query: str = "loss",
    damping: float | None = None,
    fisher: str = "true",
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """(T, N) influence scores (module docstring); cached under ``out_dir/kronfluence``."""
    from diffattr.diffusion.presets import model_fingerprint

    Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs = (
        _kronfluence()
    )
    for value, allowed, what in (
        (strategy, STRATEGIES, "strategy"),
        (query, QUERIES, "query"),
        (fisher, FISHERS, "fisher"),
    ):
        if value not in allowed:
            raise ConfigError(f"unknown ekfac {what} {value!r}", hint=f"choose from {allowed}")
    if damping is not None and not damping > 0:
        raise ConfigError(f"ekfac damping must be positive, got {damping}")
    schedule = schedule or NoiseSchedule()
    spec = timesteps or TimestepSpec()
    spec.validate(schedule.num_train_timesteps)
    train_ids = np.asarray(train_ids, dtype=np.int64)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    train_items = _Items(train_images, train_ids, spec, schedule, noise_seed)
    query_items = _Items(target_images, target_ids, spec, schedule, noise_seed)
    K = spec.num

    fp = model_fingerprint(model)[:12]
    data = _hash(train_images, train_ids, spec.to_dict(), noise_seed, schedule.to_dict())
    factors_name = f"{strategy}-{fisher}-{data}"
    scores_name = f"{factors_name}-{query}-{damping}-{_hash(target_images, target_ids)}"
    task = _make_task(Task, query, fisher, noise_seed)
    prepared = prepare_model(copy.deepcopy(model).eval(), task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        analyzer = Analyzer(
            analysis_name=f"unet-{fp}",
            model=prepared,
            task=task,
            cpu=True,
            disable_tqdm=not progress,
            log_level=logging.WARNING,
            output_dir=str(Path(out_dir) / "kronfluence"),
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
        analyzer.fit_all_factors(
            factors_name=factors_name,
            dataset=train_items,
            per_device_batch_size=batch_size,
            factor_args=factor_args,
        )
        scores = analyzer.compute_pairwise_scores(
            scores_name=scores_name,
            factors_name=factors_name,
            query_dataset=query_items,
            train_dataset=train_items,
            per_device_query_batch_size=query_batch_size(
                sum(p.numel() for p in model.parameters()), len(query_items)
            ),
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=damping),
        )
        if scores is None:
            scores = analyzer.load_pairwise_scores(scores_name)
    s = scores["all_modules"].double().numpy()
    T, N = len(target_ids), len(train_ids)
    return s.reshape(T, K, N, K).mean(axis=(1, 3))


def ekfac_from_inputs(
    inputs: Any,
    strategy: str = "ekfac",
    query: str = "loss",
    damping: float | None = None,
    fisher: str = "true",
) -> tuple[np.ndarray, dict[str, Any]]:
    """The registered ``ekfac`` method from its ScoreInputs (model, settings, store_dir, …)."""
    missing = [
        f
        for f in ("model", "train_images", "target_images", "store_dir")
        if getattr(inputs, f) is None
    ]
    if missing:
        raise ConfigError(
            f"method 'ekfac' needs {', '.join(missing)} in its ScoreInputs",
            hint="score it through Attributor, or call influence.ekfac_scores",
        )
    n, t = inputs.train_images.shape[0], inputs.target_images.shape[0]
    spec = inputs.settings.timestep_spec() if inputs.settings is not None else TimestepSpec()
    noise_seed = inputs.settings.noise_seed if inputs.settings is not None else 0
    values = ekfac_scores(
        inputs.model,
        inputs.train_images,
        inputs.train_ids if inputs.train_ids is not None else np.arange(n),
        inputs.target_images,
        inputs.target_ids if inputs.target_ids is not None else np.arange(t),
        inputs.store_dir,
        schedule=inputs.schedule,
        timesteps=spec,
        noise_seed=noise_seed,
        strategy=strategy,
        query=query,
        damping=damping,
        fisher=fisher,
        batch_size=inputs.batch_size,
        progress=inputs.progress,
    )
    meta = {"influence": f"kronfluence {strategy}", "query": query, "fisher": fisher}
    return values, meta
