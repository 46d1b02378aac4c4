"""Linear datamodeling score (LDS): ground truth from retrained subset models, and evaluation.

Build (``diffattr lds build``): draw M subsets Sⱼ (fraction α) of the run's training set; for
each subset and each seed retrain with the run's training config (common random numbers: same
initial weights per seed, per-sample noise streams); measure on every target x

    F(x; θ_Sⱼ) = (1/|𝒯|) Σ_{t∈𝒯} ‖ε_θ(√ᾱ_t x + √(1−ᾱ_t) ε_{x,t}, t) − ε_{x,t}‖² / d

with 𝒯 every (T/K_F)-th timestep and ε_{x,t} keyed by (MEASUREMENT_KEY, seed, x) — the same in
every subset model and independent of the attribution noise. F is averaged over seeds.

Evaluate (``diffattr lds eval``): LDS(x) = Spearman over subsets of Σ_{i∈Sⱼ} τ(x, zᵢ) and
−F(x; θ_Sⱼ) (positive τ = helps produce x = lowers its loss). λ of kernel methods is cross-fitted:
chosen on one half of the targets, reported on the other, and swapped; the oracle λ (best on
the reported targets, as in the literature) is a separate column, and so is the LDS of the
method's default λ rule (what ``diffattr score`` gives a user, chosen without ground truth).
A λ chosen at either end of the grid is flagged: the optimum may lie outside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.data import sample_subsets
from diffattr.diffusion.presets import load_unet
from diffattr.diffusion.sampling import sample
from diffattr.diffusion.schedule import MEASUREMENT_KEY, NoiseSchedule
from diffattr.diffusion.training import TrainConfig, train
from diffattr.errors import DiffattrError
from diffattr.evaluation.stats import (
    bootstrap_lds_ci,
    bootstrap_mean_ci,
    finite_mean,
    spearman_columns,
)
from diffattr.fsio import atomic_write, atomic_write_json, read_json
from diffattr.parallel import Executor
from diffattr.run import TEXT2IMAGE, DataSpec, RunDir
from diffattr.seeding import generator

VAL, GEN = 0, 1
KIND_NAMES = {VAL: "val", GEN: "gen"}
#: Relative λ grid of the cross-fit: half-decade steps from 1e-7 to 10 (the best λ of the
#: committed benchmarks lies between 1e-5 and 0.1 relative; a choice at an end is flagged).
DEFAULT_LAMBDAS = (
    1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0
)  # fmt: skip


@dataclass
class LDSConfig:
    """Settings of an LDS benchmark; everything that changes the ground truth is here."""

    num_subsets: int = 24
    fraction: float = 0.5
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    subset_seed: int = 0
    measure_timesteps: int = 100
    measure_seed: int = 0
    num_val: int = 200
    num_gen: int = 200
    gen_seed: int = 100_000
    common_random_numbers: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_key(kind: int, ident: int) -> int:
    """Stream key of a target: kind (val/gen) and its id."""
    return kind * 10**9 + int(ident)


@torch.no_grad()
def measure_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    keys: np.ndarray,
    num_timesteps: int,
    seed: int,
    schedule: NoiseSchedule,
    batch_size: int = 512,
    conditioning: torch.Tensor | None = None,
) -> np.ndarray:
    """Per-timestep losses (targets, K): ‖ε_θ(x_t, t) − ε‖²/d at every (T/K)-th t.

    Noise is keyed by (MEASUREMENT_KEY, seed, target key, t). F(x) is the row mean; any K' that
    divides K gives F over K' timesteps from every (K/K')-th column. ``conditioning``: each
    target's third model input (caption embeddings of a text-to-image UNet).
    """
    ts = measure_timestep_grid(num_timesteps, schedule)
    ab = schedule.alphas_cumprod()
    model.eval()
    dev = next(model.parameters()).device  # noise is drawn on CPU, the model runs where it is
    shape = tuple(images.shape[1:])
    pairs = [(i, k, int(t)) for i in range(len(keys)) for k, t in enumerate(ts)]
    out = np.zeros((len(keys), len(ts)), dtype=np.float64)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        rows = torch.tensor([p[0] for p in chunk])
        cols = np.array([p[1] for p in chunk])
        t = torch.tensor([p[2] for p in chunk])
        eps = torch.stack(
            [
                torch.randn(shape, generator=generator(MEASUREMENT_KEY, seed, int(keys[i]), tt))
                for i, _, tt in chunk
            ]
        )
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * images[rows] + (1 - a).sqrt() * eps
        cond = () if conditioning is None else (conditioning[rows].to(dev),)
        pred = model(xt.to(dev), t.to(dev), *cond).sample
        err = (pred - eps.to(dev)).pow(2).flatten(1).mean(1).double().cpu()
        out[rows.numpy(), cols] = err.numpy()
    return out


def measure_timestep_grid(num_timesteps: int, schedule: NoiseSchedule) -> np.ndarray:
    """Every (T/K)-th timestep: 0, T/K, 2T/K, …"""
    T = schedule.num_train_timesteps
    return np.arange(0, T, max(1, T // num_timesteps))[:num_timesteps]


@dataclass
class SubsetJob:
    """One retraining: subset j with seed s; picklable for worker processes."""

    data: dict[str, Any]
    train: dict[str, Any]
    subset: np.ndarray
    out_dir: str
    targets_path: str
    measure_timesteps: int
    measure_seed: int
    device: str = "cpu"  # where the worker trains and measures (``auto``: cuda if it has one)


def run_subset_job(job: SubsetJob) -> str:
    """Train the subset model (resuming), measure F on the targets, write ``F.npy``."""
    from diffattr.attribution.gradients import resolve_device

    out = Path(job.out_dir)
    f_path = out / "F.npy"
    if f_path.is_file():
        return str(f_path)
    device = resolve_device(job.device)
    train_set, _ = DataSpec(**job.data).load()
    config = replace(TrainConfig.from_dict(job.train), keep_checkpoints=False)
    model_dir = train(train_set, config, out, subset=job.subset, progress=False, device=device)
    targets = np.load(job.targets_path)
    values = measure_loss(
        load_unet(model_dir).to(device),
        torch.from_numpy(targets["images"]),
        targets["keys"],
        job.measure_timesteps,
        job.measure_seed,
        config.schedule,
    )
    atomic_write(f_path, lambda f: np.save(f, values))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return str(f_path)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def build(
    run: RunDir,
    bench_dir: str | Path,
    config: LDSConfig,
    executor: Executor,
    progress: bool = True,
    device: str = "cpu",
) -> Path:
    """Build (or resume) the LDS ground truth for ``run`` into ``bench_dir``.

    ``device``: where each worker trains and measures its subset models (``auto``: a GPU when
    the worker has one; CUDA training is not bit-reproducible run to run).

    Text-to-image runs retrain by LoRA fine-tuning and measure F in latent space under each
    target's caption (:mod:`diffattr.text2image.evaluation`).
    """
    text2image = run.family == TEXT2IMAGE
    if text2image:
        from diffattr.text2image import evaluation as t2i
    bench = Path(bench_dir)
    bench.mkdir(parents=True, exist_ok=True)
    spec, train_config = run.data_spec(), run.train_config()
    train_set, val_set = spec.load()
    manifest = {
        "config": config.to_dict(),
        "data": asdict(spec),
        "train": train_config.to_dict(),
        "dataset_fingerprint": train_set.fingerprint(),
        "run": str(run.path),
    }
    if text2image:
        manifest.update(family=TEXT2IMAGE, **t2i.job_data(run))
    if (bench / "lds.json").is_file():
        have = read_json(bench / "lds.json")
        for key in ("config", "data", "train", "dataset_fingerprint"):
            if have.get(key) != manifest[key]:
                raise DiffattrError(
                    f"{bench} holds an LDS benchmark with other {key} settings",
                    hint="use another --out directory, or the original settings",
                )
    else:
        atomic_write_json(bench / "lds.json", manifest)

    subsets = sample_subsets(
        len(train_set), config.num_subsets, config.fraction, config.subset_seed
    )
    if not (bench / "subsets.npy").is_file():
        atomic_write(bench / "subsets.npy", lambda f: np.save(f, subsets))
    targets_path = bench / "targets.npz"
    if not targets_path.is_file():
        write = t2i.write_lds_targets if text2image else write_targets
        write(run, val_set, config, targets_path, progress)

    data = t2i.job_data(run) if text2image else asdict(spec)
    jobs = [
        SubsetJob(
            data,
            replace(
                train_config,
                seed=s,
                stream_salt=0 if config.common_random_numbers else 1 + j,
            ).to_dict(),
            subsets[j],
            str(bench / "models" / f"seed{s}-subset{j:03d}"),
            str(targets_path),
            config.measure_timesteps,
            config.measure_seed,
            device,
        )
        for s in config.seeds
        for j in range(config.num_subsets)
    ]
    job_fn = t2i.run_subset_job if text2image else run_subset_job
    list(executor.map(job_fn, jobs, desc="lds: retrain subsets"))
    F_t = np.stack(
        [
            np.stack([np.load(Path(j.out_dir) / "F.npy") for j in jobs if _seed_of(j) == s])
            for s in config.seeds
        ]
    ).astype(np.float32)  # (seeds, M, T, K_F)
    atomic_write(bench / "ground_truth.npz", lambda f: f.write(_npz_bytes(F_t=F_t)))
    return bench


def _seed_of(job: SubsetJob) -> int:
    return int(job.train["seed"])


def write_targets(
    run: RunDir, val_set, config: LDSConfig, path: Path, progress: bool = True
) -> None:
    """Held-out real images (val) and images generated by the run's model with recorded seeds."""
    model = load_unet(run.model_dir)
    n_val = min(config.num_val, len(val_set))
    seeds = np.arange(config.gen_seed, config.gen_seed + config.num_gen)
    gen = sample(model, seeds, run.train_config().schedule, progress=progress)
    images = torch.cat([val_set.images[:n_val], gen.images]).numpy().astype(np.float32)
    kinds = np.concatenate([np.full(n_val, VAL), np.full(config.num_gen, GEN)])
    ids = np.concatenate([val_set.ids[:n_val].numpy(), np.arange(config.num_gen)])
    keys = np.array([target_key(k, i) for k, i in zip(kinds, ids, strict=True)], dtype=np.int64)
    atomic_write(
        path,
        lambda f: f.write(
            _npz_bytes(
                images=images,
                kinds=kinds,
                ids=ids,
                keys=keys,
                seeds=np.concatenate([np.full(n_val, -1), seeds]),
            )
        ),
    )


