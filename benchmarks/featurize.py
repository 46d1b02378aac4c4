"""Per-sample-gradient throughput on CPU: diffattr featurize vs traker (MadryLab TRAK).

    .venv/bin/python benchmarks/featurize.py [--quick] [--cases tiny,cifar,digits8-K100,t2i-lora]
        [--base-src OTHER_CHECKOUT/src] [--out benchmarks/results/featurize.md]

Both sides do the same work on the same model, images, timesteps and keyed noise: for each
sample, the gradient of the diffusion loss ‖ε_θ(x_t, t) − ε‖²/d w.r.t. all parameters, averaged
over K timesteps (unnormalised), then projected to k dimensions.

- diffattr: ``GradientComputer.compute`` on featurize batches (``batch`` samples, split into
  micro-batches of (sample, timestep) pairs chosen by the library, as ``featurize`` does), then
  the projector on each featurize batch, exactly the inner loop of ``featurize`` (without the
  store writes); the gradients are written into an output allocated before timing
  (``compute(out=…)``; featurize reuses one buffer per call), the peers allocate theirs.
- traker: ``FunctionalGradientComputer`` with a model-output function that averages the loss
  over the sample's K timesteps (so one gradient per sample, as in a ``TRAKer.featurize`` call),
  on calls of ``micro_batch`` pairs, flattened with ``NoOpProjector``; then its CPU
  ``BasicProjector`` (Rademacher, the same k) on each featurize batch. traker has no sparse
  projection, so the countsketch row compares with its Rademacher projector at the same k.
- dattri (TRAIS-Lab): the gradient function of its ``AttributionTask`` (``vmap(grad(loss))``
  over samples, the loss averaging the sample's K timesteps, on flattened parameters) and its
  ``random_project`` (Rademacher, CPU) — the two steps of ``TRAKAttributor.cache``.

- diffattr ``logra r=16``: the per-layer Kronecker projection (``--projector logra``) inside the
  gradient pass, which never forms a full per-sample gradient — not the same projection as
  the peers' (their row's projection is the dense one at k, smaller than logra's output), so
  this row is the speed of diffattr's fastest feature path, not of the same computation.

diffattr's gradient strategies (``layers``, ``vmap``, ``backward``, and ``logra``) are also
timed side by side on the same work, unnormalised and normalised per timestep, and a profile
of the default strategy on normalised features says where the time goes.

Further cases, each timed on its own work:

- ``digits8-K100``: the digits8 LDS benchmark's features (benchmarks/lds_digits8.sh): N = 900
  digits 8×8 (train 500 + val 200 + generated 200) × K = 100 timesteps, DAS measure, per-timestep
  normalisation, exact (identity) features, featurize batch 32, on a seeded random `tiny` UNet
  (the trained one has the same cost), timed end to end through ``featurize`` (store writes
  included); with ``--base-src`` the same call in a subprocess importing another checkout (the
  code before a change), and the two stores compared row by row. The peers compute the same
  features — per-pair gradients of the DAS measure, normalised, averaged per sample — on the
  first ``--peer-samples`` samples, scaled linearly to N.
- ``t2i-lora``: the text-to-image family's LoRA gradients on the tiny pipeline's UNet
  (UNet2DConditionModel, rank-4 LoRA on the attention projections, B filled as after
  fine-tuning), conditioned on per-sample caption embeddings, loss measure averaged over K
  timesteps, per-sample gradients w.r.t. the LoRA parameters only (traker: ``grad_wrt``; dattri:
  the model's trainable parameters).

Throughput = samples × timesteps / (gradient time + projection time), i.e. per-sample
gradients per second; each phase is timed (time.perf_counter) after one warm-up pass and the
median over the repetitions is reported. Threads: torch.set_num_threads(2).

Hardware fraction: the FLOPs of one (sample, timestep) gradient — a forward and a backward
pass at batch 1, counted by ``torch.utils.flop_counter.FlopCounterMode`` — times diffattr's
gradient rate, over the fp32 matmul rate (2048×2048) timed in the same interleaved rounds as
the gradients (so both see the same load on a shared machine). For logra, which does less work
than a full gradient, this is an effective rate and can exceed 100%.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from trak.gradient_computers import FunctionalGradientComputer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import BasicProjector, NoOpProjector

try:  # optional peer: pip install dattri
    from dattri.func.projection import random_project
    from dattri.task import AttributionTask
except ImportError:  # pragma: no cover - the table then says so
    AttributionTask = random_project = None

from diffattr.attribution.features.gradients import (
    GradientComputer,
    TimestepSpec,
    select_parameters,
)
from diffattr.attribution.features.layer_projection import LayerProjection
from diffattr.attribution.features.measure import parse_measure
from diffattr.attribution.features.projection import make_projector
from diffattr.diffusion.presets import build_unet, use_classic_attention
from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, NoiseSchedule, keyed_noise

THREADS = 2
#: Rank of diffattr's per-layer (logra) projection in the rows that use it.
LOGRA_RANK = 16
NOISE_SEED = 0
#: Cap on traker's BasicProjector block (grad_dim × block_size float32 is allocated at once).
TRAKER_BLOCK_BYTES = 1 << 30


@dataclass(frozen=True)
class Case:
    preset: str
    size: int
    channels: int
    samples: int
    timesteps: int
    batch: int  # samples per featurize batch (one projection call each)
    micro_batch: int  # (sample, timestep) pairs per vmapped gradient call of the peers
    k: int


CASES = {
    "quick": [Case("tiny", 8, 1, 32, 2, 16, 32, 512), Case("cifar", 32, 3, 4, 1, 4, 4, 32)],
    "full": [Case("tiny", 8, 1, 64, 4, 32, 64, 1024), Case("cifar", 32, 3, 8, 2, 8, 4, 64)],
}
#: Cases run by default: the two presets' gradient/projection tables and the further work.
ALL_CASES = ("tiny", "cifar", "digits8-K100", "t2i-lora")


class TimestepAveragedLoss(AbstractModelOutput):
    """traker model output: mean over K timesteps of ‖ε_θ(x_t, t) − ε‖²/d for one sample."""

    def __init__(self, alphas: torch.Tensor) -> None:
        super().__init__()
        self.alphas = alphas

    def get_output(self, model, weights, buffers, x0, t, noise):
        a = self.alphas[t].view(-1, *([1] * (x0.dim() - 1)))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = torch.func.functional_call(model, (weights, buffers), (xt, t)).sample
        return (out - noise).pow(2).mean(dim=(1, 2, 3)).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.ones(batch[0].shape[0], 1)


def timed(fns: dict, reps: int) -> tuple[dict, dict, dict]:
    """Run each function once (warm-up), then ``reps`` rounds of all of them, interleaved
    (so a change of load on a shared machine hits every side alike).

    Returns (warm-up seconds, median seconds, last result), each keyed like ``fns``.
    """
    warm, out = {}, {}
    for key, fn in fns.items():
        t0 = time.perf_counter()
        out[key] = fn()
        warm[key] = time.perf_counter() - t0
    times: dict = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            out[key] = None
            gc.collect()
            t0 = time.perf_counter()
            out[key] = fn()
            times[key].append(time.perf_counter() - t0)
    spread = ", ".join(f"{key}: " + "/".join(f"{t:.3f}" for t in ts) for key, ts in times.items())
    print(f"    repetitions (s): {spread}", flush=True)
    return warm, {key: statistics.median(t) for key, t in times.items()}, out


#: fp32 matmuls of 2048×2048 per timed round of the matmul rate.
ROUND_MATMULS = 4


def matmul_side(n: int = 2048) -> tuple[Callable[[], None], Callable[[float], float]]:
    """A round of ROUND_MATMULS fp32 n×n matmuls, to time alone or in the same interleaved
    rounds as a case's gradient sides (so the hardware fraction's denominator sees the same
    load), and its seconds → GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def run() -> None:
        for _ in range(ROUND_MATMULS):
            torch.mm(a, b)

    return run, lambda sec: ROUND_MATMULS * 2 * n**3 / sec / 1e9


