"""Attribution by unlearning the target: AbU and MUCS.

Both make a copy of the model forget the target x̂ and score each training image zᵢ by how much
its own loss rose with it. The loss is the model's own training loss under its noise process
(:class:`~diffattr.diffusion.schedule.NoiseSchedule`), so ε-, v- and x₀-prediction models are
served alike:

    ℓ(θ; x₀, t, ε) = ‖f_θ(x_t, t) − y‖² / d,   x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε,   y = ε, v or x₀.

Training images' losses are taken on fixed (timestep, noise) pairs, the same pairs before and
after unlearning (common random numbers): a score is the difference of one function at two
parameter values, not of two noisy estimates. Sign: positive = zᵢ helped produce x̂.

**AbU** (Wang et al., NeurIPS 2024; ``abu``):

    F_j  = (1/(N R)) Σᵢ Σ_r (∂ℓ(θ₀; zᵢ, t_ir, ε_ir)/∂θ_j)²          diagonal empirical Fisher
    g    = (1/D) Σ_j ∇_θ ℓ(θ; x̂, t_j, ε_j)                          target-loss gradient
    θ   ← θ + η · g / (N (F + δ)),   δ = damping · mean(F) per tensor    (``steps`` times)
    τ(x̂, zᵢ) = (1/K) Σ_k [ℓ(θ; zᵢ, t_k, ε_ik) − ℓ(θ₀; zᵢ, t_k, ε_ik)]

with t_k K evenly spaced timesteps (``range(0, T, T//K)``), ε_ik keyed by (seed, image id, t_k),
(t_ir, ε_ir) keyed by (seed, image id, r), and the D target draws t_j distinct timesteps of a
seeded permutation with fresh noise. One step with η = 1 is the Newton step on
−L(x̂) + (N/2)(θ−θ₀)ᵀF(θ−θ₀); the authors' code uses η = 0.01 on COCO (N ≈ 10⁵) and no δ.
F is computed once per call (in memory) from per-sample gradients of the selected parameters.

**MUCS** (Serrà et al., 2026; ``mucs``): a noise bank of K pairs (t_k, ε_k) shared by every
image and both models — σ_k the Karras grid (ρ = ``rho``) from σ(T−1) down to ``sigma_min``,
σ_t = √((1−ᾱ_t)/ᾱ_t), each mapped to the timestep of nearest log σ — then a copy fine-tuned by
AdamW on

    J(θ) = mean_r ℓ(θ; z_r, t_r, ε_r) − λ · mean_j min(ℓ(θ; x̂, t_j, ε_j), L_null)

(retain batches of training images, forget batches of copies of x̂, t uniform, fresh noise),
stopping before the update once mean_j min(ℓ(x̂), L_null) ≥ (1 − tol) L_null, or at
``max_steps``; L_null defaults to the zero predictor's loss on the bank, mean ‖y‖²/d (≈ 1 for
ε-prediction, as a freshly initialised network's). With L_t, L_u the original and unlearned
models' losses on the bank,

    τ(x̂, zᵢ) = (1/K) Σ_k (L_u[i,k] − L_t[i,k]) / (L_u[i,k] + L_t[i,k] + c),   c = 10⁻³.

**Defaults** (tiny UNets at 8×8/16×16, N = 500–1,000; every one an option, to be tuned on
digits8 by cross-fitting over targets, ``benchmarks/unlearning.py --lds``). K: the caller's
feature timesteps (``--timesteps``, 32 for ``diffattr score``; so LDS rows match DAS's K), else
20. AbU: η = 1e-3 — on the digits8 model (N = 500, K = 10, 6 targets) one step raised a target's
own loss ×1.4 (1.2–1.5) while the mean training loss rose 4% (the notes' criterion: ×1.5–2
with < 5%); η = 1e-2 raised every loss ×3; η = 1e-4 moved the target's loss by 3%. One step;
D = 256 draws (a few per cent of a target's cost at N = 500, K = 32); R = 4 Fisher draws per
image (once per call); damping 1e-3; all parameters. MUCS: lr = 2e-4 (the training lr of the
``tiny`` preset, 2e-3, over 10: the authors' rule), λ = 0.2 and tol = 0.05 (the authors');
max_steps = 50 (the authors have no cap: on digits8 the target's loss rose ×4–5 in 50 steps
without reaching 0.95·L_null, and 50 steps of 64 draws cost about what the after-loss pass does
at N = 500); retain and forget batches of 32 (the authors': 100); σ_min = 0.3, ρ = 7 (their
grid without its 30% lowest levels); weight decay 0.01; Linear/Conv weights outside the time
embedding trained.

**Determinism.** Every draw comes from a generator keyed by (purpose, seed, …)
(:mod:`diffattr.seeding`). Unlearning draws (target timesteps and noise, retain batches) are
keyed by step and draw only, never by the target or its position, so two targets differ only in
their image, and a target's scores do not depend on which other targets share the call. The
unlearning passes have a fixed size (:data:`UNLEARN_CHUNK`) and the Fisher's passes one set by
the model alone, so ``batch_size`` (images per training-loss pass) changes only the rounding of
the loss passes (the same for before and after).

**Cost.** Once per call: the before-losses, N·K forward passes (AbU also the Fisher, N·R
per-sample gradients). Per target: the unlearning (AbU: steps·D forward+backward passes of x̂;
MUCS: S·(retain + forget) of them, S ≤ ``max_steps``) and the after-losses, N·K forward passes.
The loss passes' inputs (x_t and y of every pair) are made once per call and shared by the
before pass and every target's after pass (held in memory up to :data:`BANK_BYTES`); each
target's model is its own, so its forward passes cannot be shared with another target's.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError
from diffattr.seeding import generator

#: Key namespaces of the random streams (ASCII tags), so that no two purposes share a stream.
ABU_LOSS_KEY = 0x41425531  # training images' (t_k, ε_ik)
ABU_FISHER_KEY = 0x41425546  # the Fisher's (t_ir, ε_ir)
ABU_TARGET_KEY = 0x41425554  # the target draws of each step
MUCS_BANK_KEY = 0x4D554342  # the noise bank ε_k
MUCS_STEP_KEY = 0x4D554353  # retain batches, their draws and the forget draws of each step
PROBE_KEY = 0x554E5052  # the target's own loss before and after (reported, not scored)

#: Draws per forward+backward pass of an unlearning step (fixed: scores never depend on the
#: caller's batch size).
UNLEARN_CHUNK = 64
#: Bytes of loss-pass inputs (x_t and y of every training (image, timestep) pair) kept in
#: memory and reused by every target; beyond this they are made again for each pass.
BANK_BYTES = 256 << 20
#: K when neither the option nor the caller's feature settings give one.
FALLBACK_TIMESTEPS = 20
#: Added to the denominator of MUCS's skew.
SKEW_OFFSET = 1e-3


# ---------------------------------------------------------------------------- shared pieces


def model_output(model: nn.Module, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f_θ(x_t, t) as float32 (a diffusers model's ``.sample``)."""
    out = model(xt, t)
    return getattr(out, "sample", out).float()


