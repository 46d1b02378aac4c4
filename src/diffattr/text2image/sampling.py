"""Text-to-image sampling with recorded seeds, prompts and initial latents.

Image i starts from z_T = noise keyed by (SAMPLING_KEY, seed_i) (as for unconditional runs),
is denoised by DDIM (η = 0, deterministic) under its prompt with classifier-free guidance
ε = ε_θ(z_t, t, ∅) + w·(ε_θ(z_t, t, h(c)) − ε_θ(z_t, t, ∅)) (w = 1: the conditional output
alone), and decoded by the VAE. ``samples.npz`` records seeds, prompts, the initial and final
latents, the guidance scale and the batch size, so any image regenerates bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr.diffusion.sampling import Samples, initial_noise, load_samples, save_samples
from diffattr.errors import ConfigError, DataError
from diffattr.text2image.latents import decode_latents
from diffattr.text2image.pipeline import Components, encode_prompts


@dataclass
class TextSamples:
    """Generated images (decoded, [-1, 1]) with their prompts and latents."""

    samples: Samples  # images, seeds, initial latents (initial_noise), sampler settings
    prompts: list[str]
    latents: torch.Tensor  # final z₀ of each image (what attribution looks at)
    guidance_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.samples)


@torch.no_grad()
def generate(
    components: Components,
    unet: torch.nn.Module,
    prompts: list[str],
    seeds: np.ndarray | list[int],
    resolution: int,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
) -> TextSamples:
    """One image per (prompt, seed) pair with DDIM under ``unet`` (base + LoRA)."""
    seeds = np.asarray(seeds, dtype=np.int64)
    if seeds.size == 0 or len(prompts) != seeds.size:
        raise ConfigError(f"need one prompt per seed, got {len(prompts)} and {seeds.size}")
    if num_steps < 1 or num_steps > components.schedule.num_train_timesteps:
        raise ConfigError(f"--steps must be in [1, {components.schedule.num_train_timesteps}]")
    shape = components.latent_shape(resolution)
    z_init = initial_noise(seeds, shape)
    cond = encode_prompts(components, list(prompts))
    uncond = encode_prompts(components, [""]) if guidance_scale != 1.0 else None
    unet.eval()
    outs = []
    timesteps = None
    bar = tqdm(total=len(seeds), desc="generate (ddim)", disable=not progress, unit="img")
    for s in range(0, len(seeds), batch_size):
        # Stable Diffusion's DDIM settings: latents unclipped, final ᾱ of step −1
        scheduler = components.schedule.scheduler(
            "ddim", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.numpy().copy()
        z = z_init[s : s + batch_size].clone()
        c = cond[s : s + batch_size]
        for t in scheduler.timesteps:
            eps = unet(z, t, c).sample
            if uncond is not None:
                eps_u = unet(z, t, uncond.expand(z.shape[0], -1, -1)).sample
                eps = eps_u + guidance_scale * (eps - eps_u)
            z = scheduler.step(eps, t, z, eta=0.0).prev_sample
        outs.append(z)
        bar.update(z.shape[0])
    bar.close()
    latents = torch.cat(outs)
    samples = Samples(
        images=decode_latents(components, latents),
        seeds=seeds,
        initial_noise=z_init,
        sampler="ddim",
        num_steps=num_steps,
        timesteps=np.asarray(timesteps, dtype=np.int64),
        batch_size=batch_size,
    )
    return TextSamples(samples, list(prompts), latents, float(guidance_scale))


def save_text_samples(result: TextSamples, out_dir: str | Path, model_fingerprint: str) -> Path:
    """``samples.npz`` (as :func:`~diffattr.diffusion.sampling.save_samples`, plus prompts,
    final latents and guidance scale), PNGs and a grid."""
    extra = {
        "prompts": np.asarray(result.prompts, dtype=np.str_),
        "latents": result.latents.numpy().astype(np.float32),
        "guidance_scale": np.array(result.guidance_scale),
    }
    return save_samples(result.samples, out_dir, model_fingerprint, extra=extra)


def load_text_samples(path: str | Path) -> TextSamples:
    """Read a ``samples.npz`` written by :func:`save_text_samples`."""
    samples = load_samples(path)
    with np.load(path, allow_pickle=False) as z:
        if "prompts" not in z.files or "latents" not in z.files:
            raise DataError(
                f"{path} records no prompts or latents",
                hint="generate the targets of a text-to-image run with `diffattr generate`",
            )
        prompts = [str(p) for p in z["prompts"].tolist()]
        latents = torch.from_numpy(z["latents"])
        scale = float(z["guidance_scale"]) if "guidance_scale" in z.files else 1.0
    return TextSamples(samples, prompts, latents, scale)
