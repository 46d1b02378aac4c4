"""Per-sample gradients of a measure with ``torch.func``, averaged over timesteps.

For a sample z (id i, image x₀) and each chosen timestep t, with noise ε keyed by
(seed, i, t) and x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε:

    g(z, t) = ∇_θ f(ε_θ(x_t, t), y, ᾱ_t)
    ḡ(z)    = (1/K) Σ_t g(z, t) / ‖g(z, t)‖    (normalisation optional)

with ε_θ the model's output and y its training target (ε for an ε-prediction model; v or x₀
for others, ``NoiseSchedule.target``), computed as ``vmap(grad(f))`` over ``functional_call``
on micro-batches of (sample, t) pairs. The same forward pass also yields the per-sample
training error e = mean_t ‖ε_θ − y‖²/d and the reduced residual r = mean_t mean(ε_θ − y),
which DAS uses to weight its scores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from diffattr.allocator import keep_freed_memory
from diffattr.attribution.features.layer_grads import (
    SUPPORTED_DESCRIPTION,
    assemble_sample_grads,
    layer_plan,
    recorded_bytes_per_pair,
    recording,
    segment_sample_grads,
    shares_tensors,
)
from diffattr.attribution.features.layer_projection import LayerProjection, LayerProjector
from diffattr.attribution.features.measure import Measure
from diffattr.attribution.features.pairs import NoisedPairs, PairSource
from diffattr.diffusion.presets import use_classic_attention
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError, NumericalError
from diffattr.seeding import generator

TIMESTEP_STRATEGIES = ("uniform", "first", "random")
#: ``--grad-dtype`` names: precision of the model copy that gradients are computed with.
GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def grad_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--grad-dtype`` name (fp32, bf16, fp16)."""
    try:
        return GRAD_DTYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown --grad-dtype {name!r}", hint=f"choose from {', '.join(GRAD_DTYPES)}"
        ) from None


@dataclass(frozen=True)
class TimestepSpec:
    """Which timesteps features average over: K of them, chosen by ``strategy``."""

    num: int = 10
    strategy: str = "uniform"
    seed: int = 0

    def validate(self, num_train_timesteps: int) -> None:
        if self.strategy not in TIMESTEP_STRATEGIES:
            raise ConfigError(
                f"unknown timestep strategy {self.strategy!r}",
                hint=f"choose from {TIMESTEP_STRATEGIES}",
            )
        if not 1 <= self.num <= num_train_timesteps:
            raise ConfigError(f"--timesteps must be in [1, {num_train_timesteps}], got {self.num}")

    def for_sample(self, sample_id: int, num_train_timesteps: int) -> np.ndarray:
        """The K timesteps of one sample: uniform range(0, T, T//K), first 0…K−1, or random."""
        T, K = num_train_timesteps, self.num
        if self.strategy == "uniform":
            return np.arange(0, T, T // K, dtype=np.int64)[:K]
        if self.strategy == "first":
            return np.arange(K, dtype=np.int64)
        g = generator(self.seed, 4242, sample_id)
        return np.sort(torch.randperm(T, generator=g)[:K].numpy()).astype(np.int64)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str | torch.device) -> str:
    """A ``--device`` value checked against this machine: ``auto`` is cuda when available."""
    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"unknown --device {name!r}", hint="use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name}: no CUDA device is available (torch {torch.__version__})",
                hint="use --device cpu (or auto), or install a CUDA build of torch on a GPU "
                "machine",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu" and device.type != "mps":
        raise ConfigError(f"unsupported --device {name!r}", hint="use cpu, cuda, cuda:N or auto")
    return str(device)