def pair_losses(
    model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """(B,) ℓ = ‖f_θ(x_t, t) − y‖²/d, x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε, y = ``schedule.target``."""
    xt = schedule.add_noise(x0, noise, t)
    y = schedule.target(x0, noise, t)
    return (model_output(model, xt, t) - y).pow(2).flatten(1).mean(1)


def uniform_timesteps(num: int, num_train_timesteps: int) -> np.ndarray:
    """K evenly spaced timesteps ``range(0, T, T//K)[:K]`` (every t when K ≥ T)."""
    T = num_train_timesteps
    if num >= T:
        return np.arange(T, dtype=np.int64)
    return np.arange(0, T, T // num, dtype=np.int64)[:num]


def sigma_timesteps(
    schedule: NoiseSchedule, num: int, sigma_min: float = 0.3, rho: float = 7.0
) -> np.ndarray:
    """MUCS's noise levels as timesteps: the Karras grid σ_k = (σ_max^{1/ρ} + k/(K−1)
    (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, k = 0…K−1, from σ_max = σ(T−1) down to ``sigma_min``
    (clipped to [σ(0), σ_max]), each mapped to the t of nearest log σ_t, σ_t = √((1−ᾱ_t)/ᾱ_t).
    """
    ab = schedule.alphas_cumprod().double()
    log_sigma = 0.5 * torch.log((1 - ab) / ab)
    hi = float(log_sigma[-1].exp())
    lo = min(max(float(sigma_min), float(log_sigma[0].exp())), hi)
    k = torch.linspace(0.0, 1.0, num, dtype=torch.float64) if num > 1 else torch.zeros(1)
    grid = (hi ** (1 / rho) + k * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    nearest = (grid.log()[:, None] - log_sigma[None, :]).abs().argmin(dim=1)
    return nearest.numpy().astype(np.int64)


class LossBank:
    """The training images' losses on fixed (timestep, noise) pairs.

    Pair (i, k) has timestep ``timesteps[k]`` and noise ``noise(rows)[i, k]``; :meth:`losses`
    returns the (N, K) float64 matrix ℓ(θ; zᵢ, t_k, ε_ik) of a model, in passes of
    ``batch_size`` images × K pairs. Each pass's inputs (x_t, t, y) are made once and kept
    while they fit in :data:`BANK_BYTES`, so the before pass and every target's after pass
    evaluate exactly the same inputs.
    """

    def __init__(
        self,
        images: torch.Tensor,
        timesteps: np.ndarray,
        noise: Callable[[slice], torch.Tensor],
        schedule: NoiseSchedule,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.images, self.schedule, self.noise = images, schedule, noise
        self.timesteps = torch.as_tensor(np.asarray(timesteps, dtype=np.int64))
        self.batch_size, self.device = max(1, int(batch_size)), torch.device(device)
        per_pair = 2 * 4 * int(np.prod(images.shape[1:]))
        self.keep = images.shape[0] * len(self.timesteps) * per_pair <= BANK_BYTES
        self._cache: dict[int, tuple[torch.Tensor, ...]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.images.shape[0], len(self.timesteps)

    def pass_inputs(self, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, y) of the pairs of images start … start + batch_size − 1 (image-major)."""
        if start in self._cache:
            return self._cache[start]
        rows = slice(start, min(start + self.batch_size, self.images.shape[0]))
        x0 = self.images[rows]
        b, K = x0.shape[0], len(self.timesteps)
        eps = self.noise(rows).reshape(b * K, *x0.shape[1:]).to(self.device)
        x0 = x0.to(self.device).repeat_interleave(K, dim=0)
        t = self.timesteps.repeat(b).to(self.device)
        made = (self.schedule.add_noise(x0, eps, t), t, self.schedule.target(x0, eps, t))
        if self.keep:
            self._cache[start] = made
        return made

    def zero_loss(self) -> float:
        """The zero predictor's loss on the bank, mean over pairs of ‖y‖²/d (float64)."""
        total = 0.0
        for start in range(0, self.shape[0], self.batch_size):
            total += float(self.pass_inputs(start)[2].double().pow(2).flatten(1).mean(1).sum())
        return total / (self.shape[0] * self.shape[1])

    @torch.no_grad()
    def losses(self, model: nn.Module) -> np.ndarray:
        """(N, K) float64 ℓ(θ; zᵢ, t_k, ε_ik) of ``model``."""
        N, K = self.shape
        out = np.empty((N, K), dtype=np.float64)
        for start in range(0, N, self.batch_size):
            xt, t, y = self.pass_inputs(start)
            loss = (model_output(model, xt, t) - y).pow(2).flatten(1).mean(1)
            out[start : start + xt.shape[0] // K] = loss.double().cpu().numpy().reshape(-1, K)
        return out


def resolve_timesteps(inputs: Any, timesteps: int | None) -> int:
    """K: the option, else the caller's feature timesteps (``settings.timesteps``, e.g.
    ``--timesteps``), else :data:`FALLBACK_TIMESTEPS`."""
    if timesteps is None:
        timesteps = getattr(inputs.context.settings, "timesteps", None) or FALLBACK_TIMESTEPS
    if int(timesteps) < 1:
        raise ConfigError(f"timesteps must be at least 1, got {timesteps}")
    return int(timesteps)


def trainable_names(model: nn.Module, pattern: str | None, default: Callable) -> list[str]:
    """Names of the parameters unlearning changes: those matching regex ``pattern``, else
    ``default(model)``."""
    if pattern is None:
        return default(model)
    try:
        rx = re.compile(str(pattern))
    except re.error as exc:
        raise ConfigError(f"invalid params pattern {pattern!r}: {exc}") from exc
    names = [n for n, _ in model.named_parameters() if rx.search(n)]
    if not names:
        raise ConfigError(f"params pattern {pattern!r} matches no parameter of the model")
    return names


def all_parameters(model: nn.Module) -> list[str]:
    """Every parameter (AbU's default)."""
    return [n for n, _ in model.named_parameters()]


def layer_weights(model: nn.Module) -> list[str]:
    """Weights of Linear and Conv2d layers outside the timestep embedding (``time_emb*``): no
    biases, norms or embedders (MUCS's default, as its authors freeze biases and embedders)."""
    return [
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and "time_emb" not in name
    ]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _working_copy(model: nn.Module, names: list[str], device: str) -> tuple[nn.Module, dict]:
    """A copy of ``model`` on ``device`` in eval mode with only ``names`` trainable, and
    those parameters' original values θ₀."""
    work = copy.deepcopy(model).to(device).eval()
    chosen = set(names)
    for n, p in work.named_parameters():
        p.requires_grad_(n in chosen)
    named = dict(work.named_parameters())
    return work, {n: named[n].detach().clone() for n in names}


@torch.no_grad()
def _restore(work: nn.Module, theta0: dict[str, torch.Tensor]) -> None:
    """θ ← θ₀ for the trainable parameters of ``work``."""
    named = dict(work.named_parameters())
    for n, value in theta0.items():
        named[n].copy_(value)


def _draws(key: int, seed: int, step: int, count: int, T: int, shape: tuple[int, ...]):
    """(t, ε) of ``count`` draws of one step: t runs through seeded permutations of 0…T−1
    (distinct while count ≤ T), ε fresh; keyed by (key, seed, step) alone."""
    g = generator(key, seed, step)
    t = torch.cat([torch.randperm(T, generator=g) for _ in range(-(-count // T))])[:count]
    return t, torch.randn((count, *shape), generator=g)


def _probe(work: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, ts: np.ndarray, seed: int):
    """The target's mean loss over ``ts`` with noise keyed by (seed, k): how far it was
    unlearned (reported in the scores' metadata, not scored)."""
    eps = torch.randn((len(ts), *x.shape), generator=generator(PROBE_KEY, seed))
    device = next(work.parameters()).device
    t = torch.as_tensor(ts).to(device)
    with torch.no_grad():
        x0 = x.to(device).expand(len(ts), *x.shape)
        return float(pair_losses(work, schedule, x0, eps.to(device), t).double().mean())


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {}
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="target", disable=not progress)


def _context(inputs: Any, method: str) -> tuple[nn.Module, NoiseSchedule, torch.Tensor, np.ndarray]:
    """(model, schedule, training images, training ids) of ``inputs``, or a ConfigError."""
    from diffattr.attribution.inputs import require_inputs

    require_inputs(inputs, method, "model", "train_images", "target_images")
    n = inputs.train_images.shape[0]
    ids = inputs.train_ids if inputs.train_ids is not None else np.arange(n)
    schedule = inputs.context.schedule or NoiseSchedule()
    return (
        inputs.context.model,
        schedule,
        inputs.train_images.float(),
        np.asarray(ids, dtype=np.int64),
    )


def _param_pattern(inputs: Any, params: str | None) -> str | None:
    """The option, else the caller's ``--params`` (``settings.params``), else None."""
    return params if params is not None else getattr(inputs.context.settings, "params", None)


# ---------------------------------------------------------------------------- AbU


def diagonal_fisher(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    ids: np.ndarray,
    names: list[str],
    draws: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F_j = (1/(N R)) Σᵢ Σ_r (∂ℓ(θ; zᵢ, t_ir, ε_ir)/∂θ_j)² (float64,
    by parameter name), R = ``draws`` per image, (t_ir, ε_ir) keyed by (seed, image id, r),
    from per-sample gradients (:class:`~..features.gradients.GradientComputer`) in
    passes whose size depends on the model alone."""
    from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
    from diffattr.attribution.features.measure import make_measure

    gc = GradientComputer(
        model, make_measure("loss"), schedule, TimestepSpec(1), normalize=False,
        param_names=names, device=device,
    )  # fmt: skip
    T, shape = schedule.num_train_timesteps, tuple(images.shape[1:])
    alphas = schedule.alphas_cumprod().to(gc.device)
    pairs = []
    for row, sid in enumerate(ids.tolist()):
        for r in range(draws):
            g = generator(ABU_FISHER_KEY, seed, int(sid), r)
            t = int(torch.randint(T, (1,), generator=g))
            pairs.append((row, t, torch.randn(shape, generator=g)))
    fisher = {n: torch.zeros(gc.params[n].numel(), dtype=torch.float64, device=gc.device)
              for n in names}  # fmt: skip
    for s in range(0, len(pairs), gc.micro_batch):
        chunk = pairs[s : s + gc.micro_batch]
        rows = torch.tensor([p[0] for p in chunk])
        t = torch.tensor([p[1] for p in chunk], device=gc.device)
        eps = torch.stack([p[2] for p in chunk]).to(gc.device)
        x0 = images[rows].to(gc.device)
        xt, y = schedule.add_noise(x0, eps, t), schedule.target(x0, eps, t)
        grads, _, _ = gc.pair_grads(xt, t, y, alphas[t])
        for n in names:
            fisher[n] += grads[n].reshape(len(chunk), -1).double().pow(2).sum(dim=0)
    return {n: (f / len(pairs)).reshape(gc.params[n].shape) for n, f in fisher.items()}


def chunked_losses(
    work: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """(B,) ℓ of B draws on ``work``'s device, in passes of :data:`UNLEARN_CHUNK` draws."""
    device = next(work.parameters()).device
    return torch.cat([
        pair_losses(work, schedule, x0[s : s + UNLEARN_CHUNK].to(device),
                    noise[s : s + UNLEARN_CHUNK].to(device), t[s : s + UNLEARN_CHUNK].to(device))
        for s in range(0, len(t), UNLEARN_CHUNK)
    ])  # fmt: skip


def target_gradient(
    work: nn.Module,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    params: list[torch.Tensor],
    t: torch.Tensor,
    noise: torch.Tensor,
) -> list[torch.Tensor]:
    """g = (1/D) Σ_j ∇_θ ℓ(θ; x̂, t_j, ε_j) over the D draws (float64 per parameter), in
    passes of :data:`UNLEARN_CHUNK` draws."""
    device = params[0].device
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with torch.enable_grad():
        for s in range(0, len(t), UNLEARN_CHUNK):
            tt, eps = t[s : s + UNLEARN_CHUNK].to(device), noise[s : s + UNLEARN_CHUNK].to(device)
            x0 = x.to(device).expand(len(tt), *x.shape)
            loss = pair_losses(work, schedule, x0, eps, tt).sum()
            for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                acc += g.double()
    return [acc / len(t) for acc in total]


def abu_scores(
    model: nn.Module,
    schedule: NoiseSchedule,
    train_images: torch.Tensor,
    train_ids: np.ndarray,
    target_images: torch.Tensor,
    eta: float = 1e-3,
    steps: int = 1,
    draws: int = 256,
    damping: float = 1e-3,
    fisher_draws: int = 4,
    timesteps: int = FALLBACK_TIMESTEPS,
    params: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(T, N) AbU scores τ(x̂, zᵢ) = mean_k [ℓ(θ_x̂; zᵢ, t_k, ε_ik) − ℓ(θ₀; zᵢ, t_k, ε_ik)]
    (module docstring) and metadata: the Fisher's and unlearning's settings, and per target
    the ratio of its own loss after/before and of the mean training loss after/before.

    Options: ``eta``: η, the size of each Fisher-preconditioned ascent step on the target's
    loss; ``steps``: how many steps; ``draws``: D, (timestep, noise) draws of the target's
    loss per step; ``damping``: δ added to the Fisher, relative to its mean per tensor;
    ``fisher_draws``: R, draws per training image for the diagonal Fisher; ``timesteps``: K,
    timesteps of the training images' losses (unset: the caller's feature timesteps, else
    20); ``params``: a regular expression selecting the parameters unlearned (unset: all);
    ``seed``: the key of every draw."""
    _check(eta >= 0 and math.isfinite(eta), f"abu eta must be ≥ 0, got {eta}")
    _check(int(steps) >= 0, f"abu steps must be ≥ 0, got {steps}")
    _check(int(draws) >= 1, f"abu draws must be ≥ 1, got {draws}")
    _check(int(fisher_draws) >= 1, f"abu fisher_draws must be ≥ 1, got {fisher_draws}")
    _check(damping >= 0, f"abu damping must be ≥ 0, got {damping}")
    N, T = train_images.shape[0], schedule.num_train_timesteps
    shape = tuple(train_images.shape[1:])
    names = trainable_names(model, params, all_parameters)
    ts = uniform_timesteps(timesteps, T)

    def noise(rows: slice) -> torch.Tensor:
        """ε_ik keyed by (seed, image id, t_k)."""
        return torch.stack([
            torch.randn(shape, generator=generator(ABU_LOSS_KEY, seed, int(sid), int(t)))
            for sid in train_ids[rows].tolist() for t in ts.tolist()
        ])  # fmt: skip

    work, theta0 = _working_copy(model, names, device)
    bank = LossBank(train_images, ts, noise, schedule, batch_size, device)
    before = bank.losses(work)
    out = np.zeros((target_images.shape[0], N))
    meta: dict[str, Any] = {"unlearning": "abu", "timesteps": ts.tolist(), "steps": int(steps),
                            "parameters": len(names)}  # fmt: skip
    named = dict(work.named_parameters())
    plist = [named[n] for n in names]
    fisher: dict[str, torch.Tensor] = {}
    if steps > 0 and eta > 0:  # else θ stays θ₀ (the after pass is still taken: scores 0)
        fisher = diagonal_fisher(
            model, schedule, train_images, train_ids, names, fisher_draws, seed, device
        )
    inverse = []  # 1 / (N (F + δ)), 0 where F + δ = 0 (a parameter no loss depends on)
    for n, p in zip(names, plist, strict=True):
        f = fisher.get(n, torch.zeros_like(p, dtype=torch.float64)).to(device)
        denom = N * (f + damping * f.mean())
        inverse.append(torch.where(denom > 0, 1.0 / denom.clamp_min(1e-300), 0.0))
    draws_per_step = [_draws(ABU_TARGET_KEY, seed, s, int(draws), T, shape) for s in range(steps)]
    target_ratio, train_ratio = [], []
    bar = _bar(target_images.shape[0], "abu (unlearn targets)", progress)
    for row, x in enumerate(target_images.float()):
        _restore(work, theta0)
        start = _probe(work, schedule, x, ts, seed)
        for t, eps in draws_per_step:
            g = target_gradient(work, schedule, x, plist, t, eps)
            with torch.no_grad():
                for p, gi, inv in zip(plist, g, inverse, strict=True):
                    p.copy_((p.double() + eta * gi * inv).to(p.dtype))
        after = bank.losses(work)
        out[row] = (after - before).mean(axis=1)
        target_ratio.append(_probe(work, schedule, x, ts, seed) / max(start, 1e-30))
        train_ratio.append(float(after.mean() / max(before.mean(), 1e-30)))
        bar.update(1)
    bar.close()
    meta.update(target_loss_ratio=_summary(target_ratio), train_loss_ratio=_summary(train_ratio))
    if fisher:
        meta["fisher_mean"] = float(np.mean([float(f.mean()) for f in fisher.values()]))
    return out, meta


def _caller_options(inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``timesteps`` and ``params`` defaulting to the caller's (its feature
    K, else 20; its ``--params``, else the method's own choice), and the inputs' batch size,
    device and progress."""
    return {
        **options,
        "timesteps": resolve_timesteps(inputs, options.get("timesteps")),
        "params": _param_pattern(inputs, options.get("params")),
        "batch_size": inputs.context.batch_size,
        "device": inputs.context.device,
        "progress": inputs.context.progress,
    }


def abu_from_inputs(inputs: Any, **options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The registered ``abu`` method from its ScoreInputs (model, schedule, training set,
    targets); ``options`` those of :func:`abu_scores` (``Method.option_specs``)."""
    model, schedule, images, ids = _context(inputs, "abu")
    return abu_scores(
        model, schedule, images, ids, inputs.target_images, **_caller_options(inputs, options)
    )


# ---------------------------------------------------------------------------- MUCS


def mucs_scores(
    model: nn.Module,
    schedule: NoiseSchedule,
    train_images: torch.Tensor,
    target_images: torch.Tensor,
    lr: float = 2e-4,
    lam: float = 0.2,
    max_steps: int = 50,
    tol: float = 0.05,
    retain_batch: int = 32,
    forget_batch: int = 32,
    weight_decay: float = 0.01,
    l_null: float | None = None,
    sigma_min: float = 0.3,
    rho: float = 7.0,
    timesteps: int = FALLBACK_TIMESTEPS,
    params: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(T, N) MUCS scores τ(x̂, zᵢ) = mean_k (L_u − L_t)/(L_u + L_t + c) (module docstring)
    and metadata: L_null, the bank's timesteps, and per target the steps taken and the ratio of
    its own loss after/before.

    Options: ``lr``: AdamW's learning rate for the unlearning; ``lam``: λ, the weight of the
    mirrored ascent on the target's loss; ``max_steps``: at most this many steps; ``tol``:
    stop once the target's loss is within this fraction of L_null; ``retain_batch``: training
    images per step; ``forget_batch``: copies of the target per step; ``weight_decay``:
    AdamW's weight decay; ``l_null``: the loss at which ascent stops (unset: the zero
    predictor's on the bank); ``sigma_min``: the lowest noise level of the bank; ``rho``: the
    Karras grid's ρ; ``timesteps``: K, the bank's size (unset: the caller's feature
    timesteps, else 20); ``params``: a regular expression selecting the parameters trained
    (unset: Linear and Conv weights outside the time embedding); ``seed``: the key of every
    draw."""
    _check(lr >= 0 and math.isfinite(lr), f"mucs lr must be ≥ 0, got {lr}")
    _check(lam >= 0, f"mucs lam must be ≥ 0, got {lam}")
    _check(int(max_steps) >= 0, f"mucs max_steps must be ≥ 0, got {max_steps}")
    _check(0 <= tol < 1, f"mucs tol must be in [0, 1), got {tol}")
    _check(int(retain_batch) >= 1 and int(forget_batch) >= 1,
           "mucs retain_batch and forget_batch must be ≥ 1")  # fmt: skip
    _check(sigma_min > 0 and rho > 0, "mucs sigma_min and rho must be > 0")
    N, T = train_images.shape[0], schedule.num_train_timesteps
    shape = tuple(train_images.shape[1:])
    names = trainable_names(model, params, layer_weights)
    ts = sigma_timesteps(schedule, timesteps, sigma_min, rho)
    bank_noise = torch.randn((len(ts), *shape), generator=generator(MUCS_BANK_KEY, seed))

    def noise(rows: slice) -> torch.Tensor:
        """ε_k, the same for every image."""
        b = len(range(*rows.indices(N)))
        return bank_noise.unsqueeze(0).expand(b, *bank_noise.shape)

    work, theta0 = _working_copy(model, names, device)
    bank = LossBank(train_images, ts, noise, schedule, batch_size, device)
    before = bank.losses(work)
    if l_null is None:  # the zero predictor's loss on the bank
        l_null = bank.zero_loss()
    out = np.zeros((target_images.shape[0], N))
    meta: dict[str, Any] = {"unlearning": "mucs", "timesteps": ts.tolist(), "l_null": l_null,
                            "parameters": len(names)}  # fmt: skip
    named = dict(work.named_parameters())
    plist = [named[n] for n in names]
    retain, forget = min(int(retain_batch), N), int(forget_batch)
    steps_taken, target_ratio = [], []
    bar = _bar(target_images.shape[0], "mucs (unlearn targets)", progress)
    for row, x in enumerate(target_images.float()):
        _restore(work, theta0)
        start = _probe(work, schedule, x, ts, seed)
        opt = torch.optim.AdamW(plist, lr=lr, weight_decay=weight_decay)
        taken = 0
        for step in range(int(max_steps)):
            g = generator(MUCS_STEP_KEY, seed, step)
            rows = torch.randperm(N, generator=g)[:retain]
            t = torch.randint(T, (retain + forget,), generator=g)
            eps = torch.randn((retain + forget, *shape), generator=g)
            x0 = torch.cat([train_images[rows], x.expand(forget, *shape)])
            with torch.enable_grad():
                loss = chunked_losses(work, schedule, x0, eps, t)
                clamped = loss[retain:].clamp(max=l_null)
                if float(clamped.detach().mean()) >= (1 - tol) * l_null:
                    break
                objective = loss[:retain].mean() - lam * clamped.mean()
                opt.zero_grad(set_to_none=True)
                objective.backward()
            opt.step()
            taken += 1
        after = bank.losses(work)
        out[row] = ((after - before) / (after + before + SKEW_OFFSET)).mean(axis=1)
        steps_taken.append(taken)
        target_ratio.append(_probe(work, schedule, x, ts, seed) / max(start, 1e-30))
        bar.update(1)
    bar.close()
    meta.update(steps_taken=_summary(steps_taken), target_loss_ratio=_summary(target_ratio))
    return out, meta


def mucs_from_inputs(inputs: Any, **options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The registered ``mucs`` method from its ScoreInputs (as :func:`abu_from_inputs`);
    ``options`` those of :func:`mucs_scores`."""
    model, schedule, images, _ = _context(inputs, "mucs")
    return mucs_scores(
        model, schedule, images, inputs.target_images, **_caller_options(inputs, options)
    )
