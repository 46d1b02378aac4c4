"""DDIM / DDPM sampling with one seed per image, so any image can be regenerated exactly.

Image i starts from x_T = noise keyed by (SAMPLING_KEY, seed_i); DDPM's per-step noise is keyed
by (SAMPLING_KEY, seed_i, step). No random draw depends on which images share a batch; the
arithmetic does slightly (batched convolutions round differently, ≈1e-5), so bit-identical
regeneration uses the recorded ``batch_size`` and the same seeds in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from diffattr.data import make_grid, save_png
from diffattr.diffusion.schedule import SAMPLING_KEY, NoiseSchedule
from diffattr.errors import ConfigError, DataError
from diffattr.fsio import atomic_write_npz
from diffattr.seeding import generator


@dataclass
class Samples:
    """Generated images with everything needed to regenerate them.

    ``trajectory`` (optional) holds x_t before each denoising step, (steps, N, C, H, W), with
    ``timesteps`` the t of each step: the sampling path Journey-TRAK attributes along.
    """

    images: torch.Tensor
    seeds: np.ndarray
    initial_noise: torch.Tensor
    sampler: str
    num_steps: int
    timesteps: np.ndarray
    trajectory: torch.Tensor | None = None
    batch_size: int = 64

    def __len__(self) -> int:
        return int(self.images.shape[0])


def initial_noise(seeds: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """x_T for each seed: standard normal keyed by (SAMPLING_KEY, seed)."""
    return torch.stack(
        [torch.randn(shape, generator=generator(SAMPLING_KEY, int(s))) for s in seeds]
    )


@torch.no_grad()
def sample(
    model: UNet2DModel,
    seeds: np.ndarray | list[int],
    schedule: NoiseSchedule | None = None,
    sampler: str = "ddim",
    num_steps: int = 50,
    batch_size: int = 64,
    record_trajectory: bool = False,
    progress: bool = True,
) -> Samples:
    """Generate one image per seed with DDIM (η = 0, deterministic) or DDPM."""
    schedule = schedule or NoiseSchedule()
    seeds = np.asarray(seeds, dtype=np.int64)
    if seeds.size == 0:
        raise ConfigError("no seeds given: generate at least one image")
    if sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"unknown sampler {sampler!r}", hint="use 'ddim' or 'ddpm'")
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x_init = initial_noise(seeds, shape)
    model.eval()
    device = next(model.parameters()).device  # sample where the model is; results on CPU
    outs, trajs = [], []
    timesteps = None
    starts = range(0, len(seeds), batch_size)
    bar = tqdm(total=len(seeds), desc=f"generate ({sampler})", disable=not progress, unit="img")
    for start in starts:
        sl = slice(start, start + batch_size)
        scheduler = schedule.scheduler(sampler)
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.numpy().copy()
        x = x_init[sl].clone().to(device)
        batch_seeds = seeds[sl]
        traj = []
        for k, t in enumerate(scheduler.timesteps):
            if record_trajectory:
                traj.append(x.cpu().clone())
            eps = model(x, t).sample
            if sampler == "ddim":
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            else:
                gens = [generator(SAMPLING_KEY, int(s), k + 1) for s in batch_seeds]
                x = scheduler.step(eps, t, x, generator=gens).prev_sample
        outs.append(x.clamp(-1, 1).cpu())
        if record_trajectory:
            trajs.append(torch.stack(traj))
        bar.update(len(batch_seeds))
    bar.close()
    return Samples(
        images=torch.cat(outs),
        seeds=seeds,
        initial_noise=x_init,
        sampler=sampler,
        num_steps=num_steps,
        timesteps=np.asarray(timesteps, dtype=np.int64),
        trajectory=torch.cat(trajs, dim=1) if record_trajectory else None,
        batch_size=batch_size,
    )


def save_samples(
    samples: Samples,
    out_dir: str | Path,
    model_fingerprint: str = "",
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``samples.npz`` (images, seeds, initial noise, sampler settings, and any ``extra``
    arrays such as prompts), PNGs and a grid."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    arrays = {
        "images": samples.images.numpy().astype(np.float32),
        "seeds": samples.seeds,
        "initial_noise": samples.initial_noise.numpy().astype(np.float32),
        "timesteps": samples.timesteps,
        "sampler": np.array(samples.sampler),
        "num_steps": np.array(samples.num_steps),
        "batch_size": np.array(samples.batch_size),
        "model_fingerprint": np.array(model_fingerprint),
        "ids": np.arange(len(samples), dtype=np.int64),
    }
    if samples.trajectory is not None:
        arrays["trajectory"] = samples.trajectory.numpy().astype(np.float32)
    arrays.update(extra or {})
    atomic_write_npz(out_dir / "samples.npz", **arrays)
    for i, img in enumerate(samples.images):
        save_png(img, out_dir / "images" / f"{i:04d}-seed{int(samples.seeds[i])}.png")
    nrow = int(np.ceil(np.sqrt(len(samples))))
    save_png(
        make_grid(samples.images, nrow=nrow),
        out_dir / "grid.png",
        scale=max(1, 64 // samples.images.shape[-1]),
    )
    return out_dir / "samples.npz"


def load_samples(path: str | Path) -> Samples:
    """Read a ``samples.npz`` written by :func:`save_samples`."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read generated samples {path}: {exc}") from exc
    for key in ("images", "seeds", "initial_noise"):
        if key not in z.files:
            raise DataError(
                f"{path} has no recorded {key!r}",
                hint="regenerate the targets with `diffattr generate`, which records seeds",
            )
    return Samples(
        images=torch.from_numpy(z["images"]),
        seeds=z["seeds"],
        initial_noise=torch.from_numpy(z["initial_noise"]),
        sampler=str(z["sampler"]) if "sampler" in z.files else "ddim",
        num_steps=int(z["num_steps"]) if "num_steps" in z.files else 50,
        timesteps=z["timesteps"] if "timesteps" in z.files else np.empty(0, dtype=np.int64),
        trajectory=torch.from_numpy(z["trajectory"]) if "trajectory" in z.files else None,
        batch_size=int(z["batch_size"]) if "batch_size" in z.files else 64,
    )