# ---------------------------------------------------------------------------- evaluation


@dataclass
class GroundTruth:
    subsets: np.ndarray  # (M, n) positions into the training set
    F: np.ndarray  # (seeds, M, T): the model output F per seed, subset and target
    kinds: np.ndarray  # (T,)
    images: torch.Tensor  # (T, C, H, W)
    keys: np.ndarray
    seeds: np.ndarray | None = None  # generation seed per target, < 0 for real images
    conditioning: torch.Tensor | None = None  # caption embeddings (text-to-image targets)

    @classmethod
    def load(
        cls, bench_dir: str | Path, measure_timesteps: int | None = None, seeds=None
    ) -> GroundTruth:
        """Load; optionally F over fewer timesteps (a divisor of the built K_F) or seeds."""
        bench = Path(bench_dir)
        if not (bench / "ground_truth.npz").is_file():
            raise DiffattrError(
                f"no LDS ground truth in {bench}", hint="run `diffattr lds build` first"
            )
        t = np.load(bench / "targets.npz")
        F_t = np.load(bench / "ground_truth.npz")["F_t"].astype(np.float64)
        if seeds is not None:
            F_t = F_t[list(seeds)]
        if measure_timesteps is not None:
            built = F_t.shape[-1]
            if built % measure_timesteps:
                raise DiffattrError(
                    f"F was measured at {built} timesteps; {measure_timesteps} does not divide it"
                )
            F_t = F_t[..., :: built // measure_timesteps]
        return cls(
            np.load(bench / "subsets.npy"),
            F_t.mean(axis=-1),
            t["kinds"],
            torch.from_numpy(t["images"]),
            t["keys"],
            t["seeds"] if "seeds" in t.files else None,
            torch.from_numpy(t["conditioning"]) if "conditioning" in t.files else None,
        )

    def predicted(self, scores: np.ndarray) -> np.ndarray:
        """(M, T): Σ_{i∈Sⱼ} τ(x, zᵢ) for scores (T, N) over training positions."""
        membership = np.zeros((self.subsets.shape[0], scores.shape[1]))
        np.put_along_axis(membership, self.subsets, 1.0, axis=1)
        return membership @ scores.T

    def measured(self, seeds: list[int] | None = None) -> np.ndarray:
        """(M, T): −F averaged over the chosen seed indices (higher = model fits x better)."""
        F = self.F if seeds is None else self.F[seeds]
        return -F.mean(axis=0)


def lds_per_target(gt: GroundTruth, scores: np.ndarray) -> np.ndarray:
    """LDS(x) for every target: Spearman over subsets of predicted vs measured."""
    return spearman_columns(gt.predicted(scores), gt.measured())


def noise_ceiling(gt: GroundTruth) -> np.ndarray:
    """Per target, the Spearman correlation over subsets of F under one seed vs another."""
    if gt.F.shape[0] < 2:
        return np.full(gt.F.shape[2], np.nan)
    vals = [
        spearman_columns(gt.F[a], gt.F[b])
        for a in range(gt.F.shape[0])
        for b in range(a + 1, gt.F.shape[0])
    ]
    return np.mean(vals, axis=0)


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


def fingerprint_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=float)


