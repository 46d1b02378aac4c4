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

kronfluence fits the factors on the K (sample, t) items of every training sample. Scores are
bilinear in the two gradients, so the mean over the K × K item pairs of a (target, sample) is
the pairing of their timestep-averaged gradients:

    τ(x, zᵢ) = (1/K² Σ_{t,t'} ∇f(x,t)ᵀ (F+λI)⁻¹ ∇L(zᵢ,t')) = ḡ_f(x)ᵀ (F+λI)⁻¹ ḡ_L(zᵢ)

``pairing="samples"`` (default) computes it that way: one averaged (unnormalised) gradient per
target and per training sample (:class:`GradientComputer`), each target's preconditioned by
kronfluence's own factor code module by module (gradients laid out as kronfluence's
out × (in·kh·kw [+ 1 for the bias]) matrices), then one product per training batch — K² fewer
pairings than ``pairing="items"``, kronfluence's own pairwise scoring of the (T·K) × (N·K) items
averaged in K × K blocks (kept as the reference the other is tested against).
Factors and scores are cached under ``out_dir/kronfluence`` by model, data and settings.

kronfluence is optional: ``pip install --no-deps kronfluence accelerate einops einconv
opt-einsum psutil`` (it declares torchvision but never imports it; installing that from PyPI
could replace a CPU torch).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
from diffattr.attribution.features.measure import make_measure
from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, NoiseSchedule, keyed_noise
from diffattr.errors import ConfigError
from diffattr.seeding import generator

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
QUERIES = ("loss", "das", "dtrak")
FISHERS = ("true", "empirical")
PAIRINGS = ("samples", "items")
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


def module_layout(model: nn.Module, params: str | None = None) -> list[tuple[str, int, int, bool]]:
    """The modules kronfluence tracks (Linear and Conv2d; with ``params``, a regex, those whose
    weight's name matches it, e.g. a text-to-image run's LoRA layers), in ``named_modules``
    order: (name, out, in·kh·kw, has bias) — the shape of its per-sample gradient matrix
    without the bias column."""
    pattern = re.compile(params) if params else None
    return [
        (name, m.weight.shape[0], m.weight[0].numel(), m.bias is not None)
        for name, m in model.named_modules()
        if type(m) in (nn.Linear, nn.Conv2d)
        and (pattern is None or pattern.search(f"{name}.weight"))
    ]


def tracked_parameter_names(model: nn.Module, params: str | None = None) -> list[str]:
    """Parameters kronfluence differentiates: weight and bias of each tracked module."""
    return [
        f"{name}.{p}"
        for name, _, _, has_bias in module_layout(model, params)
        for p in ("weight", "bias")[: 1 + has_bias]
    ]