def select_parameters(model: torch.nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the parameters whose gradients are taken (all, or those matching ``pattern``)."""
    names = [n for n, _ in model.named_parameters()]
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"invalid --params pattern {pattern!r}: {exc}") from exc
        names = [n for n in names if rx.search(n)]
        if not names:
            raise ConfigError(f"--params pattern {pattern!r} matches no parameter of the model")
    return names


#: Bytes of per-pair gradients one gradient call may hold on the CPU (caps ``micro_batch``;
#: see :func:`gradient_memory`).
MICRO_BATCH_BYTES = 1 << 29
#: Environment variable overriding every gradient memory cap (MiB), e.g. on a large machine.
GRADIENT_MEMORY_ENV = "DIFFATTR_GRADIENT_MEMORY_MIB"
#: On a CUDA device each cap is at least this fraction of the device's memory.
CUDA_GRADIENT_MEMORY_FRACTION = 1 / 16
#: How per-sample gradients are taken (see :class:`GradientComputer`).
GRADIENT_STRATEGIES = ("auto", "layers", "vmap", "backward")
#: Default pairs per gradient call for ``vmap`` and ``backward`` (``micro_batch=None``).
DEFAULT_MICRO_BATCH = 64
#: Most pairs per ``layers`` pass when the micro-batch is chosen automatically. Time per pair
#: is a fixed cost per pass (hooks, Python, small kernels) plus a per-pair cost, and beyond a
#: few hundred pairs the pass's tensors leave the caches. Measured on the 0.46M-parameter `tiny`
#: UNet (2 CPU threads, one process, interleaved): normalised DAS features at K = 100 ran at
#: 660, 774, 815 and 675 pairs/s with 100, 200, 400 and 800 pairs per pass; unnormalised at
#: K = 4, 605, 779 and 682 pairs/s with 64, 128 and 256.
AUTO_MAX_PAIRS = 400
#: ``auto`` takes unnormalised averages by backward passes on models this large …
BACKWARD_MIN_PARAMS = 4_000_000
#: … and, where ``layers`` cannot be used, from this many timesteps on.
BACKWARD_MIN_TIMESTEPS = 8


def gradient_memory(default: int, device: str | torch.device) -> int:
    """Bytes a block of gradients may hold: ``$DIFFATTR_GRADIENT_MEMORY_MIB`` × 2²⁰ when set,
    else on a CUDA device max(``default``, its memory / 16), else ``default``."""
    text = os.environ.get(GRADIENT_MEMORY_ENV, "").strip()
    if text:
        try:
            mib = float(text)
        except ValueError:
            mib = float("nan")
        if not mib > 0:
            raise ConfigError(
                f"{GRADIENT_MEMORY_ENV}={text!r} is not a positive number of MiB",
                hint=f"e.g. {GRADIENT_MEMORY_ENV}=4096, or unset it for the default",
            )
        return int(mib * (1 << 20))
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(default, int(total * CUDA_GRADIENT_MEMORY_FRACTION))
    return default


class GradientComputer:
    """Per-sample, timestep-averaged gradients of ``measure`` for one model.

    ``param_names`` selects the differentiated parameters; the rest are held fixed.

    ``strategy``: ``layers`` runs one batched forward and backward pass over micro-batches of
    whole samples (all K of a sample's timesteps, several samples per pass; a sample's
    timesteps in chunks when K exceeds the pass) and takes each layer's per-sample sum
    Σ_t w_t g(z, t) as one batched product over the sample's timesteps × positions
    (:func:`~diffattr.attribution.features.layer_grads.segment_sample_grads`; w_t = 1/‖g(z, t)‖ when
    normalising, the norms taken first from the same factors), never forming a per-pair
    gradient; models made of Linear, Conv2d, GroupNorm and LayerNorm layers, i.e. diffusers
    UNets. :meth:`pair_grads` (AbU's Fisher, tests) still gives per-pair gradients.
    ``vmap`` takes per-pair gradients with ``vmap(grad(f))`` (any model). ``backward`` uses
    ordinary batched backward passes: without per-timestep normalisation a sample's gradient is
    that of (1/K) Σ_t f(x_t, t), i.e. one backward pass over its K pairs as a batch; with it,
    one backward pass per pair. Same quantity, rounding aside (benchmarks/featurize.py times
    them side by side). ``auto`` picks ``backward`` for unnormalised averages on models of at
    least BACKWARD_MIN_PARAMS parameters, else ``layers`` where the model allows it, else
    ``backward`` for unnormalised averages over at least BACKWARD_MIN_TIMESTEPS timesteps and
    ``vmap`` otherwise. Attention runs through SDPA under ``layers`` and through the classic
    processor otherwise (vmap has no batching rule for SDPA; :meth:`flat_grads` uses vmap
    under ``backward``).
    ``micro_batch``: pairs per gradient call; None (default) lets ``layers`` size its passes
    from memory (:meth:`layer_pairs`) and the others use DEFAULT_MICRO_BATCH.
    ``dtype``: precision of the forward and backward passes (a cast copy of the parameters;
    the model itself is not changed). The measure, the gradients handed out, their norms and
    the timestep average are float32 whatever ``dtype``. Building one lets the C allocator
    keep freed memory for the process's later passes (:mod:`diffattr.allocator`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        measure: Measure,
        schedule: NoiseSchedule,
        timesteps: TimestepSpec,
        noise_seed: int = 0,
        normalize: bool = True,
        param_names: list[str] | None = None,
        micro_batch: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        strategy: str = "auto",
        layer_projection: LayerProjection | None = None,
        pairs: PairSource | None = None,
    ) -> None:
        if strategy not in GRADIENT_STRATEGIES:
            raise ConfigError(
                f"unknown gradient strategy {strategy!r}",
                hint=f"choose from {', '.join(GRADIENT_STRATEGIES)}",
            )
        keep_freed_memory()  # a pass's same-sized temporaries reuse memory, not fresh pages
        self.model = model.to(device).eval()
        self.measure, self.schedule, self.timesteps = measure, schedule, timesteps
        self.noise_seed, self.normalize = noise_seed, normalize
        #: The K pairs each sample's gradient averages over (default: the noised image).
        self.pair_source = pairs or NoisedPairs(timesteps, noise_seed, schedule)
        #: None: chosen per pass (``layers``: from memory, up to AUTO_MAX_PAIRS; else 64).
        self.auto_micro_batch = micro_batch is None
        self.requested_micro_batch = max(1, micro_batch or DEFAULT_MICRO_BATCH)
        self.device = torch.device(device)
        self.dtype = dtype
        names = param_names or select_parameters(model)
        named = dict(model.named_parameters())

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype) if t.is_floating_point() else t.detach()

        self.params = {n: cast(named[n]) for n in names}
        self.fixed = {n: cast(p) for n, p in named.items() if n not in self.params}
        self.fixed.update({n: cast(b) for n, b in model.named_buffers()})
        #: Whether functional_call must tie shared tensors: its check walks every parameter
        #: on each call (a third of one query's featurization for the tiny UNet), so it runs
        #: only for models that share a tensor between names.
        self.tie_weights = shares_tensors(model)
        self.num_params = sum(p.numel() for p in self.params.values())
        #: Pairs per gradient call, capped so their per-pair gradients (4·p bytes each) fit
        #: in gradient_memory(MICRO_BATCH_BYTES): 64 pairs of a 35.7M-parameter UNet would be
        #: 9 GB.
        budget = gradient_memory(MICRO_BATCH_BYTES, self.device)
        self.micro_batch = max(1, min(self.requested_micro_batch, budget // (4 * self.num_params)))
        self._plan = layer_plan(self.model, list(self.params))
        if layer_projection is not None:
            if self._plan is None:
                raise ConfigError(
                    "--projector logra needs every differentiated parameter to belong to "
                    + SUPPORTED_DESCRIPTION,
                    hint="use another --projector, or select parameters with --params",
                )
            if strategy not in ("auto", "layers"):
                raise ConfigError(f"--projector logra needs gradient strategy 'layers', not "
                                  f"{strategy!r}")  # fmt: skip
            strategy = "layers"
        if strategy == "layers" and self._plan is None:
            raise ConfigError(
                "gradient strategy 'layers' needs every differentiated parameter to belong to "
                + SUPPORTED_DESCRIPTION,
                hint="use strategy 'vmap' (or 'auto', which falls back to it)",
            )
        if strategy == "auto":
            large = sum(p.numel() for p in named.values()) >= BACKWARD_MIN_PARAMS
            many = self.pair_source.num >= BACKWARD_MIN_TIMESTEPS
            if not normalize and large:
                strategy = "backward"
            elif self._plan is not None:
                strategy = "layers"
            else:
                strategy = "backward" if not normalize and many else "vmap"
        self.strategy = strategy
        self.layer_projector = (
            None
            if layer_projection is None
            else LayerProjector(self._plan, layer_projection, self.device)
        )
        #: Feature columns per parameter (its size, or its projected size under logra).
        self.out_dims = (
            {n: p.numel() for n, p in self.params.items()}
            if self.layer_projector is None
            else self.layer_projector.out_dims
        )
        #: Width of the gradients handed out: p, or the logra projection's dimension.
        self.dim = sum(self.out_dims.values())
        self._use_attention()
        self._grad_fn = vmap(grad(self._f, has_aux=True), in_dims=(None, 0, 0, 0, 0))
        self._grad_fn_cond = vmap(grad(self._f, has_aux=True), in_dims=(None, 0, 0, 0, 0, 0))
        offsets, offset = {}, 0
        for n in self.params:
            offsets[n] = offset
            offset += self.out_dims[n]
        self._offsets = offsets
        #: Pairs per ``layers`` pass when chosen automatically (set by the first pass).
        self.layer_pass_pairs: int | None = None

    def _f(self, params, xt, t, target, ab, cond=None):
        args = (xt[None], t[None]) if cond is None else (xt[None], t[None], cond[None])
        tie = self.tie_weights
        out = functional_call(self.model, (params, self.fixed), args, tie_weights=tie).sample[0]
        out = out.float()  # the measure and its reductions in float32 (gradients flow back)
        diff = out - target
        return self.measure(out, target, ab), (diff.pow(2).mean(), diff.mean())

    def _batches(self, x0: torch.Tensor, ids: np.ndarray) -> Iterator[tuple[torch.Tensor, ...]]:
        """Pairs as the strategy consumes them: micro-batches (vmap), one sample's K pairs
        (backward, unnormalised) or single pairs (backward, normalised)."""
        if self.strategy in ("vmap", "layers"):
            return self.pairs(x0, ids)
        if self.normalize:
            return self.pairs(x0, ids, group=1)
        return self.pairs(x0, ids, group=self.pair_source.num)

    def pairs(
        self, x0: torch.Tensor, ids: np.ndarray, group: int | None = None
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """(row, x_t, t, target, ᾱ_t) for every (sample, timestep) pair, in micro-batches of
        ``group`` pairs (default: the micro-batch size); the target is what the model predicts
        (ε for an ε-prediction model, :meth:`NoiseSchedule.target`)."""
        rows, ts = [], []
        for r, sid in enumerate(ids):
            for t in self.pair_source.timesteps_of(int(sid)):
                rows.append(r)
                ts.append(int(t))
        step = group or self.micro_batch
        for s in range(0, len(rows), step):
            yield self._pair_inputs(x0, ids, rows[s : s + step], ts[s : s + step])

    def _pair_inputs(
        self, x0: torch.Tensor, ids: np.ndarray, rows: list[int], ts: list[int]
    ) -> tuple[torch.Tensor, ...]:
        """(row, x_t, t, target, ᾱ_t) of the given pairs (from the pair source)."""
        return self.pair_source.inputs(x0, ids, rows, ts, self.device)

    def segment_batches(
        self, x0: torch.Tensor, ids: np.ndarray, pairs: int
    ) -> Iterator[tuple[tuple[torch.Tensor, ...], int]]:
        """Micro-batches of at most ``pairs`` pairs made of whole segments: m = ⌊pairs/K⌋
        consecutive samples with all K of their timesteps each (K ≤ pairs), or one sample's
        timesteps in ⌈K/pairs⌉ nearly equal chunks. Yields (:meth:`pairs`' tuple, number of
        segments); segment j of a micro-batch is its pairs j·L … (j+1)·L − 1, one sample."""
        K = self.pair_source.num
        times = [[int(t) for t in self.pair_source.timesteps_of(int(sid))] for sid in ids]
        if pairs >= K:
            m = max(1, pairs // K)
            for s in range(0, len(ids), m):
                rows = list(range(s, min(len(ids), s + m)))
                flat_rows = [r for r in rows for _ in range(K)]
                flat_ts = [t for r in rows for t in times[r]]
                yield self._pair_inputs(x0, ids, flat_rows, flat_ts), len(rows)
            return
        chunks = -(-K // pairs)
        for r in range(len(ids)):
            for part in np.array_split(np.asarray(times[r]), chunks):
                ts = part.tolist()
                yield self._pair_inputs(x0, ids, [r] * len(ts), ts), 1

    def layer_pairs(
        self, x0: torch.Tensor, cond: torch.Tensor | None = None, ids: np.ndarray | None = None
    ) -> int:
        """Pairs per ``layers`` pass: the micro-batch given, or (automatic) as many as
        gradient_memory(MICRO_BATCH_BYTES) holds of one pass's recorded factors per pair
        (measured once by a one-pair forward pass), at most AUTO_MAX_PAIRS."""
        if not self.auto_micro_batch:
            return self.micro_batch
        if self.layer_pass_pairs is None:
            ids = np.zeros(1, dtype=np.int64) if ids is None else np.asarray(ids[:1])
            first = int(self.pair_source.timesteps_of(int(ids[0]))[0])
            probe = self._pair_inputs(x0[:1], ids, [0], [first])
            c = None if cond is None else cond[:1].to(self.device, self.dtype)
            self._use_attention()
            with torch.no_grad(), recording(self._plan):
                functional_call(self.model, (self.params, self.fixed),
                                self._model_args(probe[1], probe[2], c),
                                tie_weights=self.tie_weights)  # fmt: skip
                per_pair = recorded_bytes_per_pair(self._plan, 1)
            budget = gradient_memory(MICRO_BATCH_BYTES, self.device)
            self.layer_pass_pairs = max(1, min(AUTO_MAX_PAIRS, budget // max(1, per_pair)))
        return self.layer_pass_pairs

    def flat_grads(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, p) gradients of f for a micro-batch of pairs, plus their (error, residual).

        ``cond``: per-pair conditioning (e.g. caption embeddings), the model's third input.
        """
        grads, err, res = self.pair_grads(xt, t, noise, ab, cond)
        flat = torch.cat([grads[n].reshape(xt.shape[0], -1).float() for n in self.params], dim=1)
        return flat, err, res

    def _use_attention(self) -> None:
        """This strategy's attention processor (set again before every pass: another computer
        on the same model may have switched it)."""
        use_classic_attention(self.model, classic=self.strategy != "layers")

    def pair_grads(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-pair gradients by parameter name, by ``layers`` when that is the strategy,
        else by ``vmap``."""
        fn = self.layer_grads if self.strategy == "layers" else self.param_grads
        return fn(xt, t, noise, ab, cond)

    def param_grads(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-pair gradients by parameter name ({name: (B, *shape)}) via vmap, plus the
        per-pair (error, residual)."""
        fn, extra = (self._grad_fn, ()) if cond is None else (self._grad_fn_cond, (cond,))
        use_classic_attention(self.model)  # vmap has no batching rule for SDPA
        try:
            grads, (err, res) = fn(self.params, xt.to(self.dtype), t, noise, ab, *extra)
        except (RuntimeError, NotImplementedError) as exc:
            self._dtype_error(exc)
            raise
        return grads, err, res

    @contextmanager
    def _batched_pass(self, record: bool) -> Iterator[None]:
        """One ordinary batched forward and backward pass: this strategy's attention,
        gradients on, the planned layers' calls recorded when ``record``; an unsupported
        gradient dtype becomes a ConfigError."""
        self._use_attention()
        try:
            with torch.enable_grad(), recording(self._plan) if record else nullcontext():
                yield
        except (RuntimeError, NotImplementedError) as exc:
            self._dtype_error(exc)
            raise

    def _measured(self, params, xt, t, target, ab, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(model output y (float32), per-pair measure values f(y, target, ᾱ_t)) of a batch of
        pairs under ``params``."""
        args = self._model_args(xt, t, cond)
        tie = self.tie_weights
        out = functional_call(self.model, (params, self.fixed), args, tie_weights=tie).sample
        out = out.float()
        return out, vmap(self.measure)(out, target, ab)

    def _model_args(self, xt, t, cond) -> tuple[torch.Tensor, ...]:
        """The model's inputs for a batch of pairs: (x_t, t) or (x_t, t, conditioning)."""
        return (xt.to(self.dtype), t) if cond is None else (xt.to(self.dtype), t, cond)

    @staticmethod
    def _error_residual(out: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-pair training error mean((ε_θ − ε)²) and reduced residual mean(ε_θ − ε)."""
        diff = (out - noise).detach()
        dims = tuple(range(1, diff.dim()))
        return diff.pow(2).mean(dim=dims), diff.mean(dim=dims)

    def layer_grads(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The same as :meth:`param_grads`, assembled per layer from one batched forward and
        backward pass (:mod:`diffattr.attribution.features.layer_grads`)."""
        with self._batched_pass(record=True):
            out, values = self._measured(self.params, xt, t, noise, ab, cond)
            grads = assemble_sample_grads(
                self._plan, values.sum(), xt.shape[0], self.layer_projector
            )
        b = xt.shape[0]
        for n, p in self.params.items():  # a layer the forward pass never reached
            if n not in grads:
                grads[n] = torch.zeros(b, self.out_dims[n], dtype=torch.float32, device=p.device)
        return grads, *self._error_residual(out, noise)

    def _add_pair_grads(
        self, out: torch.Tensor, rows: torch.Tensor, grads: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """out[rows] += g (normalised per pair if asked), one parameter at a time, so no
        flattened (B, p) copy of the pairs' gradients is ever made. Returns the pair norms.

        Scaling and scattering are one product per parameter: out += W g with W (samples ×
        pairs), W[rows[j], j] = 1/‖g_j‖ (or 1), a single pass over the pairs' gradients.
        """
        b = rows.numel()
        sq = torch.zeros(b, dtype=torch.float32, device=out.device)
        for n in self.params:
            sq += grads[n].reshape(b, -1).float().pow(2).sum(dim=1)
        norms = sq.sqrt()
        if not torch.isfinite(norms).all():
            return norms
        scale = 1.0 / norms.clamp_min(1e-30) if self.normalize else torch.ones_like(norms)
        weights = torch.zeros(out.shape[0], b, dtype=torch.float32, device=out.device)
        weights[rows.to(out.device), torch.arange(b, device=out.device)] = scale
        offset = 0
        for n in self.params:
            g = grads.pop(n).reshape(b, -1).float()
            out.narrow(1, offset, g.shape[1]).addmm_(weights, g)
            offset += g.shape[1]
        return norms

    def summed_grad(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, p) gradient of Σ_pairs f over a micro-batch of pairs by one ordinary backward
        pass, plus the per-pair (error, residual)."""
        params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        with self._batched_pass(record=False):
            out, values = self._measured(params, xt, t, noise, ab, cond)
            grads = torch.autograd.grad(values.sum(), list(params.values()))
        flat = torch.cat([g.reshape(1, -1).float() for g in grads], dim=1)
        return flat, *self._error_residual(out, noise)

    def _add_segment_grads(
        self,
        out: torch.Tensor,
        batch: tuple[torch.Tensor, ...],
        segments: int,
        ids: np.ndarray,
        cond: torch.Tensor | None,
        overwrite: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """out[sample] += (1/K) Σ_t w_t g(sample, t) over a micro-batch of whole segments
        (:meth:`segment_batches`), each layer's sum one batched product over the segments'
        timesteps × positions (:func:`~.layer_grads.segment_sample_grads`);
        w_t = 1/‖g‖ when normalising; with ``overwrite`` (the segments are whole samples)
        out[sample] = … instead, so ``out`` need not be zeroed first. Returns the per-pair
        (error, residual)."""
        rows, xt, t, target, ab = batch
        c = None if cond is None else cond[rows].to(self.device, self.dtype)
        first = int(rows[0])
        block = out.narrow(0, first, segments)

        sums = torch.zeros(segments, dtype=torch.float32, device=out.device)
        unwritten = set(self.params)

        def emit(name: str, g: torch.Tensor) -> None:
            cols = block.narrow(1, self._offsets[name], g.shape[1])
            if overwrite:
                cols.copy_(g)
            else:
                cols.add_(g)
            unwritten.discard(name)
            sums.add_(g.sum(dim=1))  # NaN/Inf check without another pass over the block

        with self._batched_pass(record=True):
            y, values = self._measured(self.params, xt, t, target, ab, c)
            norms = segment_sample_grads(
                self._plan, values.sum(), xt.shape[0], segments, emit, self.normalize,
                None if self.layer_projector is None else self.layer_projector.layer_factors,
                scale=1.0 / self.pair_source.num,
            )  # fmt: skip
        if overwrite:  # a parameter the pass never reached has a zero gradient
            for name in unwritten:
                block.narrow(1, self._offsets[name], self.out_dims[name]).zero_()
        if norms is not None:
            bad = ~torch.isfinite(norms).cpu()
            bad_rows = rows[bad]
        else:
            finite = torch.isfinite(sums).cpu()
            bad_rows = torch.arange(first, first + segments)[~finite]
        if bad_rows.numel():
            raise NumericalError(
                f"non-finite gradient for sample id {int(ids[int(bad_rows[0])])}",
                hint="check the model checkpoint and the input image for NaN/Inf",
            )
        return self._error_residual(y, target)

    def output_block(
        self, rows: int, buffer: torch.Tensor | None = None, zeroed: bool = True
    ) -> torch.Tensor:
        """A (rows, p) float32 block, zeroed unless ``zeroed`` is False (every element is then
        written before it is read): a view of ``buffer`` when given (ConfigError if it is too
        small or not float32 on this device), else a new tensor."""
        if buffer is None:
            make = torch.zeros if zeroed else torch.empty
            return make(rows, self.dim, dtype=torch.float32, device=self.device)
        n = rows * self.dim
        if (buffer.dtype != torch.float32 or buffer.device != self.device
                or buffer.numel() < n or not buffer.is_contiguous()):  # fmt: skip
            raise ConfigError(
                f"gradient output buffer of {buffer.numel()} {buffer.dtype} elements on "
                f"{buffer.device} cannot hold {rows}×{self.dim} float32 on {self.device}",
                hint="pass a contiguous float32 tensor on the computer's device",
            )
        block = buffer.view(-1)[:n].view(rows, self.dim)
        return block.zero_() if zeroed else block

    def _dtype_error(self, exc: BaseException) -> None:
        """Raise a ConfigError when ``exc`` says the gradient dtype is unsupported here."""
        if self.dtype == torch.float32 or "not implemented for" not in str(exc):
            return
        name = {v: k for k, v in GRAD_DTYPES.items()}[self.dtype]
        raise ConfigError(
            f"--grad-dtype {name} is not supported on {self.device.type}: {exc}",
            hint="use --grad-dtype bf16 on CPU (fp16 needs --device cuda), or fp32",
        ) from None

    def compute(
        self,
        x0: torch.Tensor,
        ids: np.ndarray,
        cond: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ḡ (B, p) float32, error e (B,) and residual r (B,) for a batch of samples.

        ``cond`` (B, …): per-sample conditioning passed to the model with x_t and t.
        ``out``: a float32 tensor of at least B·p elements on this device to write ḡ into
        (overwritten; ḡ is a view of it), e.g. one buffer reused across batches, which spares
        the operating system mapping fresh pages for every batch's (B, p) block.
        """
        B = x0.shape[0]
        K = self.pair_source.num
        err = torch.zeros(B, dtype=torch.float64)
        res = torch.zeros(B, dtype=torch.float64)
        if self.strategy == "layers":
            pairs = self.layer_pairs(x0, cond, ids)
            whole = pairs >= K  # one pass per sample: its row is written, not accumulated
            out = self.output_block(B, out, zeroed=not whole)
            for batch, segments in self.segment_batches(x0, ids, pairs):
                e, r = self._add_segment_grads(out, batch, segments, ids, cond, whole)
                err.index_add_(0, batch[0], e.detach().cpu().double())
                res.index_add_(0, batch[0], r.detach().cpu().double())
            return out, (err / K).float(), (res / K).float()  # out already holds Σ_t/K
        out = self.output_block(B, out)
        for rows, xt, t, noise, ab in self._batches(x0, ids):
            c = None if cond is None else cond[rows].to(self.device, self.dtype)
            if self.strategy == "vmap":
                grads, e, r = self.pair_grads(xt, t, noise, ab, c)
                grad_rows = rows
                norms = self._add_pair_grads(out, rows, grads)  # also a cheap NaN/Inf check
            else:  # rows: one sample's pairs (summed) or a single pair
                g, e, r = self.summed_grad(xt, t, noise, ab, c)
                grad_rows = rows[:1]
                norms = g.norm(dim=1)
                if torch.isfinite(norms).all():
                    if self.normalize:
                        g.div_(norms.clamp_min(1e-30)[:, None])
                    out.index_add_(0, grad_rows.to(self.device), g)
            if not torch.isfinite(norms).all():
                bad = grad_rows[~torch.isfinite(norms).cpu()][0]
                raise NumericalError(
                    f"non-finite gradient for sample id {int(ids[int(bad)])}",
                    hint="check the model checkpoint and the input image for NaN/Inf",
                )
            err.index_add_(0, rows, e.detach().cpu().double())
            res.index_add_(0, rows, r.detach().cpu().double())
        return out.div_(K), (err / K).float(), (res / K).float()