# ---------------------------------------------------------------------------- kernels


@dataclass
class KernelCache:
    """Dual-form kernel pieces of one feature setting: ΦΦᵀ, φ(x)ᵀΦᵀ, norms and residuals.

    Small (N×N + T×N), so LDS over many λ and methods runs in seconds and can be committed.
    """

    gram: np.ndarray
    inner: np.ndarray
    target_sqnorm: np.ndarray
    error: np.ndarray
    residual: np.ndarray
    dim: int
    meta: dict[str, Any]

    def save(self, path: Path) -> None:
        """Write as float32 (half the size; ample for the Cholesky at the λ grid used)."""
        arrays = {
            k: np.asarray(getattr(self, k), dtype=np.float32)
            for k in ("gram", "inner", "target_sqnorm", "error")
        }
        arrays["residual"] = self.residual
        arrays["dim"] = np.array(self.dim)
        arrays["meta"] = np.array(json.dumps(self.meta, sort_keys=True))
        atomic_write(path, lambda f: f.write(_npz_bytes(**arrays)))

    @classmethod
    def load(cls, path: Path) -> KernelCache:
        z = np.load(path)
        return cls(
            z["gram"].astype(np.float64),
            z["inner"].astype(np.float64),
            z["target_sqnorm"].astype(np.float64),
            z["error"].astype(np.float64),
            z["residual"].astype(np.float64),
            int(z["dim"]),
            json.loads(str(z["meta"])),
        )

    def scale(self) -> float:
        """Mean non-zero eigenvalue of ΦᵀΦ: trace / min(N, k)."""
        return float(np.trace(self.gram)) / min(self.gram.shape[0], self.dim)