class _Items(torch.utils.data.Dataset):
    """(sample, timestep) items: (row, x₀, t, ε, sample id, conditioning — the sample's caption
    embedding, or an empty tensor for a model of (x_t, t) alone)."""

    def __init__(
        self,
        images: torch.Tensor,
        ids: np.ndarray,
        spec: TimestepSpec,
        schedule: NoiseSchedule,
        noise_seed: int,
        conditioning: torch.Tensor | None = None,
    ) -> None:
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
                cond = torch.zeros(0) if conditioning is None else conditioning[r]
                self.items.append((r, images[r], int(t), eps, int(sid), cond))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _make_task(
    Task,
    query: str,
    fisher: str,
    noise_seed: int,
    schedule: NoiseSchedule,
    tracked: list[str] | None = None,
):
    """kronfluence's task for the model's own noise process: x_t = ``schedule.add_noise``, the
    prediction target y = ``schedule.target`` (ε, v or x₀), training loss ‖ε_θ(x_t, t) − y‖²/d
    per item (true Fisher: y drawn from the model's own predictive, out + √(d/2)·ξ), and the
    measurement the query names (the loss; DAS's mean output; D-TRAK's ‖output‖²). The model
    takes the item's conditioning as its third input where there is one. ``tracked``: the
    modules it fits curvature on (None: every Linear and Conv2d)."""

    class DiffusionTask(Task):
        def get_influence_tracked_modules(self):
            return tracked

        def _forward(self, batch, model):
            _, x0, t, eps, _, cond = batch
            inputs = (schedule.add_noise(x0, eps, t), t)
            out = model(*inputs, *((cond,) if cond.numel() else ())).sample
            return out, schedule.target(x0, eps, t)

        def compute_train_loss(self, batch, model, sample=False):
            out, y = self._forward(batch, model)
            if sample:
                sids, t = batch[4], batch[2]
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
                    y = out.detach() + (d / 2) ** 0.5 * xi
            return (out - y).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model):
            out, y = self._forward(batch, model)
            if query == "loss":
                return (out - y).pow(2).flatten(1).mean(1).sum()
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
    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = "ekfac",
    query: Literal["loss", "das", "dtrak"] = "loss",
    damping: float | None = None,
    fisher: str = "true",
    batch_size: int = 32,
    progress: bool = False,
    pairing: str = "samples",
    device: str = "cpu",
    normalize: bool = False,
    train: Literal["loss", "das", "dtrak"] = "loss",
    train_conditioning: torch.Tensor | None = None,
    target_conditioning: torch.Tensor | None = None,
    params: str | None = None,
) -> np.ndarray:
    """(T, N) influence scores (module docstring); cached under ``out_dir/kronfluence``.

    ``train_conditioning`` / ``target_conditioning``: per-sample conditioning (a text-to-image
    model's caption embeddings), the model's third input; ``params``: a regex selecting the
    tracked layers by their weights' names (default: every Linear and Conv2d), e.g. LoRA's.

    ``train``: the measure whose gradients the training side pairs (``loss``, the influence
    function's; ``das`` / ``dtrak`` give DAS's / D-TRAK's feature pairing preconditioned by
    the loss curvature instead of their feature Gram; ``pairing="samples"`` only).

    ``normalize``: average per-timestep L2-normalised gradients on both sides, as the kernel
    methods' features are (``pairing="samples"`` only; the factors are fitted as without it).

    ``device``: where ``pairing="samples"`` takes its gradients (kronfluence itself runs on
    the CPU here)."""
    from diffattr.diffusion.presets import model_fingerprint

    Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs = (
        _kronfluence()
    )
    for value, allowed, what in (
        (strategy, STRATEGIES, "strategy"),
        (query, QUERIES, "query"),
        (fisher, FISHERS, "fisher"),
        (pairing, PAIRINGS, "pairing"),
        (train, QUERIES, "train"),
    ):
        if value not in allowed:
            raise ConfigError(f"unknown ekfac {what} {value!r}", hint=f"choose from {allowed}")
    if damping is not None and not damping > 0:
        raise ConfigError(f"ekfac damping must be positive, got {damping}")
    if (normalize or train != "loss") and pairing != "samples":
        raise ConfigError(
            "ekfac normalize=true and train=das|dtrak need pairing=samples",
            hint="kronfluence's item pairing scores unnormalised per-item loss gradients",
        )
    schedule = schedule or NoiseSchedule()
    spec = timesteps or TimestepSpec()
    spec.validate(schedule.num_train_timesteps)
    train_ids = np.asarray(train_ids, dtype=np.int64)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    train_items = _Items(train_images, train_ids, spec, schedule, noise_seed, train_conditioning)
    K = spec.num
    tracked = None  # kronfluence's own choice: every Linear and Conv2d
    if params:
        tracked = [name for name, _, _, _ in module_layout(model, params)]
        if not tracked:
            raise ConfigError(f"ekfac: no Linear or Conv2d layer's weight matches {params!r}")

    fp = model_fingerprint(model)[:12]
    analysis_dir = Path(out_dir) / "kronfluence" / f"unet-{fp}"  # kronfluence's, and our cache
    data = _hash(
        train_images, train_ids, spec.to_dict(), noise_seed, schedule.to_dict(),
        *(() if train_conditioning is None and not params else (train_conditioning, params)),
    )  # fmt: skip
    factors_name = f"{strategy}-{fisher}-{data}"
    target_key = (
        target_images,
        target_ids,
        *(() if target_conditioning is None else (target_conditioning,)),
    )
    scores_name = f"{factors_name}-{query}-{damping}-{_hash(*target_key)}"
    task = _make_task(Task, query, fisher, noise_seed, schedule, tracked)
    prepared = prepare_model(copy.deepcopy(model).eval(), task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        analyzer = Analyzer(
            analysis_name=analysis_dir.name,
            model=prepared,
            task=task,
            cpu=True,
            disable_tqdm=not progress,
            log_level=logging.WARNING,
            output_dir=str(analysis_dir.parent),
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
        analyzer.fit_all_factors(
            factors_name=factors_name,
            dataset=train_items,
            per_device_batch_size=batch_size,
            factor_args=factor_args,
        )
        if pairing == "samples":
            sample_suffix = ("-norm" if normalize else "") + (
                "" if train == "loss" else f"-{train}"
            )
            return _sample_pairing_scores(
                analyzer,
                factors_name,
                analysis_dir / f"scores_{scores_name}-samples{sample_suffix}.npy",
                model,
                (train_images, train_ids, train_conditioning),
                (target_images, target_ids, target_conditioning),
                schedule,
                spec,
                noise_seed,
                query,
                ScoreArguments(damping_factor=damping),
                batch_size,
                device,
                progress,
                normalize,
                train,
                params,
            )
        query_items = _Items(
            target_images, target_ids, spec, schedule, noise_seed, target_conditioning
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


def _sample_pairing_scores(
    analyzer,
    factors_name: str,
    cache: Path,
    model: nn.Module,
    train: tuple[torch.Tensor, np.ndarray, torch.Tensor | None],
    targets: tuple[torch.Tensor, np.ndarray, torch.Tensor | None],
    schedule: NoiseSchedule,
    spec: TimestepSpec,
    noise_seed: int,
    query: str,
    score_args: Any,
    batch_size: int,
    device: str,
    progress: bool,
    normalize: bool = False,
    train_measure: str = "loss",
    params: str | None = None,
) -> np.ndarray:
    """ḡ_f(x)ᵀ (F+λI)⁻¹ ḡ_L(zᵢ) for every target x and training sample zᵢ (module docstring),
    from kronfluence's fitted factors; cached in the .npy file ``cache``."""
    from tqdm.auto import tqdm

    from diffattr.fsio import atomic_write

    if cache.is_file():
        return np.load(cache)
    names, layout = tracked_parameter_names(model, params), module_layout(model, params)
    strategy = str(analyzer.load_factor_args(factors_name).strategy)
    factors = prepared_factors(
        analyzer.load_all_factors(factors_name), layout, strategy, score_args
    )

    query_gc, train_gc = (
        GradientComputer(
            model,
            make_measure(measure),
            schedule,
            spec,
            noise_seed=noise_seed,
            normalize=normalize,
            param_names=names,
            device=device,
        )  # fmt: skip
        for measure in (query, train_measure)
    )

    def averaged(gc: GradientComputer, images: torch.Tensor, ids: np.ndarray, cond):
        """(rows, ḡ) per batch: timestep-averaged unnormalised gradients of ``gc``'s measure."""
        for s in range(0, len(ids), batch_size):
            rows = slice(s, s + batch_size)
            c = None if cond is None else cond[rows]
            yield rows, gc.compute(images[rows], ids[rows], c)[0].cpu()

    (train_images, train_ids, train_cond), (target_images, target_ids, target_cond) = train, targets
    out = np.zeros((len(target_ids), len(train_ids)))
    # preconditioned target gradients held at once: QUERY_BATCH_BYTES' worth
    chunk = query_batch_size(sum(int(p.numel()) for p in model.parameters()), len(target_ids))
    chunks = range(0, len(target_ids), chunk)
    total = len(target_ids) + len(train_ids) * len(chunks)  # targets, then the training set
    bar = tqdm(total=total, desc=f"ekfac ({query} query)", unit="img", disable=not progress)
    for c in chunks:
        rows = slice(c, c + chunk)
        parts = []
        cond = None if target_cond is None else target_cond[rows]
        for _, g in averaged(query_gc, target_images[rows], target_ids[rows], cond):
            parts.append(precondition(g, layout, factors))
            bar.update(g.shape[0])
        q = torch.cat(parts)
        for cols, g in averaged(train_gc, train_images, train_ids, train_cond):
            out[rows, cols] = (q @ g.T).double().numpy()
            bar.update(g.shape[0])
    bar.close()
    atomic_write(cache, lambda f: np.save(f, out))
    return out


def prepared_factors(
    factors: dict[str, dict[str, torch.Tensor]],
    layout: list[tuple[str, int, int, bool]],
    strategy: str,
    score_args: Any,
) -> list[tuple[Any, dict[str, Any]]]:
    """Per tracked module, kronfluence's factor config for ``strategy`` and its storage made
    ready for preconditioning (damping added, eigenvalues inverted) by kronfluence's own
    ``prepare`` — on copies, so ``factors`` is left as loaded."""
    from kronfluence.factor.config import FactorConfig, FactorStrategy
    from kronfluence.utils.constants import LAMBDA_MATRIX_NAME

    config = FactorConfig.CONFIGS[FactorStrategy(strategy)]
    out = []
    for mname, _, _, _ in layout:
        storage: dict[str, Any] = {LAMBDA_MATRIX_NAME: None}
        storage.update({name: values[mname].clone() for name, values in factors.items()})
        config.prepare(storage, score_args, torch.device("cpu"))
        out.append((config, storage))
    return out


def precondition(
    grads: torch.Tensor,
    layout: list[tuple[str, int, int, bool]],
    factors: list[tuple[Any, dict[str, Any]]],
) -> torch.Tensor:
    """(B, p) flat gradients → (F+λI)⁻¹ g, module by module by kronfluence's own code.

    Each module's slice is kronfluence's per-sample gradient matrix out × (in·kh·kw + bias),
    the bias gradient as its last column; the result is flattened back in the same order."""
    out, start, B = [], 0, grads.shape[0]
    for (_, n_out, n_in, has_bias), (config, storage) in zip(layout, factors, strict=True):
        w = grads[:, start : start + n_out * n_in].reshape(B, n_out, n_in)
        start += n_out * n_in
        if has_bias:
            w = torch.cat([w, grads[:, start : start + n_out, None]], dim=2)
            start += n_out
        p = config.precondition_gradient(w.float(), storage)
        out.append(p[:, :, :n_in].reshape(B, -1))
        if has_bias:
            out.append(p[:, :, n_in])
    return torch.cat(out, dim=1)


def ekfac_from_inputs(
    inputs: Any,
    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = "ekfac",
    query: Literal["loss", "das", "dtrak"] = "loss",
    damping: float | None = None,
    fisher: Literal["true", "empirical"] = "true",
    pairing: Literal["samples", "items"] = "samples",
    normalize: bool = False,
    train: Literal["loss", "das", "dtrak"] = "loss",
) -> tuple[np.ndarray, dict[str, Any]]:
    """The registered ``ekfac`` method from its ScoreInputs (model, settings, store_dir, …).

    Options (module docstring): ``strategy``: the curvature F, kronfluence's ekfac, kfac,
    diagonal, or identity (plain gradient dot products); ``query``: the target's measure f(x),
    its diffusion loss or DAS's or D-TRAK's output measure; ``damping``: λ, absolute (unset:
    0.1 × each layer's mean eigenvalue); ``fisher``: F from sampled outputs (true, the
    Gauss–Newton matrix) or from the true noise (empirical); ``pairing``: pair timestep-averaged
    gradients (samples) or kronfluence's per-timestep items averaged (items, slower);
    ``normalize``: average per-timestep unit-norm gradients on both sides, as the kernel
    methods' features are (pairing samples only); ``train``: the training images' measure
    (their diffusion loss by default; das or dtrak need pairing samples)."""
    from diffattr.attribution.inputs import require_inputs

    require_inputs(inputs, "ekfac", "model", "train_images", "target_images", "store_dir")
    n, t = inputs.train_images.shape[0], inputs.target_images.shape[0]
    spec = (
        inputs.context.settings.timestep_spec()
        if inputs.context.settings is not None
        else TimestepSpec()
    )
    noise_seed = inputs.context.settings.noise_seed if inputs.context.settings is not None else 0
    values = ekfac_scores(
        inputs.context.model,
        inputs.train_images,
        inputs.train_ids if inputs.train_ids is not None else np.arange(n),
        inputs.target_images,
        inputs.target_ids if inputs.target_ids is not None else np.arange(t),
        inputs.context.store_dir,
        schedule=inputs.context.schedule,
        timesteps=spec,
        noise_seed=noise_seed,
        strategy=strategy,
        query=query,
        damping=damping,
        fisher=fisher,
        batch_size=inputs.context.batch_size,
        progress=inputs.context.progress,
        pairing=pairing,
        device=inputs.context.device,
        normalize=normalize,
        train=train,
        train_conditioning=inputs.train_conditioning,
        target_conditioning=inputs.target_conditioning,
        params=inputs.context.settings.params if inputs.context.settings is not None else None,
    )
    meta = {
        "influence": f"kronfluence {strategy}",
        "query": query,
        "fisher": fisher,
        "pairing": pairing,
        "normalize": normalize,
        "train": train,
    }
    return values, meta
