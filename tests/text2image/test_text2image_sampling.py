"""Prompted sampling: recorded seeds, prompts and initial latents regenerate bit-identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.diffusion.sampling import initial_noise
from diffattr.errors import ConfigError, DataError
from diffattr.text2image.sampling import generate, load_text_samples, save_text_samples


def test_regeneration_from_recorded_seed_and_prompt_is_bit_identical(components, tmp_path):
    unet = components.unet
    prompts = ["a red square", "a blue square", "a red square"]
    first = generate(components, unet, prompts, [5, 6, 7], 16, num_steps=6, batch_size=2,
                     guidance_scale=2.0, progress=False)  # fmt: skip
    assert first.samples.images.shape == (3, 3, 16, 16) and first.latents.shape == (3, 4, 8, 8)
    save_text_samples(first, tmp_path, "fp")
    rec = load_text_samples(tmp_path / "samples.npz")
    assert rec.prompts == prompts and rec.guidance_scale == 2.0
    assert torch.equal(rec.samples.initial_noise, initial_noise(np.array([5, 6, 7]), (4, 8, 8)))
    again = generate(
        components, unet, rec.prompts, rec.samples.seeds, 16, num_steps=rec.samples.num_steps,
        guidance_scale=rec.guidance_scale, batch_size=rec.samples.batch_size, progress=False,
    )  # fmt: skip
    assert torch.equal(again.latents, rec.latents)
    assert torch.equal(again.samples.images, rec.samples.images)
    # the prompt matters: same seed, other prompt, other image
    other = generate(components, unet, ["a green square"], [5], 16, num_steps=6,
                     guidance_scale=2.0, progress=False)  # fmt: skip
    assert not torch.equal(other.latents[0], first.latents[0])


def test_sampling_inputs_are_checked(components, tmp_path):
    with pytest.raises(ConfigError, match="one prompt per seed"):
        generate(components, components.unet, ["a"], [1, 2], 16, progress=False)
    with pytest.raises(ConfigError, match="multiple"):
        generate(components, components.unet, ["a"], [1], 15, progress=False)
    np.savez(tmp_path / "plain.npz", images=np.zeros((1, 3, 4, 4), np.float32), seeds=[0],
             initial_noise=np.zeros((1, 4, 2, 2), np.float32))  # fmt: skip
    with pytest.raises(DataError, match="prompts"):
        load_text_samples(tmp_path / "plain.npz")