def build_kernel_cache(
    run: RunDir, gt: GroundTruth, settings, progress: bool = True, device: str = "cpu"
) -> KernelCache:
    """Featurize the run's training set and the benchmark targets; reduce to a kernel cache."""
    from diffattr.attribution.attributor import Attributor

    if run.family == TEXT2IMAGE:
        from diffattr.text2image.family import attribution_inputs

        model, train_set, settings = attribution_inputs(run, settings)
    else:
        model, (train_set, _) = load_unet(run.model_dir), run.data_spec().load()
    att = Attributor(
        model,
        train_set,
        run.features_dir,
        method={"das": "das", "dtrak": "dtrak", "loss": "trak"}[settings.measure],
        schedule=run.train_config().schedule,
        settings=settings,
        device=device,
        progress=progress,
    )
    store = att.featurize()
    tstore = att.featurize_targets(gt.images, gt.keys, gt.conditioning)
    phi, tphi = store.features, np.asarray(tstore.features, dtype=np.float64)
    n = phi.shape[0]
    gram = np.zeros((n, n))
    inner = np.zeros((tphi.shape[0], n))
    block = 256
    for i in range(0, n, block):
        fi = np.asarray(phi[i : i + block], dtype=np.float64)
        inner[:, i : i + block] = tphi @ fi.T
        for j in range(i, n, block):
            fj = np.asarray(phi[j : j + block], dtype=np.float64)
            gram[i : i + block, j : j + block] = fi @ fj.T
            gram[j : j + block, i : i + block] = gram[i : i + block, j : j + block].T
    return KernelCache(
        gram,
        inner,
        (tphi**2).sum(axis=1),
        store.column("error").astype(np.float64),
        store.column("residual").astype(np.float64),
        store.dim,
        {
            "features": att.settings.to_dict(),
            "model_fingerprint": store.settings["model_fingerprint"],
            "targets": fingerprint_array(gt.keys),
        },
    )


