"""LDS ground truth: subset models retrained from the run, and the model output F they give.

Build (``diffattr lds build``): draw M subsets Sⱼ (fraction α) of the run's training set; for
each subset and each seed retrain with the run's training config through its model family
(common random numbers: same initial weights per seed, per-sample noise streams); measure on
every target x

    F(x; θ_Sⱼ) = (1/|𝒯|) Σ_{t∈𝒯} ‖ε_θ(√ᾱ_t x + √(1−ᾱ_t) ε_{x,t}, t) − ε_{x,t}‖² / d

with 𝒯 every (T/K_F)-th timestep and ε_{x,t} keyed by (MEASUREMENT_KEY, seed, x) — the same in
every subset model and independent of the attribution noise. F is averaged over seeds.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.data import sample_subsets
from diffattr.diffusion.schedule import MEASUREMENT_KEY, NoiseSchedule
from diffattr.errors import DiffattrError
from diffattr.evaluation.stats import spearman_columns
from diffattr.families import family_of, get_family
from diffattr.fsio import atomic_write, atomic_write_npz, claim_manifest
from diffattr.parallel import Executor
from diffattr.run import UNCONDITIONAL, RunDir
from diffattr.seeding import generator

VAL, GEN = 0, 1
KIND_NAMES = {VAL: "val", GEN: "gen"}


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
        xt = schedule.add_noise(images[rows], eps, t)
        target = schedule.target(images[rows], eps, t)  # ε for an ε-prediction model
        cond = () if conditioning is None else (conditioning[rows].to(dev),)
        pred = model(xt.to(dev), t.to(dev), *cond).sample
        err = (pred - target.to(dev)).pow(2).flatten(1).mean(1).double().cpu()
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
    family: str = UNCONDITIONAL  # the run's model family: how to retrain and load


def run_subset_job(job: SubsetJob) -> str:
    """Train the subset model (resuming), measure F on the targets, write ``F.npy``."""
    from diffattr.attribution.features.gradients import resolve_device

    out = Path(job.out_dir)
    f_path = out / "F.npy"
    if f_path.is_file():
        return str(f_path)
    device = resolve_device(job.device)
    family = get_family(job.family)
    config = replace(family.config_from_dict(job.train), keep_checkpoints=False)
    dataset = family.retrain_set(job.data)
    model_dir = family.train_model(dataset, config, out, job.subset, device=device)
    with np.load(job.targets_path) as targets:
        images, keys = torch.from_numpy(targets["images"]), targets["keys"]
        cond = None
        if "conditioning" in targets.files:
            cond = torch.from_numpy(targets["conditioning"])
    values = measure_loss(
        family.load_trained(config, model_dir).to(device), images, keys,
        job.measure_timesteps, job.measure_seed, config.schedule, conditioning=cond,
    )  # fmt: skip
    atomic_write(f_path, lambda f: np.save(f, values))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return str(f_path)


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

    The run's family retrains (a text-to-image run by LoRA fine-tuning, measuring F in latent
    space under each target's caption).
    """
    family = family_of(run)
    bench = Path(bench_dir)
    bench.mkdir(parents=True, exist_ok=True)
    spec, train_config = run.data_spec(), family.train_config(run)
    train_set, val_set = spec.load()
    manifest = {
        "config": config.to_dict(),
        "data": asdict(spec),
        "train": train_config.to_dict(),
        "dataset_fingerprint": train_set.fingerprint(),
        "run": str(run.path),
    }
    manifest.update(family=family.name, **family.benchmark_fields(run))
    keys = ("config", "data", "train", "dataset_fingerprint")
    claim_manifest(bench / "lds.json", manifest, keys, "an LDS benchmark")

    subsets = sample_subsets(
        len(train_set), config.num_subsets, config.fraction, config.subset_seed
    )
    if not (bench / "subsets.npy").is_file():
        atomic_write(bench / "subsets.npy", lambda f: np.save(f, subsets))
    targets_path = bench / "targets.npz"
    if not targets_path.is_file():
        write_targets(run, val_set, config, targets_path, progress)

    data = family.job_data(run)
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
            family.name,
        )
        for s in config.seeds
        for j in range(config.num_subsets)
    ]
    finished = lambda job: (Path(job.out_dir) / "F.npy").is_file()  # noqa: E731
    executor.run_pending(run_subset_job, jobs, finished, "lds: retrain subsets")
    F_t = np.stack(
        [
            np.stack([np.load(Path(j.out_dir) / "F.npy") for j in jobs if j.train["seed"] == s])
            for s in config.seeds
        ]
    ).astype(np.float32)  # (seeds, M, T, K_F)
    atomic_write_npz(bench / "ground_truth.npz", F_t=F_t)
    return bench


def write_targets(
    run: RunDir, val_set, config: LDSConfig, path: Path, progress: bool = True
) -> None:
    """Held-out real images (val) and images generated by the run's model with recorded seeds
    (in the family's space: latents with caption embeddings for a text-to-image run)."""
    n_val = min(config.num_val, len(val_set))
    seeds = np.arange(config.gen_seed, config.gen_seed + config.num_gen)
    arrays = family_of(run).lds_targets(run, val_set, n_val, seeds, progress)
    kinds = np.concatenate([np.full(n_val, VAL), np.full(config.num_gen, GEN)])
    ids = np.concatenate([val_set.ids[:n_val].numpy(), np.arange(config.num_gen)])
    keys = np.array([target_key(k, i) for k, i in zip(kinds, ids, strict=True)], dtype=np.int64)
    seeds_all = np.concatenate([np.full(n_val, -1), seeds])
    atomic_write_npz(path, **arrays, kinds=kinds, ids=ids, keys=keys, seeds=seeds_all)


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


def seed_agreement(gt: GroundTruth) -> np.ndarray:
    """Per target, the Spearman correlation over subsets of F under one seed vs another
    (averaged over seed pairs): how well one seed's retrainings predict another's."""
    if gt.F.shape[0] < 2:
        return np.full(gt.F.shape[2], np.nan)
    vals = [
        spearman_columns(gt.F[a], gt.F[b])
        for a in range(gt.F.shape[0])
        for b in range(a + 1, gt.F.shape[0])
    ]
    return np.mean(vals, axis=0)


def noise_ceiling(gt: GroundTruth) -> np.ndarray:
    """Per target, the highest correlation any prediction can have with the seed-averaged F.

    F averaged over S seeds has reliability ρ_S = S·r / (1 + (S − 1)·r) (Spearman–Brown, r the
    agreement of two seeds); a predictor that knows the true F exactly correlates with the
    average at √ρ_S, so the ceiling is √ρ_S (r clipped to [0, 1]). It bounds the LDS, which is
    taken against the average; the single-seed agreement r (:func:`seed_agreement`) does not.
    """
    S = gt.F.shape[0]
    r = np.clip(seed_agreement(gt), 0.0, 1.0)
    return np.sqrt(S * r / (1.0 + (S - 1) * r))
