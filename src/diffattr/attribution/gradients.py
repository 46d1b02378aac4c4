"""Per-sample gradients of a measure with ``torch.func``, averaged over timesteps.

For a sample z (id i, image x₀) and each chosen timestep t, with noise ε keyed by
(seed, i, t) and x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε:

    g(z, t) = ∇_θ f(ε_θ(x_t, t), ε, ᾱ_t)
    ḡ(z)    = (1/K) Σ_t g(z, t) / ‖g(z, t)‖    (normalisation optional)

computed as ``vmap(grad(f))`` over ``functional_call`` on micro-batches of (sample, t) pairs.
The same forward pass also yields the per-sample training error e = mean_t ‖ε_θ − ε‖²/d and the
reduced residual r = mean_t mean(ε_θ − ε), which DAS uses to weight its scores.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from diffattr.attribution.measure import Measure
from diffattr.diffusion.presets import use_classic_attention
from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, NoiseSchedule, keyed_noise
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


#: How per-sample gradients are taken (see :class:`GradientComputer`).
GRADIENT_STRATEGIES = ("auto", "vmap", "backward")
#: ``auto`` takes unnormalised averages by backward passes from this many timesteps on …
BACKWARD_MIN_TIMESTEPS = 8
#: … or, for fewer timesteps, on models with at least this many parameters.
BACKWARD_MIN_PARAMS = 4_000_000


class GradientComputer:
    """Per-sample, timestep-averaged gradients of ``measure`` for one model.

    ``param_names`` selects the differentiated parameters; the rest are held fixed.

    ``strategy``: ``vmap`` takes a gradient per (sample, timestep) pair with
    ``vmap(grad(f))`` over micro-batches of pairs. ``backward`` uses ordinary batched backward
    passes instead: without per-timestep normalisation a sample's gradient is that of
    (1/K) Σ_t f(x_t, t), i.e. one backward pass over its K pairs as a batch; with it, one
    backward pass per pair. Same quantity, rounding aside. Measured on CPU: one backward pass
    over a sample's K pairs took 0.55–0.75× vmap's time on the 35.7M-parameter `cifar` UNet
    (K = 4) and 0.35–0.45× on the 0.46M `tiny` one at K = 10, but 2–3× vmap's time on `tiny`
    at K = 2; a backward pass per pair was always slower than vmap (1.4–2.6×). So ``auto``
    picks ``backward`` for unnormalised averages over at least BACKWARD_MIN_TIMESTEPS
    timesteps, or over fewer on models of at least BACKWARD_MIN_PARAMS parameters.
    ``dtype``: precision of the forward and backward passes (a cast copy of the parameters;
    the model itself is not changed). The measure, the gradients handed out, their norms and
    the timestep average are float32 whatever ``dtype``.
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
        micro_batch: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        strategy: str = "auto",
    ) -> None:
        timesteps.validate(schedule.num_train_timesteps)
        if strategy not in GRADIENT_STRATEGIES:
            raise ConfigError(
                f"unknown gradient strategy {strategy!r}",
                hint=f"choose from {', '.join(GRADIENT_STRATEGIES)}",
            )
        self.model = model.to(device).eval()
        use_classic_attention(self.model)
        self.measure, self.schedule, self.timesteps = measure, schedule, timesteps
        self.noise_seed, self.normalize = noise_seed, normalize
        self.micro_batch = max(1, micro_batch)
        self.device = torch.device(device)
        self.dtype = dtype
        names = param_names or select_parameters(model)
        named = dict(model.named_parameters())

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype) if t.is_floating_point() else t.detach()

        self.params = {n: cast(named[n]) for n in names}
        self.fixed = {n: cast(p) for n, p in named.items() if n not in self.params}
        self.fixed.update({n: cast(b) for n, b in model.named_buffers()})
        self.dim = sum(p.numel() for p in self.params.values())
        if strategy == "auto":
            large = sum(p.numel() for p in named.values()) >= BACKWARD_MIN_PARAMS
            many = timesteps.num >= BACKWARD_MIN_TIMESTEPS
            strategy = "backward" if not normalize and (many or large) else "vmap"
        self.strategy = strategy
        self.alphas = schedule.alphas_cumprod().to(self.device)
        self._grad_fn = vmap(grad(self._f, has_aux=True), in_dims=(None, 0, 0, 0, 0))
        self._grad_fn_cond = vmap(grad(self._f, has_aux=True), in_dims=(None, 0, 0, 0, 0, 0))

    def _f(self, params, xt, t, noise, ab, cond=None):
        args = (xt[None], t[None]) if cond is None else (xt[None], t[None], cond[None])
        out = functional_call(self.model, (params, self.fixed), args).sample[0]
        out = out.float()  # the measure and its reductions in float32 (gradients flow back)
        diff = out - noise
        return self.measure(out, noise, ab), (diff.pow(2).mean(), diff.mean())

    def _batches(self, x0: torch.Tensor, ids: np.ndarray) -> Iterator[tuple[torch.Tensor, ...]]:
        """Pairs as the strategy consumes them: micro-batches (vmap), one sample's K pairs
        (backward, unnormalised) or single pairs (backward, normalised)."""
        if self.strategy == "vmap":
            return self.pairs(x0, ids)
        if self.normalize:
            return self.pairs(x0, ids, group=1)
        return self.pairs(x0, ids, group=self.timesteps.num)

    def pairs(
        self, x0: torch.Tensor, ids: np.ndarray, group: int | None = None
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """(row, x_t, t, ε, ᾱ_t) for every (sample, timestep) pair, in micro-batches of
        ``group`` pairs (default: the micro-batch size)."""
        T = self.schedule.num_train_timesteps
        rows, ts = [], []
        for r, sid in enumerate(ids):
            for t in self.timesteps.for_sample(int(sid), T):
                rows.append(r)
                ts.append(int(t))
        shape = tuple(x0.shape[1:])
        step = group or self.micro_batch
        for s in range(0, len(rows), step):
            r = torch.tensor(rows[s : s + step])
            t = torch.tensor(ts[s : s + step])
            noise = torch.stack(
                [
                    keyed_noise(ATTRIBUTION_NOISE_KEY, self.noise_seed, int(ids[i]), int(tt), shape)
                    for i, tt in zip(r.tolist(), t.tolist(), strict=True)
                ]
            ).to(self.device)
            ab = self.alphas[t.to(self.device)]
            x = x0[r].to(self.device)
            a = ab.view(-1, *([1] * (x.dim() - 1)))
            xt = a.sqrt() * x + (1 - a).sqrt() * noise
            yield r, xt, t.to(self.device), noise, ab

    def flat_grads(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, p) gradients of f for a micro-batch of pairs, plus their (error, residual).

        ``cond``: per-pair conditioning (e.g. caption embeddings), the model's third input.
        """
        grads, err, res = self.param_grads(xt, t, noise, ab, cond)
        flat = torch.cat([grads[n].reshape(xt.shape[0], -1).float() for n in self.params], dim=1)
        return flat, err, res

    def param_grads(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-pair gradients by parameter name ({name: (B, *shape)}) via vmap, plus the
        per-pair (error, residual)."""
        fn, extra = (self._grad_fn, ()) if cond is None else (self._grad_fn_cond, (cond,))
        try:
            grads, (err, res) = fn(self.params, xt.to(self.dtype), t, noise, ab, *extra)
        except (RuntimeError, NotImplementedError) as exc:
            self._dtype_error(exc)
            raise
        return grads, err, res

    def _add_pair_grads(
        self, out: torch.Tensor, rows: torch.Tensor, grads: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """out[rows] += g (normalised per pair if asked), one parameter at a time, so no
        flattened (B, p) copy of the pairs' gradients is ever made. Returns the pair norms."""
        b = rows.numel()
        sq = torch.zeros(b, dtype=torch.float32, device=out.device)
        for n in self.params:
            sq += grads[n].reshape(b, -1).float().pow(2).sum(dim=1)
        norms = sq.sqrt()
        if not torch.isfinite(norms).all():
            return norms
        idx = rows.to(out.device)
        offset = 0
        for n in self.params:
            g = grads.pop(n).reshape(b, -1).float()
            if self.normalize:
                g = g / norms.clamp_min(1e-30)[:, None]
            out[:, offset : offset + g.shape[1]].index_add_(0, idx, g)
            offset += g.shape[1]
        return norms

    def summed_grad(
        self, xt, t, noise, ab, cond=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, p) gradient of Σ_pairs f over a micro-batch of pairs by one ordinary backward
        pass, plus the per-pair (error, residual)."""
        params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        args = (xt.to(self.dtype), t) if cond is None else (xt.to(self.dtype), t, cond)
        try:
            with torch.enable_grad():
                out = functional_call(self.model, (params, self.fixed), args).sample.float()
                values = vmap(self.measure)(out, noise, ab)
                grads = torch.autograd.grad(values.sum(), list(params.values()))
        except (RuntimeError, NotImplementedError) as exc:
            self._dtype_error(exc)
            raise
        diff = (out - noise).detach()
        dims = tuple(range(1, diff.dim()))
        flat = torch.cat([g.reshape(1, -1).float() for g in grads], dim=1)
        return flat, diff.pow(2).mean(dim=dims), diff.mean(dim=dims)

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
        self, x0: torch.Tensor, ids: np.ndarray, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ḡ (B, p) float32, error e (B,) and residual r (B,) for a batch of samples.

        ``cond`` (B, …): per-sample conditioning passed to the model with x_t and t.
        """
        B = x0.shape[0]
        K = self.timesteps.num
        out = torch.zeros(B, self.dim, dtype=torch.float32, device=self.device)
        err = torch.zeros(B, dtype=torch.float64)
        res = torch.zeros(B, dtype=torch.float64)
        for rows, xt, t, noise, ab in self._batches(x0, ids):
            c = None if cond is None else cond[rows].to(self.device, self.dtype)
            if self.strategy == "vmap":
                grads, e, r = self.param_grads(xt, t, noise, ab, c)
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