def kernel_cache(
    run: RunDir | None,
    bench: Path,
    gt: GroundTruth,
    settings,
    progress: bool = True,
    device: str = "cpu",
) -> KernelCache:
    """Load the benchmark's cached kernel for ``settings`` or build it from ``run``."""
    proj = {"identity": "exact", "auto": "auto"}.get(
        settings.projector, f"{settings.projector}-k{settings.proj_dim}"
    )
    name = f"{settings.measure}-K{settings.timesteps}-{proj}-{settings.key()}.npz"
    path = bench / "kernels" / name
    if path.is_file():
        return KernelCache.load(path)
    if run is None:
        raise DiffattrError(
            f"no cached kernel {path.name} in {bench}",
            hint="pass --run RUN so the features can be computed",
        )
    cache = build_kernel_cache(run, gt, settings, progress, device)
    cache.save(path)
    return KernelCache.load(path)  # the same (float32-rounded) numbers as a later reload


def cache_inputs(cache: KernelCache | None, train_images, target_images) -> Any:
    """:class:`ScoreInputs` of a benchmark's images and, if given, its kernel cache (Gram form:
    ΦΦᵀ, φ(x)ᵀΦᵀ, squared norms, error and residual columns)."""
    from diffattr.attribution.methods import ScoreInputs

    inputs = ScoreInputs(
        train_images=train_images,
        target_images=target_images,
        num_train=len(train_images),
        num_targets=len(target_images),
    )
    if cache is not None:
        inputs.train_gram = cache.gram
        inputs.target_inner = cache.inner
        inputs.train_sqnorm = np.diag(cache.gram).copy()
        inputs.target_sqnorm = cache.target_sqnorm
        inputs.train_error = cache.error
        inputs.train_residual = cache.residual
    return inputs


def method_scores(
    method: str, cache: KernelCache | None, ridges: list[Any], train_images, target_images,
    **options: Any,
) -> list[np.ndarray]:  # fmt: skip
    """Scores (T, N) per λ rule in ``ridges`` (a :class:`Ridge`, or None for the method's
    default); one entry for kernel-free methods."""
    from diffattr.attribution.kernel import Kernel
    from diffattr.attribution.methods import get_method

    m = get_method(method, **options)
    inputs = cache_inputs(cache, train_images, target_images)
    if not m.uses_kernel:
        return [m.score(inputs)]
    out = []
    rank = min(cache.gram.shape[0], cache.dim)
    for ridge in ridges:
        lam = m.lambda_rule(ridge).resolve(cache.gram, rank)
        inputs.kernel = Kernel.from_gram(cache.gram, lam)
        out.append(m.score(inputs))
    return out