def matmul_gflops(reps: int = 5) -> float:
    """The fp32 matmul rate timed on its own (before and after the cases)."""
    run, rate = matmul_side()
    return rate(timed({"matmul": run}, reps)[1]["matmul"])


def project_all(proj, grads: list[torch.Tensor], traker: bool) -> list[torch.Tensor]:
    """Project every featurize batch (traker's ``project`` also takes a model id)."""
    if traker:
        return [proj.project(g, model_id=0) for g in grads]
    return [proj.project(g) for g in grads]


def dattri_project_all(k: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """dattri's ``random_project`` (Rademacher, CPU) on every featurize batch."""
    out = []
    for g in grads:
        fn = random_project(g, g.shape[0], proj_dim=k, proj_max_batch_size=g.shape[0],
                            proj_seed=0, proj_type="rademacher", device="cpu")  # fmt: skip
        out.append(fn(g, ensemble_id=0))
    return out


def gradient_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward + backward pass at batch 1 (what one per-sample gradient costs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.zeros(1, *shape), torch.tensor([10])
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t).sample.pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def run_case(
    case: Case, reps: int, log: Callable[[str], None]
) -> tuple[list[dict], list[dict], list[str]]:
    torch.manual_seed(0)
    model = build_unet(case.preset, case.size, case.channels).eval()
    shape = (case.channels, case.size, case.size)
    images = torch.rand((case.samples, *shape), generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = np.arange(case.samples, dtype=np.int64)
    schedule = NoiseSchedule()
    spec = TimestepSpec(case.timesteps, "uniform", NOISE_SEED)
    T, K = schedule.num_train_timesteps, case.timesteps
    work = case.samples * K

    ours_gc = GradientComputer(
        model, parse_measure("loss"), schedule, spec, noise_seed=NOISE_SEED, normalize=False,
    )  # fmt: skip
    p = ours_gc.dim
    log(f"[{case.preset}] p={p:,}  {case.samples} samples x {K} timesteps  k={case.k}")

    # diffattr writes each featurize batch's gradients into an output it is given (featurize
    # reuses one buffer); here one (N, p) block allocated before timing, so the timed passes
    # do not include the kernel mapping fresh pages for every batch's output. The peers'
    # APIs allocate their outputs per call.
    ours_out = torch.zeros(case.samples, p)

    def ours_grads() -> list[torch.Tensor]:
        return [ours_gc.compute(images[sl], ids[sl], out=ours_out[sl])[0]
                for sl in batches(case.samples, case.batch)]  # fmt: skip

    logra_gc = GradientComputer(
        model, parse_measure("loss"), schedule, spec, noise_seed=NOISE_SEED, normalize=False,
        layer_projection=LayerProjection(LOGRA_RANK),
    )  # fmt: skip

    def logra_features() -> list[torch.Tensor]:
        return [logra_gc.compute(images[sl], ids[sl])[0]
                for sl in batches(case.samples, case.batch)]  # fmt: skip

    alphas = schedule.alphas_cumprod()
    traker_gc = FunctionalGradientComputer(
        model, TimestepAveragedLoss(alphas), p, torch.float32, "cpu"
    )
    flatten = NoOpProjector(device="cpu")
    per_call = max(1, case.micro_batch // K)  # samples per vmapped call: same pair count

    def traker_grads() -> list[torch.Tensor]:
        use_classic_attention(model)  # SDPA has no vmap rule on CPU; ours may have set it
        out = []
        for sl in batches(case.samples, case.batch):
            parts = []
            for s in range(sl.start, sl.stop, per_call):
                x0, ts, noise = pair_inputs(slice(s, min(sl.stop, s + per_call)))
                grads = traker_gc.compute_per_sample_grad((x0, ts, noise))
                parts.append(flatten.project(grads, model_id=0))
            out.append(torch.cat(parts))
        return out

    def pair_inputs(sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 (B, K, …), t (B, K), ε (B, K, …)) of a featurize batch, as traker gets them."""
        rows = range(sl.start, sl.stop)
        ts = np.stack([spec.for_sample(int(ids[r]), T) for r in rows])
        noise = torch.stack([
            torch.stack([keyed_noise(ATTRIBUTION_NOISE_KEY, NOISE_SEED, int(ids[r]), t, shape)
                         for t in tr.tolist()])
            for r, tr in zip(rows, ts, strict=True)
        ])  # fmt: skip
        x0 = images[list(rows)].unsqueeze(1).expand(-1, K, *shape).contiguous()
        return x0, torch.as_tensor(ts), noise

    dattri_grad_fn = None
    if AttributionTask is not None:

        def dattri_loss(params, data):
            x0, t, noise = data  # one sample's K pairs
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            out = torch.func.functional_call(model, params, (xt, t)).sample
            return (out - noise).pow(2).mean(dim=(1, 2, 3)).mean()

        task = AttributionTask(loss_func=dattri_loss, model=model, checkpoints=model.state_dict())
        dattri_params = task.get_param(ckpt_idx=0)[0]
        dattri_grad_fn = task.get_grad_loss_func(in_dims=(None, 0))

    def dattri_grads() -> list[torch.Tensor]:
        use_classic_attention(model)
        out = []
        for sl in batches(case.samples, case.batch):
            parts = []
            for s in range(sl.start, sl.stop, per_call):
                inputs = pair_inputs(slice(s, min(sl.stop, s + per_call)))
                parts.append(dattri_grad_fn(dattri_params, inputs).detach())
            out.append(torch.cat(parts))
        return out

    block = min(case.k, 100)  # traker's default block_size is 100
    while block > 1 and p * block * 4 > TRAKER_BLOCK_BYTES:
        block //= 2
    ours_proj = {
        "identity": make_projector("identity", p, None),
        f"countsketch k={case.k}": make_projector("countsketch", p, case.k, seed=0),
        f"rademacher k={case.k}": make_projector("rademacher", p, case.k, seed=0),
    }
    traker_dense = BasicProjector(p, case.k, 0, "rademacher", "cpu", block_size=block)
    traker_proj = {"identity": NoOpProjector(device="cpu"), "dense": traker_dense}

    matmul_run, matmul_rate = matmul_side()
    grad_sides = {"ours": ours_grads, "ours-logra": logra_features, "traker": traker_grads}
    if dattri_grad_fn is not None:
        grad_sides["dattri"] = dattri_grads
    grad_warm, grad_t, grads = timed({**grad_sides, "matmul": matmul_run}, reps)
    case_gflops = matmul_rate(grad_t["matmul"])
    log(f"  fp32 matmul in the same rounds: {case_gflops:.1f} GFLOP/s")
    for side in grad_sides:
        log(f"  {side:6s} gradients: {grad_t[side]:8.3f} s  (first pass {grad_warm[side]:.2f} s)")
    ours_all, traker_all = torch.cat(grads["ours"]), torch.cat(grads["traker"])
    maxdiff = float((traker_all - ours_all).abs().max() / ours_all.abs().max())
    if "dattri" in grads:
        dattri_all = torch.cat(grads["dattri"])
        maxdiff = max(maxdiff, float((dattri_all - ours_all).abs().max() / ours_all.abs().max()))
        del dattri_all
    del ours_all, traker_all

    proj_fns = {
        ("ours", name): partial(project_all, proj, grads["ours"], False)
        for name, proj in ours_proj.items()
    }
    for name, proj in traker_proj.items():
        proj_fns[("traker", name)] = partial(project_all, proj, grads["traker"], True)
    if "dattri" in grads:
        proj_fns[("dattri", "dense")] = partial(dattri_project_all, case.k, grads["dattri"])
    _, proj_t, _ = timed(proj_fns, reps)
    for (side, name), sec in proj_t.items():
        log(f"  {side:6s} {name:18s} projection: {sec:8.3f} s")
    del grads
    gc.collect()
    results = {
        name: {
            "ours_grad": grad_t["ours"],
            "ours_proj": proj_t[("ours", name)],
            "traker_grad": grad_t["traker"],
            "traker_proj": proj_t[("traker", "identity" if name == "identity" else "dense")],
            "dattri_grad": grad_t.get("dattri", float("nan")),
            "dattri_proj": 0.0 if name == "identity"
            else proj_t.get(("dattri", "dense"), float("nan")),
        }
        for name in ours_proj
    }  # fmt: skip
    logra_name = f"logra r={LOGRA_RANK} (k={logra_gc.dim:,})"
    results[logra_name] = {
        **results[f"rademacher k={case.k}"],
        "ours_grad": grad_t["ours-logra"],
        "ours_proj": 0.0,  # projected per layer inside the gradient pass
    }
    flops = gradient_flops(model, shape)
    warmups = {**grad_warm, "maxdiff": maxdiff}
    srows, profile_note = strategy_rows(case, model, images, ids, schedule, spec, reps, log)

    rows = []
    for name, r in results.items():
        ours_rate = work / (r["ours_grad"] + r["ours_proj"])
        traker_rate = work / (r["traker_grad"] + r["traker_proj"])
        dattri_rate = work / (r["dattri_grad"] + r["dattri_proj"])
        best_peer = max(traker_rate, dattri_rate if dattri_rate == dattri_rate else 0.0)
        traker_name = "none" if name == "identity" else f"rademacher k={case.k}"
        grad_s = r["ours_grad"]
        rows.append(
            {
                "preset": f"{case.preset} ({case.size}x{case.size}x{case.channels})",
                "params": p,
                "work": f"{case.samples}x{K}",
                "ours_projection": name,
                "traker_projection": traker_name,
                **r,
                "ours_rate": ours_rate,
                "traker_rate": traker_rate,
                "dattri_rate": dattri_rate,
                "ratio": ours_rate / best_peer,
                "flops": flops,
                "gflops": case_gflops,
                "grad_rate": work / grad_s,
            }
        )
    note = (
        f"{case.preset}: first (warm-up) gradient pass {warmups['ours']:.2f} s ours, "
        f"{warmups['traker']:.2f} s traker; unprojected gradients of the two sides differ by "
        f"max|Δ|/max|g| = {warmups['maxdiff']:.1e}; featurize batch {case.batch} samples, "
        f"diffattr's gradients written into an (N, p) output allocated before timing "
        f"(GradientComputer.compute(out=…); featurize reuses one buffer the same way), the "
        f"peers' allocated per call; "
        f"peers' gradient calls {case.micro_batch} pairs, diffattr's chosen by the library "
        f"({pass_pairs(ours_gc, case)}), traker BasicProjector block_size {block}; "
        f"diffattr gradient strategy {ours_gc.strategy!r}; one gradient = {flops / 1e9:.3f} GFLOP"
        + ("" if dattri_grad_fn is not None else "; dattri not installed, its columns are nan")
        + "."
    )
    return rows, srows, [note, profile_note]


STRATEGIES = ("layers", "vmap", "backward")


def pass_pairs(gc: GradientComputer, case: Case) -> str:
    """The pairs per gradient pass diffattr used: ``layers`` passes are whole samples."""
    if gc.strategy != "layers":
        return f"{gc.micro_batch} pairs per pass"
    limit = gc.layer_pass_pairs or gc.micro_batch
    per_pass = min(case.batch, max(1, limit // case.timesteps)) * case.timesteps
    return f"{per_pass} pairs per pass, at most {limit}"


def strategy_rows(
    case: Case, model, images, ids, schedule, spec, reps: int, log: Callable[[str], None]
) -> tuple[list[dict], str]:
    """diffattr's gradient strategies side by side on the same work, for unnormalised averages
    (the peers' quantity) and per-timestep normalised ones (diffattr's default features), plus
    a profile of the default strategy on normalised features: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    computers = {
        (normalize, strategy): GradientComputer(
            model,
            parse_measure("loss"),
            schedule,
            spec,
            noise_seed=NOISE_SEED,
            normalize=normalize,
            strategy=strategy,
        )  # fmt: skip
        for normalize in (False, True)
        for strategy in STRATEGIES
    }
    for normalize in (False, True):
        computers[(normalize, "logra")] = GradientComputer(
            model, parse_measure("loss"), schedule, spec, noise_seed=NOISE_SEED,
            normalize=normalize, layer_projection=LayerProjection(LOGRA_RANK),
        )  # fmt: skip

    def run(gc: GradientComputer) -> torch.Tensor:
        return torch.cat([gc.compute(images[sl], ids[sl])[0]
                          for sl in batches(case.samples, case.batch)])  # fmt: skip

    fns = {key: partial(run, gc) for key, gc in computers.items()}
    matmul_run, matmul_rate = matmul_side()
    _, sec, out = timed({**fns, "matmul": matmul_run}, reps)
    gflops = matmul_rate(sec.pop("matmul"))
    out.pop("matmul")
    rows = []
    for (normalize, strategy), t in sec.items():
        ref = out[(normalize, "vmap")]
        got = out[(normalize, strategy)]
        diff = float((got - ref).abs().max() / ref.abs().max()) if got.shape == ref.shape else None
        rows.append(
            {"preset": case.preset, "normalize": normalize, "strategy": strategy, "sec": t,
             "vs_vmap": t / sec[(normalize, "vmap")], "maxdiff": diff,
             "rate": case.samples * case.timesteps / t, "gflops": gflops}
        )  # fmt: skip
        log(f"  strategy {strategy:8s} normalise={normalize!s:5s}: {t:8.3f} s")
    del out
    default = GradientComputer(
        model, parse_measure("loss"), schedule, spec, noise_seed=NOISE_SEED, normalize=True,
    )  # fmt: skip
    sl = batches(case.samples, case.batch)[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        default.compute(images[sl], ids[sl])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:8])
    note = (
        f"{case.preset}: profile of one featurize batch ({sl.stop - sl.start} samples) with the "
        f"default (auto → {default.strategy!r}) strategy on normalised features, self CPU time "
        f"by operator: {top}."
    )
    return rows, note


class PairMeasure(AbstractModelOutput):
    """traker model output: a diffattr measure of one (sample, timestep) pair's prediction."""

    def __init__(self, measure) -> None:
        super().__init__()
        self.measure = measure

    def get_output(self, model, weights, buffers, xt, t, target, ab):
        out = torch.func.functional_call(model, (weights, buffers), (xt[None], t[None])).sample
        return self.measure(out[0], target, ab)

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.ones(batch[0].shape[0], 1)


def peer_pair_features(kind: str, model, measure, gc: GradientComputer, images, ids) -> tuple:
    """A peer's per-pair gradients of ``measure`` on the pairs of ``gc`` (calls of
    ``gc.micro_batch`` pairs), normalised per pair and averaged per sample (diffattr's default
    features, computed outside the peer). Returns (features (n, p), seconds)."""
    use_classic_attention(model)  # SDPA has no vmap rule on CPU
    if kind == "traker":
        tgc = FunctionalGradientComputer(model, PairMeasure(measure), gc.dim, torch.float32, "cpu")
        flatten = NoOpProjector(device="cpu")

        def grads(batch):
            return flatten.project(tgc.compute_per_sample_grad(batch), model_id=0)

    else:

        def loss(params, data):
            xt, t, target, ab = data
            out = torch.func.functional_call(model, params, (xt[None], t[None])).sample
            return measure(out[0], target, ab)

        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        params = task.get_param(ckpt_idx=0)[0]
        fn = task.get_grad_loss_func(in_dims=(None, 0))

        def grads(batch):
            return fn(params, batch).detach()

    _, xt, t, target, ab = next(gc.pairs(images[:1], ids[:1]))
    grads((xt, t, target, ab))  # warm-up
    start = time.perf_counter()
    out = torch.zeros(len(ids), gc.dim)
    for rows, xt, t, target, ab in gc.pairs(images, ids):
        g = grads((xt, t, target, ab))
        out.index_add_(0, rows, g / g.norm(dim=1, keepdim=True))
    out /= gc.timesteps.num
    return out, time.perf_counter() - start


def run_digits8(
    quick: bool, base_src: str | None, peer_samples: int, log: Callable[[str], None]
) -> tuple[list[dict], list[str]]:
    """The digits8 LDS benchmark's features at K = 100 through ``featurize``, today's code
    (``base_src``) on the same call, and the peers on a subset, scaled to N."""
    import tempfile

    from store_agreement import compare, featurize_digits, featurize_elsewhere

    from diffattr.data import load_builtin

    n, K = (64, 20) if quick else (900, 100)
    settings = {"measure": "das", "timesteps": K}
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        ours = featurize_digits(Path(tmp) / "ours", settings, n)
        log(f"[digits8] featurize N={n} K={K}: {ours:.1f} s")
        base = agreement = None
        if base_src:
            base = featurize_elsewhere(base_src, Path(tmp) / "base", settings, n)
            agreement = compare(Path(tmp) / "ours", Path(tmp) / "base")
            log(f"[digits8] the same with {base_src}: {base:.1f} s; {agreement}")
        from diffattr.attribution.features.store import FeatureStore

        ours_rows = torch.from_numpy(np.array(FeatureStore.load(Path(tmp) / "ours").features))
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1).eval()  # the model featurize_digits builds
    data = load_builtin("digits")
    m = min(peer_samples, n)
    images, ids = data.images[:m], np.asarray(data.ids[:m], dtype=np.int64)
    measure = parse_measure("das", (1, 8, 8))
    gc = GradientComputer(model, measure, NoiseSchedule(), TimestepSpec(K), noise_seed=NOISE_SEED,
                          micro_batch=64)  # fmt: skip
    peers = {}
    for kind in ("traker", "dattri") if AttributionTask is not None else ("traker",):
        feats, sec = peer_pair_features(kind, model, measure, gc, images, ids)
        diff = float(((feats - ours_rows[:m]).norm(dim=1) / ours_rows[:m].norm(dim=1)).max())
        peers[kind] = (sec * n / m, diff)
        log(f"[digits8] {kind} on {m} samples: {sec:.1f} s (row rel. difference {diff:.1e})")
    best = min(t for t, _ in peers.values())
    row = {
        "case": f"digits8 K={K}", "work": f"{n}x{K}", "what": "DAS, normalised, exact; "
        "featurize end to end", "ours": ours, "base": base,
        "traker": peers["traker"][0], "dattri": peers.get("dattri", (float("nan"),))[0],
        "rate": n * K / ours, "vs_peer": best / ours,
    }  # fmt: skip
    notes.append(
        f"digits8 K={K}: N = {n} digits × K = {K}, featurize batch 32, one timed run each. "
        + (f"Today's code ({base_src}, same call in a subprocess): {base:.1f} s, "
           f"{base / ours:.2f}× this run's time; the two stores agree to max row "
           f"‖Δφ‖/‖φ‖ = {agreement['features']:.1e} (error column {agreement['error']:.1e}). "
           if base is not None else "")
        + "Peers timed on the first "
        + f"{m} samples ({m * K} pairs, calls of 64 pairs) and scaled ×{n / m:.1f} (linear in "
        + "the samples); their features agree with diffattr's to max row ‖Δφ‖/‖φ‖ = "
        + ", ".join(f"{k} {v[1]:.1e}" for k, v in peers.items()) + "."
    )  # fmt: skip
    return [row], notes


class CondTimestepAveragedLoss(AbstractModelOutput):
    """traker model output for a conditioned UNet: mean over K timesteps of the loss."""

    def __init__(self, alphas: torch.Tensor) -> None:
        super().__init__()
        self.alphas = alphas

    def get_output(self, model, weights, buffers, x0, t, noise, cond):
        a = self.alphas[t].view(-1, *([1] * (x0.dim() - 1)))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        c = cond[None].expand(x0.shape[0], *cond.shape)
        out = torch.func.functional_call(model, (weights, buffers), (xt, t, c)).sample
        return (out - noise).pow(2).mean(dim=(1, 2, 3)).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.ones(batch[0].shape[0], 1)


def run_t2i(quick: bool, reps: int, log: Callable[[str], None]) -> tuple[list[dict], list[str]]:
    """LoRA per-sample gradients of the tiny text-to-image UNet: diffattr vs the peers."""
    from diffusers import UNet2DConditionModel

    from diffattr.text2image.lora import LORA_PARAMS, LoraSpec, attach_lora
    from diffattr.text2image.pipeline import SD_SCHEDULE, TINY_MAX_TOKENS, TINY_UNET

    n, K, per_call = (16, 2, 32) if quick else (64, 10, 64)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, **TINY_UNET).eval()
    attach_lora(unet, LoraSpec(), seed=0)
    with torch.no_grad():  # B starts at 0 (zero gradients for A): as after fine-tuning
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    names = select_parameters(unet, LORA_PARAMS)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn((n, 4, 8, 8), generator=g)
    cond = torch.randn((n, TINY_MAX_TOKENS, TINY_UNET["cross_attention_dim"]), generator=g)
    ids = np.arange(n, dtype=np.int64)
    schedule, spec = SD_SCHEDULE, TimestepSpec(K, "uniform", NOISE_SEED)
    batch = 32
    sides: dict[str, Callable] = {}
    computers = {}
    for key, normalize in (("ours", False), ("ours-normalised", True)):
        gc = GradientComputer(unet, parse_measure("loss"), schedule, spec, noise_seed=NOISE_SEED,
                              normalize=normalize, param_names=names)  # fmt: skip
        computers[key] = gc
        sides[key] = partial(
            lambda gc: torch.cat([gc.compute(latents[sl], ids[sl], cond[sl])[0]
                                  for sl in batches(n, batch)]), gc)  # fmt: skip
    p = computers["ours"].dim
    alphas = schedule.alphas_cumprod()
    T = schedule.num_train_timesteps

    def inputs(sl: slice):
        ts = np.stack([spec.for_sample(int(i), T) for i in ids[sl]])
        noise = torch.stack([
            torch.stack([keyed_noise(ATTRIBUTION_NOISE_KEY, NOISE_SEED, int(i), int(t), (4, 8, 8))
                         for t in tr]) for i, tr in zip(ids[sl], ts, strict=True)
        ])  # fmt: skip
        x0 = latents[sl].unsqueeze(1).expand(-1, K, 4, 8, 8).contiguous()
        return x0, torch.as_tensor(ts), noise, cond[sl]

    samples_per_call = max(1, per_call // K)
    tgc = FunctionalGradientComputer(unet, CondTimestepAveragedLoss(alphas), p, torch.float32,
                                     "cpu", grad_wrt=names)  # fmt: skip
    flatten = NoOpProjector(device="cpu")

    def traker_side():
        use_classic_attention(unet)
        return torch.cat([flatten.project(tgc.compute_per_sample_grad(inputs(sl)), model_id=0)
                          for sl in batches(n, samples_per_call)])  # fmt: skip

    sides["traker"] = traker_side
    if AttributionTask is not None:

        def loss(params, data):
            x0, t, noise, c = data
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            cc = c[None].expand(x0.shape[0], *c.shape)
            out = torch.func.functional_call(unet, params, (xt, t, cc)).sample
            return (out - noise).pow(2).mean(dim=(1, 2, 3)).mean()

        task = AttributionTask(loss_func=loss, model=unet, checkpoints=unet.state_dict())
        dparams = task.get_param(ckpt_idx=0)[0]
        dfn = task.get_grad_loss_func(in_dims=(None, 0))

        def dattri_side():
            use_classic_attention(unet)
            return torch.cat([dfn(dparams, inputs(sl)).detach()
                              for sl in batches(n, samples_per_call)])  # fmt: skip

        sides["dattri"] = dattri_side
    warm, sec, out = timed(sides, reps)
    for key, t in sec.items():
        log(f"[t2i-lora] {key:16s} {t:8.3f} s (first pass {warm[key]:.2f} s)")
    ref = out["ours"]
    diffs = {k: float((out[k] - ref).abs().max() / ref.abs().max())
             for k in ("traker", "dattri") if k in out}  # fmt: skip
    best = min(sec[k] for k in ("traker", "dattri") if k in sec)
    rows = [{
        "case": "t2i-lora", "work": f"{n}x{K}", "what": f"loss, {what}; LoRA p = {p:,}",
        "ours": sec[key], "base": None, "traker": sec["traker"],
        "dattri": sec.get("dattri", float("nan")), "rate": n * K / sec[key],
        "vs_peer": best / sec[key],
    } for key, what in (("ours", "unnormalised"), ("ours-normalised", "normalised"))]  # fmt: skip
    note = (
        f"t2i-lora: tiny pipeline UNet ({sum(x.numel() for x in unet.parameters()):,} parameters,"
        f" LoRA rank 4 on to_q/to_k/to_v/to_out.0: p = {p:,}), {n} samples × K = {K}, caption "
        f"embeddings {TINY_MAX_TOKENS}×{TINY_UNET['cross_attention_dim']}, featurize batch "
        f"{batch}; diffattr strategy {computers['ours'].strategy!r}; peers vmap over samples "
        f"({samples_per_call} per call); peers' unnormalised gradients differ from diffattr's by "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        + " (max|Δ|/max|g|); the normalised row is diffattr's default feature, compared with "
        "the peers' unnormalised work."
    )
    return rows, [note]


def work_table(rows: list[dict]) -> str:
    lines = [
        "| case | samples×t | features | diffattr s | before this change s | traker s | dattri s "
        "| diffattr grads/s | diffattr ÷ faster peer's time⁻¹ |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        base = "" if r["base"] is None else f"{r['base']:.1f}"
        lines.append(
            f"| {r['case']} | {r['work']} | {r['what']} | {r['ours']:.2f} | {base} "
            f"| {r['traker']:.2f} | {r['dattri']:.2f} | {r['rate']:.1f} | {r['vs_peer']:.2f}× |"
        )
    return "\n".join(lines)


def strategy_table(rows: list[dict], flops: dict[str, int]) -> str:
    lines = [
        "| preset | features | strategy | gradient s | time ÷ vmap's | per-sample grads/s "
        "| gradient FLOP/s ÷ matmul FLOP/s | max|Δ|/max|g| vs vmap |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        frac = r["rate"] * flops[r["preset"]] / (r["gflops"] * 1e9)
        lines.append(
            f"| {r['preset']} | {'normalised' if r['normalize'] else 'unnormalised'} "
            f"| {r['strategy']} | {r['sec']:.3f} | {r['vs_vmap']:.2f} | {r['rate']:.2f} "
            f"| {100 * frac:.0f}% "
            f"| {'(projected)' if r['maxdiff'] is None else format(r['maxdiff'], '.1e')} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (
        "| preset | params | samples×t | diffattr projection | peers' projection "
        "| diffattr grad s | diffattr proj s | traker grad s | traker proj s "
        "| dattri grad s | dattri proj s "
        "| diffattr grads/s | traker grads/s | dattri grads/s | diffattr / faster peer "
        "| diffattr gradient FLOP/s ÷ matmul FLOP/s |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        frac = r["grad_rate"] * r["flops"] / (r["gflops"] * 1e9)
        lines.append(
            f"| {r['preset']} | {r['params']:,} | {r['work']} | {r['ours_projection']} "
            f"| {r['traker_projection']} | {r['ours_grad']:.3f} | {r['ours_proj']:.3f} "
            f"| {r['traker_grad']:.3f} | {r['traker_proj']:.3f} "
            f"| {r['dattri_grad']:.3f} | {r['dattri_proj']:.3f} | {r['ours_rate']:.2f} "
            f"| {r['traker_rate']:.2f} | {r['dattri_rate']:.2f} | {r['ratio']:.2f}× "
            f"| {100 * frac:.0f}% |"
        )
    return "\n".join(lines)


def matmul_rates(rows: list[dict], srows: list[dict]) -> dict[str, float]:
    """{table: its matmul GFLOP/s} (one per preset's gradient and strategy rounds)."""
    out = {}
    for r in rows:
        out[f"{r['preset'].split()[0]} gradients"] = r["gflops"]
    for r in srows:
        out[f"{r['preset']} strategies"] = r["gflops"]
    return out


def dattri_version() -> str:
    try:
        return version("dattri")
    except Exception:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 3 minutes)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per phase")
    parser.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated subset of {','.join(ALL_CASES)} (default: all)",
    )
    parser.add_argument(
        "--base-src",
        default=None,
        help="src directory of another checkout (the code before a change): "
        "digits8-K100 also runs it, in a subprocess, and compares the stores",
    )
    parser.add_argument(
        "--peer-samples",
        type=int,
        default=8,
        help="digits8-K100: samples the peers are timed on (scaled to N)",
    )
    args = parser.parse_args(argv)
    chosen = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(chosen) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}")

    torch.set_num_threads(THREADS)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    print(f"command: {command}", flush=True)
    mode = "quick" if args.quick else "full"
    reps = args.reps or (2 if args.quick else 3)
    cases = [c for c in CASES[mode] if c.preset in chosen]

    start = time.perf_counter()
    gflops = matmul_gflops()
    print(f"fp32 matmul 2048x2048: {gflops:.1f} GFLOP/s ({THREADS} threads)", flush=True)
    rows, srows, notes, wrows = [], [], [], []
    log = partial(print, flush=True)
    for case in cases:
        case_rows, case_srows, case_notes = run_case(case, reps, log)
        rows += case_rows
        srows += case_srows
        notes += case_notes
    if "digits8-K100" in chosen:
        case_rows, case_notes = run_digits8(args.quick, args.base_src, args.peer_samples, log)
        wrows += case_rows
        notes += case_notes
    if "t2i-lora" in chosen:
        case_rows, case_notes = run_t2i(args.quick, reps, log)
        wrows += case_rows
        notes += case_notes
    flops = {r["preset"].split()[0]: r["flops"] for r in rows}
    elapsed = time.perf_counter() - start
    gflops_end = matmul_gflops()
    print(f"fp32 matmul 2048x2048 at the end: {gflops_end:.1f} GFLOP/s", flush=True)

    report = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch.set_num_threads({THREADS}); fp32 matmul 2048×2048: {gflops:.1f} GFLOP/s "
            f"before the run, {gflops_end:.1f} GFLOP/s after it (a lower figure means other "
            f"load); each table's fractions divide by the rate of {ROUND_MATMULS} such matmuls "
            f"timed in the same interleaved rounds as its gradients: "
            + ", ".join(f"{k} {v:.1f}" for k, v in matmul_rates(rows, srows).items())
            + " GFLOP/s. "
            f"torch {torch.__version__}, traker {version('traker')}, dattri {dattri_version()}. "
            f"Mode {mode}, cases {','.join(chosen)}; median of {reps} timed repetitions after "
            f"one warm-up (digits8: one run each); total wall time {elapsed:.0f} s.",
            "",
            *(
                [
                    table(rows),
                    "",
                    "diffattr's gradient strategies on the same work (unnormalised: the peers' "
                    "quantity; normalised per timestep: diffattr's default features), timed in the "
                    "same rounds:",
                    "",
                    strategy_table(srows, flops),
                    "",
                ]
                if rows
                else []
            ),
            *(
                [
                    "Further work, each case timed end to end on its own (seconds for the whole "
                    "work; peers' digits8 times scaled from a subset, see the notes):",
                    "",
                    work_table(wrows),
                    "",
                ]
                if wrows
                else []
            ),
            *[f"- {n}" for n in notes],
            "",
        ]
    )
    print()
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