def lambda_grid(lambdas: list[float]) -> list[Any]:
    """The relative-λ grid as rules, then None: the method's default rule (last entry)."""
    from diffattr.attribution.ridge import Ridge

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
    prediction), one row per screen.
    """
    from diffattr.attribution.featurize import FeatureSettings
    from diffattr.attribution.method_spec import method_label
    from diffattr.attribution.methods import METHODS, get_method

    bench = Path(bench_dir)
    gt = GroundTruth.load(bench, measure_timesteps, seeds)
    manifest = read_json(bench / "lds.json")
    if manifest.get("family") == TEXT2IMAGE:  # targets are latents: so are the train images
        from diffattr.text2image.latents import load_latents

        train_set = load_latents(manifest["latents"])
    else:
        train_set, _ = DataSpec(**manifest["data"]).load()
    lambdas = list(lambdas or DEFAULT_LAMBDAS)
    ctx = _EvalContext(
        run, bench, gt, train_set, base_settings or FeatureSettings(), lambdas, progress, device
    )
    rows: list[dict[str, Any]] = []
    keep = {screen: _screen_mask(ctx, screen) for screen in screens or []}
    ceiling = noise_ceiling(gt)
    for method, options in methods:
        if method not in METHODS:
            get_method(method)  # raises the standard unknown-method error
        m = get_method(method, **options)  # also checks the options
        feature_free = m.measure is None and not m.needs_model
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
        if mask.any():
            rows.append(
                {
                    "method": "noise ceiling",
                    "timesteps": None,
                    name: {"lds": finite_mean(ceiling[mask])},  # NaN with one seed
                }  # fmt: skip
            )
    return rows


@dataclass
class _EvalContext:
    """What scoring a method on a benchmark needs besides the method."""

    run: RunDir | None
    bench: Path
    gt: GroundTruth
    train_set: Any
    base: Any  # FeatureSettings
    lambdas: list[float]
    progress: bool
    device: str


def _scores_at(ctx: _EvalContext, method: str, options: dict[str, Any], K: int | None):
    """Scores (T, N) of a method at K: one per relative λ of the grid then the default rule
    (kernel methods), or a single entry. A combination (``Method.components``) is combined
    from its members' default-λ scores, each computed as it would be alone (and cached so)."""
    from diffattr.attribution.combination import combine_scores
    from diffattr.attribution.methods import get_method

    m = get_method(method, **options)
    members = m.components()
    if members:
        return [combine_scores([_scores_at(ctx, n, o, K)[-1] for n, o in members])]
    if m.needs_model:
        return _model_based_scores(ctx, method, options, K)
    cache = None
    if m.measure is not None:
        settings = replace(ctx.base, measure=m.measure, timesteps=K)
        cache = kernel_cache(ctx.run, ctx.bench, ctx.gt, settings, ctx.progress, ctx.device)
    opts = {"seed": 0, **options} if method == "random" else options
    return method_scores(
        method, cache, lambda_grid(ctx.lambdas), ctx.train_set.images, ctx.gt.images, **opts
    )


def _screen_mask(ctx: _EvalContext, screen: Any) -> np.ndarray:
    """(T, N) True on each target's candidates: scores are kept there, 0 elsewhere."""
    from diffattr.attribution.methods import ScoreInputs
    from diffattr.attribution.screening import candidate_rows, similarity_scores

    if screen.kernel != "all":
        raise DiffattrError(
            f"lds eval applies a screen to the scores of the full kernel (--screen-kernel all), "
            f"not {screen.kernel!r}",
            hint="benchmarks/screening.py measures the union and candidates kernels",
        )
    images = ctx.train_set.images
    inputs = ScoreInputs(
        train_images=images, target_images=ctx.gt.images, num_train=len(images),
        num_targets=len(ctx.gt.images), train_ids=np.asarray(ctx.train_set.ids),
        store_dir=ctx.run.features_dir if ctx.run is not None else None,
    )  # fmt: skip
    cand = candidate_rows(similarity_scores(screen, inputs), screen.count(len(images)))
    keep = np.zeros((len(ctx.gt.images), len(images)), dtype=bool)
    np.put_along_axis(keep, cand, True, axis=1)
    return keep


def _model_based_scores(ctx: _EvalContext, method: str, options: dict[str, Any], K: int):
    """Scores of a method that computes its own features from the model (``needs_model``)."""
    from diffattr.attribution.context import benchmark_scores

    run = ctx.run
    if run is None:
        raise DiffattrError(f"{method} computes features from the model", hint="pass --run RUN")
    if run.family == TEXT2IMAGE:
        from diffattr.text2image.family import check_method

        check_method(method)
    settings = replace(ctx.base, timesteps=K)
    extra: dict[str, Any] = {}
    if method == "journey-trak":
        loss = replace(settings, measure="loss")
        c = kernel_cache(run, ctx.bench, ctx.gt, loss, ctx.progress, ctx.device)
        extra = {"gram": c.gram, "trak_inner": c.inner}
    return benchmark_scores(
        method, options, lambda_grid(ctx.lambdas), model=load_unet(run.model_dir),
        train=ctx.train_set, target_images=ctx.gt.images, target_ids=ctx.gt.keys,
        target_seeds=ctx.gt.seeds, schedule=run.train_config().schedule, settings=settings,
        store_dir=run.features_dir, run_dir=run.path, progress=ctx.progress, device=ctx.device,
        **extra,
    )  # fmt: skip


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
